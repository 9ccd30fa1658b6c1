"""Saliency methods by name: ``m2ib`` (information bottleneck), ``surgery`` (CLIP Surgery), ``vlsam``
(VL-SAM, a vision-language model's attention flow), ``oracle``.

A method is one function ``fn(ctx, scans, prompts) -> list[np.ndarray]`` returning, per scan, a
float32 map in [0, 1] at the scan's own resolution (H, W). Register a new one with::

    @register("my_method")
    def my_method(ctx: SaliencyContext, scans, prompts): ...
"""

from . import m2ib, oracle, surgery, vlsam  # noqa: E402,F401  (registers the built-in methods)
from .base import SaliencyContext, SaliencyFn, available, get, register

__all__ = ["SaliencyContext", "SaliencyFn", "available", "get", "register"]
