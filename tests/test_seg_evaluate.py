"""`negdpo evaluate` end to end on phantoms, the Python API, and file-name pairing."""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

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
    assert len(res.rows) == s["n_images"] and res.out is None


def test_negdpo_evaluate_writes_everything(phantom_dir, tmp_path):
    out = tmp_path / "eval"
    rc = negdpo(["evaluate", "--data", str(phantom_dir), "--split", "test", "--clip", "base=tiny", "dpo=tiny",
                 "--sam", "tiny", "--out", str(out), "--limit", "2", "--m2ib-steps", "2", "--m2ib-samples", "2",
                 "--bootstrap", "200"])
    assert rc == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 4 and {r["checkpoint"] for r in rows} == {"base", "dpo"}
    for r in rows:
        for key in ("saliency_path", "mask_path"):
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


def test_cli_errors(phantom_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        negdpo(["evaluate", "--data", str(phantom_dir), "--clip", "nonsense", "--out", str(tmp_path)])
    rc = negdpo(["evaluate", "--data", str(phantom_dir), "--clip", "x=tiny", "--saliency", "nope",
                 "--out", str(tmp_path)])
    assert rc == 1 and "unknown saliency method" in capsys.readouterr().err
