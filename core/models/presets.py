"""Offline presets: the real models' exact architectures (random init) and the tiny test models.

=====================  =========  ==================================================================
preset                 role       architecture
=====================  =========  ==================================================================
``sd15-inpaint-random`` diffusion  SD-1.5 inpainting: 9-channel UNet 320-640-1280-1280, SD VAE,
                                   CLIP ViT-L/14 text encoder, 49,408-token BPE tokenizer (built here)
``biomedclip-random``  clip       BiomedCLIP's open_clip config: timm ViT-B/16 at 224 px (linear
                                   projection to 512) + BERT-base text tower (PubMedBERT's sizes,
                                   30,522-token vocabulary, MLP projection), context length 256
``sam-vit-b-random``   sam        ``segment_anything`` ViT-B builder
``sam-vit-h-random``   sam        ``segment_anything`` ViT-H builder
``tiny*``              all        small models of the same families (tests, CPU demos)
=====================  =========  ==================================================================

Each preset is written once (seeded, without touching the caller's random state) under
``NEGDPO_HOME/presets`` in the layout real weights have (diffusers folder, open_clip ``local-dir:``
folder, SAM ``.pth``) and loads through the same loaders. Architectures and writers live with their
family's loader (``clip``, ``diffusion``, ``sam``); this module is the registry above them:
:func:`param_counts` counts a preset's parameters per component on the meta device (no memory).
Random weights: for speed, memory and plumbing only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .clip import (
    BIOMEDCLIP_CONTEXT,
    PUBMEDBERT,
    TINY_BERT,
    TINY_CONTEXT,
    _write_bert,
    biomedclip_model,
    biomedclip_model_cfg,
    tiny_clip_model,
    write_biomedclip,
)
from .diffusion import sd15_components, tiny_sd_components, write_sd15_inpaint
from .sam import TINY_SAM, sam_model, write_sam
from .vocab import write_clip_bpe

__all__ = ["BIOMEDCLIP_CONTEXT", "PRESETS", "PUBMEDBERT", "Preset", "biomedclip_model_cfg", "get_preset",
           "param_counts", "write_biomedclip", "write_sam", "write_sd15_inpaint"]


# --- components per preset (counted on the meta device) ------------------------------------------------

def clip_components(model) -> dict[str, torch.nn.Module]:
    return {"image": model.visual, "text": model.text, "logit_scale": _ParamHolder(model.logit_scale)}


class _ParamHolder(torch.nn.Module):
    def __init__(self, p: torch.nn.Parameter) -> None:
        super().__init__()
        self.p = p


def sam_components(model) -> dict[str, torch.nn.Module]:
    return {"image_encoder": model.image_encoder, "prompt_encoder": model.prompt_encoder,
            "mask_decoder": model.mask_decoder}


# --- registry and counting ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    name: str
    role: str  # diffusion | clip | sam
    summary: str
    components: Callable[[], dict[str, torch.nn.Module]]  # builds the modules (called on the meta device)


def _tiny_sd(in_channels: int) -> Callable[[], dict[str, torch.nn.Module]]:
    def build() -> dict[str, torch.nn.Module]:
        with tempfile.TemporaryDirectory() as d:
            return tiny_sd_components(in_channels, write_clip_bpe(Path(d)))
    return build


def _clip_with_bert(model_fn: Callable[[Path], object], bert: dict, context: int, vocab_size: int | None):
    def build() -> dict[str, torch.nn.Module]:
        with tempfile.TemporaryDirectory() as d:
            with torch.device("cpu"):  # the config/tokenizer files, not the model
                _write_bert(Path(d), bert, context, vocab_size)
            return clip_components(model_fn(Path(d)))
    return build


def _tiny_clip() -> dict[str, torch.nn.Module]:
    return _clip_with_bert(tiny_clip_model, TINY_BERT, TINY_CONTEXT, None)()


def _tiny_sam() -> dict[str, torch.nn.Module]:
    from segment_anything.build_sam import _build_sam

    return sam_components(_build_sam(checkpoint=None, **TINY_SAM))


PRESETS: tuple[Preset, ...] = (
    Preset("sd15-inpaint-random", "diffusion", "SD-1.5 inpainting architecture (9-ch UNet, SD VAE, CLIP ViT-L/14 text)",
           lambda: sd15_components()),
    Preset("biomedclip-random", "clip", "BiomedCLIP architecture (ViT-B/16 224 px + PubMedBERT-sized BERT, ctx 256)",
           _clip_with_bert(biomedclip_model, PUBMEDBERT, BIOMEDCLIP_CONTEXT, PUBMEDBERT["vocab_size"])),
    Preset("sam-vit-b-random", "sam", "SAM ViT-B (segment_anything builder)", lambda: sam_components(sam_model("vit_b"))),
    Preset("sam-vit-h-random", "sam", "SAM ViT-H (segment_anything builder)", lambda: sam_components(sam_model("vit_h"))),
    Preset("tiny", "diffusion", "tiny SD inpainting (9-ch UNet 32-64, 64 px)", _tiny_sd(9)),
    Preset("tiny-txt2img", "diffusion", "tiny SD with a 4-ch UNet (img2img mode)", _tiny_sd(4)),
    Preset("tiny", "clip", "tiny BiomedCLIP-family CLIP (timm test_vit + 2-layer BERT)", _tiny_clip),
    Preset("tiny", "sam", "tiny SAM (2-block 32-wide encoder; SAM's prompt encoder and mask decoder)", _tiny_sam),
)


def get_preset(name: str, role: str) -> Preset:
    for p in PRESETS:
        if p.name == name and p.role == role:
            return p
    raise KeyError(f"no {role} preset '{name}'")


def param_counts(preset: Preset) -> dict[str, int]:
    """Parameters per component, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        comps = preset.components()
    return {name: sum(p.numel() for p in m.parameters()) for name, m in comps.items()}
