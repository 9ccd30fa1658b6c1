"""`negdpo evaluate` end to end on phantoms, the Python API, and file-name pairing."""

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from negdpo.core.console import UserError

from negdpo.cli import main as negdpo


def test_pairing_by_name_with_shuffled_listings(tmp_path, monkeypatch):
    from negdpo.core.imageio import save_png
    from negdpo.core.scans import ScanFolder

    for i in range(6):
        img = np.full((8, 8), i / 10, np.float32)
        mask = np.zeros((8, 8), bool)
        mask[i, :] = True  # row i marks scan i
        save_png(tmp_path / "test_images" / f"s{i}.png", img)
        save_png(tmp_path / "test_masks" / f"s{i}.png", mask)
    real_iterdir = Path.iterdir

    def shuffled(self):
        items = list(real_iterdir(self))
        random.Random(len(str(self))).shuffle(items)
        return iter(items)

    monkeypatch.setattr(Path, "iterdir", shuffled)
    scans = ScanFolder(tmp_path).load_split("test")
    assert len(scans) == 6
    for s in scans:
        i = int(Path(s.name).stem[1:])
        assert s.mask[i].all() and s.mask.sum() == 8 and s.image[0, 0] == pytest.approx(i / 10, abs=1e-2)


def test_oracle_without_sam_scores_high(phantom_dir):
    from negdpo.segmentation.evaluate import evaluate

    res = evaluate(phantom_dir, {"oracle": "tiny"}, None, saliency="oracle", sam="none", split="test")
    s = res.summary["checkpoints"]["oracle"]
    assert s["n_positive"] >= 3 and s["dice"]["mean"] > 0.9 and s["nsd"]["mean"] > 0.9
    assert s["negatives_false_positive_rate"] == 0.0  # empty ground truth -> empty map -> empty mask
    assert s["sal_auroc"]["mean"] > 0.95 and s["sal_pointing"]["mean"] == 1.0  # the blurred mask finds the lesion
    assert len(res.rows) == s["n_images"] and res.out is None


def test_negdpo_evaluate_writes_everything(phantom_dir, tmp_path):
    out = tmp_path / "eval"
    rc = negdpo(["evaluate", "--data", str(phantom_dir), "--split", "test", "--clip", "base=tiny", "--clip", "dpo=tiny",
                 "--sam", "tiny", "--out", str(out), "--limit", "2", "--m2ib_steps", "2", "--m2ib_samples", "2",
                 "--bootstrap", "200"])
    assert rc == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 4 and {r["checkpoint"] for r in rows} == {"base", "dpo"}  # --clip is repeatable
    for r in rows:
        for key in ("saliency_path", "mask_path", "overlay_path"):
            assert (out / r[key]).is_file()
        for kind in ("saliency", "coarse", "masks", "overlays"):
            assert (out / kind / r["checkpoint"] / f"{Path(r['image']).stem}.png").is_file()
        assert 0 <= float(r["dice"]) <= 1 and r["control_dice"] != ""
    # same CLIP weights under two names -> identical maps and scores (per-image seeds)
    by = {(r["checkpoint"], r["image"]): r["dice"] for r in rows}
    assert all(by[("base", img)] == by[("dpo", img)] for _, img in by)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["checkpoints"]) == {"base", "dpo"} and summary["layout"] == "per-checkpoint subfolders"
    report = (out / "report.md").read_text()
    assert "| base |" in report and "control Dice" in report and "dice_bar.png" in report
    assert (out / "dice_bar.png").stat().st_size > 1000
    # overlays are linked from report.md and shown side by side in index.html
    assert "(index.html)" in report and all(f"({r['overlay_path']})" in report for r in rows)
    page = (out / "index.html").read_text()
    assert all(f'src="{r["overlay_path"]}"' in page for r in rows) and page.count("<tr>") == 1 + 2


def _no_models(monkeypatch):
    import negdpo.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_clip", refuse)
    monkeypatch.setattr(models, "load_sam", refuse)


def test_cli_errors_one_line_before_models_load(phantom_dir, tmp_path, capsys, monkeypatch):
    import logging

    _no_models(monkeypatch)
    root_handlers = list(logging.getLogger().handlers)
    assert negdpo(["evaluate", "--data", str(phantom_dir), "--clip", "nonsense", "--out", str(tmp_path)]) == 2
    assert "--clip expects NAME=CKPT" in capsys.readouterr().err
    # the same name twice would overwrite each other's images
    assert negdpo(["evaluate", "--data", str(phantom_dir), "--clip", "a=tiny", "--clip", "a=other",
                   "--out", str(tmp_path)]) == 2
    assert "--clip name 'a' given twice" in capsys.readouterr().err
    assert negdpo(["evaluate", "--data", str(phantom_dir), "--out", str(tmp_path), "--overwrite"]) == 2  # no abbrev.
    assert capsys.readouterr().err.count("\n") == 1
    cases = [(["--saliency", "nope"], "unknown saliency method 'nope'"),
             (["--data", str(tmp_path / "missing")], "missing: scan folder does not exist"),
             (["--clip", "A=tiny", "a=tiny"], "'A' and 'a' differ only in case"),
             (["--prompts", str(tmp_path / "p.json")], "p.json: not valid JSON"),
             (["--prompt_template", "{nope}"], "only {name} and {stem} can be filled in")]
    (tmp_path / "p.json").write_text("{'single': 'quotes'}")
    for extra, message in cases:
        rc = negdpo(["evaluate", "--data", str(phantom_dir), "--clip", "x=tiny", "--out", str(tmp_path / "o"),
                     *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(UserError, match="unknown saliency method") as raised:  # --debug: the traceback
        negdpo(["evaluate", "--data", str(phantom_dir), "--out", str(tmp_path / "o"), "--saliency", "nope", "--debug"])
    assert isinstance(raised.value.__cause__, KeyError)
    assert logging.getLogger().handlers == root_handlers  # library loggers are not configured at the root
    assert not (tmp_path / "o").exists()  # nothing written for a failed check


def test_api_rejects_colliding_names(phantom_dir):
    from negdpo.core.scans import ScanFolder
    from negdpo.segmentation.evaluate import evaluate

    scans = ScanFolder(phantom_dir).load_split("test")[:2]
    twin_name = type(scans[0])(**{**scans[0].__dict__, "name": Path(scans[0].name).stem + ".jpg"})
    with pytest.raises(ValueError, match=r"share the name .*outputs would overwrite each other"):
        evaluate(clips={"o": "tiny"}, scans=[scans[0], twin_name], saliency="oracle", sam="none")
    with pytest.raises(ValueError, match="differ only in case"):
        evaluate(clips={"Base": "tiny", "base": "tiny"}, scans=scans, saliency="oracle", sam="none")


def test_output_folder_holds_one_evaluation(phantom_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    base = ["evaluate", "--data", str(phantom_dir), "--saliency", "oracle", "--sam", "none", "--out", str(out),
            "--bootstrap", "10", "--limit", "3"]
    assert negdpo(base + ["--clip", "a=tiny", "b=tiny"]) == 0
    assert (out / "overlays" / "a").is_dir()
    (out / "notes.txt").write_text("mine")
    assert negdpo(base + ["--clip", "a=tiny", "b=tiny"]) == 0  # the same run again: replaced in place
    capsys.readouterr()
    assert negdpo(base + ["--clip", "a=tiny"]) == 2  # other settings: refused, nothing touched
    err = capsys.readouterr().err
    assert "earlier `negdpo evaluate` run with other settings" in err and "--overwrite_output_dir" in err
    assert (out / "overlays" / "b").is_dir()
    assert negdpo(base + ["--clip", "a=tiny", "--overwrite_output_dir"]) == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(  # flat now, no stale subfolders
        f"{Path(r['image']).stem}.png" for r in csv.DictReader((out / "metrics.csv").open()))
    assert (out / "notes.txt").read_text() == "mine" and not (out / ".negdpo.lock").exists()


def test_saliency_metrics_score_the_raw_maps_of_both_prompts(phantom_dir, tmp_path, monkeypatch):
    """The rows' ``sal_*`` columns score the method's own maps (report prompt) and ``control_sal_*`` the control
    prompt's; summary.json averages them over positives and report.md lists them (docs/method.md#saliency-metrics)."""
    from negdpo.segmentation import saliency_metrics as SM
    from negdpo.segmentation.evaluate import DEFAULT_CONTROL, evaluate
    from negdpo.segmentation.saliency import base

    def probe(ctx, scans, prompts):  # the lesion for the report prompt, local brightness for the control prompt
        return [SM.local_brightness(s.image) if p == DEFAULT_CONTROL else np.asarray(s.mask, np.float32)
                for s, p in zip(scans, prompts)]

    monkeypatch.setitem(base._REGISTRY, "probe_maps", probe)
    out = tmp_path / "eval"
    res = evaluate(phantom_dir, {"a": "tiny"}, out, saliency="probe_maps", sam="none", split="test", bootstrap=10,
                   save_images=False)
    pos = [r for r in res.rows if r["positive"]]
    neg = [r for r in res.rows if not r["positive"]]
    assert len(pos) >= 3 and neg
    for r in pos:
        assert r["sal_auroc"] == 1.0 and r["sal_ap"] == 1.0 and r["sal_pointing"] == 1.0
        assert r["sal_partial_r"] == pytest.approx(1.0, abs=1e-9)  # mask is the map: nothing explained by brightness
        assert r["control_sal_partial_r"] == 0.0  # the brightness map: nothing beyond brightness
        assert 0.0 <= r["control_sal_auroc"] <= 1.0 and 0.0 < r["control_sal_ap"] <= 1.0
        scan_image = next(s for s in _scans(phantom_dir) if s.name == r["image"])
        ref = SM.reference(scan_image.image, scan_image.mask)
        expect = SM.saliency_metrics(SM.local_brightness(scan_image.image), ref, 2.0)
        assert r["control_sal_auroc"] == pytest.approx(expect["sal_auroc"], abs=1e-12)
        assert r["control_sal_pointing"] == expect["sal_pointing"]
    for r in neg:
        assert all(math.isnan(r[c]) and math.isnan(r[f"control_{c}"]) for c in SM.COLUMNS)
    summary = json.loads((out / "summary.json").read_text())["checkpoints"]["a"]
    assert summary["sal_auroc"]["mean"] == 1.0 and summary["sal_auroc"]["n"] == len(pos)
    assert summary["control_sal_auroc"]["mean"] == pytest.approx(np.mean([r["control_sal_auroc"] for r in pos]))
    header = (out / "metrics.csv").open().readline().strip().split(",")
    assert {*SM.COLUMNS, *(f"control_{c}" for c in SM.COLUMNS)} <= set(header)
    report = (out / "report.md").read_text()
    assert "lesion AUROC" in report and "| a | report | 1.000" in report and "| a | control |" in report


def _scans(phantom_dir):
    from negdpo.core.scans import ScanFolder

    return ScanFolder(phantom_dir).load_split("test")
