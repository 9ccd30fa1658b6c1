"""The study's training sets beyond the phantoms: MedCLIP-SAMv2's DHN-NCE set (positives + ordinary healthy scans,
no counterfactual image) and the harmonic-fill set; both are built without opening a test file."""

from __future__ import annotations

import json

import numpy as np
from negdpo.core.imageio import read_scan
from negdpo.core.scans import ScanFolder
from negdpo.core.split_lock import locked_splits

from negdpo.study.data import write_harmonic_set, write_healthy_set


def test_faithful_set_pairs_positives_with_ordinary_healthy_scans(tmp_path):
    from negdpo.core.phantoms import PhantomConfig, generate

    root = generate(PhantomConfig(out=str(tmp_path / "p"), n=8, size=32, seed=0, slices=2, pretrain_n=4, preview=False))
    folder = ScanFolder(root)
    with locked_splits(("test",)) as record:
        out = write_healthy_set(root, tmp_path / "faithful")
        write_harmonic_set(root, tmp_path / "harmonic")
    assert "test" not in record.reads and not (tmp_path / "faithful" / "test_images").exists()
    healthy = {s.name: s.image for split in ("train", "val") for s in folder.load_split(split) if not s.positive}
    for split in ("train", "val"):
        positives = {s.name: s for s in folder.load_split(split) if s.positive}
        files = sorted(p.name for p in (out / f"{split}_twins").glob("*.png"))
        assert files == sorted(positives)  # every positive, once
        for name in files:
            slot = read_scan(out / f"{split}_twins" / name)
            own_twin = positives[name].twin
            assert not np.allclose(slot, own_twin, atol=2 / 255)  # never the counterfactual
            matches = [h for h in healthy.values() if np.allclose(slot, np.asarray(h, np.float32), atol=1 / 255)]
            assert matches, name  # an ordinary healthy scan
    prompts = json.loads((out / "prompts.json").read_text())
    assert all(prompts[n] == folder.prompts[n] for n in (p.name for p in (out / "train_images").glob("*.png")))
