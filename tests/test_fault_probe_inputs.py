"""The fault probe's findings (issue 25), items 6-9, each test failing on the code before its fix.

6 one-line errors (corrupt pair dataset, resume with another --rank, disk full); 7 config checks; 8 linear
label trimming; 9 the smaller ones. Items 1-5: test_fault_probe.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest
from fault_probe_common import (
    BUILD,
    CLIP_FAST,
    clip_args,
    fresh_console,
    one_error_line,
    records,
    steps,
)


@pytest.fixture(autouse=True)
def _fresh_console():
    with fresh_console():
        yield


# -- 6 -----------------------------------------------------------------------------------------------
def _pair_dataset(path: Path, n: int = 8) -> Path:
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2 * n)]
    ds = datasets.Dataset.from_dict(
        {"prompt": ["A scan with a tumour."] * n, "chosen": imgs[:n], "rejected": imgs[n:]},
        features=datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Image(),
                                    "rejected": datasets.Image()}))
    ds.save_to_disk(str(path))
    return path


def test_item6_corrupt_pair_dataset_is_one_line_naming_the_file(tmp_path, capsys):
    from negdpo.preference.clip.cli import main

    data = _pair_dataset(tmp_path / "pairs")
    (arrow,) = data.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    assert main(clip_args(data, tmp_path / "run", max_train_steps=1)) == 2
    line = one_error_line(capsys.readouterr().err, "clip_train")
    assert f"{arrow}: unreadable pair dataset" in line


def test_item6_undecodable_image_names_the_row(tmp_path):
    import datasets
    from negdpo.preference.clip.data import PairDataError, pairs_from_dataset

    data = _pair_dataset(tmp_path / "pairs", n=4)
    ds = datasets.load_from_disk(str(data)).cast_column("chosen", datasets.Image(decode=False))
    rows = ds.to_list()
    rows[2]["chosen"] = {"bytes": b"\x89PNG not really", "path": None}
    bad = datasets.Dataset.from_list(rows, features=ds.features).cast_column("chosen", datasets.Image())
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(PairDataError, match=r"bad: unreadable pair dataset \(row 2\): UnidentifiedImageError"):
        pairs_from_dataset(tmp_path / "bad", "train")


def test_item6_resume_with_another_rank_says_what_differs(phantom_dir, tmp_path, capsys):
    from negdpo.preference.clip.cli import main

    out = tmp_path / "run"
    args = dict(finetune="lora", checkpointing_steps=1, save_final=False)
    assert main(clip_args(phantom_dir, out, max_train_steps=1, rank=4, **args)) == 0
    capsys.readouterr()
    assert main(clip_args(phantom_dir, out, max_train_steps=2, rank=8, resume_from_checkpoint="latest", **args)) == 2
    line = one_error_line(capsys.readouterr().err, "clip_train")
    assert "cannot resume from" in line and "checkpoint-1" in line and "--rank 4 -> 8" in line
    assert not (out / ".negdpo.lock").exists()


def test_item6_disk_full_is_one_line_and_the_rerun_recovers(phantom_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC on the third metrics append: one line naming the folder; the rerun with --resume_from_checkpoint
    latest finishes with every step logged once."""
    from negdpo.core import metrics_log
    from negdpo.preference.clip.cli import main

    real, calls = os.write, []

    def full(fd, data):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    out = tmp_path / "run"
    args = clip_args(phantom_dir, out, max_train_steps=4, checkpointing_steps=1, save_final=False,
                      resume_from_checkpoint="latest")
    with monkeypatch.context() as m:
        m.setattr(metrics_log.os, "write", full)
        assert main(args) == 2
    line = one_error_line(capsys.readouterr().err, "clip_train")
    assert f"No space left on device in {out}" in line and "--resume_from_checkpoint latest" in line
    assert main(args) == 0
    assert [r["step"] for r in steps(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_item6_disk_full_in_build_pairs_is_one_line(phantom_dir, tmp_path, monkeypatch, capsys):
    from negdpo.preference.pairs import build
    from negdpo.preference.pairs.build_cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(build, "write_shard", full)
    out = tmp_path / "out"
    assert main(["--data", str(phantom_dir), "--out", str(out), *BUILD]) == 2
    line = one_error_line(capsys.readouterr().err, "negdpo build-pairs")
    assert f"No space left on device in {out}" in line
    assert not (out / ".negdpo.lock").exists()


# -- 7 -----------------------------------------------------------------------------------------------
def _cfg_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_item7_duplicate_yaml_key_is_an_error(tmp_path):
    from negdpo.core.config import ConfigError, parse_config
    from negdpo.core.training import TrainConfig

    path = _cfg_file(tmp_path, "learning_rate: 1.0e-4\nseed: 1\nlearning_rate: 1.0e-2\n")
    with pytest.raises(ConfigError, match=rf"{path}: duplicate key 'learning_rate' \(lines 1 and 3\)"):
        parse_config(TrainConfig, ["--config", path])
    nested = _cfg_file(tmp_path, "presets:\n  a:\n    seed: 1\n    seed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        parse_config(TrainConfig, ["--config", nested])


def test_item7_empty_yaml_is_an_error(tmp_path):
    from negdpo.core.config import ConfigError, parse_config
    from negdpo.core.training import TrainConfig

    for text in ("", "# only a comment\n"):
        path = _cfg_file(tmp_path, text)
        with pytest.raises(ConfigError, match=rf"{path}: empty config file"):
            parse_config(TrainConfig, ["--config", path])


def test_item7_unselected_presets_are_validated(tmp_path):
    from dataclasses import dataclass

    from negdpo.core.config import ConfigError, parse_config

    @dataclass
    class Cfg:
        preset: str = "a"
        steps: int = 1

    good = "presets:\n  a: {steps: 2}\n  b: {steps: 3}\n"
    assert parse_config(Cfg, ["--config", _cfg_file(tmp_path, good), "--preset", "a"]).steps == 2
    for bad, why in (("  b: {steps: many}\n", "b'\\): steps='many': expected an integer"),
                     ("  b: {stepz: 3}\n", r"b'\): unknown key\(s\) \['stepz'\]"),
                     ("  b: [1, 2]\n", "preset 'b': expected a mapping")):
        path = _cfg_file(tmp_path, "presets:\n  a: {steps: 2}\n" + bad)
        with pytest.raises(ConfigError, match=why):
            parse_config(Cfg, ["--config", path, "--preset", "a"])


# -- 8 -----------------------------------------------------------------------------------------------
def test_item8_a_21000_character_label_trims_fast_and_fits():
    """Trimming one character per measurement was quadratic: 4,000 characters took 21 s."""
    import numpy as np
    from negdpo.core.figures import _fit, _text_size, font, render_grid
    from PIL import Image, ImageDraw

    text = ("a lesion-free axial T1 MRI slice, " * 700)[:21000]
    draw, f = ImageDraw.Draw(Image.new("RGB", (1, 1))), font(18)
    t0 = time.perf_counter()
    fitted = _fit(draw, text, f, 256)
    assert time.perf_counter() - t0 < 1.0
    assert fitted.endswith("…") and text.startswith(fitted[:-1])
    assert _text_size(draw, fitted, f)[0] <= 256 < _text_size(draw, text[: len(fitted)] + "…", f)[0]
    t0 = time.perf_counter()
    render_grid([[np.zeros((64, 64))]], column_labels=[text], row_labels=[text], tile_text=[[text]], title=text)
    assert time.perf_counter() - t0 < 1.0


# -- 9 -----------------------------------------------------------------------------------------------
def test_item9_brackets_in_the_output_path_merge(tmp_path):
    """The merge handed shard paths to load_dataset as glob patterns: 'pairs[1]' matched nothing."""
    import datasets
    from negdpo.preference.pairs.schema import shard_dir
    from negdpo.preference.pairs.shards import merge_shards

    out = tmp_path / "pairs[1]*?"
    shards = Path(shard_dir(out, "generator"))
    shards.mkdir(parents=True)
    datasets.Dataset.from_dict({"pair_id": ["b", "a"], "x": [2, 1]}).to_parquet(str(shards / "test-0.parquet"))
    datasets.Dataset.from_dict({"pair_id": ["c"], "x": [3]}).to_parquet(str(shards / "train-0.parquet"))
    assert merge_shards(out, ["generator"]) == {"generator": {"test": 2, "train": 1}}
    assert datasets.load_from_disk(str(out / "generator"))["test"]["pair_id"] == ["a", "b"]


def test_item9_folder_name_with_newlines_stays_inside_the_card_fence(tmp_path):
    import ast

    from negdpo.preference.pairs.card import write_card

    out = tmp_path / 'x\n```\n<script>alert(1)<\\script>\n"'
    out.mkdir()
    text = write_card(out, {"k": 2}, {}, "contrast=1", {"inpaint": "tiny"}, {}).read_text()
    body = text.split("```python\n", 1)[1].split("\n```\n", 1)[0]
    ast.parse(body)  # still Python: the name did not close the fence
    assert "<script>" not in text and text.count("```") == 4


def test_item9_data_without_split_folders_is_an_error(tmp_path, capsys):
    from negdpo.preference.pairs.build_cli import main

    data = tmp_path / "scans"
    (data / "images").mkdir(parents=True)
    assert main(["--data", str(data), "--out", str(tmp_path / "out"), "--no_progress"]) == 2
    assert "no split folders" in one_error_line(capsys.readouterr().err, "negdpo build-pairs")


def test_item9_broken_image_symlinks_and_unmatched_prompts_are_reported(phantom_dir, tmp_path):
    import shutil

    from negdpo.preference.pairs.config import BuildConfig
    from negdpo.preference.pairs.items import list_items

    data = tmp_path / "scans"
    shutil.copytree(phantom_dir, data)
    link = data / "test_images" / "gone_0.png"
    link.symlink_to(tmp_path / "nowhere.png")
    prompts = json.loads((data / "prompts.json").read_text())
    (data / "prompts.json").write_text(json.dumps({**prompts, "typo_0001.png": "A scan."}))
    with records("negdpo.preference.pairs.items") as logs:
        items, skipped = list_items(BuildConfig(data=str(data), out=str(tmp_path / "o"), splits="test"))
    assert items and [f for f, _ in skipped] == [str(link)]
    assert "not a readable file" in skipped[0][1]
    said = [r.getMessage() for r in logs if r.levelno == logging.WARNING]
    assert len(said) == 1 and "1 key(s) match no image" in said[0] and "'typo_0001.png'" in said[0]


def test_item9_stale_lock_of_a_reused_pid_is_taken_over(tmp_path):
    from negdpo.core.outdir import LOCK, OutputDirLockedError, _start_time, run_lock

    me = {"pid": os.getpid(), "host": socket.gethostname()}
    (tmp_path / LOCK).write_text(json.dumps({**me, "start": "1"}))  # our pid, another process's start time
    with records("negdpo.core.outdir") as logs, run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["start"] == _start_time(os.getpid())
    assert any("now belongs to another process" in r.getMessage() for r in logs)
    (tmp_path / LOCK).write_text(json.dumps({**me, "start": _start_time(os.getpid())}))  # really held
    with pytest.raises(OutputDirLockedError), run_lock(tmp_path):
        pass


def test_item9_adapter_without_its_reference_file_is_not_loaded_silently(tmp_path):
    from negdpo.generator.sample import adapter_chain

    dpo = tmp_path / "dpo"
    dpo.mkdir()
    (dpo / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (dpo / "README.md").write_text("LoRA ... Reference adapter: `../sft`.\n")
    with pytest.raises(FileNotFoundError, match=r"no negdpo_adapter.json, but it was trained on top of .*'\.\./sft'"):
        adapter_chain(dpo)
    (dpo / "README.md").unlink()
    with records("negdpo.generator.sample") as logs:
        assert adapter_chain(dpo) == [dpo]
    assert any("no negdpo_adapter.json; loading it on the base model alone" in r.getMessage() for r in logs)
    ckpt = tmp_path / "run" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "run" / "config.yaml").write_text("reference_adapter: outputs/sft\n")
    with pytest.raises(FileNotFoundError, match="outputs/sft"):
        adapter_chain(ckpt)


def test_item9_clip_fp16_on_cpu_says_it_trains_in_fp32(phantom_dir, tmp_path):
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from negdpo.preference.clip.train import ClipTrainConfig, train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        with records("negdpo.preference.clip.train") as logs:
            train(ClipTrainConfig(dataset_name=str(phantom_dir), output_dir=str(tmp_path / "r"), max_train_steps=1,
                                  mixed_precision="fp16", save_final=False, **CLIP_FAST))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState()
    said = [r.getMessage() for r in logs if r.levelno == logging.WARNING]
    assert any("fp16 has no effect on the CPU" in s and "trains in fp32" in s for s in said)
