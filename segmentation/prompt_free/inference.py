"""Save / load a trained prompt generator and segment images with it, prompt-free.

A saved generator is a folder with ``prompt_generator.json`` (architecture, the SAM it was trained on,
inference threshold) and ``prompt_generator.safetensors`` (generator + adapter weights; SAM's own weights
are not copied). ``load_prompt_free`` accepts that folder or a training output folder (``final/``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import PromptFreeConfig, PromptSAM

CONFIG_FILE = "prompt_generator.json"
WEIGHTS_FILE = "prompt_generator.safetensors"


def save_prompt_free(model: PromptSAM, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the config and trainable weights (atomic per file)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    tmp = folder / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps({"generator": model.cfg.to_dict(), **(meta or {})}, indent=1))
    tmp.replace(folder / CONFIG_FILE)
    return folder


def load_trainable(model: PromptSAM, weights: str | Path) -> None:
    """Load generator + adapter weights; every trainable tensor must be present (and nothing else)."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    expected = {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or extra or shapes:
        raise ValueError(f"{weights}: weights do not fit this generator (missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, other shape {shapes[:5]}); was it trained with other num_queries / "
                         "adapters / SAM?")
    model.load_state_dict(state, strict=False)


def find_saved(folder: str | Path) -> Path:
    folder = Path(folder)
    for cand in (folder, folder / "final"):
        if (cand / CONFIG_FILE).is_file():
            return cand
    raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} (neither in the folder nor in its final/ subfolder)")


def load_prompt_free(folder: str | Path, sam_checkpoint: str | None = None,
                     device: str | torch.device = "cpu") -> tuple[PromptSAM, dict[str, Any]]:
    """(model in eval mode, saved meta). SAM is loaded by its saved name; ``sam_checkpoint`` overrides the path."""
    from negdpo.core.models import load_sam

    folder = find_saved(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    cfg = PromptFreeConfig.from_dict(meta["generator"])
    sam = load_sam(cfg.sam, sam_checkpoint or cfg.sam_checkpoint, device)
    model = PromptSAM(sam, cfg)
    load_trainable(model, folder / WEIGHTS_FILE)
    return model.to(device).eval(), meta


@dataclass
class Prediction:
    masks: np.ndarray  # (N, H, W) bool, SAM's final masks
    aux: np.ndarray  # (N, H, W) bool, the generator's auxiliary masks
    scores: np.ndarray  # (N,) 1 - p(no object)
    labels: np.ndarray  # (N,) most likely class
    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1 in pixels of the image
    prob: np.ndarray  # (H, W) max over queries of score x mask probability


class PromptFreeSegmenter:
    """Prompt-free segmentation: union of the final masks of queries with score >= ``score_threshold``."""

    def __init__(self, model: PromptSAM, score_threshold: float = 0.5) -> None:
        self.model = model.eval()
        self.score_threshold = score_threshold

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> Prediction:
        from .data import preprocess_image

        sam = self.model.sam
        x, hw = preprocess_image(sam, image)
        out = self.model(images=x[None].to(sam.device), input_hw=torch.tensor([hw]))
        hgt, wid = image.shape[:2]

        def full(logits: torch.Tensor) -> torch.Tensor:
            return sam.postprocess_masks(logits[None].float(), hw, (hgt, wid))[0]

        masks, aux = full(out["masks"][0]), full(out["aux_masks"][0])
        probs = out["logits"][0].float().softmax(-1)
        scores = 1 - probs[:, -1]
        from torchvision.ops import box_convert

        boxes = box_convert(out["boxes"][0].float(), "cxcywh", "xyxy") * torch.tensor([wid, hgt, wid, hgt]).to(scores)
        prob = (scores[:, None, None] * torch.sigmoid(masks)).amax(0)
        return Prediction(masks=(masks > 0).cpu().numpy(), aux=(aux > 0).cpu().numpy(), scores=scores.cpu().numpy(),
                          labels=probs[:, :-1].argmax(-1).cpu().numpy(), boxes=boxes.cpu().numpy(),
                          prob=prob.cpu().numpy())

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Final bool mask (H, W) and info: the prediction, the kept queries and their aux-mask union."""
        pred = self.predict(image)
        keep = pred.scores >= self.score_threshold
        mask = pred.masks[keep].any(0) if keep.any() else np.zeros(image.shape[:2], bool)
        coarse = pred.aux[keep].any(0) if keep.any() else np.zeros(image.shape[:2], bool)
        return mask, {"prediction": pred, "keep": keep, "coarse": coarse, "n_prompts": int(keep.sum())}
