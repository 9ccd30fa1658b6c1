"""CLIP preference trainer: pairs from phantoms, log 2 at step 0, fixed logit scale, checkpoint round trip
through open_clip, resume, and a short run that learns the preference on held-out phantom pairs."""

import copy
import math
from contextlib import nullcontext

import pytest
import torch
from negdpo.preference.clip import model as cm
from negdpo.preference.clip.data import ClipPairDataset, make_collate, pairs_from_scans
from negdpo.preference.clip.train import ClipTrainConfig, build_model, compute_loss, train

LEARN_STEPS, LEARN_LR, LEARN_BATCH = 60, 1e-3, 8  # constant lr: 80 cosine steps before


def _batch(cfg, phantom_dir, n=4):
    model, preprocess, tokenizer, scale = build_model(cfg)
    ds = ClipPairDataset(pairs_from_scans(phantom_dir, "train")[:n], preprocess, cm.grid_size(model))
    return model, make_collate(tokenizer)([ds[i] for i in range(len(ds))]), scale


def test_pairs_from_phantoms(phantom_dir):
    pairs = pairs_from_scans(phantom_dir, "train")
    assert pairs and all(p.mask.any() and p.negative.shape == p.positive.shape for p in pairs)
    assert all("no " in p.text_neg.lower() and p.text_neg != p.text_pos for p in pairs)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_step0_loss_is_log2(phantom_dir, finetune):
    cfg = ClipTrainConfig(loss="dpo", finetune=finetune)
    model, batch, scale = _batch(cfg, phantom_dir)
    ref = cm.CLIPReference(model, use_adapter_disable=finetune == "lora")
    loss, logs = compute_loss(cfg, {"dpo"}, model, ref, batch, scale, 0, nullcontext)
    assert loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()  # log 2 exactly (fp32)
    assert logs["rewards/accuracies"] == 0.0 and logs["rewards/margins"] == 0.0


def test_retention_learns_logit_scale_only_when_unfrozen(phantom_dir):
    cfg = ClipTrainConfig(loss="clip", retention_weight=1.0, freeze_logit_scale=False, dedup_captions=True)
    model, batch, scale = _batch(cfg, phantom_dir)
    for frozen in (False, True):
        model.logit_scale.requires_grad_(not frozen)
        model.zero_grad(set_to_none=True)
        loss, logs = compute_loss(cfg, {"clip"}, model, None, batch, scale, 0, nullcontext)
        loss.backward()
        assert math.isfinite(logs["loss/retention"])
        assert (model.logit_scale.grad is None) == frozen
        assert model.visual.head.proj.weight.grad.abs().sum() > 0


def test_train_mode_dropout_breaks_log2(phantom_dir):
    cfg = ClipTrainConfig(loss="dpo", disable_dropout=False)
    model, batch, scale = _batch(cfg, phantom_dir)
    torch.manual_seed(0)
    ref = cm.CLIPReference(model, use_adapter_disable=False)
    loss, _ = compute_loss(cfg, {"dpo"}, model.train(), ref, batch, scale, 0,
                           nullcontext)
    assert abs(loss.item() - math.log(2)) > 1e-6


def test_checkpoint_roundtrip_open_clip(tiny_clip, tmp_path, monkeypatch):
    import open_clip
    from negdpo.core.models import load_clip

    model = copy.deepcopy(tiny_clip[0])
    with torch.no_grad():
        model.visual.head.proj.weight.mul_(1.5)
    out = cm.save_clip_checkpoint(model, "tiny", tmp_path / "ckpt")
    monkeypatch.chdir(out)  # the preset's BERT is saved in the folder as "." (test_interop: moved folders)
    loaded, _ = open_clip.create_model_from_pretrained("local-dir:.")
    monkeypatch.chdir(tmp_path)
    again, _, tok = load_clip(str(out))
    x = torch.randn(2, 3, 224, 224)
    text = tok(["a tumour", "no tumour"])
    with torch.no_grad():
        for m in (loaded.eval(), again):
            assert torch.allclose(m.encode_image(x), model.eval().encode_image(x), atol=1e-6)
            assert torch.allclose(m.encode_text(text), model.encode_text(text), atol=1e-6)


def test_train_resume_logit_scale_and_outputs(phantom_dir, tmp_path):
    base = dict(dataset_name=str(phantom_dir), output_dir=str(tmp_path / "run"), loss="dpo+entropy+stages+clip",
                train_batch_size=4, eval_batch_size=8, checkpointing_steps=2, report_to="none", tsne=True,
                tsne_max_points=80, progress_bar=False, ref_mode="on_the_fly")
    s1 = train(ClipTrainConfig(max_train_steps=2, save_final=False, **(base | {"tsne": False})))
    assert s1["steps"] == 2 and (tmp_path / "run" / "checkpoint-2").is_dir()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s2 = train(ClipTrainConfig(max_train_steps=3, resume_from_checkpoint="latest", torch_threads=1, **base))
        assert torch.get_num_threads() == 2  # the run's thread setting is restored afterwards
    finally:
        torch.set_num_threads(threads)
    assert s2["steps"] == 3
    assert (tmp_path / "run" / "tsne.png").is_file() and (tmp_path / "run" / "final" / "open_clip_config.json").is_file()
    last = s2["last_step"]
    assert last["logit_scale"] == pytest.approx(s2["logit_scale"])  # frozen
    assert {"loss/dpo", "attention/entropy", "loss/stages", "loss/retention", "rewards/margins"} <= set(last)
    assert {"eval/preference/accuracy", "eval/r1_i2t", "eval/attention_entropy"} <= set(s2["after"])


def test_resume_is_exact(phantom_dir, tmp_path):
    """Killed after step 2 and resumed = uninterrupted: same final weights (bit-exact on CPU), no repeated log steps."""
    import json

    from safetensors.torch import load_file

    base = dict(dataset_name=str(phantom_dir), loss="dpo+clip", train_batch_size=4, eval_batch_size=8,
                report_to="none", tsne=False, progress_bar=False, max_train_steps=4, logging_steps=1,
                learning_rate=1e-3, lr_scheduler="constant")
    train(ClipTrainConfig(output_dir=str(tmp_path / "full"), **base))
    train(ClipTrainConfig(output_dir=str(tmp_path / "cut"), checkpointing_steps=2, **(base | {"max_train_steps": 2})))
    train(ClipTrainConfig(output_dir=str(tmp_path / "cut"), resume_from_checkpoint="latest", **base))
    a = load_file(tmp_path / "full" / "final" / "open_clip_model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "open_clip_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One short CLIP-DPO run from the tiny random init on 48-subject phantoms (16 held-out pairs), shared by the learning
    assertions (the expensive part of this file: keep it to one run)."""
    from negdpo.core.phantoms import ensure_phantoms

    root = tmp_path_factory.mktemp("clip_learn")
    data = ensure_phantoms(root / "ph", n=48, size=64, seed=0, slices=2, preview=False)
    return train(ClipTrainConfig(dataset_name=str(data), output_dir=str(root / "learn"), loss="dpo", beta=1.0,
                                 learning_rate=LEARN_LR, lr_scheduler="constant", max_train_steps=LEARN_STEPS,
                                 train_batch_size=LEARN_BATCH,
                                 report_to="none", tsne=False, save_final=False, progress_bar=False))


@pytest.mark.integration
def test_clip_dpo_learns_preference(learned):
    """Tiny random-init model, phantom pairs: held-out preference accuracy rises from chance.

    Measured with the locked versions (requirements.lock), 16 held-out pairs, both directions, seeds 0/1/2:
    accuracy 0.34 -> 0.64 / 0.66 / 0.63, text->image 0.19 -> 0.75 / 0.81 / 0.75, implicit-reward accuracy
    0.59 / 0.69 / 0.67. (On 24 subjects there were 8 held-out pairs, where one pair moves text->image by 0.125:
    the earlier bound of 0.85 there held for one set of package versions and not the next.)"""
    before, after = learned["before"], learned["after"]
    print("CLIP-DPO held-out preference accuracy", before["eval/preference/accuracy"], "->",
          after["eval/preference/accuracy"], "t2i", before["eval/t2i/preference/accuracy"], "->",
          after["eval/t2i/preference/accuracy"])
    assert learned["steps"] == LEARN_STEPS and learned["val_pairs"] >= 16
    assert before["eval/preference/accuracy"] <= 0.5
    assert after["eval/preference/accuracy"] >= 0.6
    assert after["eval/preference/accuracy"] - before["eval/preference/accuracy"] >= 0.25
    assert after["eval/t2i/preference/accuracy"] >= 0.7
    assert after["eval/t2i/preference/accuracy"] - before["eval/t2i/preference/accuracy"] >= 0.45
    assert after["eval/rewards/accuracies"] >= 0.55
