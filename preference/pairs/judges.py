"""Pluggable scorers of candidate negatives ("judges"); higher = better tumour-free fill.

Every judge has a ``name`` and maps the candidates of one positive to scores in about [0, 1]:

* ``clip_lesion``  P("without tumour") from a CLIP model's zero-shot softmax over the item's lesion
  text vs its healthy text (differentiable core: :func:`clip_lesion_logit`, also used by
  :mod:`negdpo.preference.pairs.boundary`).
* ``contrast``     model-free lesion score: ``exp(-mean |s - harmonic fill of s| / (ring std + 0.02))``
  inside the mask, s = the candidate smoothed by a 1 px Gaussian -- a healthy fill continues its
  surroundings smoothly, a lesion stands out from them.
* ``mi_out``       masked mutual information with the source on the pixels outside the dilated mask,
  normalised by the source's own MI (:func:`parzen_mi`: ``negdpo.generator.mi.weighted_mi``'s formula in float64).
* ``fidelity_out`` ``1 - mean |candidate - source|`` outside the dilated mask.
* ``twin``         ``1 - mean |candidate - healthy twin|`` inside the dilated mask (phantoms only;
  absent when the item has no twin).

:class:`CompositeJudge` takes a spec like ``"clip_lesion=1,contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2"``
and returns the weighted mean of the judges available for an item, plus every judge's own score;
its ``spec`` string is recorded in each row (``label_source``).

Formulas and sources: docs/method.md#judges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from negdpo.core.config import parse_weights
from negdpo.core.fill import harmonic_fill
from negdpo.core.imageio import to_gray
from scipy import ndimage

DEFAULT_SPEC = "clip_lesion=1,contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2"


@dataclass
class JudgeItem:
    """What a judge may look at for one positive: float [0, 1] arrays of the same H x W."""

    source: np.ndarray
    mask: np.ndarray  # bool, the dilated repaint mask actually used
    prompt: str  # lesion text of the positive
    healthy_text: str
    twin: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)


class Judge(Protocol):
    name: str

    def __call__(self, item: JudgeItem, images: list[np.ndarray]) -> np.ndarray | None:
        """Scores (higher = better), or None when the judge does not apply to this item."""


# -- CLIP zero-shot lesion score -------------------------------------------------------------------
def clip_image_tensor(images: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] from grayscale or RGB float arrays."""
    arrs = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in images]
    return torch.from_numpy(np.stack(arrs).astype(np.float32)).permute(0, 3, 1, 2).to(device)


def clip_lesion_logit(model, x: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Differentiable logit of "with lesion" over "without" for images x in [0, 1] (B, 3, H, W).

    ``text_features`` = normalised [healthy, lesion] embeddings (2, D) or per-image (B, 2, D).
    Preprocessing matches open_clip's for square inputs: bicubic resize to the model size + normalise.
    """
    from negdpo.core.models.clip import CLIP_MEAN, CLIP_STD

    size = getattr(model.visual, "image_size", (224, 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    feats = F.normalize(model.encode_image((x - mean) / std), dim=-1)
    tf = text_features if text_features.ndim == 3 else text_features.expand(len(feats), -1, -1)
    sims = torch.einsum("bd,bkd->bk", feats, tf) * model.logit_scale.exp()
    return sims[:, 1] - sims[:, 0]


class ClipLesionJudge:
    """P(healthy) = sigmoid(-lesion logit) from a CLIP model (open_clip)."""

    name = "clip_lesion"

    def __init__(self, clip: str | tuple = "tiny", device: str = "cpu") -> None:
        from negdpo.core.models import load_clip

        self.clip_name = clip if isinstance(clip, str) else "custom"
        self.model, _, self.tokenizer = load_clip(clip, device=device) if isinstance(clip, str) else clip
        self.device = device
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_features(self, healthy: str, lesion: str) -> torch.Tensor:
        out = []
        for t in (healthy, lesion):
            if t not in self._text:
                tok = self.tokenizer([t]).to(self.device)
                self._text[t] = F.normalize(self.model.encode_text(tok), dim=-1)[0]
            out.append(self._text[t])
        return torch.stack(out)

    @torch.no_grad()
    def __call__(self, item: JudgeItem, images: list[np.ndarray]) -> np.ndarray:
        tf = self.text_features(item.healthy_text, item.prompt)
        logit = clip_lesion_logit(self.model, clip_image_tensor(images, self.device), tf)
        return torch.sigmoid(-logit).double().cpu().numpy()


# -- model-free judges -----------------------------------------------------------------------------
class ContrastJudge:
    """How far the (lightly smoothed) fill departs from the harmonic interpolation of its surroundings,
    relative to the surroundings' texture: ``exp(-mean |s - harmonic(s)| / (ring std + 0.02))``."""

    name = "contrast"

    def __call__(self, item: JudgeItem, images: list[np.ndarray]) -> np.ndarray:
        mask = item.mask
        if not mask.any() or mask.all():
            return np.ones(len(images))
        if "ring" not in item._cache:
            r = np.sqrt(mask.sum() / np.pi)
            item._cache["ring"] = ndimage.binary_dilation(mask, iterations=max(3, int(r))) & ~mask
            item._cache["solver"] = {}
        ring, solver = item._cache["ring"], item._cache["solver"]
        out = []
        for img in images:
            g = to_gray(img) if img.ndim == 3 else img.astype(np.float64)
            smooth = ndimage.gaussian_filter(g, 1.0)
            dev = np.abs(smooth - harmonic_fill(smooth, mask, solver))[mask].mean()
            out.append(np.exp(-dev / (g[ring].std() + 0.02)))
        return np.asarray(out, np.float64)


def parzen_mi(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None, num_bins: int = 23,
              sigma_ratio: float = 0.5, eps: float = 1e-7) -> float:
    """Weighted Gaussian-Parzen MI (nats) between samples in [0, 1] -- the formula of
    ``negdpo.generator.mi.weighted_mi`` (MONAI's estimate with pixel weights), in float64 numpy so a score
    does not depend on torch's thread count (and with it on the number of processes)."""
    centers = np.linspace(0.0, 1.0, num_bins)
    pre = 1.0 / (2.0 * (sigma_ratio / (num_bins - 1)) ** 2)

    def parzen(x: np.ndarray) -> np.ndarray:
        w = np.exp(-pre * (np.clip(x.astype(np.float64).ravel(), 0, 1)[:, None] - centers[None]) ** 2)
        return w / w.sum(1, keepdims=True)

    wa, wb = parzen(a), parzen(b)
    pw = np.full(len(wa), 1.0 / len(wa)) if weights is None else weights.astype(np.float64).ravel() / weights.sum()
    pa, pb = pw @ wa, pw @ wb
    pab = (wa * pw[:, None]).T @ wb
    return float((pab * np.log((pab + eps) / (np.outer(pa, pb) + eps) + eps)).sum())


class MaskedMIJudge:
    """MI(candidate, source) over the pixels outside the dilated mask / MI(source, source)."""

    name = "mi_out"

    def __call__(self, item: JudgeItem, images: list[np.ndarray]) -> np.ndarray:
        outside = ~item.mask
        if outside.sum() < 16:
            return np.ones(len(images))
        src = (to_gray(item.source) if item.source.ndim == 3 else item.source)[outside]
        if "self_mi" not in item._cache:
            item._cache["self_mi"] = max(parzen_mi(src, src), 1e-6)
        return np.asarray([parzen_mi((to_gray(im) if im.ndim == 3 else im)[outside], src) / item._cache["self_mi"]
                           for im in images], np.float64)


class FidelityJudge:
    name = "fidelity_out"

    def __call__(self, item: JudgeItem, images: list[np.ndarray]) -> np.ndarray:
        outside = ~item.mask
        if not outside.any():
            return np.ones(len(images))
        return np.asarray([1.0 - float(np.abs(im - item.source)[outside].mean()) for im in images], np.float64)


class TwinJudge:
    name = "twin"

    def __call__(self, item: JudgeItem, images: list[np.ndarray]) -> np.ndarray | None:
        if item.twin is None or not item.mask.any():
            return None
        twin = item.twin if item.twin.shape == images[0].shape else to_gray(item.twin)
        return np.asarray([1.0 - float(np.abs((to_gray(im) if im.ndim != twin.ndim else im) - twin)[item.mask].mean())
                           for im in images], np.float64)


def quantize(image: np.ndarray) -> np.ndarray:
    """The 8-bit rendering the dataset stores, back as float32 in [0, 1]."""
    from negdpo.core.imageio import to_uint8

    return to_uint8(image).astype(np.float32) / 255.0


# -- composite -------------------------------------------------------------------------------------
def parse_spec(spec: str) -> dict[str, float]:
    """``"a=1,b=0.5,c"`` -> {a: 1.0, b: 0.5, c: 1.0}; unknown names raise."""
    return parse_weights(spec, JUDGES, "judge")


JUDGES = {"clip_lesion": ClipLesionJudge, "contrast": ContrastJudge, "mi_out": MaskedMIJudge,
          "fidelity_out": FidelityJudge, "twin": TwinJudge}


class CompositeJudge:
    """Weighted mean of several judges; ``spec`` names them (recorded as ``label_source``)."""

    def __init__(self, spec: str = DEFAULT_SPEC, clip: str | tuple = "tiny", device: str = "cpu") -> None:
        self.weights = parse_spec(spec)
        self.judges: dict[str, Judge] = {}
        for name in self.weights:
            self.judges[name] = ClipLesionJudge(clip, device) if name == "clip_lesion" else JUDGES[name]()
        clip_tag = f":{self.judges['clip_lesion'].clip_name}" if "clip_lesion" in self.judges else ""
        self.spec = ",".join(f"{n}{clip_tag if n == 'clip_lesion' else ''}={w:g}" for n, w in self.weights.items())

    def __call__(self, item: JudgeItem, images: list[np.ndarray]) -> tuple[np.ndarray, list[dict[str, float]]]:
        """(composite scores, per-image {judge: score}) for the candidates of one item."""
        images = [quantize(im) for im in images]  # judge exactly what is stored (8-bit PNG)
        total = np.zeros(len(images))
        wsum = 0.0
        parts: list[dict[str, float]] = [{} for _ in images]
        for name, judge in self.judges.items():
            s = judge(item, images)
            if s is None:
                continue
            s = np.asarray(s, np.float64)
            total += self.weights[name] * s
            wsum += self.weights[name]
            for p, v in zip(parts, s):
                p[name] = round(float(v), 6)
        if wsum == 0:
            raise ValueError(f"no judge of '{self.spec}' applies to this item")
        return total / wsum, parts
