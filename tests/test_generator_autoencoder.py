"""Modality adaptation of the tiny preset's autoencoder: reconstruction improves, the folder is a full pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from negdpo.generator.autoencoder import (
    STAMP,
    adapt_autoencoder,
    collect_images,
    read_record,
    reconstruction_psnr,
)


@pytest.mark.integration
def test_adaptation_raises_heldout_psnr_and_writes_a_loadable_pipeline(adapted_tiny_sd, phantom_dir, tiny_sd_path):
    from negdpo.core.models import load_inpaint_pipeline
    from negdpo.generator.sample import load_generator

    rec = read_record(adapted_tiny_sd)
    assert rec["n_heldout_images"] > 0 and rec["settings"]["steps"] == 50
    # random-init VAE ~6 dB; even a 50-step adaptation gains > 8 dB on held-out phantoms (400 steps: ~27 dB)
    assert rec["psnr_heldout_before"] < 10.0, rec
    assert rec["psnr_heldout_after"] > rec["psnr_heldout_before"] + 8.0, rec
    folder = Path(adapted_tiny_sd)
    assert (folder / "model_index.json").is_file() and not any(folder.parent.glob(".tiny-phantoms-*"))
    assert list((folder / "vae").glob("*.safetensors")) and list((folder / "unet").glob("*.safetensors"))
    # the PSNR is reproducible from the saved folder, which loads wherever a model name goes
    pipe = load_generator(adapted_tiny_sd)
    held = collect_images(phantom_dir, 64, ("val", "test"), twins=False, negatives=False)
    assert reconstruction_psnr(pipe.vae, held) == pytest.approx(rec["psnr_heldout_after"], abs=0.01)
    assert pipe.vae.config.scaling_factor == pytest.approx(rec["scaling_factor"])
    base = load_inpaint_pipeline(tiny_sd_path)
    assert reconstruction_psnr(base.vae, held) == pytest.approx(rec["psnr_heldout_before"], abs=0.01)
    # the other components are the original ones
    import torch

    for (n, p), (_, q) in zip(pipe.unet.state_dict().items(), base.unet.state_dict().items()):
        assert torch.equal(p, q), n
    # same settings -> reused as is; different settings -> a clear error instead of overwriting
    stamp = (folder / STAMP).stat().st_mtime_ns
    assert adapt_autoencoder("tiny", str(phantom_dir), str(folder), steps=50, batch_size=8, lr=3e-3) == str(folder)
    assert (folder / STAMP).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="different settings"):
        adapt_autoencoder("tiny", str(phantom_dir), str(folder), steps=7)
    assert json.loads((folder / STAMP).read_text())["settings"]["steps"] == 50


def test_autoencoder_cli_help():
    from negdpo.generator.autoencoder import _parser

    args = _parser().parse_args(["--data", "d", "--out", "o", "--max_train_steps", "5"])
    assert (args.model, args.max_train_steps, args.batch_size) == ("tiny", 5, 8)
