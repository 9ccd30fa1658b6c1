"""Generation step of a pair build: K candidate tumour-free fills per positive and source.

Sources: ``inpaint`` (the inpainting generator, optionally with a LoRA adapter) and ``boundary``
(latent-boundary negatives, :mod:`negdpo.preference.pairs.boundary`). Candidate j of item ``key`` has
seed ``derive_seed(key, source, j, base=seed)``. Models load lazily (a rerun with nothing left to do
loads nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .config import BuildConfig


def adapter_sha(adapter: str | None) -> str:
    """First 16 hex digits of the LoRA adapter's content hash ('' without adapter, 'missing' if absent):
    tensors and LoRA settings, not the file's bytes (``lora_io.lora_content_sha``), so re-saving the same
    weights keeps it."""
    if not adapter:
        return ""
    p = Path(adapter)
    f = p / "pytorch_lora_weights.safetensors" if p.is_dir() else p
    if not f.is_file():
        return "missing"
    from negdpo.generator.lora_io import lora_content_sha

    try:
        return lora_content_sha(f)[:16]
    except Exception as err:  # not a safetensors file
        raise ValueError(f"--adapter {f}: unreadable LoRA weights ({type(err).__name__}: {err})") from None


def candidate_seeds(cfg: BuildConfig, key: str, source: str, n: int) -> list[int]:
    from negdpo.core.config import derive_seed

    return [derive_seed(key, source, j, base=cfg.seed) for j in range(n)]


class CandidateGenerator:
    """Holds the generator (and the latent-boundary search); ``clip`` returns (model, tokenizer)."""

    def __init__(self, cfg: BuildConfig, device: str, clip: Callable[[], tuple]) -> None:
        self.cfg = cfg
        self.device = device
        self._clip = clip
        self._pipe = None
        self._boundary = None
        self.adapter_sha = adapter_sha(cfg.adapter)

    @property
    def pipe(self):
        if self._pipe is None:
            from negdpo.generator.sample import load_generator

            self._pipe = load_generator(self.cfg.generator, self.cfg.adapter, device=self.device,
                                        dtype=getattr(torch, self.cfg.dtype))
        return self._pipe

    @pipe.setter
    def pipe(self, pipe) -> None:
        self._pipe = pipe

    def gen_model(self, source: str) -> str:
        if source == "inpaint":
            return self.cfg.generator
        return f"latent_boundary:{self.cfg.generator}-vae:clip-{self.cfg.clip}"

    def provenance(self, source: str) -> dict:
        """Row columns describing how a source's candidates were made."""
        cfg = self.cfg
        inpaint = source == "inpaint"
        return {"gen_model": self.gen_model(source), "gen_adapter_sha": self.adapter_sha if inpaint else "",
                "scheduler": (cfg.scheduler or type(self.pipe.scheduler).__name__) if inpaint else "adam",
                "steps": cfg.steps if inpaint else cfg.boundary_steps, "guidance": cfg.guidance if inpaint else 0.0,
                "strength": cfg.strength if inpaint else cfg.boundary_eps}

    def candidates(self, source: str, images: list[np.ndarray], masks: list[np.ndarray], prompts: list[str],
                   keys: list[str], lesion_texts: list[str], healthy_texts: list[str]) -> list[list[np.ndarray]]:
        """K candidates per item (float arrays like the inputs), in item order."""
        k = self.cfg.k
        seeds = [s for key in keys for s in candidate_seeds(self.cfg, key, source, k)]
        flat_images = [im for im in images for _ in range(k)]
        flat_masks = [m for m in masks for _ in range(k)]
        if source == "inpaint":
            from negdpo.generator.sample import inpaint

            flat = inpaint(self.pipe, flat_images, flat_masks, [p for p in prompts for _ in range(k)], seeds,
                           steps=self.cfg.steps, guidance_scale=self.cfg.guidance, strength=self.cfg.strength,
                           init=self.cfg.init, scheduler=self.cfg.scheduler, size=self.cfg.size, batch_size=len(flat_images))
        else:
            flat = self._boundary_candidates(flat_images, flat_masks, seeds, lesion_texts, healthy_texts)
        return [flat[i * k:(i + 1) * k] for i in range(len(images))]

    def _boundary_candidates(self, images, masks, seeds, lesion_texts, healthy_texts) -> list[np.ndarray]:
        import torch.nn.functional as F
        from negdpo.generator.sample import native_size

        from .boundary import BoundaryConfig, LatentBoundary, zero_shot_logit_fn

        if self._boundary is None:
            size = int(self.cfg.size or native_size(self.pipe))
            self._boundary = LatentBoundary(self.pipe.vae, size, BoundaryConfig(
                steps=self.cfg.boundary_steps, eps=self.cfg.boundary_eps))
        model, tok = self._clip()
        k = self.cfg.k
        feats = []
        with torch.no_grad():
            for lesion, healthy in zip(lesion_texts, healthy_texts):
                t = tok([healthy, lesion or "tumour"]).to(self.device)
                feats += [F.normalize(model.encode_text(t), dim=-1)] * k
        with torch.enable_grad():
            return self._boundary(images, masks, seeds, zero_shot_logit_fn(model, torch.stack(feats)))
