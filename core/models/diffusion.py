"""Stable Diffusion inpainting through diffusers: hub id, local folder, or the ``tiny`` preset.

``tiny`` is a diffusers pipeline folder with SD-1.5-inpainting's component types (UNet2DCondition
with 9 input channels, AutoencoderKL, CLIP text encoder + tokenizer, DDPM/PNDM-style scheduler), small
and randomly initialised; ``tiny-txt2img`` is the same with a 4-channel UNet (img2img mode).
It loads with ``StableDiffusionInpaintPipeline.from_pretrained`` like any real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import ModelNotAvailableError, build_once, hub_snapshot

SD_INPAINTING = "stable-diffusion-v1-5/stable-diffusion-inpainting"
TINY_SIZE = 64  # native resolution of the tiny preset (VAE downsamples by 4 -> 16x16 latents)


def _build_tiny_sd(folder: Path, in_channels: int) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .vocab import write_clip_bpe

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_SIZE // 4, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=TINY_SIZE, scaling_factor=0.18215)
    tok_dir = folder / "_tok"
    tok_dir.mkdir()
    vocab = write_clip_bpe(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        pad_token_id=vocab - 1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)


def resolve_diffusion(name: str) -> str:
    """Local folder for ``tiny`` / ``tiny-txt2img`` / a hub id (cached) / a local diffusers folder."""
    if name == "tiny":
        return str(build_once("tiny-sd-inpaint", lambda tmp, final: _build_tiny_sd(tmp, 9)))
    if name == "tiny-txt2img":
        return str(build_once("tiny-sd-txt2img", lambda tmp, final: _build_tiny_sd(tmp, 4)))
    path = Path(name)
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelNotAvailableError(f"diffusion folder '{path}' has no model_index.json or unet/ subfolder")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return hub_snapshot(name, "Stable Diffusion model", (
            f"Download it where the hub is reachable (`huggingface-cli download {name}`), or pass a local "
            "diffusers folder (with model_index.json), or use the offline preset `tiny`."))
    raise ModelNotAvailableError(f"diffusion model '{name}' is neither 'tiny', a hub id nor an existing folder")


def load_inpaint_pipeline(name: str = "tiny", torch_dtype: torch.dtype = torch.float32, **kwargs):
    """``StableDiffusionInpaintPipeline`` (9-channel UNet) with the safety checker disabled."""
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline.from_pretrained(
        resolve_diffusion(name), dtype=torch_dtype, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **kwargs)
