"""What a command prints: quiet library loggers, and user errors as one line (traceback with ``--debug``)."""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from .errors import _PROG, CommandParser, UsageError, UserError, current_prog  # noqa: F401  (re-exported)

QUIET = ("diffusers", "transformers", "accelerate", "peft", "httpx", "urllib3", "datasets", "open_clip", "timm",
         "torch", "matplotlib", "PIL", "fsspec", "filelock", "huggingface_hub")
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError,
                                                IsADirectoryError, PermissionError, UserError)


def setup_logging(debug: bool = False) -> None:
    """``negdpo`` loggers at INFO (DEBUG with ``--debug``) to stderr; libraries at WARNING; root untouched."""
    log = logging.getLogger("negdpo")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error() if not debug else hf_logging.set_verbosity_info()
    except ImportError:  # pragma: no cover
        pass


def disk_full_message(err: OSError, folder: object = None) -> str:
    """One line for ENOSPC: the folder, what was kept, how to go on."""
    where = err.filename or folder
    detail = err.strerror or ""
    extra = detail[len(os.strerror(errno.ENOSPC)):].strip() if detail.startswith(os.strerror(errno.ENOSPC)) else ""
    return (f"No space left on device{f' in {where}' if where else ''}{f' {extra}' if extra else ''}; "
            "free space there, then rerun the same command (trainers: add --resume_from_checkpoint latest; "
            "complete checkpoints, shards and logged steps are kept)")


def pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` from ``argv``; returns (rest, debug)."""
    return [a for a in argv if a != "--debug"], "--debug" in argv


def one_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's key without quotes; line breaks joined with '; ')."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts) or type(err).__name__


def run_main(prog: str, fn: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Call ``fn(argv)``; a user error prints ``<prog>: error: <message>`` and returns 2 (3 for a NaN stop)."""
    from .training import NonFiniteError

    argv, debug = pop_debug(list(sys.argv[1:] if argv is None else argv))
    setup_logging(debug)
    token = _PROG.set(prog)
    try:
        result = fn(argv)
    except NonFiniteError as err:
        if debug:
            raise
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 3
    except USER_ERRORS as err:
        if debug:
            raise
        hint = "--help for the options" if isinstance(err, UsageError) else "--debug for the traceback"
        print(f"{prog}: error: {one_line(err)} ({hint})", file=sys.stderr)
        return 2
    except OSError as err:
        if debug or err.errno != errno.ENOSPC:
            raise
        print(f"{prog}: error: {disk_full_message(err)}", file=sys.stderr)
        return 2
    finally:
        _PROG.reset(token)
    return int(result) if isinstance(result, int) else 0
