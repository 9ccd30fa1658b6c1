"""The saliency registry and the context a method receives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np


class ScanLike(Protocol):
    """What a saliency method reads from a scan (``negdpo.core.scans.Scan`` satisfies it)."""

    name: str
    image: np.ndarray
    mask: np.ndarray


@dataclass
class SaliencyContext:
    """Everything shared by the calls of one method: the CLIP bundle, device, options, seed.

    ``clip`` is ``(model, preprocess, tokenizer)`` from ``negdpo.core.models.load_clip`` (None for methods
    that need no model, e.g. ``oracle``). ``align``: ``"crop"`` maps the 224-px crop back onto the
    part of the frame it covers (rest = 0); ``"stretch"`` reproduces the public implementation, which
    stretches the crop's map over the whole frame (nearest neighbour). ``seed`` is the base seed;
    methods derive per-image seeds from it and the image name.
    """

    clip: tuple[Any, Any, Any] | None = None
    device: str = "cpu"
    align: Literal["crop", "stretch"] = "crop"
    seed: int = 12
    options: dict[str, Any] = field(default_factory=dict)


SaliencyFn = Callable[[SaliencyContext, Sequence[ScanLike], Sequence[str]], list[np.ndarray]]
_REGISTRY: dict[str, SaliencyFn] = {}


def register(name: str) -> Callable[[SaliencyFn], SaliencyFn]:
    def deco(fn: SaliencyFn) -> SaliencyFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"saliency method '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn
    return deco


def get(name: str) -> SaliencyFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown saliency method '{name}'; available: {', '.join(available())}") from None


def available() -> list[str]:
    return sorted(_REGISTRY)
