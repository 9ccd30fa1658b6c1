"""Checkpoint folders: numeric order, completeness marker, atomic finalisation, pruning after completion."""

import pytest
from negdpo.core.checkpoints import (
    MARKER,
    finalize_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    partial_dir,
    prune_checkpoints,
    write_checkpoint,
)


def _complete(path):
    path.mkdir()
    (path / MARKER).write_text("{}")


def test_order_latest_and_prune(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-9"):
        _complete(tmp_path / name)
    for name in ("checkpoint-tmp", "logs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a state folder")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert (tmp_path / "checkpoint-tmp").is_dir()  # not ours to delete
    prune_checkpoints(tmp_path, keep=None)  # None keeps all
    assert len(list_checkpoints(tmp_path)) == 2
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10"]


def test_latest_skips_incomplete_and_says_so(tmp_path, caplog):
    _complete(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-6").mkdir()  # a kill during an old-style save: no marker
    (tmp_path / "checkpoint-6" / "model.safetensors").write_text("half")
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert "checkpoint-6" in caplog.text
    prune_checkpoints(tmp_path, keep=5)  # incomplete ones are removed by pruning, complete ones kept
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]


def test_partial_write_is_invisible_and_finalize_is_atomic(tmp_path):
    tmp = partial_dir(tmp_path, 3)
    tmp.mkdir()
    (tmp / "state.bin").write_text("x")
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []  # killed mid-save: nothing
    final = finalize_checkpoint(tmp_path, 3)
    assert final.name == "checkpoint-3" and (final / MARKER).is_file() and not tmp.exists()
    assert latest_checkpoint(tmp_path) == final
    # saving the same step again replaces it completely
    write_checkpoint(tmp_path, 3, lambda d: (d / "new.bin").write_text("y"))
    assert sorted(p.name for p in final.iterdir()) == sorted([MARKER, "new.bin"])


def test_failed_save_leaves_previous_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 1, lambda d: (d / "a").write_text("1"))

    def boom(d):
        (d / "a").write_text("2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 2, boom)
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    prune_checkpoints(tmp_path, keep=1)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
