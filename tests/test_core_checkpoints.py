"""Checkpoint folders: numeric order (not lexical), stray names ignored, pruning keeps the newest."""

from negdpo.core.checkpoints import latest_checkpoint, list_checkpoints, prune_checkpoints


def test_order_latest_and_prune(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-9", "checkpoint-tmp", "logs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a state folder")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert (tmp_path / "checkpoint-tmp").is_dir()  # not ours to delete
    prune_checkpoints(tmp_path, keep=0)
    assert latest_checkpoint(tmp_path) is None
