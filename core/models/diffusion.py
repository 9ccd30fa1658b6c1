"""Stable Diffusion inpainting through diffusers: hub id, local folder, or the ``tiny`` preset.

``sd15-inpaint-random`` is SD-1.5-inpainting's exact architecture, random init (see ``presets``).
``tiny`` is a diffusers pipeline folder with SD-1.5-inpainting's component types (UNet2DCondition
with 9 input channels, AutoencoderKL, CLIP text encoder + tokenizer, DDPM/PNDM-style scheduler), small
and randomly initialised; ``tiny-txt2img`` is the same with a 4-channel UNet (img2img mode).
It loads with ``StableDiffusionInpaintPipeline.from_pretrained`` like any real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import ModelNotAvailableError, build_once, hub_snapshot, seeded

SD_INPAINTING = "stable-diffusion-v1-5/stable-diffusion-inpainting"
TINY_SIZE = 64  # native resolution of the tiny preset (VAE downsamples by 4 -> 16x16 latents)
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


TINY_SD_VERSION = "2"  # v2: word-level BPE merges, so the phantom captions fit the 77-token context


def tiny_sd_components(in_channels: int, vocab: int) -> dict[str, torch.nn.Module]:
    """The tiny preset's UNet, VAE and text encoder (seeded; same families and layout as SD-1.5)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with seeded(0):
        unet = UNet2DConditionModel(
            sample_size=TINY_SIZE // 4, in_channels=in_channels, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=8, sample_size=TINY_SIZE, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
            pad_token_id=vocab - 1))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def sd15_components(tokenizer_vocab: int = CLIP_L14_TEXT["vocab_size"]) -> dict[str, torch.nn.Module]:
    """SD-1.5-inpainting's UNet, VAE and text encoder (diffusers / transformers classes), seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with seeded(0):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**{**CLIP_L14_TEXT, "vocab_size": tokenizer_vocab},
                                            bos_token_id=tokenizer_vocab - 2, eos_token_id=tokenizer_vocab - 1,
                                            pad_token_id=tokenizer_vocab - 1))
    return {"unet": unet, "vae": vae, "text_encoder": text}


def write_sd15_inpaint(folder: Path, final: Path | None = None) -> None:
    """A diffusers ``StableDiffusionInpaintPipeline`` folder of SD-1.5-inpainting's architecture."""
    import shutil

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
    shutil.rmtree(tok_dir)


def _build_tiny_sd(folder: Path, in_channels: int) -> None:
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
    from transformers import CLIPTokenizer

    from .vocab import write_clip_bpe

    tok_dir = folder / "_tok"
    tok_dir.mkdir()
    vocab = write_clip_bpe(tok_dir)  # every word of the medical list is one token
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(
        **tiny_sd_components(in_channels, vocab), tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(tok_dir)


def resolve_diffusion(name: str) -> str:
    """Local folder for ``tiny`` / ``tiny-txt2img`` / ``sd15-inpaint-random`` / a hub id (cached) / a folder."""
    if name == "tiny":
        return str(build_once("tiny-sd-inpaint", lambda tmp, final: _build_tiny_sd(tmp, 9), TINY_SD_VERSION))
    if name == "tiny-txt2img":
        return str(build_once("tiny-sd-txt2img", lambda tmp, final: _build_tiny_sd(tmp, 4), TINY_SD_VERSION))
    if name == "sd15-inpaint-random":
        return str(build_once(name, write_sd15_inpaint))
    path = Path(name)
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelNotAvailableError(f"diffusion folder '{path}' has no model_index.json or unet/ subfolder")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return hub_snapshot(name, "Stable Diffusion model", (
            f"Download it where the hub is reachable (`huggingface-cli download {name}`), or pass a local "
            "diffusers folder (with model_index.json), or use the offline preset `tiny`."))
    raise ModelNotAvailableError(
        f"diffusion model '{name}' is neither a preset (tiny, tiny-txt2img, sd15-inpaint-random), a hub id nor an "
        "existing folder")


def load_inpaint_pipeline(name: str = "tiny", torch_dtype: torch.dtype = torch.float32, **kwargs):
    """``StableDiffusionInpaintPipeline`` (9-channel UNet) with the safety checker disabled."""
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline.from_pretrained(
        resolve_diffusion(name), dtype=torch_dtype, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **kwargs)
