"""The locked test split (issue 22): while a lock is active no reader can open a test file, reads of the other
splits are counted, a nested block never unlocks, worker processes inherit the lock, and the study's selection
phase refuses a stage that would read the test split. The full study run (tests/test_study.py) runs every real
selection stage under the lock."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from negdpo.core.imageio import read_scan
from negdpo.core.scans import ScanFolder
from negdpo.core.split_lock import LockedSplitError, active_lock, locked_splits, split_of

from negdpo.study.cache import StudyRun, _run_in_worker
from negdpo.study.data import held_out_positives, pool_positives


def test_split_of_names_the_split_folder():
    assert split_of("/x/test_images/a.png") == "test" and split_of(Path("d/val_twins/b.png")) == "val"
    assert split_of("/x/pretrain_masks/a.png") == "pretrain"
    assert split_of("/x/negatives/a.png") is None and split_of("/x/test_images") is None and split_of(3) is None


def test_no_reader_opens_a_locked_split(phantom_dir):
    folder = ScanFolder(phantom_dir)
    test_file = folder.image_files("test")[0]
    with locked_splits(("test",)) as record:
        assert active_lock() == {"test"}
        train = folder.load_split("train")  # allowed, and counted (images + masks + twins)
        with pytest.raises(LockedSplitError, match="'test' split is locked"):
            read_scan(test_file)  # PIL
        with pytest.raises(LockedSplitError):
            open(test_file, "rb")  # noqa: SIM115  (plain open)
        with pytest.raises(LockedSplitError):
            np.load(test_file, allow_pickle=False)
        with pytest.raises(LockedSplitError):
            folder.load_split("test")
        with pytest.raises(LockedSplitError):
            held_out_positives(phantom_dir)  # val + test: the generator table's scans
        with locked_splits(()):  # a nested block never unlocks
            assert active_lock() == {"test"}
            with pytest.raises(LockedSplitError):
                read_scan(test_file)
    n_twins = sum(s.twin is not None for s in train)
    assert record.reads["train"] == 2 * len(train) + n_twins and "test" not in record.reads
    assert active_lock() == frozenset()
    assert read_scan(test_file).size > 0  # unlocked again


def test_study_phases_lock_and_record(phantom_dir, tmp_path):
    run = StudyRun(cfg=None, work=tmp_path, out=tmp_path, device="cpu")
    with run.selection():
        with pytest.raises(LockedSplitError):
            ScanFolder(phantom_dir).load_split("test")
        ScanFolder(phantom_dir).load_split("val")
    with run.phase("evaluation"):
        ScanFolder(phantom_dir).load_split("test")
    assert "test" not in run.reads["selection"] and run.reads["selection"]["val"] > 0
    assert run.reads["evaluation"]["test"] > 0


def _leaky_stage(phantoms: str, out: Path) -> dict:
    return {"n": len(ScanFolder(phantoms).load_split("test"))}


def test_a_worker_stage_inherits_the_lock(phantom_dir, tmp_path):
    """Independent stages run in worker processes through ``_run_in_worker`` with the parent's lock."""
    from functools import partial

    with pytest.raises(LockedSplitError):
        _run_in_worker(tmp_path, "leaky", {"k": 1}, partial(_leaky_stage, str(phantom_dir)), frozenset({"test"}))
    assert not (tmp_path / "leaky" / "stage.json").exists()  # a refused stage leaves no stamp
    _run_in_worker(tmp_path, "ok", {"k": 1}, partial(_leaky_stage, str(phantom_dir)), frozenset())
    assert json.loads((tmp_path / "ok" / "stage.json").read_text())["result"]["n"] > 0


def test_pool_positives_read_the_pool_only(tmp_path):
    from negdpo.core.phantoms import PhantomConfig, generate

    root = generate(PhantomConfig(out=str(tmp_path / "p"), n=8, size=32, seed=0, slices=1, pretrain_n=4,
                                  preview=False))
    with locked_splits(("train", "val", "test")) as record:
        assert pool_positives(root, 3)
    assert set(record.reads) == {"pretrain"}


def _read_split(phantoms: str, split: str, out: Path) -> dict:
    return {"n": len(ScanFolder(phantoms).load_split(split))}


def test_stage_reads_live_in_the_stamp_and_count_once(phantom_dir, tmp_path):
    """A stage's own reads and the stages it read are stored in its ``stage.json``; the phase counts each stage once
    per run, whether it ran or came from the cache (a re-render reports what the computing run opened, nested
    stages included); a stamp without a reads record is named, not guessed."""
    from functools import partial
    from types import SimpleNamespace

    cfg = SimpleNamespace(workers=1, threads=1, preset="t")
    val = ("val_stage", {"k": 1}, partial(_read_split, str(phantom_dir), "val"))

    def outer(d: Path) -> dict:  # a stage that reads another stage (the twin-free chain's shape)
        inner = run.stage(*val)
        return {"n": inner["n"] + len(ScanFolder(phantom_dir).load_split("train"))}

    run = StudyRun(cfg=cfg, work=tmp_path, out=tmp_path, device="cpu")
    with run.selection():
        run.stage("outer", {"k": 1}, outer)
        run.stage(*val)  # read again: not counted again
    n_val, n_train = (len(ScanFolder(phantom_dir).load_split(s)) for s in ("val", "train"))
    stamp = lambda name: json.loads((tmp_path / name / "stage.json").read_text())["reads"]  # noqa: E731
    assert stamp("val_stage")["val"] >= 2 * n_val and set(stamp("val_stage")) == {"val"}  # images + masks
    assert set(stamp("outer")) == {"train"} and stamp("outer")["train"] >= 2 * n_train  # its own opens only
    assert json.loads((tmp_path / "outer" / "stage.json").read_text())["stages"] == ["val_stage"]  # and what it read
    assert run.reads["selection"] == {**stamp("outer"), **stamp("val_stage")}
    cached = StudyRun(cfg=cfg, work=tmp_path, out=tmp_path, device="cpu")
    with cached.selection():
        cached.stage("outer", {"k": 1}, outer)  # cached: its fn (which reads val_stage) does not run
    assert cached.reads == run.reads and cached.unrecorded == []
    with cached.selection():
        cached.stage(*val)  # counted through "outer" already
    assert cached.reads == run.reads
    info = json.loads((tmp_path / "val_stage" / "stage.json").read_text())
    del info["reads"]
    (tmp_path / "val_stage" / "stage.json").write_text(json.dumps(info))
    old = StudyRun(cfg=cfg, work=tmp_path, out=tmp_path, device="cpu")
    with old.phase("evaluation"):
        old.stage(*val)
    assert old.unrecorded == ["val_stage"] and dict(old.reads["evaluation"]) == {}


@pytest.mark.integration  # spawns worker processes (~15 s)
def test_background_stages_run_beside_the_caller_locked_and_counted(phantom_dir, tmp_path):
    """``StudyRun.background``: stages start on a spare worker and the block goes on; leaving it waits. The worker's
    reads are kept in the stage's stamp and counted where the stage is read back; a stage that opens a locked
    split fails the run there."""
    from functools import partial
    from types import SimpleNamespace

    from negdpo.study.twinfree import write_twinless_copy

    run = StudyRun(cfg=SimpleNamespace(workers=2, threads=1, preset="t"), work=tmp_path, out=tmp_path, device="cpu")
    copy_val = [("copy_val", {"k": 1}, partial(write_twinless_copy, phantom_dir, splits=("val",)))]
    with run.background(copy_val, ("test",)) as started:
        assert started == ["copy_val"]
    n_val = len(ScanFolder(phantom_dir).image_files("val"))
    stamp = json.loads((tmp_path / "copy_val" / "stage.json").read_text())
    assert stamp["pid"] != os.getpid() and stamp["reads"]["val"] >= n_val and "test" not in stamp["reads"]
    assert run.reads == {}  # nothing counted until the stage is read back
    with run.selection():
        run.stage(*copy_val[0])
    assert run.reads["selection"] == stamp["reads"]
    assert len(list((tmp_path / "copy_val" / "val_images").iterdir())) == n_val
    with run.background(copy_val, ("test",)) as started:
        assert started == []  # cached: nothing reruns
    copy_test = [("copy_test", {"k": 1}, partial(write_twinless_copy, phantom_dir, splits=("test",)))]
    with pytest.raises(LockedSplitError), run.background(copy_test, ("test",)):
        pass
    assert not (tmp_path / "copy_test" / "stage.json").exists()
    serial = StudyRun(cfg=SimpleNamespace(workers=1, threads=1, preset="t"), work=tmp_path / "s", out=tmp_path,
                      device="cpu")
    with serial.background(copy_test, ("test",)) as started:
        assert started == []  # no spare worker: the stage runs later, where the caller reads it
