"""BiomedCLIP through open_clip: ``hf-hub:`` id, ``local-dir:`` folder, or the ``tiny`` preset.

The tiny preset is an open_clip ``local-dir:`` folder with BiomedCLIP's architecture family (timm
ViT patch16 at 224 px with CLS token, HF BERT text tower with CLS pooling and an MLP projection),
small and randomly initialised, so it loads through exactly the code path real weights use.
The vision trunk is timm's registered ``test_vit`` (so the folder loads with plain open_clip, no
import side effects); its position embedding is built for 160 px and interpolated to the 14 x 14
patch grid at 224 px (``dynamic_img_size``), whereas BiomedCLIP's is fixed at 14 x 14.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .common import ModelNotAvailableError, build_once, hub_snapshot

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CONTEXT = 64


def _build_tiny_clip(folder: Path, final: Path) -> None:
    import open_clip
    from safetensors.torch import save_file
    from transformers import BertConfig, BertTokenizer

    from .vocab import write_bert_vocab

    vocab_size = write_bert_vocab(folder)
    BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=128, max_position_embeddings=TINY_CONTEXT, hidden_dropout_prob=0.1,
               attention_probs_dropout_prob=0.1).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True,
                  model_max_length=TINY_CONTEXT).save_pretrained(folder)

    def model_cfg(bert_dir: Path) -> dict:  # BiomedCLIP's open_clip_config layout, small sizes
        return {
            "embed_dim": 32,
            "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": str(bert_dir), "hf_model_pretrained": False,
                         "hf_tokenizer_name": str(bert_dir), "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": TINY_CONTEXT},
        }

    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**model_cfg(folder))  # built from the temp folder's BERT config
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    preprocess_cfg = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg(final), "preprocess_cfg": preprocess_cfg}, indent=2))


def resolve_clip(name: str) -> str:
    """Map ``tiny`` / ``hf-hub:<id>`` / ``local-dir:<path>`` / a bare folder to an open_clip model name."""
    if name == "tiny":
        return f"local-dir:{build_once('tiny-clip', _build_tiny_clip)}"
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
        f"unknown CLIP model '{name}': use 'tiny', 'hf-hub:<org>/<repo>' or 'local-dir:<folder>'")


def load_clip(name: str = "tiny", device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) for a CLIP name; the model is in eval mode."""
    import open_clip

    model_name = resolve_clip(name)
    model, preprocess = open_clip.create_model_from_pretrained(model_name, device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model.eval(), preprocess, tokenizer
