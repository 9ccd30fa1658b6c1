"""Generator components for training: load, attach LoRA, toggle the reference, build UNet inputs.

Reference modes (``UNetReference``):
  * ``disable_adapters`` (default): the same UNet with its LoRA adapters disabled, under no_grad.
    With B = 0 init the policy equals the reference exactly at step 0 (loss = log 2).
  * ``adapter``: a named reference adapter (e.g. an SFT LoRA) stays loaded; reference = {ref},
    policy = {ref, default}; only ``default`` trains.
  * fused (``reference_adapter`` + ``reference_mode="fuse"``): the SFT LoRA is fused into the base
    weights before the fresh DPO LoRA is added; then ``disable_adapters`` gives the SFT model.
  * ``model``: an explicit second frozen UNet (e.g. a pos->neg translation model), no adapter toggle.

UNet input for 9-channel inpainting UNets: [noisy latents (4) | mask (1) | masked-image latents (4)],
mask = 1 where to repaint, masked image = image * (mask < 0.5). 4-channel UNets (img2img mode) get the
noisy latents only: the source enters at sampling time through latent blending.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .lora_io import LORA_WEIGHT_NAME, POLICY_ADAPTER, REF_ADAPTER, load_adapter

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class Components:
    pipe: object  # StableDiffusionInpaintPipeline (holds unet, vae, text_encoder, tokenizer, scheduler)
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler with the checkpoint's training schedule

    @property
    def inpaint(self) -> bool:
        return int(self.unet.config.in_channels) == 9

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)


def load_components(model: str = "tiny", reference_adapter: str | None = None, reference_mode: str = "fuse",
                    dtype: torch.dtype = torch.float32) -> Components:
    """Load the pipeline; optionally fuse (``fuse``) or keep named (``adapter``) a reference LoRA."""
    from diffusers import DDPMScheduler
    from negdpo.core.models import load_inpaint_pipeline

    pipe = load_inpaint_pipeline(model, torch_dtype=dtype)
    in_ch = int(pipe.unet.config.in_channels)
    if in_ch not in (4, 9):
        raise ValueError(f"{model}: UNet has {in_ch} input channels; expected 9 (inpainting) or 4 (img2img)")
    if reference_adapter:
        from .sample import adapter_chain

        folder = Path(reference_adapter)
        if not (folder / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(f"reference adapter {folder}: no {LORA_WEIGHT_NAME}")
        if reference_mode not in ("fuse", "adapter"):
            raise ValueError(f"reference_mode must be 'fuse' or 'adapter', got '{reference_mode}'")
        # an adapter trained on top of another (SFT -> DPO round 1 -> round 2 ...) needs its whole chain,
        # as load_generator samples it: every earlier adapter is fused into the base first
        for i, earlier in enumerate(adapter_chain(folder)[:-1]):
            load_adapter(pipe, earlier, f"{REF_ADAPTER}_base{i}")
            pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[f"{REF_ADAPTER}_base{i}"])
            pipe.unload_lora_weights()
        load_adapter(pipe, folder, REF_ADAPTER)  # load_lora_weights, then every tensor checked
        if reference_mode == "fuse":
            pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[REF_ADAPTER])
            pipe.unload_lora_weights()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Components(pipe, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, noise_scheduler)


def add_lora(unet: torch.nn.Module, rank: int = 8, alpha: float | None = None,
             targets: tuple[str, ...] | list[str] = LORA_TARGETS, init: str = "gaussian") -> list[torch.nn.Parameter]:
    """Attach a trainable PEFT LoRA (adapter ``default``) with B = 0; returns its parameters (fp32).

    Only inits that leave the base weights untouched are allowed ("gaussian", True): PiSSA/OLoRA-style
    inits change W and would break "reference = adapters disabled".
    """
    from peft import LoraConfig

    if init not in ("gaussian", "true", "True", True):
        raise ValueError(f"lora init '{init}' would modify base weights; use 'gaussian' or 'true'")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        init_lora_weights=True if init in ("true", "True", True) else "gaussian",
                        target_modules=list(targets))
    unet.add_adapter(config, adapter_name=POLICY_ADAPTER)
    params = []
    for name, p in unet.named_parameters():
        is_policy = "lora_" in name and f".{POLICY_ADAPTER}." in name
        p.requires_grad_(is_policy)
        if is_policy:
            p.data = p.data.float()
            params.append(p)
    if not params:
        raise ValueError(f"no LoRA parameters were created; target modules {list(targets)} not found in the UNet")
    return params


class UNetReference:
    """Computes reference predictions in one of the modes of the module docstring."""

    def __init__(self, unet: torch.nn.Module, mode: str = "disable_adapters", ref_unet: torch.nn.Module | None = None):
        if mode not in ("disable_adapters", "adapter", "model"):
            raise ValueError(f"unknown reference mode '{mode}'")
        if mode == "model" and ref_unet is None:
            raise ValueError("reference mode 'model' needs ref_unet")
        self.unet, self.mode, self.ref_unet = unet, mode, ref_unet

    def _refreeze(self) -> None:  # PEFT's set_adapter marks active adapters trainable; keep only ours
        for name, p in self.unet.named_parameters():
            if "lora_" in name:
                p.requires_grad_(f".{POLICY_ADAPTER}." in name)

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """Yields the module to call for the reference forward; restores the policy on exit."""
        if self.mode == "model":
            yield self.ref_unet
            return
        if self.mode == "disable_adapters":
            self.unet.disable_adapters()
            try:
                yield self.unet
            finally:
                self.unet.enable_adapters()
            return
        self.unet.set_adapters([REF_ADAPTER])
        try:
            yield self.unet
        finally:
            self.unet.set_adapters([REF_ADAPTER, POLICY_ADAPTER])
            self._refreeze()

    def policy_setup(self) -> None:
        if self.mode == "adapter":
            self.unet.set_adapters([REF_ADAPTER, POLICY_ADAPTER])
            self._refreeze()


@torch.no_grad()
def encode_prompts(comp: Components, prompts: list[str], device: torch.device) -> torch.Tensor:
    tok = comp.tokenizer(prompts, padding="max_length", max_length=comp.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return comp.text_encoder(tok.input_ids.to(device))[0]


@torch.no_grad()
def encode_images(comp: Components, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [-1,1] -> scaled latents (distribution mode, deterministic)."""
    vae_dtype = next(comp.vae.parameters()).dtype
    return comp.vae.encode(images.to(vae_dtype)).latent_dist.mode().float() * comp.scaling_factor


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,1,H,W) {0,1} pixel mask -> latent resolution (nearest, as the diffusers pipeline does)."""
    return F.interpolate(mask.float(), size=size, mode="nearest")


def unet_input(comp: Components, noisy: torch.Tensor, mask_lat: torch.Tensor, masked_lat: torch.Tensor) -> torch.Tensor:
    if comp.inpaint:
        return torch.cat([noisy, mask_lat.to(noisy.dtype), masked_lat.to(noisy.dtype)], dim=1)
    return noisy
