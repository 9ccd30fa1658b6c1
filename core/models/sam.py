"""SAM through ``segment_anything``: vit_b / vit_l / vit_h + checkpoint file, or a preset.

``sam-vit-b-random`` / ``sam-vit-h-random``: the real builders with random weights (see ``presets``).

Weights are always read by us with ``torch.load(weights_only=True)`` (the upstream builder's own
loader is bypassed). The tiny preset uses the same builder (``_build_sam``) with a 2-block, 32-wide
image encoder; prompt encoder and mask decoder keep SAM's fixed sizes.

``load_sam("tiny", checkpoint=PATH)`` loads a pre-trained tiny SAM (``negdpo pretrain-sam``): the
architecture (input size, encoder and decoder widths) is read from the JSON next to the weights
(``PATH`` with suffix ``.json``, see :func:`build_sam_arch`); without that file the tiny preset's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from .common import ModelNotAvailableError, build_once, cache_home, seeded

SAM_CHECKPOINTS = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth",
                   "vit_h": "sam_vit_h_4b8939.pth"}
SAM_KINDS = {"sam-vit-b-random": "vit_b", "sam-vit-h-random": "vit_h"}  # real-size presets
TINY_SAM = {"encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
            "encoder_global_attn_indexes": [1]}


ARCH_DEFAULTS = {"img_size": 1024, "patch_size": 16, "window_size": 14, "prompt_embed_dim": 256,
                 "decoder_mlp_dim": 2048, "decoder_num_heads": 8, "iou_head_hidden_dim": 256, "mask_in_chans": 16,
                 **TINY_SAM}


def build_sam_arch(arch: dict | None = None):
    """A random-init ``segment_anything`` ``Sam`` from SAM's own modules, any size: ``arch`` overrides
    ``ARCH_DEFAULTS`` (the tiny preset at SAM's 1024-px input). Unknown keys raise."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    a = dict(ARCH_DEFAULTS)
    unknown = set(arch or {}) - set(a)
    if unknown:
        raise ValueError(f"unknown SAM architecture keys {sorted(unknown)}; known: {sorted(a)}")
    a.update(arch or {})
    grid = a["img_size"] // a["patch_size"]
    dim = a["prompt_embed_dim"]
    encoder = ImageEncoderViT(
        depth=a["encoder_depth"], embed_dim=a["encoder_embed_dim"], img_size=a["img_size"], mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a["encoder_num_heads"],
        patch_size=a["patch_size"], qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=tuple(a["encoder_global_attn_indexes"]), window_size=a["window_size"], out_chans=dim)
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                           input_image_size=(a["img_size"], a["img_size"]), mask_in_chans=a["mask_in_chans"])
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=dim, mlp_dim=a["decoder_mlp_dim"], num_heads=a["decoder_num_heads"]),
        transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=a["iou_head_hidden_dim"])
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


def arch_path(checkpoint: str | Path) -> Path:
    """The architecture JSON saved next to a tiny-SAM checkpoint: same name, suffix ``.json``."""
    return Path(checkpoint).with_suffix(".json")


def save_sam(model, arch: dict, path: str | Path) -> Path:
    """Write ``model``'s weights (``torch.save`` of the state dict) and ``arch`` (JSON) next to them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
    arch_path(path).write_text(json.dumps(arch, indent=1, sort_keys=True))
    return path


def _build_tiny_sam(folder: Path, final: Path) -> None:
    from segment_anything.build_sam import _build_sam

    with seeded(0):
        model = _build_sam(checkpoint=None, **TINY_SAM)
    torch.save(model.state_dict(), folder / "sam_tiny.pth")


def sam_model(kind: str):
    """``segment_anything`` builder for ``vit_b`` / ``vit_l`` / ``vit_h``, no checkpoint, seeded."""
    from segment_anything import sam_model_registry

    with seeded(0):
        return sam_model_registry[kind](checkpoint=None)


def write_sam(kind: str) -> Callable[[Path, Path], None]:
    def write(folder: Path, final: Path) -> None:
        torch.save(sam_model(kind).state_dict(), folder / SAM_CHECKPOINTS[kind])
    return write


def _search_paths(model_type: str) -> list[Path]:
    fname = SAM_CHECKPOINTS[model_type]
    env = os.environ.get("SAM_CHECKPOINT_DIR")
    dirs = ([Path(env)] if env else []) + [Path("checkpoints"), cache_home() / "checkpoints"]
    return [d / fname for d in dirs]


def resolve_sam(name: str, checkpoint: str | Path | None = None) -> tuple[str, Path]:
    """(model type, checkpoint path) for ``tiny`` (+ optional pre-trained checkpoint), ``sam-vit-b-random``, ``sam-vit-h-random`` or
    ``vit_b|vit_l|vit_h`` (+ optional explicit path)."""
    if name == "tiny":
        if checkpoint:
            if not Path(checkpoint).is_file():
                raise ModelNotAvailableError(f"tiny SAM checkpoint {checkpoint} does not exist")
            return "tiny", Path(checkpoint)
        return "tiny", build_once("tiny-sam", _build_tiny_sam) / "sam_tiny.pth"
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
        f"{SAM_CHECKPOINTS[name]} from the segment-anything release page and pass --sam_checkpoint PATH "
        "(or put it in ./checkpoints or $SAM_CHECKPOINT_DIR), or use --sam tiny.")


def load_sam(name: str = "tiny", checkpoint: str | Path | None = None, device: str | torch.device = "cpu"):
    """A ``segment_anything.modeling.Sam`` in eval mode."""
    from segment_anything import sam_model_registry
    from segment_anything.build_sam import _build_sam

    model_type, path = resolve_sam(name, checkpoint)
    if model_type == "tiny" and arch_path(path).is_file():
        model = build_sam_arch(json.loads(arch_path(path).read_text()))
    elif model_type == "tiny":
        model = _build_sam(checkpoint=None, **TINY_SAM)
    else:
        model = sam_model_registry[model_type]()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
