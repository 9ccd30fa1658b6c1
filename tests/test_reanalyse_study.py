"""scripts/reanalyse_study.py on a small synthetic study: per-seed differences, the Holm family, the old
verdicts beside the new ones, and one-line errors for bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("reanalyse_study", ROOT / "scripts" / "reanalyse_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_study(folder: Path) -> None:
    """base and dhn_nce, 3 seeds x 4 subjects x 2 images; dhn_nce - base = 0.1 / 0.2 / 0.3 by seed (report),
    irrelevant prompt Dice equal for both (so the prompt gap difference is the same)."""
    folder.mkdir()
    rows = []
    for seed, shift in enumerate((0.1, 0.2, 0.3)):
        for s in range(4):
            for i in range(2):
                base = 0.3 + 0.05 * s + 0.01 * i
                for variant, d in (("base", base), ("dhn_nce", base + shift)):
                    img = f"mri_{s:04d}_{i}.png"
                    rows.append({"variant": variant, "seed": seed, "image": img, "subject_id": f"mri_{s:04d}",
                                 "group": "mri_bright", "prompt": "report", "dice": d})
                    rows.append({"variant": variant, "seed": seed, "image": img, "subject_id": f"mri_{s:04d}",
                                 "group": "mri_bright", "prompt": "irrelevant", "dice": 0.1})
    with (folder / "segmentation_metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    old = [{"a": "dhn_nce", "b": "base", "metric": "dice", "diff_mean": 0.2, "ci": [0.17, 0.23], "verdict": "better"}]
    (folder / "results.json").write_text(json.dumps({"preset": "tiny", "code_version": "abc", "comparisons": old}))


def test_reanalysis_of_a_synthetic_study(tmp_path, capsys):
    write_study(tmp_path / "study")
    assert load_script().main([str(tmp_path / "study"), "--n-boot", "300"]) == 0
    text = capsys.readouterr().out
    assert "one Holm family of 2" in text  # dice and prompt gap of the one comparison whose variants ran
    dice_row = next(line for line in text.splitlines() if line.startswith("| DHN-NCE vs base [dice] | +0.100"))
    cells = [c.strip() for c in dice_row.split("|")[1:-1]]
    assert cells[1] == "+0.100 / +0.200 / +0.300" and cells[2] == "+0.200 [+0.170, +0.230]" and cells[3] == "better"
    assert cells[4].startswith("+0.200 [+0.1") and cells[-1] == "better"
    # t over the three seeds: mean 0.2, se 0.1 / sqrt 3, p = 2 sf(2 sqrt 3, 2) = 0.0742, Holm over 2: 0.1484
    t_row = next(line for line in text.splitlines() if line.startswith("| DHN-NCE vs base [dice] | +0.200"))
    assert "| 0.0742 | 0.1484 | inconclusive |" in t_row
    assert "## Generator: " in text and "not found, skipped" in text


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from negdpo.core.console import run_main

    mod = load_script()
    assert run_main("reanalyse_study", mod.main, [str(tmp_path / "missing")]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "segmentation_metrics.csv").write_text("variant,seed\nbase,0\n")
    assert run_main("reanalyse_study", mod.main, [str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "segmentation_metrics.csv: missing columns image, subject_id, prompt, dice" in err and err.count("\n") == 1


def test_n_boot_must_be_positive(tmp_path):
    write_study(tmp_path / "study")
    with pytest.raises(ValueError, match="--n-boot"):
        load_script().main([str(tmp_path / "study"), "--n-boot", "0"])
