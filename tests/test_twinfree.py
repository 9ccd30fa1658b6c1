"""The generator without twins: self-supervised SFT masks, training judges, on-policy rounds, the twin guard."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage


def _disk(shape, cy, cx, r) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


# ------------------------------------------------------------------------------------------ masks
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), margin=st.integers(0, 6))
def test_placed_masks_avoid_the_dilated_lesion_and_stay_on_anatomy(seed, margin):
    from negdpo.generator.selfsup import MIN_FOREGROUND, selfsup_masks

    image = np.zeros((64, 64), np.float32)
    image[4:60, 4:60] = 0.5  # anatomy: a square; background 0 around it
    lesion = _disk(image.shape, 30, 30, 6)
    y, x = np.mgrid[:13, :21]
    bank = [((y - 6) ** 2 / 36 + (x - 10) ** 2 / 100) <= 1, ((y - 6) ** 2 / 9 + (x - 10) ** 2 / 36) <= 1]
    masks = selfsup_masks("scan.png", image, lesion, bank, 3, seed, margin)
    forbidden = ndimage.binary_dilation(lesion, iterations=margin) if margin else lesion
    areas = {int(b.sum()) for b in bank}
    for m in masks:
        assert not (m & forbidden).any()
        assert (image[m] > 0.05).mean() >= MIN_FOREGROUND
        # a rotated, flipped bank shape: the rotation keeps a blob's area within a few per cent
        assert min(abs(int(m.sum()) - a) / a for a in areas) < 0.1
    again = selfsup_masks("scan.png", image, lesion, bank, 3, seed, margin)
    assert len(again) == len(masks) and all((a == b).all() for a, b in zip(masks, again))


def test_placement_gives_up_when_nothing_fits():
    from negdpo.generator.selfsup import place_mask

    image = np.ones((16, 16), np.float32)
    rng = np.random.default_rng(0)
    assert place_mask(np.ones((20, 4), bool), image, None, rng) is None  # larger than the image
    assert place_mask(np.ones((4, 4), bool), image, np.ones((16, 16), bool), rng) is None  # all forbidden
    m = place_mask(np.ones((4, 4), bool), image, None, rng)
    assert m is not None and m.sum() == 16 and ndimage.label(m)[1] == 1


def test_selfsup_pairs_repaint_healthy_tissue_with_the_original_as_target(phantom_dir):
    from negdpo.core.scans import ScanFolder
    from negdpo.generator.selfsup import lesion_mask_bank, selfsup_pairs

    bank = lesion_mask_bank(phantom_dir, "train")
    folder = ScanFolder(phantom_dir, read_twins=False)
    scans = {s.name: s for s in folder.iter_split("train")}
    assert len(bank) == sum(s.positive for s in scans.values()) > 0
    pairs = selfsup_pairs(phantom_dir, "train", 64, bank=bank, per_image=2, seed=3, margin=4)
    names = {p.name.split("#")[0] for p in pairs}
    assert any(n.startswith("negatives/") for n in names) is False  # phantom negatives/ repeat train scans
    assert any(scans[n].positive for n in names if n in scans) and any(not scans[n].positive for n in names)
    for p in pairs:
        assert (p.chosen == p.source).all() and (p.rejected == p.source).all() and p.mask.any()
        scan = scans[p.name.split("#")[0]]
        if scan.positive:  # the repaint mask stays away from the lesion (64 px phantoms: no resize)
            assert not (p.mask & ndimage.binary_dilation(scan.mask, iterations=4)).any()
    again = selfsup_pairs(phantom_dir, "train", 64, bank=bank, per_image=2, seed=3, margin=4)
    assert [p.name for p in again] == [p.name for p in pairs]
    assert all((a.mask == b.mask).all() for a, b in zip(again, pairs))
    other = selfsup_pairs(phantom_dir, "train", 64, bank=bank, per_image=2, seed=4, margin=4)
    assert any((a.mask != b.mask).any() for a, b in zip(other, pairs))


# ------------------------------------------------------------------------------------------ judges
def test_training_judges_refuse_twins_and_other_splits(phantom_dir):
    from negdpo.core.scans import ScanFolder
    from negdpo.preference.pairs.train_judges import ResidualLesionJudge, check_training_scans

    with_twins = ScanFolder(phantom_dir).load_split("train")
    with pytest.raises(ValueError, match="never see healthy twins"):
        check_training_scans(with_twins)
    val = ScanFolder(phantom_dir, read_twins=False).load_split("val")
    with pytest.raises(ValueError, match="'train' split only"):
        ResidualLesionJudge.fit(val, [])


def test_lesion_judge_separates_held_out_lesions_from_their_twins(phantom_dir):
    """Fit on training data only; on the val positives it must score the twin (healthy) above the lesion."""
    from negdpo.core.scans import ScanFolder
    from negdpo.generator.selfsup import lesion_mask_bank
    from negdpo.preference.pairs.train_judges import ResidualLesionJudge, healthy_regions

    train = ScanFolder(phantom_dir, read_twins=False).load_split("train")
    bank = lesion_mask_bank(phantom_dir)
    judge = ResidualLesionJudge.fit(train, healthy_regions(train, [], bank, 2, 0, 4))
    held = [s for s in ScanFolder(phantom_dir).load_split("test") if s.positive]
    p_lesion = judge.lesion_prob([s.image for s in held], [s.mask for s in held])
    p_twin = judge.lesion_prob([s.twin for s in held], [s.mask for s in held])
    assert (p_twin < p_lesion).mean() >= 0.75, (p_twin, p_lesion)


def test_training_judges_weighted_mean(phantom_dir):
    from negdpo.core.scans import ScanFolder
    from negdpo.preference.pairs.judges import quantize
    from negdpo.preference.pairs.train_judges import TrainingJudges

    scan = next(s for s in ScanFolder(phantom_dir, read_twins=False).iter_split("train") if s.positive)
    rmask = ndimage.binary_dilation(scan.mask, iterations=2)
    off = scan.image.copy()
    off[~rmask] = 1.0 - off[~rmask]  # anatomy outside the mask destroyed
    judges = TrainingJudges({"fidelity_out": 1.0, "mi_out": 3.0}, None, None)
    scores, parts = judges(scan.image, scan.mask, rmask, [scan.image, off])
    src = quantize(scan.image)
    fid = [1 - np.abs(quantize(im) - src)[~rmask].mean() for im in (scan.image, off)]
    assert parts[0]["fidelity_out"] == pytest.approx(fid[0], abs=1e-6) and fid[0] == 1.0
    assert parts[1]["fidelity_out"] == pytest.approx(fid[1], abs=1e-6)
    for s, p in zip(scores, parts):
        assert s == pytest.approx((p["fidelity_out"] + 3 * p["mi_out"]) / 4, abs=1e-5)
    assert scores[0] > scores[1]
    with pytest.raises(ValueError, match="not fitted"):
        TrainingJudges({"lesion": 1.0}, None, None)


# ------------------------------------------------------------------------------------------ adapters
def _random_adapter(out: Path, seed: int, reference: str | None = None) -> Path:
    import torch
    from negdpo.core.models import load_inpaint_pipeline
    from negdpo.generator.lora_io import save_lora
    from negdpo.generator.pipeline import add_lora

    unet = load_inpaint_pipeline("tiny").unet
    params = add_lora(unet, rank=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_lora(unet, out)
    if reference:
        (out / "negdpo_adapter.json").write_text(json.dumps({"reference_adapter": reference}))
    return out


def test_reference_adapter_chain_is_fused_like_sampling(tmp_path):
    """Round 2's reference is round 1's policy = SFT fused + round-1 LoRA: training must load the whole chain."""
    from negdpo.generator.pipeline import load_components
    from negdpo.generator.sample import inpaint, load_generator

    a = _random_adapter(tmp_path / "a", 1)
    b = _random_adapter(tmp_path / "b", 2, reference="../a")
    lone = _random_adapter(tmp_path / "lone", 2)  # B's weights without the chain
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    mask = _disk(img.shape, 30, 30, 10)
    kw = dict(steps=3, paste_back=False)
    sampled = inpaint(load_generator("tiny", str(b)), [img], [mask], [""], [5], **kw)[0]
    trained_ref = inpaint(load_components("tiny", str(b), "fuse").pipe, [img], [mask], [""], [5], **kw)[0]
    only_b = inpaint(load_components("tiny", str(lone), "fuse").pipe, [img], [mask], [""], [5], **kw)[0]
    np.testing.assert_allclose(trained_ref, sampled, atol=1e-4)
    assert np.abs(only_b - sampled).max() > 1e-3  # the chain matters: without A the output differs
    assert a.is_dir()


# ------------------------------------------------------------------------------------------ runs
def _cfg(data, out, **kw):
    from negdpo.generator.config import GenTrainConfig

    base = dict(pretrained_model_name_or_path="tiny", dataset_name=str(data), output_dir=str(out), train_batch_size=2,
                max_train_steps=2, learning_rate=1e-3, report_to="none", eval_pairs=0, validation_steps=0,
                checkpointing_steps=0, cache_latents=True, torch_threads=1, rounds=1, candidates=2, sample_steps=2,
                max_train_pairs=2, sample_batch=2, selfsup_masks_per_image=1)
    return GenTrainConfig(**(base | kw))


def _twin_free_chain(data: Path, out: Path) -> list[str]:
    from negdpo.onpolicy import run_onpolicy, train_sft_healthy

    sft = train_sft_healthy(_cfg(data, out / "sft"))
    assert (Path(sft) / "pytorch_lora_weights.safetensors").is_file()
    return run_onpolicy(_cfg(data, out / "onpolicy", reference_adapter=sft, train_method="onpolicy"))


def test_twin_free_run_trains_without_the_twins_folder(phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data, ignore=shutil.ignore_patterns("*_twins"))
    adapters = _twin_free_chain(data, tmp_path / "out")
    assert len(adapters) == 1 and (Path(adapters[0]) / "pytorch_lora_weights.safetensors").is_file()
    round_1 = json.loads((tmp_path / "out" / "onpolicy" / "round_01" / "round.json").read_text())
    assert round_1["n_pairs"] == 2 and round_1["mean_score_chosen"] >= round_1["mean_score_rejected"]


def test_twin_free_run_opens_no_twin(phantom_dir, tmp_path, monkeypatch):
    import PIL.Image

    opened: list[str] = []
    real_open, real_pil = builtins.open, PIL.Image.open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    def spy_pil(fp, *a, **k):
        opened.append(str(fp))
        return real_pil(fp, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(PIL.Image, "open", spy_pil)
    _twin_free_chain(phantom_dir, tmp_path / "out")
    assert any("train_images" in p for p in opened)  # the spies do see the scans being read
    assert not [p for p in opened if "_twins" in p]


def test_onpolicy_pairs_dataset_and_rejected_source(phantom_dir, tmp_path):
    import datasets
    from negdpo.generator.data import load_pairs

    from negdpo.onpolicy import run_onpolicy

    out = tmp_path / "op"
    run_onpolicy(_cfg(phantom_dir, out, train_method="onpolicy", onpolicy_rejected="source", max_train_steps=1))
    pairs_dir = out / "round_01" / "pairs"
    ds = datasets.load_from_disk(str(pairs_dir / "generator"))["train"]
    parquet = datasets.load_dataset("parquet", data_files=str(pairs_dir / "data/generator/*.parquet"), split="train")
    assert ds["pair_id"] == parquet["pair_id"] and len(ds) == 2
    pairs = load_pairs(pairs_dir, "train", 64)
    for p in pairs:  # rejected = the positive itself; chosen differs from it only inside the repaint mask
        assert (p.rejected == p.source).all()
        assert np.abs(p.chosen - p.source)[~p.mask].max() < 1 / 255 + 1e-6
    with pytest.raises(ValueError, match="other settings"):
        run_onpolicy(_cfg(phantom_dir, out, train_method="onpolicy", onpolicy_rejected="worst", max_train_steps=1,
                          resume_from_checkpoint="latest"))


@pytest.mark.integration
def test_onpolicy_resumes_after_kills_at_sampling_training_and_pairs(phantom_dir, tmp_path):
    """kill -9 inside round 1's sampling, inside its DPO training and after round 2's pairs; each time the same
    command resumes; the rounds' candidates, pairs and adapters equal an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys

    import torch
    import yaml
    from negdpo.core.config import parse_config
    from negdpo.generator.config import GenTrainConfig
    from negdpo.generator.data import load_pairs
    from safetensors.torch import load_file

    from negdpo.onpolicy import run_onpolicy

    root = Path(__file__).resolve().parents[1]
    cfg_file = tmp_path / "op.yaml"
    cfg_file.write_text(yaml.safe_dump(dict(
        dataset_name=str(phantom_dir), train_method="onpolicy", rounds=2, candidates=2, sample_steps=2,
        max_train_pairs=2, sample_batch=1, max_train_steps=2, checkpointing_steps=1, train_batch_size=2,
        learning_rate=1e-3, report_to="none", eval_pairs=0, validation_steps=0, cache_latents=True,
        resume_from_checkpoint="latest", torch_threads=1)))
    full = tmp_path / "full"
    run_onpolicy(parse_config(GenTrainConfig, ["--config", str(cfg_file), "--output_dir", str(full)]))
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for fault in ("onpolicy_sampled_r1:0", "step_end:2", "onpolicy_pairs:2", None):
        env.pop("NEGDPO_FAULT", None)
        if fault:
            env["NEGDPO_FAULT"] = fault
        res = subprocess.run([sys.executable, str(root / "gen_train.py"), "--config", str(cfg_file), "--output_dir",
                              str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == (-signal.SIGKILL if fault else 0), (fault, res.stderr[-3000:])
        if fault == "onpolicy_sampled_r1:0":
            assert sorted(p.name for p in (out / "round_01" / "candidates").iterdir()) == ["chunk_0000.npz"]
        if fault == "step_end:2":
            assert (out / "round_01" / "train" / "checkpoint-1").is_dir()
            assert not (out / "round_01" / "round.json").exists()
    for r in ("round_01", "round_02"):
        for chunk in ("chunk_0000.npz", "chunk_0001.npz"):
            with np.load(full / r / "candidates" / chunk) as a, np.load(out / r / "candidates" / chunk) as b:
                assert np.array_equal(a["c0"], b["c0"])
        pa, pb = load_pairs(full / r / "pairs", "train", 64), load_pairs(out / r / "pairs", "train", 64)
        assert [p.name for p in pa] == [p.name for p in pb]
        assert all((x.chosen == y.chosen).all() and (x.rejected == y.rejected).all() for x, y in zip(pa, pb))
        wa = load_file(full / r / "train" / "pytorch_lora_weights.safetensors")
        wb = load_file(out / r / "train" / "pytorch_lora_weights.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), r
        steps = [json.loads(line)["step"] for line in (out / r / "train" / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2], (r, steps)
    assert json.loads((out / "summary.json").read_text())["adapters"] == [str(out / "round_01" / "train"),
                                                                          str(out / "round_02" / "train")]


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("flags, key", [
    (["--train_method", "onpolicy", "--candidates", "1"], "candidates"),
    (["--judge_weights", "lesion=1,twin=2"], "judge_weights"),
    (["--judge_weights", "lesion=0"], "judge_weights"),
    (["--sft_source", "oracle"], "sft_source"),
    (["--sample_strength", "0"], "sample_strength"),
])
def test_bad_twin_free_settings_are_one_line_errors(flags, key, capsys):
    from negdpo.generator.cli import main

    assert main(["--dataset_name", "nowhere", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0]


def test_parse_judge_weights():
    from negdpo.generator.config import parse_judge_weights

    assert parse_judge_weights("lesion=1, realism=0.5,mi_out") == {"lesion": 1.0, "realism": 0.5, "mi_out": 1.0}
    with pytest.raises(ValueError, match="not a number"):
        parse_judge_weights("lesion=x")


def test_selfsup_sft_refuses_a_pair_dataset(tmp_path):
    from negdpo.generator.train import _selfsup_pairs

    (tmp_path / "pairs.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="needs a scan folder"):
        _selfsup_pairs(_cfg(tmp_path / "pairs.parquet", tmp_path / "out", train_method="sft", sft_source="healthy"),
                       64)


def test_autoencoder_images_without_twins(phantom_dir, monkeypatch):
    import PIL.Image
    from negdpo.generator.autoencoder import collect_images

    opened: list[str] = []
    real_pil = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_pil(fp, *a, **k))
    n_train = len(list((phantom_dir / "train_images").iterdir()))
    n_neg = len(list((phantom_dir / "negatives").iterdir()))
    assert len(collect_images(phantom_dir, 64, twins=False)) == n_train + n_neg
    assert opened and not [p for p in opened if "_twins" in p]
    with_twins = collect_images(phantom_dir, 64, twins=True)
    assert len(with_twins) == n_train + n_neg + len(list((phantom_dir / "train_twins").iterdir()))
