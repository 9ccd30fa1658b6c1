"""The study's twin-free rows (issue 23): names, comparisons, the generator table's handling of them, and the guard
that the twin-free chain (autoencoder, SFT, on-policy rounds, CLIP pairs) opens no twin and no val/test file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from negdpo.study.cache import StudyRun
from negdpo.study.config import StudyConfig
from negdpo.study.variants import (
    COMPARISONS,
    DESIGN,
    GEN_COMPARISONS,
    GEN_VARIANTS,
    SUPERVISION,
    gen_comparisons,
    gen_label,
    training_stage,
    twinfree_rows,
)


def test_twinfree_row_names_stages_and_labels():
    assert twinfree_rows(2) == ("sft_healthy", "dpo_onpolicy_r1", "dpo_onpolicy_r2", "dpo_onpolicy_mi_r1",
                                "dpo_onpolicy_mi_r2")
    assert [training_stage(r) for r in twinfree_rows(2)] == ["sft_healthy", "dpo_onpolicy", "dpo_onpolicy",
                                                             "dpo_onpolicy_mi", "dpo_onpolicy_mi"]
    assert [training_stage(v) for v in GEN_VARIANTS] == list(GEN_VARIANTS)  # the oracle stages keep their names
    assert training_stage("dpo_onpolicy_rx") == "dpo_onpolicy_rx"  # not a round number
    assert all("(oracle)" in gen_label(v) for v in GEN_VARIANTS)
    assert all("no twins" in gen_label(r) for r in twinfree_rows(3))
    assert gen_label("dpo_onpolicy_mi_r3") == "on-policy DPO + MI, round 3 (no twins)"
    assert len({gen_label(r) for r in twinfree_rows(3)}) == 7  # every row its own label


def test_twinfree_comparisons_ask_the_issue_questions():
    assert gen_comparisons(0) == GEN_COMPARISONS
    pairs = [(a, b) for a, b, _ in gen_comparisons(2)]
    assert len(pairs) == len(set(pairs))
    added = pairs[len(GEN_COMPARISONS):]
    assert added[0] == ("dpo_onpolicy_r2", "sft_healthy")  # does twin-free DPO beat twin-free SFT?
    assert added[-1] == ("dpo_onpolicy_mi_r2", "dpo_onpolicy_r2")  # does MI help without twins?
    # anything learned vs the fill through the twin-free autoencoder (the oracle's saw twins)
    assert {a for a, b in added if b == "harmonic_vae_twinfree"} == set(twinfree_rows(2))
    assert not {a for a, b in added if b == "harmonic_vae"}
    clip = {(a, b) for a, b, _ in COMPARISONS}
    assert {("dpo_twinfree", "dpo_gen"), ("dpo_twinfree", "dpo_harmonic"), ("dpo_twinfree", "dhn_nce_faithful"),
            ("dpo_twinfree", "dhn_nce_twinfree")} <= clip
    assert DESIGN["dpo", "twinfree"] == "dpo_twinfree" and SUPERVISION["dpo_twinfree"] == "masks (no twins)"
    from negdpo.study.results import families

    fams = {name: {(a, b) for members, _ in groups for a, b, _ in members} for name, groups in families("dpo_gen").items()}
    assert len(fams["clip"]) == 13 and not any("twinfree" in a + b for a, b in fams["clip"])  # issue 22's design
    assert fams["clip_twinfree"] == {("dpo_twinfree", "dhn_nce_twinfree"), ("dpo_twinfree", "dpo_gen"),
                                     ("dpo_twinfree", "dpo_harmonic"), ("dpo_twinfree", "dhn_nce_faithful"),
                                     ("dhn_nce_twinfree", "dhn_nce_faithful")}
    assert len(clip) == len(COMPARISONS)


@pytest.mark.parametrize("key, value", [("twinfree_candidates", 1), ("twinfree_rounds", 0),
                                        ("twinfree_sft_steps", 0), ("twinfree_dpo_steps", 0)])
def test_bad_twinfree_settings_are_errors(tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        StudyConfig(out=str(tmp_path), work_dir=str(tmp_path), **{key: value})


def test_twinfree_generator_comparisons_hand_computed():
    from negdpo.study.tables import generator_comparisons

    def rows(method, run, errs):
        return [{"method": method, "paste_back": True if run else None, "run": run, "file": f"mri_{k:04d}_0.png",
                 "subject_id": f"mri_{k:04d}", "modality": "mri", "inside_err": e} for k, e in enumerate(errs)]

    gen = rows("sft_healthy", "0", [0.2, 0.4, 0.6]) + rows("dpo_onpolicy_r1", "0", [0.1, 0.2, 0.3]) \
        + rows("dpo_onpolicy_mi_r1", "0", [0.1, 0.3, 0.5]) + rows("harmonic_vae_twinfree", "", [0.3, 0.3, 0.3])
    out = {(r["a"], r["b"]): r for r in generator_comparisons(gen, 200, 0, pairs=gen_comparisons(1))}
    assert out["dpo_onpolicy_r1", "sft_healthy"]["diff_mean"] == pytest.approx(-0.2)
    assert out["dpo_onpolicy_mi_r1", "dpo_onpolicy_r1"]["diff_mean"] == pytest.approx(0.1)
    assert out["sft_healthy", "harmonic_vae_twinfree"]["diff_mean"] == pytest.approx(0.1)  # pairs with every run
    assert ("dpo", "sft") not in out  # rows that did not run are not compared


def _tiny_cfg(tmp_path: Path, **kw) -> StudyConfig:
    base = dict(out=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), device="cpu", threads=1,
                gen_autoencoder_steps=2, gen_batch=2, gen_sample_steps=2, twinfree_rows=True, twinfree_rounds=1,
                twinfree_candidates=2, twinfree_sft_steps=1, twinfree_dpo_steps=1, pairs_k=2, pairs_steps=2,
                gen_extra={"max_train_pairs": 2, "sample_batch": 2, "selfsup_masks_per_image": 1, "rank": 4},
                pairs_extra={"limit": 2})
    return StudyConfig(**(base | kw))


def _run(cfg: StudyConfig, phantoms: Path) -> StudyRun:
    out = Path(cfg.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    return StudyRun(cfg=cfg, work=Path(cfg.work_dir), out=out, device="cpu", phantoms=Path(phantoms),
                    ph_settings={"test": str(phantoms)}, sampling={"init": "harmonic", "strength": 0.5})


def test_generator_table_scores_twinfree_rows_per_seed_with_their_model(phantom_dir, tmp_path, monkeypatch):
    """Twin-free rows are learned rows (``run`` = their generator seed), sampled from the twin-free autoencoder,
    and their cache key names the stage that trained them (one stage holds every round of a chain)."""
    from negdpo.study import generators

    cfg = _tiny_cfg(tmp_path, judges=False, gen_isolation_rows=False, gen_strength=1.0, gen_seeds=2)
    run = _run(cfg, phantom_dir)
    for stage in ("gen_sft_healthy", "gen_dpo_onpolicy", "gen_sft_healthy_g1", "gen_dpo_onpolicy_g1"):
        run.stage(stage, {"stage": stage}, lambda d: {})
    calls = []

    def fake_score(method, scans, out, *, model=None, adapter=None, **kw):
        calls.append((method, model, adapter))
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples.png").write_bytes(b"")
        return {"rows": [{"method": method, "paste_back": True, "file": "f.png", "subject_id": "s", "modality": "mri",
                          "inside_err": 0.0}], "grid": str(out / "samples.png")}

    monkeypatch.setattr(generators, "score_generator", fake_score)
    rows = ["sft_healthy", "dpo_onpolicy_r1"]
    adapters = {gs: {r: f"/adapters/{r}/{gs}" for r in rows} for gs in (0, 1)}
    table = generators.generator_table(run, rows, adapters, {r: "/tf-model" for r in [*rows, "harmonic_vae_twinfree"]})
    assert ("dpo_onpolicy_r1", "/tf-model", "/adapters/dpo_onpolicy_r1/1") in calls
    assert ("identity", cfg.gen_model, None) in calls
    assert ("harmonic_vae", "/tf-model", None) in calls  # the twin-free baseline: the fill through their autoencoder
    assert {(r["method"], r["run"]) for r in table.rows} == {("identity", ""), ("harmonic", ""),
                                                              ("harmonic_vae_twinfree", ""),  # reported as itself
                                                              *((r, str(gs)) for r in rows for gs in (0, 1))}
    import json

    key = json.loads((run.work / "geneval_dpo_onpolicy_r1_g1" / "stage.json").read_text())["settings"]
    assert key["adapter_stamp"] == run.stamp("gen_dpo_onpolicy_g1") is not None


_opened: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


@pytest.mark.integration  # a subprocess or a training chain: out of the inner loop
def test_twinfree_chain_opens_no_twin_and_no_held_out_split(phantom_dir, tmp_path):
    """The whole twin-free chain of the study on a tiny config: every ``open`` (Python's audit event, below every
    reader) is recorded; no file under a ``*_twins/`` folder is opened, and the training stages read train only."""
    from negdpo.study.twinfree import TWINFREE_PAIR_JUDGES, build_twinfree_pairs, train_twinfree_rows

    global _opened
    if _record_opens not in getattr(sys, "_negdpo_test_hooks", ()):
        sys.addaudithook(_record_opens)  # cannot be removed: inert while _opened is None
        sys._negdpo_test_hooks = (*getattr(sys, "_negdpo_test_hooks", ()), _record_opens)
    run = _run(_tiny_cfg(tmp_path), phantom_dir)
    _opened = []
    try:
        with run.selection():
            by_seed, model = train_twinfree_rows(run, [0], "tiny")
            pairs = build_twinfree_pairs(run, model, by_seed[0]["dpo_onpolicy_r1"], "dpo_onpolicy_r1", "train,val")
        opened = list(_opened)
    finally:
        _opened = None
    assert any(Path(p).parent.name == "train_images" for p in opened)  # the recorder sees the scans being read
    assert not [p for p in opened if Path(p).parent.name.endswith("_twins")]
    assert set(run.reads["twinfree"]) == {"train"} and run.reads["twinfree"]["train"] > 0  # val, test: locked
    assert set(by_seed[0]) == set(twinfree_rows(1))
    for adapter in by_seed[0].values():
        assert (Path(adapter) / "pytorch_lora_weights.safetensors").is_file()
    assert Path(model, "model_index.json").is_file() and model != "tiny"
    copy = Path(pairs["path"]).parent / "data"
    assert sorted(p.name for p in copy.iterdir() if p.is_dir()) == ["train_images", "train_masks", "val_images",
                                                                     "val_masks"]
    assert pairs["summary"]["judge"] == TWINFREE_PAIR_JUDGES and "twin" not in TWINFREE_PAIR_JUDGES
    assert sum(n for kind in pairs["summary"]["rows"].values() for n in kind.values()) > 0
