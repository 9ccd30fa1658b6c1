"""Model-side helpers for CLIP preference training: encoding with patch tokens, dropout off, tower
locking, LoRA (PEFT), reference handling and the open_clip ``local-dir:`` checkpoint writer."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import vision_trunk

VISION_LORA = r".*visual\.trunk\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
TEXT_LORA = r".*text\.transformer\.encoder\.layer\.\d+\.attention\.self\.(query|key|value)"


def unwrap(model: nn.Module) -> nn.Module:
    """The open_clip model under Accelerate/DDP and PEFT wrappers."""
    m = getattr(model, "module", model)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def disable_dropout(model: nn.Module) -> int:
    """Set p = 0 on every dropout module (TRL's ``disable_dropout``); returns how many were changed."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            mod.p = 0.0
            n += 1
    return n


def grid_size(model: nn.Module) -> tuple[int, int]:
    """Patch grid at the tower's input size (open_clip ``visual.image_size`` / timm patch size)."""
    trunk = vision_trunk(model)
    size = getattr(unwrap(model).visual, "image_size", None) or trunk.patch_embed.img_size
    patch = trunk.patch_embed.patch_size
    return (size[0] // patch[0], size[1] // patch[1])


def encode_images(model: nn.Module, images: torch.Tensor, with_tokens: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unit image embeddings (B, D) and, optionally, projected patch tokens (B, P, D).

    For timm towers the trunk runs once: tokens -> pooled head -> projection, as ``TimmModel.forward``.
    """
    m = unwrap(model)
    if not with_tokens:
        return F.normalize(m.encode_image(images), dim=-1), None
    trunk, head = m.visual.trunk, m.visual.head
    tokens = trunk.forward_features(images)
    emb = head(trunk.forward_head(tokens))
    patches = head(tokens[:, trunk.num_prefix_tokens:])
    return F.normalize(emb, dim=-1), patches


def encode_texts(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(unwrap(model).encode_text(tokens), dim=-1)


def lock_towers(model: nn.Module, lock_image: bool, lock_text: bool) -> None:
    """Freeze whole towers (``requires_grad=False``); LoRA layers added later stay trainable."""
    m = unwrap(model)
    if lock_image:
        m.visual.requires_grad_(False)
    if lock_text:
        m.text.requires_grad_(False)


def apply_lora(model: nn.Module, towers: str, rank: int = 8, alpha: int = 16, dropout: float = 0.0):
    """Wrap with PEFT LoRA on 'image', 'text' or 'both' towers (B = 0 init: policy == reference at start)."""
    from peft import LoraConfig, get_peft_model

    targets = {"image": [VISION_LORA], "text": [TEXT_LORA], "both": [VISION_LORA, TEXT_LORA]}[towers]
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules="|".join(f"({t})" for t in targets))
    return get_peft_model(model, cfg)


class CLIPReference:
    """Frozen reference similarities: a separate frozen copy, or the PEFT model with adapters disabled."""

    def __init__(self, policy: nn.Module, use_adapter_disable: bool) -> None:
        self.policy = policy
        self.copy: nn.Module | None = None
        if not use_adapter_disable:
            self.copy = copy.deepcopy(unwrap(policy)).eval().requires_grad_(False)

    @contextmanager
    def model(self):
        if self.copy is not None:
            yield self.copy
            return
        peft_model = getattr(self.policy, "module", self.policy)
        with peft_model.disable_adapter():
            yield peft_model

    @torch.no_grad()
    def sims(self, pos: torch.Tensor, neg: torch.Tensor, texts: torch.Tensor, scale: float,
             autocast=nullcontext) -> torch.Tensor:
        with self.model() as m, autocast():
            return pair_sims(m, pos, neg, texts, scale)[0].float()


def pair_sims(model: nn.Module, pos: torch.Tensor, neg: torch.Tensor, texts: torch.Tensor, scale: float,
              with_tokens: bool = False) -> tuple[torch.Tensor, dict]:
    """(B, 2, 2) scaled similarity blocks ``s(image_i, text_j)`` (0 = lesion, 1 = healthy) + features."""
    b = pos.shape[0]
    img, tok = encode_images(model, torch.cat([pos, neg]), with_tokens)
    txt = encode_texts(model, texts).view(b, 2, -1)  # interleaved (pos, neg) per pair
    img = torch.stack([img[:b], img[b:]], dim=1)  # (B, 2, D)
    sims = scale * torch.einsum("bid,bjd->bij", img, txt)
    return sims, {"img": img, "txt": txt, "tokens": tok}


LOCAL_TOWER = "."  # hf_model_name of a text tower saved in the checkpoint folder itself (not a Hub model)


def is_hub_id(name: str) -> bool:
    """``org/name`` (or a bare ``name``) on the Hugging Face Hub, as opposed to a local folder path."""
    path = Path(name)
    return not (path.is_absolute() or path.exists() or name.startswith((".", "~")) or name.count("/") > 1
                or "\\" in name)


def save_clip_checkpoint(model: nn.Module, source: str, out: str | Path) -> Path:
    """Write an open_clip ``local-dir:`` folder that loads after a move or copy: ``open_clip_config.json``
    (the source's), ``open_clip_model.safetensors``, and the HF text tower's ``config.json`` and tokenizer
    files, so the folder needs nothing outside itself. The config holds no absolute path.

    The config names the text tower as the source did when that is a Hub id (``hf_model_name`` /
    ``hf_tokenizer_name``, e.g. BiomedCLIP's PubMedBERT): plain ``open_clip.create_model_from_pretrained(
    "local-dir:<folder>")`` then loads the moved folder anywhere (tokenizer from the folder, tower config
    from the Hub cache). A tower that came from a local folder (the presets) is named ``"."``: open_clip
    3.x reads the tokenizer of a ``local-dir:`` from the folder itself but passes ``hf_model_name`` to
    ``transformers.AutoConfig``, which resolves a path against the working directory, so plain open_clip
    loads such a folder from inside it (``local-dir:.``); ``negdpo.core.models.load_clip`` loads it from
    anywhere (it reads the tower's config from the folder). PEFT adapters are merged into a copy first, so
    the folder holds plain open_clip weights.
    """
    import open_clip
    from negdpo.core.models import resolve_clip
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = getattr(model, "module", model)
    if hasattr(m, "merge_and_unload"):
        m = copy.deepcopy(m).merge_and_unload()
    state = {k: v.detach().to("cpu").contiguous() for k, v in m.state_dict().items()}
    src_name = resolve_clip(source)
    if src_name.startswith("local-dir:"):
        src_dir = Path(src_name.removeprefix("local-dir:"))
    else:
        from huggingface_hub import snapshot_download

        src_dir = Path(snapshot_download(src_name.removeprefix("hf-hub:"), local_files_only=True))
    cfg = json.loads((src_dir / "open_clip_config.json").read_text())
    text_cfg = cfg.get("model_cfg", {}).get("text_cfg", {})
    if text_cfg.get("hf_model_name"):  # HF text tower: its config and tokenizer go into the folder
        text_config = getattr(getattr(m, "text", None), "config", None)
        if not hasattr(text_config, "save_pretrained"):
            raise ValueError(f"{source}: config names HF text model '{text_cfg['hf_model_name']}' but the model "
                             "has no HF text tower config")
        text_config.save_pretrained(str(out))
        tokenizer = open_clip.get_tokenizer(src_name)
        tokenizer.save_pretrained(str(out))
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if text_cfg.get(key) and not is_hub_id(str(text_cfg[key])):
                text_cfg[key] = LOCAL_TOWER
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    tmp = out / ".open_clip_model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "open_clip_model.safetensors")
    return out
