"""Deprecated alias of :mod:`negdpo.segmentation.prompt_free` (renamed: "generator" names only the negative
generator). Kept for one release; it re-exports the package, its submodules and the old names, and warns."""

from __future__ import annotations

import importlib
import sys
import warnings

from .prompt_free import *  # noqa: F403
from .prompt_free import PromptFreeConfig, PromptFreeSegmenter, load_prompt_free, save_prompt_free

warnings.warn("negdpo.segmentation.prompt_generator is deprecated; import negdpo.segmentation.prompt_free",
              DeprecationWarning, stacklevel=2)

# the old names of the renamed objects
GeneratorConfig = PromptFreeConfig
PromptGeneratorSegmenter = PromptFreeSegmenter
load_prompt_generator = load_prompt_free
save_prompt_generator = save_prompt_free

# ``import negdpo.segmentation.prompt_generator.train`` finds the renamed submodule (one module object, not a copy)
for _sub in ("data", "evaluation", "inference", "matching", "model", "train"):
    sys.modules[f"{__name__}.{_sub}"] = importlib.import_module(f"{__package__}.prompt_free.{_sub}")
