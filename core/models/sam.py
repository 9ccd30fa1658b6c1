"""SAM through ``segment_anything``: vit_b / vit_l / vit_h + checkpoint file, or a preset.

``sam-vit-b-random`` / ``sam-vit-h-random``: the real builders with random weights (see ``presets``).

Weights are always read by us with ``torch.load(weights_only=True)`` (the upstream builder's own
loader is bypassed). The tiny preset uses the same builder (``_build_sam``) with a 2-block, 32-wide
image encoder; prompt encoder and mask decoder keep SAM's fixed sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import ModelNotAvailableError, build_once, cache_home

SAM_CHECKPOINTS = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth",
                   "vit_h": "sam_vit_h_4b8939.pth"}
TINY_SAM = {"encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
            "encoder_global_attn_indexes": [1]}


def _build_tiny_sam(folder: Path, final: Path) -> None:
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    model = _build_sam(checkpoint=None, **TINY_SAM)
    torch.save(model.state_dict(), folder / "sam_tiny.pth")


def _search_paths(model_type: str) -> list[Path]:
    fname = SAM_CHECKPOINTS[model_type]
    env = os.environ.get("SAM_CHECKPOINT_DIR")
    dirs = ([Path(env)] if env else []) + [Path("checkpoints"), cache_home() / "checkpoints"]
    return [d / fname for d in dirs]


def resolve_sam(name: str, checkpoint: str | Path | None = None) -> tuple[str, Path]:
    """(model type, checkpoint path) for ``tiny``, ``sam-vit-b-random``, ``sam-vit-h-random`` or
    ``vit_b|vit_l|vit_h`` (+ optional explicit path)."""
    if name == "tiny":
        return "tiny", build_once("tiny-sam", _build_tiny_sam) / "sam_tiny.pth"
    from .presets import SAM_KINDS, write_sam

    if name in SAM_KINDS:
        kind = SAM_KINDS[name]
        return kind, build_once(name, write_sam(kind)) / SAM_CHECKPOINTS[kind]
    if name not in SAM_CHECKPOINTS:
        raise ModelNotAvailableError(f"unknown SAM model '{name}': use tiny, sam-vit-b-random, sam-vit-h-random, vit_b, vit_l or vit_h")
    candidates = [Path(checkpoint)] if checkpoint else _search_paths(name)
    for path in candidates:
        if path.is_file():
            return name, path
    raise ModelNotAvailableError(
        f"SAM {name} checkpoint not found: looked at {', '.join(str(c) for c in candidates)}. Download "
        f"{SAM_CHECKPOINTS[name]} from the segment-anything release page and pass --sam-checkpoint PATH "
        "(or put it in ./checkpoints or $SAM_CHECKPOINT_DIR), or use --sam tiny.")


def load_sam(name: str = "tiny", checkpoint: str | Path | None = None, device: str | torch.device = "cpu"):
    """A ``segment_anything.modeling.Sam`` in eval mode."""
    from segment_anything import sam_model_registry
    from segment_anything.build_sam import _build_sam

    model_type, path = resolve_sam(name, checkpoint)
    model = _build_sam(checkpoint=None, **TINY_SAM) if model_type == "tiny" else sam_model_registry[model_type]()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
