"""VL-SAM saliency (Lin et al., NeurIPS 2024): an object's map from a vision-language model's attention.

Per image and object phrase (see ``docs/method.md#vl-sam``):

1. The VLM (Qwen2-VL class) answers ``question`` about the image (greedy generation). The object's
   tokens are found in the answer (with or without a leading space, lower-case or capitalised), or
   appended after it when the answer does not contain them.
2. Q and K of every decoder layer and head over the whole sequence (prompt with image tokens, answer,
   object) are captured by scoped forward pre-hooks on the self-attention modules (removed on exit):
   the hook re-runs ``q_proj``/``k_proj`` on the module's input and applies the rotary embedding the
   module receives (Llama/Qwen rotate-half RoPE; for Qwen2-VL the multimodal M-RoPE cos/sin). The
   capture runs as one teacher-forced pass after generation; under the causal mask its Q/K equal the
   ones computed step by step while generating (``tests/test_vlsam.py`` checks both, and checks the
   S below against the model's own eager attention weights).
3. Per layer l and head h: ``S = softmax(mask(Q K^T / sqrt(d)))`` (causal mask, -inf above the
   diagonal); ``W[l,h] = mean_i max_j S[l,h,i,j]`` (focused heads weigh more); ``A_l = mean_h W[l,h] S[l,h]``.
4. Regularised attention flow (rollout with the residual identity): ``F = prod_l (I + R(A_l)) / 2``, later
   layers on the left. Under the causal mask the flow collapses onto the first tokens (key j is seen by
   ``n_j = N - j`` queries, and the product compounds that over layers), so ``R`` multiplies column j of
   every layer's map by ``1 - (n_j - 1) / N``. With uniform causal attention (N = 90) the image-span
   max/min ratio of the object row is then 13 at 2 layers, 4.8 at 8, 3.7 at 12; without it, or with
   the factor applied once to F, the flow keeps only the first tokens at depth (tests pin the formula).
5. The map is the object rows of the flow (averaged over the object's tokens) at the image
   token columns, on the merged patch grid; bilinear to the scan's (H, W) (the processor resizes the
   whole frame, no crop), min-max to [0, 1].
6. SAM prompts (``peak_points``): the top-k peaks of the map at least ``spacing`` px apart and at least
   ``min_peak`` (relative to the maximum) as positives; negatives in the lowest region (values at or
   below the ``low_quantile`` quantile), greedily as far as possible from every point chosen so far.
   ``negdpo evaluate --saliency vlsam`` prompts SAM with these points (``segment_map``), not with
   prompts from the coarse mask; ``align`` does not apply (no crop).

    negdpo evaluate --data DIR --saliency vlsam --vlm tiny|FOLDER|Qwen/Qwen2-VL-2B-Instruct --sam tiny --out OUT

The VLM is loaded once per (name, device) per process, in float32.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import SaliencyContext, register
from .common import minmax

OBJECT_WORDS = ("tumour", "tumor", "mass", "lesion", "nodule", "cyst", "opacity")
DEFAULT_QUESTION = "Describe the findings."


# -- steps 3-4: attention maths on captured Q/K ----------------------------------------------------
def causal_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) queries, (B, Hk, N, d) keys (Hk divides H, grouped heads) -> S (B, H, N, N)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    n = q.shape[-2]
    logits = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def head_weights(s: torch.Tensor) -> torch.Tensor:
    """W = mean over queries of the max over keys: (..., H, N, N) -> (..., H)."""
    return s.amax(dim=-1).mean(dim=-1)


def aggregate_heads(s: torch.Tensor) -> torch.Tensor:
    """A = mean_h W_h S_h: (B, H, N, N) -> (B, N, N)."""
    return (s * head_weights(s)[..., None, None]).mean(dim=1)


def attention_flow(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rollout ``prod_l (I + A_l) / 2`` of (B, N, N) layer maps, the first layer applied first."""
    n = layers[0].shape[-1]
    eye = torch.eye(n, device=layers[0].device, dtype=layers[0].dtype)
    flow = eye.expand_as(layers[0]).clone()
    for a in layers:
        flow = 0.5 * (eye + a) @ flow
    return flow


def regularise_columns(flow: torch.Tensor) -> torch.Tensor:
    """Column j (visible to n_j = N - j causal rows) times ``1 - (n_j - 1) / N`` = (j + 1) / N."""
    n = flow.shape[-1]
    unmasked = torch.arange(n, 0, -1, device=flow.device, dtype=flow.dtype)
    return flow * (1.0 - (unmasked - 1.0) / n)


def flow_from_qk(layers_qk: Sequence[tuple[torch.Tensor, torch.Tensor]], regularise: bool = True) -> torch.Tensor:
    """Captured (Q, K) per layer -> the (regularised) attention flow (B, N, N), one layer's S at a time."""
    maps = [aggregate_heads(causal_attention(q, k)) for q, k in layers_qk]
    return attention_flow([regularise_columns(a) for a in maps] if regularise else maps)


# -- step 2: scoped Q/K capture --------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) with (B, N, d) cos/sin (rotate-half convention)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def decoder_attentions(model) -> list[torch.nn.Module]:
    """The language decoder's self-attention modules (having ``q_proj``/``k_proj``), in layer order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    found = [m for m in decoder.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not found:
        raise TypeError(f"VL-SAM found no decoder self-attention with q_proj/k_proj in {type(model).__name__}")
    return found


@dataclass
class QKCapture:
    """Per-layer Q/K chunks, one chunk per forward call (prefill, then one token per decode step)."""

    q: list[list[torch.Tensor]] = field(default_factory=list)
    k: list[list[torch.Tensor]] = field(default_factory=list)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(Q (B, H, N, d), K (B, Hk, N, d))] with the chunks joined along the sequence."""
        return [(torch.cat(q, dim=2), torch.cat(k, dim=2)) for q, k in zip(self.q, self.k)]


def _qk_hook(store: QKCapture, index: int):
    def hook(module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        b, n, _ = h.shape
        d = module.head_dim
        with torch.no_grad():
            q = module.q_proj(h).view(b, n, -1, d)
            k = module.k_proj(h).view(b, n, -1, d)
            if hasattr(module, "q_norm"):  # Qwen3-style per-head norms before RoPE
                q, k = module.q_norm(q), module.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            rope = kwargs.get("position_embeddings")
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        store.q[index].append(q.detach())
        store.k[index].append(k.detach())
    return hook


@contextlib.contextmanager
def capture_qk(model) -> Iterator[QKCapture]:
    """Record rotary-embedded Q/K of every decoder layer during the forward calls inside the block."""
    modules = decoder_attentions(model)
    store = QKCapture([[] for _ in modules], [[] for _ in modules])
    handles = [m.register_forward_pre_hook(_qk_hook(store, i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


# -- steps 1 and 5: one image -> grid --------------------------------------------------------------
def object_phrase(prompt: str, words: Sequence[str] = OBJECT_WORDS) -> str:
    """The first object word in the prompt (``tumour``, ``mass``, ...), else the whole prompt."""
    for token in re.findall(r"[a-z]+", prompt.lower()):
        if token in words:
            return token
    return prompt.strip()


def find_subsequence(seq: Sequence[int], sub: Sequence[int]) -> int:
    """Start of the first occurrence of ``sub`` in ``seq``, -1 if absent."""
    m = len(sub)
    for i in range(len(seq) - m + 1) if m else ():
        if list(seq[i:i + m]) == list(sub):
            return i
    return -1


@dataclass
class VlsamResult:
    grid: torch.Tensor  # (gh, gw) raw flow values over the merged patch grid
    answer: str
    object_positions: list[int]
    appended: bool  # the object was not in the answer and was teacher-forced after it
    seconds: float
    sequence: list[int]  # the token ids the flow was computed over


def chat_inputs(processor, image: np.ndarray, question: str, device) -> dict[str, torch.Tensor]:
    from negdpo.core.imageio import to_rgb_uint8
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.fromarray(to_rgb_uint8(image))], text=[text], return_tensors="pt")
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def vlsam_grid(model, processor, image: np.ndarray, obj: str, question: str = DEFAULT_QUESTION,
               max_new_tokens: int = 24, regularise: bool = True) -> VlsamResult:
    """Steps 1-5 for one image (H, W[, 3]) in [0, 1] and one object phrase."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    tok = processor.tokenizer
    inputs = chat_inputs(processor, image, question, device)
    prompt = inputs["input_ids"]
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, prompt.shape[1]:]
    stops = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
    answer = generated.tolist()
    cut = next((i for i, t in enumerate(answer) if t in stops), len(answer))
    answer = answer[:cut]
    start, obj_ids = -1, []
    for variant in dict.fromkeys((" " + obj, obj, " " + obj.capitalize(), obj.capitalize())):
        obj_ids = tok(variant, add_special_tokens=False)["input_ids"]
        start = find_subsequence(answer, obj_ids)
        if start >= 0:
            break
    appended = start < 0
    if appended:  # not in the answer: teacher-force " <object>" after it
        obj_ids = tok(" " + obj, add_special_tokens=False)["input_ids"]
        start, answer = len(answer), answer + obj_ids
    tail = torch.tensor([answer], dtype=prompt.dtype, device=device)
    seq = torch.cat([prompt, tail], dim=1)
    forward = dict(inputs, input_ids=seq, attention_mask=torch.ones_like(seq))
    if "mm_token_type_ids" in inputs:
        forward["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tail)], dim=1)
    with capture_qk(model) as cap:
        model(**forward, use_cache=False)
    flow = flow_from_qk(cap.layers(), regularise)[0]
    image_id = getattr(model.config, "image_token_id", None) or tok.convert_tokens_to_ids("<|image_pad|>")
    image_pos = (seq[0] == image_id).nonzero()[:, 0]
    merge = int(getattr(processor.image_processor, "merge_size", 1))
    _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
    gh, gw = gh // merge, gw // merge
    if image_pos.numel() != gh * gw:
        raise RuntimeError(f"{image_pos.numel()} image tokens for a {gh} x {gw} merged grid")
    positions = [prompt.shape[1] + start + i for i in range(len(obj_ids))]
    grid = flow[positions][:, image_pos].mean(0).reshape(gh, gw)
    return VlsamResult(grid.float().cpu(), tok.decode(answer[:start] if appended else answer,
                                                      skip_special_tokens=True),
                       positions, appended, time.perf_counter() - t0, seq[0].tolist())


def grid_to_map(grid: torch.Tensor, h: int, w: int) -> np.ndarray:
    """(gh, gw) -> bilinear (H, W) (``align_corners=False``) -> min-max [0, 1] float32."""
    up = F.interpolate(grid[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    return minmax(up)[0].numpy().astype(np.float32)


# -- step 6: SAM point prompts ---------------------------------------------------------------------
def peak_points(sal: np.ndarray, k: int = 3, n_negative: int = 3, spacing: float = 8.0, min_peak: float = 0.5,
                low_quantile: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Points (P, 2) as (x, y) pixels and labels (1 positive, 0 negative) from a map (H, W).

    Positives: repeatedly the maximum of what is left (first in raster order on ties), then every pixel
    closer than ``spacing`` is removed; stops at ``k`` points or when the maximum falls below
    ``min_peak * max``. Negatives: pixels with values <= the ``low_quantile`` quantile, each the one
    farthest from all points chosen so far (positives included); at most ``n_negative``.
    """
    sal = np.asarray(sal, np.float64)
    h, w = sal.shape
    yy, xx = np.mgrid[0:h, 0:w]
    top = float(sal.max()) if sal.size else 0.0
    points: list[tuple[int, int]] = []
    if top > 0:
        left = sal.copy()
        while len(points) < k:
            idx = int(np.argmax(left))
            y, x = divmod(idx, w)
            if not np.isfinite(left[y, x]) or left[y, x] < min_peak * top:
                break
            points.append((x, y))
            left[(xx - x) ** 2 + (yy - y) ** 2 < spacing ** 2] = -np.inf
    n_pos = len(points)
    if n_negative > 0 and n_pos > 0:
        region = sal <= np.quantile(sal, low_quantile)
        cy, cx = yy[region].astype(np.float64), xx[region].astype(np.float64)
        dmin = np.full(cy.shape, np.inf)
        for x, y in points:
            dmin = np.minimum(dmin, (cx - x) ** 2 + (cy - y) ** 2)
        for _ in range(min(n_negative, cy.size)):
            j = int(np.argmax(dmin))
            points.append((int(cx[j]), int(cy[j])))
            dmin = np.minimum(dmin, (cx - cx[j]) ** 2 + (cy - cy[j]) ** 2)
    labels = np.array([1] * n_pos + [0] * (len(points) - n_pos), dtype=np.int64)
    return np.asarray(points, dtype=np.float32).reshape(-1, 2), labels


def segment_from_points(predictor, points: np.ndarray, labels: np.ndarray, hw: tuple[int, int],
                        multimask: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """SAM mask from point prompts on the image already set in ``predictor`` (a ``SamPredictor``);
    with ``multimask`` the candidate with the highest predicted IoU. No positive point -> empty mask."""
    if not (labels == 1).any():
        return np.zeros(hw, bool), {"empty_coarse": True, "n_prompts": 0}
    masks, scores, _ = predictor.predict(point_coords=points, point_labels=labels, multimask_output=multimask)
    return np.asarray(masks[int(np.argmax(scores))], bool), {"empty_coarse": False, "n_prompts": int(len(labels))}


def segment_map(predictor, sal: np.ndarray, k: int = 3, n_negative: int = 3, spacing_frac: float = 0.1,
                multimask: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """VL-SAM's SAM call: ``peak_points`` of the map (spacing = ``spacing_frac * min(H, W)`` px), one prompt."""
    h, w = sal.shape
    points, labels = peak_points(sal, k, n_negative, spacing=max(spacing_frac * min(h, w), 1.0))
    return segment_from_points(predictor, points, labels, (h, w), multimask)


# -- the registered method -------------------------------------------------------------------------
_BUNDLES: dict[tuple[str, str], tuple[Any, Any]] = {}


def vlm_bundle(name: str, device: str) -> tuple[Any, Any]:
    """(model, processor), loaded once per (name, device) in this process."""
    key = (name, str(device))
    if key not in _BUNDLES:
        from negdpo.core.models.vlm import load_vlm

        _BUNDLES[key] = load_vlm(name, device)
    return _BUNDLES[key]


@register("vlsam")
def vlsam(ctx: SaliencyContext, scans: Sequence, prompts: Sequence[str]) -> list[np.ndarray]:
    """Options: ``vlm`` (preset, folder or hub id; default ``tiny``), ``vlsam_question``, ``vlsam_object``
    (fixed object phrase; default: the prompt's object word), ``vlsam_max_new_tokens`` (24),
    ``vlsam_regularise`` (True). Per-image seconds are appended to ``ctx.options['vlsam_seconds']``."""
    opts = ctx.options
    model, processor = vlm_bundle(opts.get("vlm") or "tiny", ctx.device)
    out = []
    for scan, prompt in zip(scans, prompts, strict=True):
        res = vlsam_grid(model, processor, scan.image, opts.get("vlsam_object") or object_phrase(prompt),
                         opts.get("vlsam_question") or DEFAULT_QUESTION,
                         int(opts.get("vlsam_max_new_tokens") or 24), bool(opts.get("vlsam_regularise", True)))
        opts.setdefault("vlsam_seconds", []).append(res.seconds)
        out.append(grid_to_map(res.grid, *scan.image.shape[:2]))
    return out
