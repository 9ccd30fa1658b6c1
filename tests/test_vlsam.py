"""VL-SAM saliency: every step against an independent implementation, the hooks, the map, the point rules,
the tiny VLM preset, report training and ``negdpo evaluate --saliency vlsam`` end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from negdpo.segmentation.saliency import vlsam as V


# -- steps on small random tensors, against loops written from the formulas --------------------------
def _softmax_causal_ref(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """q (H, N, d), k (Hk, N, d) -> S (H, N, N) by explicit loops; head h uses key head h // (H / Hk)."""
    h_n, n, d = q.shape
    group = h_n // k.shape[0]
    s = np.zeros((h_n, n, n))
    for h in range(h_n):
        for i in range(n):
            logits = np.array([q[h, i] @ k[h // group, j] / math.sqrt(d) for j in range(i + 1)])
            e = np.exp(logits - logits.max())
            s[h, i, : i + 1] = e / e.sum()
    return s


def test_causal_attention_matches_loops_with_grouped_heads():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    s = V.causal_attention(q, k)[0].numpy()
    np.testing.assert_allclose(s, _softmax_causal_ref(q[0].numpy(), k[0].numpy()), atol=1e-6)
    assert np.allclose(np.triu(s, 1), 0.0) and np.allclose(s.sum(-1), 1.0, atol=1e-6)


def test_head_weights_and_aggregation_match_loops():
    g = torch.Generator().manual_seed(1)
    s = V.causal_attention(torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g))
    w, a = V.head_weights(s).numpy(), V.aggregate_heads(s).numpy()
    sn = s.numpy()
    for b in range(2):
        w_ref = [np.mean([max(sn[b, h, i]) for i in range(5)]) for h in range(3)]
        np.testing.assert_allclose(w[b], w_ref, atol=1e-6)
        a_ref = sum(w_ref[h] * sn[b, h] for h in range(3)) / 3
        np.testing.assert_allclose(a[b], a_ref, atol=1e-6)
    # hand value: a head attending one-hot everywhere has W = 1; uniform causal attention over 2 tokens, W = 3/4
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    uniform = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(V.head_weights(torch.stack([one_hot, uniform])).numpy(), [1.0, 0.75])


def test_attention_flow_is_the_rollout_product():
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # hand: (I + a1) / 2 = [[1, 0], [0.25, 0.75]]
    np.testing.assert_allclose(V.attention_flow([a1[None]])[0].numpy(), [[1.0, 0.0], [0.25, 0.75]])
    g = torch.Generator().manual_seed(2)
    layers = [torch.rand(1, 5, 5, generator=g).tril() for _ in range(3)]
    eye = np.eye(5)
    ref = np.linalg.multi_dot([0.5 * (eye + a[0].numpy()) for a in reversed(layers)])  # last layer leftmost
    np.testing.assert_allclose(V.attention_flow(layers)[0].numpy(), ref, rtol=1e-5, atol=1e-7)


def test_column_regularisation_factors():
    # N = 4: columns are visible to 4, 3, 2, 1 causal rows -> 1 - (n - 1)/4 = 1/4, 2/4, 3/4, 1
    out = V.regularise_columns(torch.ones(1, 4, 4))[0].numpy()
    np.testing.assert_allclose(out, np.tile([0.25, 0.5, 0.75, 1.0], (4, 1)))


def test_regularised_flow_counters_the_collapse_under_uniform_attention():
    n = 90
    a = torch.tril(torch.ones(n, n))
    a = (a / a.sum(1, keepdim=True))[None]
    raw = V.attention_flow([a] * 8)[0, -1, 3:68]
    reg = V.attention_flow([V.regularise_columns(a)] * 8)[0, -1, 3:68]
    assert float(raw.max() / raw.min()) > 50  # no regularisation: the first image tokens dominate
    assert float(reg.max() / reg.min()) < 6


def test_flow_from_qk_composes_the_steps():
    g = torch.Generator().manual_seed(3)
    qk = [(torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 1, 6, 4, generator=g)) for _ in range(2)]
    maps = [V.aggregate_heads(V.causal_attention(q, k)) for q, k in qk]
    np.testing.assert_allclose(V.flow_from_qk(qk).numpy(),
                               V.attention_flow([V.regularise_columns(m) for m in maps]).numpy(), atol=1e-7)
    np.testing.assert_allclose(V.flow_from_qk(qk, regularise=False).numpy(), V.attention_flow(maps).numpy(),
                               atol=1e-7)


# -- the tiny VLM: hooks against the model's own attention -----------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm():
    from negdpo.core.models.vlm import load_vlm

    return load_vlm("tiny")


def _image(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)).astype(np.float32)


def test_tiny_preset_is_qwen2_vl(tiny_vlm):
    model, processor = tiny_vlm
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert len(V.decoder_attentions(model)) == model.config.text_config.num_hidden_layers == 2


def test_captured_qk_reproduce_eager_attention_and_hooks_are_removed(tiny_vlm):
    model, processor = tiny_vlm
    attns = V.decoder_attentions(model)
    inputs = V.chat_inputs(processor, _image(), "describe the findings.", "cpu")
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), V.capture_qk(model) as cap:
            assert all(len(m._forward_pre_hooks) == 1 for m in attns)
            out = model(**inputs, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    layers = cap.layers()
    assert len(layers) == len(out.attentions) == 2
    for (q, k), ref in zip(layers, out.attentions):
        assert q.shape[1] == 4 and k.shape[1] == 2  # grouped key/value heads
        torch.testing.assert_close(V.causal_attention(q, k), ref.float(), atol=1e-6, rtol=1e-5)
    assert all(len(m._forward_pre_hooks) == 0 for m in attns)
    with pytest.raises(RuntimeError, match="boom"), V.capture_qk(model):
        raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in attns)


def test_capture_while_generating_equals_teacher_forced_capture(tiny_vlm):
    model, processor = tiny_vlm
    inputs = V.chat_inputs(processor, _image(seed=1), "describe the findings.", "cpu")
    with torch.no_grad(), V.capture_qk(model) as gen_cap:
        seq = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    steps = len(gen_cap.q[0])
    assert steps == 4  # prefill + 3 decode steps (the last token is never fed back)
    fed = seq[:, :-1]
    forward = dict(inputs, input_ids=fed, attention_mask=torch.ones_like(fed),
                   mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"],
                                                torch.zeros_like(fed[:, inputs["input_ids"].shape[1]:])], 1))
    with torch.no_grad(), V.capture_qk(model) as tf_cap:
        model(**forward, use_cache=False)
    for (qg, kg), (qt, kt) in zip(gen_cap.layers(), tf_cap.layers()):
        torch.testing.assert_close(qg, qt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kg, kt, atol=1e-5, rtol=1e-5)


def test_vlsam_grid_map_shape_and_object_tokens(tiny_vlm):
    model, processor = tiny_vlm
    h, w = 48, 80  # non-square: 12 x 20 patches of 4 px, merged 2 x 2 -> 6 x 10
    res = V.vlsam_grid(model, processor, _image(h, w, 2), "tumour", max_new_tokens=6)
    assert tuple(res.grid.shape) == (6, 10) and torch.isfinite(res.grid).all() and (res.grid >= 0).all()
    obj_ids = processor.tokenizer(" tumour", add_special_tokens=False)["input_ids"]
    assert [res.sequence[p] for p in res.object_positions] == obj_ids
    if res.appended:
        assert res.object_positions[-1] == len(res.sequence) - 1
    sal = V.grid_to_map(res.grid, h, w)
    assert sal.shape == (h, w) and sal.dtype == np.float32
    assert sal.min() == 0.0 and sal.max() == pytest.approx(1.0)
    assert not V.grid_to_map(torch.ones(6, 10), h, w).any()  # a constant map becomes zeros


def test_object_found_in_the_answer_is_read_there(tiny_vlm, monkeypatch):
    model, processor = tiny_vlm
    tok = processor.tokenizer
    said = tok(" a small tumour in the left lobe.", add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, **_):  # the answer is fixed: the object sits at answer index 2
        return torch.cat([input_ids, torch.tensor([said + [tok.eos_token_id, 7, 7]])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    res = V.vlsam_grid(model, processor, _image(seed=3), "tumour")
    n_prompt = len(res.sequence) - len(said)  # the eos and what follows it are cut
    assert not res.appended and res.object_positions == [n_prompt + 2]
    assert res.answer == "a small tumour in the left lobe."


def test_object_phrase_and_subsequence():
    assert V.object_phrase("A T1-weighted axial brain MRI showing a small bright Tumour in the left lobe.") == "tumour"
    assert V.object_phrase("A breast ultrasound image showing a mass.") == "mass"
    assert V.object_phrase("a photo of a cat") == "a photo of a cat"
    assert V.find_subsequence([5, 1, 2, 1, 2], [1, 2]) == 1
    assert V.find_subsequence([5, 1, 2], [2, 5]) == -1 and V.find_subsequence([1], []) == -1


# -- point sampling rules --------------------------------------------------------------------------
def _bumps(h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    sal = np.zeros((h, w))
    for (x, y), amp in (((10, 12), 1.0), ((40, 30), 0.8), ((55, 8), 0.3)):
        sal += amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0 ** 2))
    return sal


def test_peak_points_positives_are_spaced_peaks_above_threshold():
    pts, labels = V.peak_points(_bumps(), k=5, n_negative=0, spacing=8.0, min_peak=0.5)
    # the 0.3 bump is below half the maximum; the rest of the 1.0 / 0.8 bumps is suppressed by the spacing
    np.testing.assert_array_equal(pts, [[10, 12], [40, 30]])
    np.testing.assert_array_equal(labels, [1, 1])
    pts, _ = V.peak_points(_bumps(), k=5, n_negative=0, spacing=8.0, min_peak=0.2)
    assert [55, 8] in pts.tolist() and len(pts) == 3
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    assert (d[np.triu_indices(len(pts), 1)] >= 8.0).all()


def test_peak_points_negatives_lie_in_the_lowest_region_far_from_everything():
    sal = _bumps()
    pts, labels = V.peak_points(sal, k=2, n_negative=3, spacing=8.0, low_quantile=0.2)
    pos, neg = pts[labels == 1], pts[labels == 0]
    assert len(pos) == 2 and len(neg) == 3
    low = sal <= np.quantile(sal, 0.2)
    assert all(low[int(y), int(x)] for x, y in neg)
    # the first negative: the low-region pixel whose nearest positive is farthest (brute force)
    ys, xs = np.nonzero(low)
    dist = np.min([(xs - x) ** 2 + (ys - y) ** 2 for x, y in pos], axis=0)
    assert dist[np.argmax(dist)] == np.min([(neg[0, 0] - x) ** 2 + (neg[0, 1] - y) ** 2 for x, y in pos])
    again, _ = V.peak_points(sal, k=2, n_negative=3, spacing=8.0, low_quantile=0.2)
    np.testing.assert_array_equal(pts, again)  # deterministic


def test_peak_points_of_an_empty_map_is_no_prompt():
    pts, labels = V.peak_points(np.zeros((16, 16)), k=3, n_negative=3)
    assert pts.shape == (0, 2) and labels.shape == (0,)
    mask, info = V.segment_from_points(None, pts, labels, (16, 16))
    assert not mask.any() and info == {"empty_coarse": True, "n_prompts": 0}


# -- end to end: train the tiny VLM a few steps, then negdpo evaluate --saliency vlsam --vlm <folder> --
@pytest.mark.integration
def test_train_reports_then_evaluate_with_vlsam(phantom_dir, tmp_path, capsys):
    import csv
    import json

    from negdpo.core.models.vlm import load_vlm
    from negdpo.segmentation.cli import main as evaluate_main
    from negdpo.segmentation.vlm_train import VlmTrainConfig, train_vlm
    from PIL import Image

    cfg = VlmTrainConfig(output_dir=str(tmp_path / "vlm_run"), data=str(phantom_dir), max_train_steps=8,
                         train_batch_size=4, logging_steps=4, learning_rate=3e-3)
    result = train_vlm(cfg)
    assert result["eval_loss"] < result["eval_loss_before"] - 0.5  # held-out report loss falls
    model, _ = load_vlm(str(result["vlm"]))
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"

    out = tmp_path / "eval"
    rc = evaluate_main(["--data", str(phantom_dir), "--split", "test", "--saliency", "vlsam", "--vlm",
                        str(result["vlm"]), "--sam", "tiny", "--limit", "2", "--bootstrap", "20", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["saliency"] == "vlsam" and summary["config"]["vlm"] == str(result["vlm"])
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(int(r["n_prompts"]) >= 1 for r in rows)  # SAM got the map's points
    sal = np.asarray(Image.open(out / rows[0]["saliency_path"]))
    assert sal.max() == 255 and sal.min() == 0
    assert "Dice" in capsys.readouterr().out


def test_bundled_vlm_config_parses():
    from pathlib import Path

    from negdpo.core.config import parse_config
    from negdpo.segmentation.vlm_train import VlmTrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "vlm_demo.yaml"
    cfg = parse_config(VlmTrainConfig, ["--config", str(path)])
    assert cfg.model == "tiny" and cfg.max_train_steps == 400 and cfg.data == ""
