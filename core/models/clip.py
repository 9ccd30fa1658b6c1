"""BiomedCLIP through open_clip: ``hf-hub:`` id, ``local-dir:`` folder, or a preset.

``biomedclip-random`` is BiomedCLIP's exact architecture with random weights (see ``presets``).

The tiny preset is an open_clip ``local-dir:`` folder with BiomedCLIP's architecture family (timm
ViT patch16 at 224 px with CLS token, HF BERT text tower with CLS pooling and an MLP projection),
small and randomly initialised, so it loads through exactly the code path real weights use.
The vision trunk is timm's registered ``test_vit`` (so the folder loads with plain open_clip, no
import side effects); its position embedding is built for 160 px and interpolated to the 14 x 14
patch grid at 224 px (``dynamic_img_size``), whereas BiomedCLIP's is fixed at 14 x 14.

``tiny-wide`` is the same family, wider (for grounding text in the patch grid, docs/saliency_levers.md):
vision width 128 with 4 heads (timm model ``negdpo_tiny_wide_vit``, registered when this module is
imported, position embedding fixed at 14 x 14), joint embedding 64, BERT width 128 with 4 heads.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from .common import ModelNotAvailableError, build_once, hub_snapshot, seeded

logger = logging.getLogger(__name__)

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CONTEXT = 64
PUBMEDBERT = dict(  # microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract config.json (BERT-base sizes)
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, type_vocab_size=2)
BIOMEDCLIP_CONTEXT = 256


def biomedclip_model_cfg(bert_dir: Path | str, embed_dim: int = 512, timm_model: str = "vit_base_patch16_224",
                         context: int = BIOMEDCLIP_CONTEXT) -> dict:
    """BiomedCLIP's ``open_clip_config.json`` ``model_cfg`` with the text tower read from ``bert_dir``."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": timm_model, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(bert_dir), "hf_model_pretrained": False, "hf_tokenizer_name": str(bert_dir),
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": context},
    }


def _write_bert(folder: Path, bert: dict, context: int, vocab_size: int | None) -> None:
    from transformers import BertConfig, BertTokenizer

    from .vocab import write_bert_vocab

    n = write_bert_vocab(folder, vocab_size)
    BertConfig(**{**bert, "vocab_size": n}).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True,
                  model_max_length=max(context, bert["max_position_embeddings"])).save_pretrained(folder)


def biomedclip_model(bert_dir: Path):
    """The open_clip ``CustomTextCLIP`` of BiomedCLIP's config, text tower from ``bert_dir``, seeded."""
    import open_clip

    with seeded(0):
        return open_clip.CustomTextCLIP(**biomedclip_model_cfg(bert_dir))


def write_biomedclip(folder: Path, final: Path) -> None:
    """An open_clip ``local-dir:`` folder of BiomedCLIP's architecture (config points at ``final``)."""
    from safetensors.torch import save_file

    _write_bert(folder, PUBMEDBERT, BIOMEDCLIP_CONTEXT, PUBMEDBERT["vocab_size"])
    model = biomedclip_model(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    preprocess_cfg = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": biomedclip_model_cfg(final), "preprocess_cfg": preprocess_cfg}, indent=2))


TINY_WIDE_VIT = "negdpo_tiny_wide_vit"
TINY_WIDE_EMBED = 64
TINY_WIDE_BERT = dict(vocab_size=0, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=256, max_position_embeddings=TINY_CONTEXT, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1)


def _register_tiny_wide_vit() -> None:
    """timm ``negdpo_tiny_wide_vit``: ViT patch 16 at 224 px, width 128, depth 6, 4 heads, MLP ratio 3, CLS."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if TINY_WIDE_VIT in timm.list_models(TINY_WIDE_VIT):
        return

    def negdpo_tiny_wide_vit(pretrained: bool = False, **kwargs):
        from timm.models import PretrainedCfg

        args = dict(img_size=224, patch_size=16, embed_dim=128, depth=6, num_heads=4, mlp_ratio=3,
                    pretrained_cfg=PretrainedCfg(architecture=TINY_WIDE_VIT, input_size=(3, 224, 224)))
        return _create_vision_transformer(TINY_WIDE_VIT, pretrained=pretrained, **dict(args, **kwargs))

    negdpo_tiny_wide_vit.__module__ = __name__
    register_model(negdpo_tiny_wide_vit)


_register_tiny_wide_vit()


TINY_BERT = dict(vocab_size=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=TINY_CONTEXT, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def tiny_clip_model(bert_dir: Path):
    """The tiny preset's ``CustomTextCLIP`` (BiomedCLIP's config layout, small sizes), seeded."""
    import open_clip

    with seeded(0):
        return open_clip.CustomTextCLIP(**biomedclip_model_cfg(bert_dir, 32, "test_vit", TINY_CONTEXT))


def _build_small_clip(folder: Path, final: Path, bert: dict, embed: int, vit: str) -> None:
    import open_clip
    from safetensors.torch import save_file

    _write_bert(folder, bert, TINY_CONTEXT, None)
    with seeded(0):  # the temp folder's BERT
        model = open_clip.CustomTextCLIP(**biomedclip_model_cfg(folder, embed, vit, TINY_CONTEXT))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    preprocess_cfg = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": biomedclip_model_cfg(final, embed, vit, TINY_CONTEXT), "preprocess_cfg": preprocess_cfg},
        indent=2))


def _build_tiny_clip(folder: Path, final: Path) -> None:
    _build_small_clip(folder, final, TINY_BERT, 32, "test_vit")


def _build_tiny_wide_clip(folder: Path, final: Path) -> None:
    _build_small_clip(folder, final, TINY_WIDE_BERT, TINY_WIDE_EMBED, TINY_WIDE_VIT)


def resolve_clip(name: str) -> str:
    """Map ``tiny`` / ``tiny-wide`` / ``biomedclip-random`` / ``hf-hub:<id>`` / ``local-dir:<path>`` / a folder to an open_clip name."""
    if name == "tiny":
        return f"local-dir:{build_once('tiny-clip', _build_tiny_clip)}"
    if name == "tiny-wide":
        return f"local-dir:{build_once('tiny-wide-clip', _build_tiny_wide_clip)}"
    if name == "biomedclip-random":
        return f"local-dir:{build_once(name, write_biomedclip)}"
    if name.startswith("local-dir:") or Path(name).is_dir():
        path = Path(name.removeprefix("local-dir:"))
        if not (path / "open_clip_config.json").is_file():
            raise ModelNotAvailableError(
                f"CLIP checkpoint folder '{path}' has no open_clip_config.json; expected an open_clip "
                "local-dir folder (open_clip_config.json + open_clip_model.safetensors).")
        return f"local-dir:{path}"
    if name.startswith("hf-hub:"):
        hub_snapshot(name.removeprefix("hf-hub:"), "CLIP model", (
            "Download it where the hub is reachable (`huggingface-cli download "
            f"{name.removeprefix('hf-hub:')}`) and copy the cache, or pass `local-dir:/path/to/folder`, "
            "or use the offline preset `tiny`."))
        return name
    raise ModelNotAvailableError(
        f"unknown CLIP model '{name}': use 'tiny', 'tiny-wide', 'biomedclip-random', 'hf-hub:<org>/<repo>' or 'local-dir:<folder>'")


def _own_text_tower(model_name: str) -> dict:
    """``text_cfg`` override so a ``local-dir:`` folder holding its HF text tower's ``config.json`` uses it,
    whatever path its ``open_clip_config.json`` recorded (a moved or copied checkpoint); else ``{}``."""
    if not model_name.startswith("local-dir:"):
        return {}
    folder = Path(model_name.removeprefix("local-dir:"))
    text_cfg = json.loads((folder / "open_clip_config.json").read_text()).get("model_cfg", {}).get("text_cfg", {})
    recorded = text_cfg.get("hf_model_name")
    if not recorded or not (folder / "config.json").is_file() or Path(recorded).resolve() == folder.resolve():
        return {}
    return {"text_cfg": text_cfg | {"hf_model_name": str(folder.resolve()), "hf_model_pretrained": False}}


def load_clip(name: str = "tiny", device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) for a CLIP name; the model is in eval mode."""
    import open_clip

    model_name = resolve_clip(name)
    with open_clip_info_to_debug():
        model, preprocess = open_clip.create_model_from_pretrained(model_name, device=device,
                                                                   **_own_text_tower(model_name))
        tokenizer = open_clip.get_tokenizer(model_name)
    logger.debug("loaded CLIP %s", model_name)
    return model.eval(), preprocess, tokenizer


class _OpenClipInfoToDebug(logging.Filter):
    """open_clip logs its progress through the *root* logger (``logging.info``): a dozen ``INFO root``
    lines per load. Inside :func:`open_clip_info_to_debug` those records are re-logged at DEBUG under
    ``negdpo.core.models.clip`` instead (warnings and errors pass unchanged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.name == "root" and "open_clip" in record.pathname:
            logger.debug("open_clip: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def open_clip_info_to_debug() -> Iterator[None]:
    filt = _OpenClipInfoToDebug()
    root = logging.getLogger()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)
