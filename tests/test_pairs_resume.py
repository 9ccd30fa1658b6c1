"""build-pairs never marks failures as done: setting checks, failed scans, corrupt shards, kill -9 and resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pairs_common import KINDS, NO_CLIP, build_reference, make_builder, rows

datasets = pytest.importorskip("datasets")

# one scan per shard and per generator call: many shards to kill between (and the CLI runs' settings)
FAST = dict(generator="tiny", k=2, steps=2, clip="tiny", batch_items=1, chunk_size=1, progress=False)
CLI = "negdpo.preference.pairs.build_cli"


@pytest.fixture(scope="module")
def builder(phantom_dir, tmp_path_factory):
    """One loaded Builder (test split, no CLIP judge) reused by the resume tests."""
    return make_builder(phantom_dir, tmp_path_factory.mktemp("unused"), FAST)


@pytest.fixture(scope="module")
def reference(builder, tmp_path_factory):
    """Uninterrupted single-process build of the builder's config."""
    return build_reference(builder, tmp_path_factory.mktemp("ref"))


def _same_rows(a: Path, b: Path) -> None:
    """Every row of every kind equal (``code_version`` aside: other helpers commit while tests run)."""
    for kind in KINDS:
        ra, rb = rows(a, kind), rows(b, kind)
        assert ra and ra.keys() == rb.keys(), kind
        for pid in ra:
            assert ra[pid] | {"code_version": ""} == rb[pid] | {"code_version": ""}, pid


# -- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, flag", [
    ({"k": 0}, "--k"), ({"steps": 0}, "--sample_steps"), ({"k": 1}, "--k"), ({"chunk_size": 0}, "--chunk_size"),
    ({"batch_items": -1}, "--batch_items"), ({"strength": 0.0}, "--strength"), ({"init": "telea"}, "--init"), ({"dilate": -1}, "--dilate"),
    ({"size": 60}, "--size"), ({"rejected": "best"}, "--rejected"), ({"judges": "contrast=x"}, "--judges"),
    ({"judges": "bogus"}, "--judges"), ({"kinds": "generator,x"}, "--kinds"), ({"boundary_steps": 0}, "--boundary_steps"),
    ({"limit": 0}, "--limit"), ({"data": "/nonexistent/scans"}, "--data")])
def test_bad_settings_one_line_error_naming_the_flag(phantom_dir, tmp_path, change, flag):
    from negdpo.preference.pairs.config import BuildConfig

    cfg = BuildConfig(**({"data": str(phantom_dir), "out": str(tmp_path / "o")} | change))
    with pytest.raises(ValueError) as err:
        cfg.validate()
    msg = str(err.value)
    assert msg.startswith(flag) and "\n" not in msg, msg
    BuildConfig(data=str(phantom_dir), out=str(tmp_path / "o")).validate()  # the defaults pass


def test_cli_rejects_bad_settings_before_any_work(phantom_dir, tmp_path, capsys):
    from negdpo.preference.pairs.build_cli import main

    out = tmp_path / "out"
    assert main(["--data", str(phantom_dir), "--out", str(out), "--sample_steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["negdpo build-pairs: error: --sample_steps must be an integer >= 1 (got 0) (--debug for the traceback)"]
    assert not out.exists()  # nothing written, nothing marked done
    assert main(["--data", str(phantom_dir), "--out", str(out), "--step", "2"]) == 2  # no abbreviations
    assert "unrecognized arguments: --step 2" in capsys.readouterr().err


def test_help_does_not_import_torch():
    code = ("import sys\nfrom negdpo.preference.pairs import build_cli\ntry:\n    build_cli.main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--overwrite_output_dir" in out.stdout and "--batch_items" in out.stdout
    assert out.stdout.strip().endswith("TORCH False"), out.stdout[-300:] + out.stderr[-2000:]


def test_cli_refuses_to_extend_a_build_with_other_settings(phantom_dir, reference, tmp_path, capsys):
    from negdpo.preference.pairs.build_cli import main

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["--data", str(phantom_dir), "--out", str(out), "--splits", "test", "--judges", NO_CLIP,
                 "--k", "3", "--sample_steps", "2", "--no_progress", "--no_report"]) == 2
    err = capsys.readouterr().err
    assert "--k: 2 -> 3" in err and "--overwrite_output_dir" in err
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing touched


def test_other_settings_refused_overwrite_clears(builder, reference, tmp_path):
    from negdpo.preference.pairs.build import BuildConfig, Builder
    from negdpo.preference.pairs.card import SettingsMismatchError, clear_output

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    cfg = BuildConfig(**{**vars(builder.cfg), "out": str(out), "k": 3, "seed": 1})
    other = Builder(cfg, device="cpu")
    with pytest.raises(SettingsMismatchError, match=r"--k: 2 -> 3; --seed: 0 -> 1\); use a new --out"):
        other.plan()
    (out / "build_settings.json").unlink()  # the shards still carry the settings hash
    with pytest.raises(SettingsMismatchError, match="shards built with other settings"):
        other.plan()
    assert builder.use_out(out).plan().pending == []  # the build's own settings: nothing left, no error
    removed = clear_output(out)
    assert {"data", "generator", ".empty_chunks"} <= set(removed) and [p.name for p in out.iterdir()] == ["notes.txt"]
    assert len(other.plan().pending) == len(builder.plan().pending) > 0


def test_malformed_prompts_json_names_the_file(phantom_dir, tmp_path):
    from negdpo.preference.pairs.items import healthy_texts

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    (data / "prompts.json").write_text('{"a.png": "x",')
    with pytest.raises(ValueError, match=r"prompts\.json"):
        healthy_texts(data, None)


# -- failures are not done -------------------------------------------------------------------------
def test_failed_generation_not_done_and_retried(phantom_dir, builder, reference, tmp_path, monkeypatch, capsys):
    """Generation that raises or gives non-finite candidates fails the scans: exit 1, counted as failed,
    not marked done; a rerun builds exactly the reference rows."""
    from negdpo.preference.pairs.build_cli import main
    from negdpo.preference.pairs.generate import CandidateGenerator
    from PIL import Image

    def broken(self, source, images, *args):
        raise RuntimeError("CUDA out of memory (simulated)")

    out = tmp_path / "out"
    args = ["--data", str(phantom_dir), "--out", str(out), "--splits", "test", "--judges", NO_CLIP, "--k", "2",
            "--sample_steps", "2", "--batch_items", "1", "--chunk_size", "1", "--no_progress", "--no_report"]
    with monkeypatch.context() as m:
        m.setattr(CandidateGenerator, "candidates", broken)
        assert main(args) == 1
    assert "scan(s) failed (failed_generation:inpaint)" in capsys.readouterr().err
    summary = json.loads((out / "build_summary.json").read_text())
    positives = {f"test/{p.stem}" for p in (phantom_dir / "test_masks").glob("*.png")
                 if np.asarray(Image.open(p)).any()}
    assert {f["item"] for f in summary["failed"]} == positives
    assert not (out / "generator").exists()  # no rows, and the failed scans are pending again:
    assert {it.key for it in builder.use_out(out).plan().pending} == positives

    with monkeypatch.context() as m:  # all candidates NaN: failed as well
        m.setattr(builder.gen, "candidates", lambda source, images, *a: [[np.full_like(im, np.nan)] * 2 for im in images])
        res = builder.run_worker(0, 1)
    assert set(res.failed) == positives and res.rows["generator"] == 0
    assert builder.run_worker(0, 1).items == len(positives)  # retried
    builder.merge()
    _same_rows(out, reference)


def test_corrupt_shard_named_set_aside_and_rebuilt(builder, reference, tmp_path):
    from negdpo.preference.pairs.build import BuildConfig, run_build
    from negdpo.preference.pairs.shards import read_shard_meta

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    shard = sorted((out / "data" / "generator").glob("*.parquet"))[0]
    keys = read_shard_meta(shard)["items"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated: no footer
    with pytest.raises(ValueError, match=str(shard.name)):
        read_shard_meta(shard)
    summary = run_build(BuildConfig(**{**vars(builder.cfg), "out": str(out)}), report=False)
    assert summary["set_aside"] == [str(shard) + ".corrupt"] and Path(summary["set_aside"][0]).is_file()
    assert summary["items_this_run"] == len(keys) and summary["failed"] == [] and shard.is_file()
    _same_rows(out, reference)


# -- kill -9 at five points, resume ----------------------------------------------------------------
DRIVER = textwrap.dedent('''
    """Import once, then fork one real process per run; NEGDPO_FAULT kills a run with SIGKILL."""
    import json, os, sys, time
    T0 = time.time()
    from pathlib import Path
    import accelerate, datasets, pyarrow.parquet, torch  # noqa: F401  (imported once, before the forks)
    from diffusers import StableDiffusionInpaintPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
    from negdpo.preference.pairs import build, build_cli  # noqa: F401
    from negdpo.generator import sample  # noqa: F401
    from negdpo.core import models  # noqa: F401

    args, out, points = json.loads(sys.argv[1])
    log = []
    t0 = time.time()
    for point in points + [None]:
        pid = os.fork()
        if pid == 0:
            os.environ.pop("NEGDPO_FAULT", None)
            if point:
                os.environ["NEGDPO_FAULT"] = point
            os._exit(build_cli.main(args + ["--out", out]))
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        tmp = [str(p) for p in Path(out).rglob(".*.tmp-*") if p.stat().st_size > 0]
        log.append({"point": point, "code": code, "tmp_files": tmp, "s": round(time.time() - t0, 2)})
    print(json.dumps(log + [{"imports_s": round(t0 - T0, 2)}]))
''')


@pytest.mark.integration
@pytest.mark.skipif(not hasattr(os, "fork"), reason="SIGKILL / fork")
def test_kill_at_five_points_then_resume_gives_the_uninterrupted_rows(phantom_dir, reference, tmp_path):
    """Real ``build-pairs`` processes killed with SIGKILL inside a shard write (twice), after a shard,
    while swapping a merged dataset and before the card; each rerun resumes, and the final dataset
    equals the uninterrupted in-process build's, row for row."""
    out = tmp_path / "killed"
    args = ["--data", str(phantom_dir), "--splits", "test", "--judges", NO_CLIP, "--k", "2", "--sample_steps", "2",
            "--batch_items", "1", "--chunk_size", "1", "--threads", "1", "--no_progress", "--no_report"]
    points = ["shard_write:1", "shard_done:3", "shard_write:2", "merge:2", "card:1"]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(driver), json.dumps([args, str(out), points])],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads(proc.stdout.strip().splitlines()[-1])
    log = log[:-1]  # timings
    assert [r["code"] for r in log] == [-9] * 5 + [0], log
    assert any(".tmp-" in f and "/data/generator/" in f for f in log[0]["tmp_files"])  # killed mid-write
    assert not any(out.rglob(".*.tmp-*"))  # leftovers cleaned
    _same_rows(out, reference)
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["rows"] == {k: {s: len(d) for s, d in datasets.load_from_disk(str(reference / k)).items()}
                               for k in KINDS}
    assert "## Counts" in (out / "README.md").read_text()
