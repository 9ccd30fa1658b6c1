"""Output folders that never mix runs: refuse / overwrite / resume, and one lock per folder.

A command that writes into a folder marks it with ``.negdpo-run.json`` (``owner``: the command,
``fingerprint``: a hash of its settings). ``prepare_output_dir`` then decides:

* missing or empty folder: create it, mark it;
* the same owner and fingerprint (the same run again): clean what the command owns, go on;
* ``resume=True`` and the same owner: keep everything (the caller continues from its checkpoints);
* ``overwrite=True``: clean what the command owns (``owned``: names/globs of top-level entries; None =
  everything), keep anything else. Only a folder a negdpo command marked is cleaned: in an unmarked
  folder, an entry the command would own is refused (your own files are never deleted), others stay;
* anything else (a different run, another command, files of unknown origin): refuse with the fix.

``run_lock`` stops two runs from sharing a folder: ``.negdpo.lock`` is created with
``O_CREAT | O_EXCL`` and holds the pid, its start time and the host; a lock whose process is gone (same
host; a pid now used by a process with another start time counts as gone) is stale and taken over with a
warning; ``wait=`` gives a live holder that many seconds to finish before
failing. ``output_dir`` combines both (lock first, so two runs never clean at once). With
Accelerate, call these on the main process only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
MARKER = ".negdpo-run.json"
LOCK = ".negdpo.lock"
_BOOKKEEPING = (MARKER, LOCK)


class OutputDirError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to do."""


class OutputDirLockedError(OutputDirError):
    """Another live run holds the folder's lock."""


def fingerprint(settings: Any) -> str:
    """A short stable hash of JSON-able settings (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The folder's run marker, or None if it has none (or an unreadable one)."""
    marker = Path(path) / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _entries(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.name not in _BOOKKEEPING)


def _matches(name: str, owned: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in owned)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def clean_owned(path: str | Path, owned: Sequence[str] | None) -> list[str]:
    """Delete the top-level entries of ``path`` matching ``owned`` (all entries if None); returns their names."""
    path = Path(path)
    gone = [p for p in _entries(path) if owned is None or _matches(p.name, owned)]
    for p in gone:
        _remove(p)
    return [p.name for p in gone]


def _write_marker(path: Path, owner: str, fp: str | None) -> None:
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"owner": owner, "fingerprint": fp}, indent=1))  # no time/pid: same run, same bytes
    tmp.replace(path / MARKER)


def prepare_output_dir(path: str | Path, owner: str, overwrite: bool = False, resume: bool = False, *,
                       owned: Sequence[str] | None = None, settings: Any = None,
                       flag: str = "--overwrite_output_dir") -> Path:
    """Make ``path`` ready for a run of ``owner`` (see the module doc); returns it as a ``Path``.

    ``owned``: names or globs of the top-level entries the command writes (what overwrite cleans).
    ``settings``: JSON-able settings; the same settings again count as the same run.
    ``flag``: the option the error message tells the user to add.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path}: exists and is not a folder; choose another output folder")
    path.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(settings) if settings is not None else None
    entries = _entries(path)
    marker = read_marker(path)
    mine = marker is not None and marker.get("owner") == owner
    if entries:
        if resume and mine:
            _write_marker(path, owner, fp)
            return path
        clash = [p.name for p in entries if owned is None or _matches(p.name, owned)]
        if marker is None and clash:  # never delete files negdpo did not write
            raise OutputDirError(f"{path}: '{clash[0]}' was not written by negdpo, so it is not replaced or "
                                 "deleted; choose an empty folder (or remove it yourself)")
        same_run = mine and fp is not None and marker.get("fingerprint") == fp
        if not (overwrite or same_run):
            if marker is None:
                origin, fix = "files not written by negdpo", f"add {flag} to write beside them"
            elif not mine:
                origin, fix = f"the output of `negdpo {marker.get('owner')}`", f"add {flag} to replace it"
            else:
                origin = f"an earlier `negdpo {owner}` run" + (" with other settings" if fp is not None else "")
                fix = f"add {flag} to replace it"
            fixes = f"choose an empty folder or {fix}"
            if resume and not mine:
                fixes = f"resume needs a folder written by `negdpo {owner}`; " + fixes
            raise OutputDirError(f"{path}: holds {origin} ({len(entries)} entries, e.g. '{entries[0].name}'); "
                                 f"{fixes}")
        removed = clean_owned(path, owned) if marker is not None else []
        if removed:  # a rerun with the same settings is routine; replacing another run is worth a warning
            logger.log(logging.INFO if same_run and not overwrite else logging.WARNING,
                       "%s: removed %d entries of the previous run (%s)", path, len(removed),
                       ", ".join(removed[:5]) + (", ..." if len(removed) > 5 else ""))
    _write_marker(path, owner, fp)
    return path


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, from ``/proc``), or None where unknown.

    With the pid it identifies a process: a pid reused by another process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _holder_alive(held: dict[str, Any]) -> bool:
    """The lock's process still runs: its pid exists and, where recorded, has the same start time."""
    pid = int(held.get("pid", -1) or -1)
    if not _pid_alive(pid):
        return False
    recorded, now = held.get("start"), _start_time(pid)
    return recorded is None or now is None or str(recorded) == now


def _read_lock(lock: Path) -> dict[str, Any]:
    try:
        data = json.loads(lock.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _age(p: Path) -> float:
    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return float("inf")


def _take(path: Path) -> dict[str, Any]:
    """Create the lock file (taking over a stale one); returns its content or raises ``OutputDirLockedError``."""
    lock = path / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(lock)
            pid, host = int(held.get("pid", -1) or -1), held.get("host")
            being_written = not held and _age(lock) < 10.0  # created, pid not written yet
            if being_written or host not in (None, me["host"]) or _holder_alive(held) or attempt:
                where = f"pid {pid}" + (f" on {host}" if host and host != me["host"] else "")
                raise OutputDirLockedError(
                    f"{path}: in use by another run ({where}); wait for it, or delete {lock} if that run is gone"
                ) from None
            gone = "no such process" if not _pid_alive(pid) else "that pid now belongs to another process"
            logger.warning("%s: taking over a stale lock of pid %s (%s)", path, pid, gone)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    return me


@contextlib.contextmanager
def run_lock(path: str | Path, wait: float = 0.0, poll: float = 0.5) -> Iterator[Path]:
    """Hold ``path/.negdpo.lock`` for the block; raises ``OutputDirLockedError`` if a live run holds it
    (after waiting up to ``wait`` seconds for it to end)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path}: exists and is not a folder; choose another output folder")
    path.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        try:
            me = _take(path)
            break
        except OutputDirLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(poll)
    try:
        yield path
    finally:
        lock = path / LOCK
        if _read_lock(lock).get("pid") == me["pid"]:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


@contextlib.contextmanager
def output_dir(path: str | Path, owner: str, overwrite: bool = False, resume: bool = False, *,
               owned: Sequence[str] | None = None, settings: Any = None,
               flag: str = "--overwrite_output_dir") -> Iterator[Path]:
    """``run_lock`` + ``prepare_output_dir``: the folder is locked before anything in it is cleaned."""
    with run_lock(path) as p:
        yield prepare_output_dir(p, owner, overwrite, resume, owned=owned, settings=settings, flag=flag)
