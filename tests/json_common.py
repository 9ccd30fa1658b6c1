"""Shared by the tests that inspect written JSON: every string in a parsed document."""

from __future__ import annotations

from typing import Any


def json_strings(obj: Any, keys: bool = True) -> list[str]:
    """Every string value in ``obj`` (nested dicts and lists), and every dict key too when ``keys``."""
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in ([str(k)] if keys else []) + json_strings(v, keys)]
    if isinstance(obj, list):
        return [s for v in obj for s in json_strings(v, keys)]
    return [obj] if isinstance(obj, str) else []
