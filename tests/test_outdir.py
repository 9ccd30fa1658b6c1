"""Output folders: refuse / same-run clean / overwrite / resume, never deleting foreign files; the run lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from negdpo.core.outdir import (
    LOCK,
    MARKER,
    OutputDirError,
    OutputDirLockedError,
    output_dir,
    prepare_output_dir,
    read_marker,
    run_lock,
)

OWNED = ["images", "metrics.csv", "*.png"]


def _run(path, settings, **kw):
    return prepare_output_dir(path, "tool", owned=OWNED, settings=settings, **kw)


def _fill(path):
    (path / "images").mkdir(parents=True, exist_ok=True)
    (path / "images" / "a.png").write_bytes(b"x")
    (path / "metrics.csv").write_text("old")
    (path / "notes.txt").write_text("keep me")


def test_new_folder_is_created_and_marked(tmp_path):
    out = _run(tmp_path / "new" / "deep", {"a": 1})
    assert out.is_dir() and read_marker(out)["owner"] == "tool"


def test_same_run_cleans_stale_outputs_other_run_is_refused(tmp_path):
    _run(tmp_path, {"a": 1})
    _fill(tmp_path)
    _run(tmp_path, {"a": 1})  # the same settings: stale outputs removed, foreign file kept
    assert not (tmp_path / "images").exists() and not (tmp_path / "metrics.csv").exists()
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    _fill(tmp_path)
    with pytest.raises(OutputDirError, match=r"earlier `negdpo tool` run with other settings.*--overwrite_output_dir"):
        _run(tmp_path, {"a": 2})
    assert (tmp_path / "metrics.csv").read_text() == "old"  # refusing touches nothing
    _run(tmp_path, {"a": 2}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "notes.txt"]


def test_other_command_refused_unless_overwrite(tmp_path):
    prepare_output_dir(tmp_path, "phantoms", settings={})
    (tmp_path / "x.png").write_bytes(b"1")
    with pytest.raises(OutputDirError, match=r"output of `negdpo phantoms`"):
        _run(tmp_path, {})
    with pytest.raises(OutputDirError, match="resume needs a folder written by `negdpo tool`"):
        _run(tmp_path, {}, resume=True)
    _run(tmp_path, {}, overwrite=True)
    assert not (tmp_path / "x.png").exists() and read_marker(tmp_path)["owner"] == "tool"


def test_resume_keeps_everything(tmp_path):
    _run(tmp_path, {"a": 1})
    _fill(tmp_path)
    _run(tmp_path, {"a": 2}, resume=True)
    assert (tmp_path / "metrics.csv").read_text() == "old" and (tmp_path / "images" / "a.png").exists()


def test_unmarked_folder_is_never_wiped(tmp_path):
    (tmp_path / "metrics.csv").write_text("the user's own")
    with pytest.raises(OutputDirError, match="not written by negdpo, so it is not replaced"):
        _run(tmp_path, {})
    with pytest.raises(OutputDirError, match="'metrics.csv' was not written by negdpo, so it is not replaced or deleted"):
        _run(tmp_path, {}, overwrite=True)
    with pytest.raises(OutputDirError, match="not written by negdpo"):  # owned=None would mean everything
        prepare_output_dir(tmp_path, "tool", overwrite=True)
    assert (tmp_path / "metrics.csv").read_text() == "the user's own"
    (tmp_path / "metrics.csv").unlink()
    (tmp_path / "README").write_text("unrelated")  # nothing the command owns: it writes beside it if told to
    with pytest.raises(OutputDirError, match="files not written by negdpo .*--overwrite_output_dir to write beside"):
        _run(tmp_path, {})
    _run(tmp_path, {}, overwrite=True)
    assert (tmp_path / "README").exists()


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputDirError, match="is not a folder"):
        _run(tmp_path / "f", {})


def test_lock_excludes_second_run_and_is_released(tmp_path):
    with run_lock(tmp_path):
        held = json.loads((tmp_path / LOCK).read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(OutputDirLockedError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK).exists()
    with pytest.raises(RuntimeError):  # released on error too
        with run_lock(tmp_path):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK).exists()


def test_stale_lock_taken_over_with_warning(tmp_path, caplog):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)  # a pid that has exited
    import socket

    (tmp_path / LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    with caplog.at_level("WARNING"), run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert f"stale lock of pid {dead}" in caplog.text
    # a lock from another host cannot be checked: it is respected
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead, "host": "elsewhere"}))
    with pytest.raises(OutputDirLockedError, match="on elsewhere"):
        with run_lock(tmp_path):
            pass


def test_output_dir_locks_then_prepares(tmp_path):
    with output_dir(tmp_path / "o", "tool", owned=OWNED, settings={}) as out:
        assert (out / LOCK).exists() and read_marker(out)["owner"] == "tool"
        (out / "metrics.csv").write_text("1")
    assert not (out / LOCK).exists()
    with output_dir(out, "tool", owned=OWNED, settings={}):  # the lock file is bookkeeping, not content
        assert not (out / "metrics.csv").exists()


def test_lock_waits_for_a_run_that_ends(tmp_path):
    import threading
    import time

    held, release = threading.Event(), threading.Event()

    def other_run():
        with run_lock(tmp_path):
            held.set()
            release.wait(5)

    t = threading.Thread(target=other_run)
    t.start()
    held.wait(5)
    with pytest.raises(OutputDirLockedError):
        with run_lock(tmp_path, wait=0.2, poll=0.05):
            pass
    threading.Timer(0.3, release.set).start()
    t0 = time.monotonic()
    with run_lock(tmp_path, wait=5, poll=0.05):
        assert time.monotonic() - t0 >= 0.2
    t.join()


def test_concurrent_ensure_phantoms_one_set(tmp_path):
    import csv
    import threading

    from negdpo.core.phantoms import ensure_phantoms

    errors: list[BaseException] = []

    def worker():
        try:
            ensure_phantoms(tmp_path / "ph", n=4, size=32, preview=False)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = list(csv.DictReader(open(tmp_path / "ph" / "meta.csv")))
    assert len(rows) == 8 == len(list((tmp_path / "ph").glob("*_images/*.png")))
