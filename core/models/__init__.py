"""Model loading for the three models of the pipeline (CLIP, SAM, SD inpainting).

Each ``resolve_*`` turns a user-facing name into something the ecosystem's own loader takes:
``"tiny"`` builds (once, seeded, cached under ``NEGDPO_HOME``) a small random-init model with the
same architecture; hub ids and local paths are checked and passed through. Offline with no local
copy, a ``ModelNotAvailableError`` says which model, where it looked and how to point at a copy.
"""

from .clip import BIOMEDCLIP, load_clip, resolve_clip
from .common import ModelNotAvailableError, cache_home
from .diffusion import SD_INPAINTING, load_inpaint_pipeline, resolve_diffusion
from .sam import SAM_CHECKPOINTS, load_sam, resolve_sam

__all__ = [
    "BIOMEDCLIP", "SAM_CHECKPOINTS", "SD_INPAINTING", "ModelNotAvailableError", "cache_home",
    "load_clip", "load_inpaint_pipeline", "load_sam", "resolve_clip", "resolve_diffusion", "resolve_sam",
]
