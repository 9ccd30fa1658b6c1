"""Real-size presets: parameter counts equal the published ones; locally built tokenizers have the real sizes."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from negdpo.core.models.cli import main as models_main
from negdpo.core.models.presets import PRESETS, param_counts

# Published parameter counts, per component, with where each comes from.
UNET_SD15_TXT2IMG = 859_520_964  # diffusers docs, ModelMixin.num_parameters example (SD-1.5 unet), "859.52M"
INPAINT_EXTRA = 5 * 320 * 3 * 3  # inpainting conv_in: 9 instead of 4 input channels (3x3 kernels, 320 out)
BERT_BASE_UNCASED = 109_482_240  # bert-base-uncased BertModel (HF; Devlin et al. 2019: "110M")
BERT_POOLER = 768 * 768 + 768  # open_clip's cls_last_hidden_state_pooler builds BERT without the pooler
PUBLISHED = {
    "sd15-inpaint-random": {
        "unet": UNET_SD15_TXT2IMG + INPAINT_EXTRA,
        "vae": 83_653_863,  # SD-1.5 vae AutoencoderKL.num_parameters(), "83.65M"
        "text_encoder": 123_060_480,  # openai/clip-vit-large-patch14 CLIPTextModel, "123.06M"
    },
    "sam-vit-b-random": {  # facebook/sam-vit-base model card: 93.7M in all
        "image_encoder": 89_670_912, "prompt_encoder": 6_220, "mask_decoder": 4_058_340,  # 89.67M + 4.06M
    },
    "sam-vit-h-random": {  # facebook/sam-vit-huge model card: 641M in all; prompt encoder / decoder as ViT-B
        "image_encoder": 641_090_608 - 6_220 - 4_058_340, "prompt_encoder": 6_220, "mask_decoder": 4_058_340,
    },
    "biomedclip-random": {  # BiomedCLIP ~196M: ViT-B/16 (86M, Dosovitskiy et al. Table 1) + PubMedBERT (BERT-base)
        "image": 85_798_656 + 768 * 512,  # timm vit_base_patch16_224 without head + linear projection to 512
        "text": BERT_BASE_UNCASED - BERT_POOLER + 768 * 640 + 640 * 512,  # + MLP projection 768 -> 640 -> 512
        "logit_scale": 1,
    },
}
TOTALS_M = {"sd15-inpaint-random": None, "sam-vit-b-random": 93.7, "sam-vit-h-random": 641.1,
            "biomedclip-random": 196}  # published totals in millions (rounded as published)


@pytest.fixture(scope="module")
def listed() -> dict[tuple[str, str], dict]:
    import logging

    log = logging.getLogger("negdpo")  # module scope: outside conftest's per-test logger restore
    saved = log.handlers[:], log.propagate, log.level
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            assert models_main(["--list", "--json"]) == 0
    finally:
        log.handlers[:], log.propagate, log.level = saved
    rows = json.loads(buf.getvalue())
    return {(r["name"], r["role"]): r for r in rows}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_size_counts_equal_published(listed, name):
    role = next(p.role for p in PRESETS if p.name == name)
    counts = listed[(name, role)]["params"]
    assert counts == PUBLISHED[name]
    if TOTALS_M[name] is not None:
        digits = len(str(TOTALS_M[name]).partition(".")[2])
        assert round(sum(counts.values()) / 1e6, digits) == TOTALS_M[name]


def test_models_list_json_covers_every_preset(listed):
    assert set(listed) == {(p.name, p.role) for p in PRESETS}
    assert {"sd15-inpaint-random", "biomedclip-random", "sam-vit-b-random", "sam-vit-h-random"} <= {
        name for name, _ in listed}
    for row in listed.values():
        assert row["params"] and all(isinstance(v, int) and v > 0 for v in row["params"].values())
    tiny = listed[("tiny", "sam")]["params"]  # the tiny SAM keeps SAM's prompt encoder and mask decoder
    assert tiny["mask_decoder"] == PUBLISHED["sam-vit-b-random"]["mask_decoder"]
    assert tiny["image_encoder"] < 1e6


def test_models_list_table(capsys):
    assert models_main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "sam-vit-h-random" in out and "641.09M" in out and "unet 859.54M" in out


def test_counting_allocates_nothing():
    """The meta device: a 641M-parameter count leaves no parameter storage behind."""
    from negdpo.core.models.presets import get_preset

    with contextlib.suppress(ImportError):
        import psutil

        before = psutil.Process().memory_info().rss
        param_counts(get_preset("sam-vit-h-random", "sam"))
        assert psutil.Process().memory_info().rss - before < 500 * 2**20  # real weights would be 2.4 GiB


def test_real_clip_bpe_has_clip_vocab_size_and_keeps_words_whole(tmp_path):
    from negdpo.core.models.vocab import MEDICAL_WORDS, write_clip_bpe
    from transformers import CLIPTokenizer

    assert write_clip_bpe(tmp_path, vocab_size=49408) == 49408
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    assert len(tok) == 49408
    for word in ("tumour", "hypoechoic", "occipital", "weighted", "glioma"):
        assert word in MEDICAL_WORDS and tok.tokenize(word) == [f"{word}</w>"]
    ids = tok("zebra quagga").input_ids  # words outside the list: several tokens, still round-trip
    assert len(ids) > 4 and tok.decode(ids, skip_special_tokens=True).strip() == "zebra quagga"


def test_real_bert_vocab_has_pubmedbert_size(tmp_path):
    from negdpo.core.models.presets import BIOMEDCLIP_CONTEXT, PUBMEDBERT, _write_bert
    from transformers import AutoTokenizer

    _write_bert(tmp_path, PUBMEDBERT, BIOMEDCLIP_CONTEXT, PUBMEDBERT["vocab_size"])
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 30522 == json.loads((tmp_path / "config.json").read_text())["vocab_size"]
    assert tok.tokenize("Tumour in the left frontal lobe") == ["tumour", "in", "the", "left", "frontal", "lobe"]


def test_biomedclip_config_matches_the_released_one():
    """The fields of BiomedCLIP's released open_clip_config.json that fix the architecture."""
    from negdpo.core.models.presets import PUBMEDBERT, biomedclip_model_cfg

    cfg = biomedclip_model_cfg("bert")
    assert cfg["embed_dim"] == 512
    assert cfg["vision_cfg"] == {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                 "timm_pool": "", "timm_proj": "linear", "image_size": 224}
    t = cfg["text_cfg"]
    assert (t["hf_proj_type"], t["hf_pooler_type"], t["context_length"]) == ("mlp", "cls_last_hidden_state_pooler", 256)
    assert (PUBMEDBERT["vocab_size"], PUBMEDBERT["hidden_size"], PUBMEDBERT["num_hidden_layers"]) == (30522, 768, 12)


@pytest.mark.slow
def test_real_size_presets_load_through_the_real_loaders(tmp_path, monkeypatch):
    """Writes biomedclip-random and sam-vit-b-random (~1.2 GB) and loads them like real weights."""
    import numpy as np
    import torch
    from negdpo.core.models import load_clip, load_sam

    monkeypatch.setenv("NEGDPO_HOME", str(tmp_path))
    model, preprocess, tokenizer = load_clip("biomedclip-random")
    assert sum(p.numel() for p in model.parameters()) == sum(PUBLISHED["biomedclip-random"].values())
    ids = tokenizer(["a brain mri showing a tumour"])
    assert ids.shape == (1, 256)
    with torch.no_grad():
        assert model.encode_text(ids).shape == (1, 512)
    sam = load_sam("sam-vit-b-random")
    assert sum(p.numel() for p in sam.parameters()) == sum(PUBLISHED["sam-vit-b-random"].values())
    from segment_anything import SamPredictor

    pred = SamPredictor(sam)
    pred.set_image(np.zeros((64, 64, 3), np.uint8))
    masks, _, _ = pred.predict(box=np.array([8, 8, 40, 40]), multimask_output=False)
    assert masks.shape == (1, 64, 64)
