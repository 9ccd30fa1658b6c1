"""Model loading: tiny presets run a forward pass through the real loaders; offline errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from negdpo.core.models import (
    ModelNotAvailableError,
    load_inpaint_pipeline,
    load_sam,
    resolve_clip,
    resolve_diffusion,
    resolve_sam,
)


def test_tiny_clip_forward_through_open_clip(tiny_clip):
    import open_clip

    model, preprocess, tokenizer = tiny_clip
    name = resolve_clip("tiny")
    assert name.startswith("local-dir:")
    cfg = json.loads((Path(name.removeprefix("local-dir:")) / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["vision_cfg"]["timm_model_name"] and cfg["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    assert isinstance(model, open_clip.CustomTextCLIP)
    from PIL import Image

    img = preprocess(Image.fromarray(np.zeros((100, 80, 3), np.uint8))).unsqueeze(0)
    assert img.shape == (1, 3, 224, 224)
    with torch.no_grad():
        f_img = model.encode_image(img, normalize=True)
        f_txt = model.encode_text(tokenizer(["a brain mri showing a tumour", "no tumour"]), normalize=True)
    assert f_img.shape == (1, 32) and f_txt.shape == (2, 32)
    assert torch.allclose(f_txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(f_txt[0], f_txt[1])  # the tokenizer distinguishes the texts


def test_tiny_presets_are_deterministic(tmp_path, monkeypatch):
    """A fresh build (other cache dir) gives bitwise the same weights: seeded init."""
    from safetensors.torch import load_file

    first = Path(resolve_clip("tiny").removeprefix("local-dir:")) / "open_clip_model.safetensors"
    monkeypatch.setenv("NEGDPO_HOME", str(tmp_path))
    second = Path(resolve_clip("tiny").removeprefix("local-dir:")) / "open_clip_model.safetensors"
    assert first != second
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_building_presets_leaves_the_global_random_state_alone(tmp_path, monkeypatch):
    """A first run (presets built now) and a later run (presets cached) draw the same random numbers:
    building a preset neither reseeds nor consumes torch's global generator (README command 1)."""
    from negdpo.core.models.presets import get_preset, param_counts
    from negdpo.core.models.vlm import resolve_vlm

    monkeypatch.setenv("NEGDPO_HOME", str(tmp_path))
    torch.manual_seed(1234)
    expected = torch.rand(8)  # what the run draws next when nothing touches the generator
    for cached in (False, True):
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        resolve_diffusion("tiny")
        resolve_clip("tiny")
        resolve_sam("tiny")
        resolve_vlm("tiny")
        param_counts(get_preset("tiny", "diffusion"))
        assert torch.equal(torch.get_rng_state(), state), f"cached={cached}"
        assert torch.equal(torch.rand(8), expected)
    assert {p.name.rsplit("-v", 1)[0] for p in (tmp_path / "presets").iterdir()} == {
        "tiny-sd-inpaint", "tiny-clip", "tiny-sam", "tiny-vlm"}


def test_building_a_preset_prints_no_progress_bar(tmp_path, monkeypatch, capfd):
    """First use builds the preset silently (a command's one-line error must stay one line in a fresh NEGDPO_HOME),
    and the libraries' progress bars are on again afterwards."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    monkeypatch.setenv("NEGDPO_HOME", str(tmp_path))
    resolve_diffusion("tiny")
    resolve_clip("tiny")
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "%|" not in err, err[:300]
    assert t_logging.is_progress_bar_enabled() and d_logging.is_progress_bar_enabled()


def test_tiny_sam_forward_with_predictor():
    from segment_anything import SamPredictor

    sam = load_sam("tiny")
    predictor = SamPredictor(sam)
    predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    masks, scores, logits = predictor.predict(box=np.array([5, 5, 30, 20]), multimask_output=False)
    assert masks.shape == (1, 40, 60) and masks.dtype == bool and scores.shape == (1,)


def test_tiny_sd_inpainting_pipeline(tiny_sd_path):
    pipe = load_inpaint_pipeline("tiny")
    assert pipe.unet.config.in_channels == 9 and pipe.unet.config.out_channels == 4
    from PIL import Image

    img = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 24))
    gen = torch.Generator().manual_seed(0)
    out = pipe("a brain mri", image=img, mask_image=mask, num_inference_steps=2, height=64, width=64,
               generator=gen, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_offline_real_models_fail_with_one_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotAvailableError, match=r"CLIP model 'microsoft/BiomedCLIP.*HF_HUB_OFFLINE=1.*local-dir:"):
        resolve_clip("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    with pytest.raises(ModelNotAvailableError, match=r"Stable Diffusion model .* not available.*local diffusers folder"):
        resolve_diffusion("stable-diffusion-v1-5/stable-diffusion-inpainting")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotAvailableError, match=r"SAM vit_h checkpoint not found: looked at .*sam_vit_h_4b8939\.pth.*--sam_checkpoint"):
        resolve_sam("vit_h")
    with pytest.raises(ModelNotAvailableError, match="no open_clip_config.json"):
        resolve_clip(f"local-dir:{tmp_path}")


def test_sam_checkpoint_loaded_with_weights_only(tmp_path):
    """A .pth holding a pickled object (not just tensors) is refused."""
    _, good = resolve_sam("tiny")
    state = torch.load(good, weights_only=True)
    evil = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"state": state, "obj": Path("x")}, evil)  # arbitrary object => needs full unpickling
    with pytest.raises(Exception, match="(?i)weights_only|Unsupported global"):
        load_sam("vit_b", checkpoint=evil)


def test_phantom_captions_fit_the_tiny_text_encoder(tiny_sd_path):
    """Every phantom caption encodes within 77 tokens (no truncation warnings): whole words are tokens."""
    from negdpo.core.phantoms import MODALITIES, _describe
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    lesion = type("L", (), {"cx": 10.0, "cy": 50.0, "contrast": -0.3, "ring": True, "radius": 20.0,
                            "harmonics": [(0.2, 0.0)]})()
    captions = [_describe(m, les, 64) for m in MODALITIES for les in (None, lesion)]
    longest = max(captions, key=len)
    assert len(longest) > 90  # char-level BPE (the v1 preset) needed > 77 tokens for this one
    for text in captions:
        assert len(tok(text).input_ids) <= 40


def test_loading_clip_prints_no_root_info(caplog):
    """open_clip's progress messages go to the root logger at INFO; loading keeps them out of it."""
    import logging

    from negdpo.core.models import load_clip

    with caplog.at_level(logging.INFO):
        load_clip("tiny")
    assert not [r for r in caplog.records if r.name == "root" and r.levelno == logging.INFO]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # still there for whoever asks for DEBUG, under our module logger
        load_clip("tiny")
    assert not [r for r in caplog.records if r.name == "root" and r.levelno == logging.INFO]
    assert any("open_clip:" in r.getMessage() for r in caplog.records if r.name == "negdpo.core.models.clip")
