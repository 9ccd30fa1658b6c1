"""User errors of the command layer: what :func:`negdpo.core.console.run_main` prints as one line and exit 2.

Dependency-free, so ``core.config`` (the dataclass parser), ``core.models`` and the console can all use it.
"""

from __future__ import annotations

import argparse
import contextvars
from typing import Any, NoReturn


class UserError(Exception):
    """An error the user can fix (a missing file or model, a bad flag): one line and exit 2 under :func:`run_main`.

    Library errors that mean this (``ModelNotAvailableError``) derive from it as well as from their usual base."""


class UsageError(UserError, ValueError):
    """A command line argparse rejects (unknown flag, bad value, missing required flag)."""


_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("negdpo_prog", default=None)


def current_prog(default: str | None = None) -> str | None:
    """The program name :func:`run_main` is running (``negdpo evaluate``), else ``default``."""
    return _PROG.get() or default


class CommandParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors raise :class:`UsageError` (one line through :func:`run_main`) instead of
    printing the usage and exiting; ``prog`` defaults to the running command's name, abbreviations are off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not args and kwargs.get("prog") is None:
            kwargs["prog"] = current_prog()
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)
