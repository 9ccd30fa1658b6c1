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

Each preset is written once (seeded) under ``NEGDPO_HOME/presets`` in the layout real weights have
(diffusers folder, open_clip ``local-dir:`` folder, SAM ``.pth``) and loads through the same loaders;
:func:`param_counts` counts a preset's parameters per component on the meta device (no memory).
Random weights: for speed, memory and plumbing only.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SD15_UNET = dict(  # stable-diffusion-v1-5/stable-diffusion-inpainting unet/config.json
    sample_size=64, in_channels=9, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5)
SD15_VAE = dict(  # .../vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215)
CLIP_L14_TEXT = dict(  # openai/clip-vit-large-patch14 text_config (SD-1.5's text_encoder)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                      set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
PUBMEDBERT = dict(  # microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract config.json (BERT-base sizes)
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, type_vocab_size=2)
BIOMEDCLIP_CONTEXT = 256
SAM_KINDS = {"sam-vit-b-random": "vit_b", "sam-vit-h-random": "vit_h"}


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


# --- architectures (constructors used both for counting on meta and for writing weights) ---------------

def sd15_components(tokenizer_vocab: int = CLIP_L14_TEXT["vocab_size"]) -> dict[str, torch.nn.Module]:
    """SD-1.5-inpainting's UNet, VAE and text encoder (diffusers / transformers classes), seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text = CLIPTextModel(CLIPTextConfig(**{**CLIP_L14_TEXT, "vocab_size": tokenizer_vocab},
                                        bos_token_id=tokenizer_vocab - 2, eos_token_id=tokenizer_vocab - 1,
                                        pad_token_id=tokenizer_vocab - 1))
    return {"unet": unet, "vae": vae, "text_encoder": text}


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

    torch.manual_seed(0)
    return open_clip.CustomTextCLIP(**biomedclip_model_cfg(bert_dir))


def clip_components(model) -> dict[str, torch.nn.Module]:
    return {"image": model.visual, "text": model.text, "logit_scale": _ParamHolder(model.logit_scale)}


class _ParamHolder(torch.nn.Module):
    def __init__(self, p: torch.nn.Parameter) -> None:
        super().__init__()
        self.p = p


def sam_model(kind: str):
    """``segment_anything`` builder for ``vit_b`` / ``vit_l`` / ``vit_h``, no checkpoint, seeded."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    return sam_model_registry[kind](checkpoint=None)


def sam_components(model) -> dict[str, torch.nn.Module]:
    return {"image_encoder": model.image_encoder, "prompt_encoder": model.prompt_encoder,
            "mask_decoder": model.mask_decoder}


# --- writers: one preset folder in the layout real weights have -----------------------------------------

def write_sd15_inpaint(folder: Path, final: Path | None = None) -> None:
    """A diffusers ``StableDiffusionInpaintPipeline`` folder of SD-1.5-inpainting's architecture."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline
    from transformers import CLIPTokenizer

    from .vocab import write_clip_bpe

    tok_dir = folder / "_tok"
    tok_dir.mkdir()
    n = write_clip_bpe(tok_dir, vocab_size=CLIP_L14_TEXT["vocab_size"])
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    comps = sd15_components(n)
    pipe = StableDiffusionInpaintPipeline(
        **comps, tokenizer=tokenizer, scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)


def write_biomedclip(folder: Path, final: Path) -> None:
    """An open_clip ``local-dir:`` folder of BiomedCLIP's architecture (config points at ``final``)."""
    from safetensors.torch import save_file

    from .clip import CLIP_MEAN, CLIP_STD

    _write_bert(folder, PUBMEDBERT, BIOMEDCLIP_CONTEXT, PUBMEDBERT["vocab_size"])
    model = biomedclip_model(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    preprocess_cfg = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": biomedclip_model_cfg(final), "preprocess_cfg": preprocess_cfg}, indent=2))


def write_sam(kind: str) -> Callable[[Path, Path], None]:
    def write(folder: Path, final: Path) -> None:
        from .sam import SAM_CHECKPOINTS

        torch.save(sam_model(kind).state_dict(), folder / SAM_CHECKPOINTS[kind])
    return write


# --- registry and counting ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    name: str
    role: str  # diffusion | clip | sam
    summary: str
    components: Callable[[], dict[str, torch.nn.Module]]  # builds the modules (called on the meta device)


def _tiny_sd(in_channels: int) -> Callable[[], dict[str, torch.nn.Module]]:
    def build() -> dict[str, torch.nn.Module]:
        from .diffusion import tiny_sd_components
        from .vocab import write_clip_bpe

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
    from .clip import TINY_BERT, TINY_CONTEXT, tiny_clip_model

    return _clip_with_bert(tiny_clip_model, TINY_BERT, TINY_CONTEXT, None)()


def _tiny_sam() -> dict[str, torch.nn.Module]:
    from segment_anything.build_sam import _build_sam

    from .sam import TINY_SAM

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
