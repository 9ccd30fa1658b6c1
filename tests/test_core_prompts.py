"""core/prompts.py: the one table of healthy texts and the one rule that picks a folder's healthy text."""

from __future__ import annotations

import csv

import pytest
from negdpo.core.prompts import (
    FALLBACK_HEALTHY_TEXT,
    HEALTHY_TEXT,
    default_healthy_text,
    folder_healthy_texts,
    modality_of,
)


def test_modality_of_file_names_and_aliases():
    assert [modality_of(n) for n in ("mri_0003_1.png", "US_1.png", "brain_7.png", "breast", "ct_1.png")] == [
        "mri", "us", "mri", "us", "ct"]


def test_default_text_table_fallback_and_strict():
    assert default_healthy_text("brain_0001.png") == HEALTHY_TEXT["mri"] == "A T1-weighted axial brain MRI with no tumour."
    assert default_healthy_text("us") == "A breast ultrasound image with no mass."
    assert default_healthy_text("ct_1.png") == FALLBACK_HEALTHY_TEXT
    with pytest.raises(ValueError, match="no healthy text for modality 'ct'.*known: mri, us, brain, breast"):
        default_healthy_text("ct_1.png", strict=True)


def test_folder_rule_most_common_healthy_prompt_per_modality():
    prompts = {"mri_1.png": "rare", "mri_2.png": "common", "mri_3.png": "common", "mri_4.png": "lesion text",
               "us_1.png": "b", "us_2.png": "a"}
    healthy = ["mri_1.png", "mri_2.png", "mri_3.png", "us_2.png", "us_1.png", "gone.png"]  # gone: no prompt
    texts = folder_healthy_texts(prompts, healthy)
    assert dict(texts) == {"mri": "common", "us": "b"}  # a tie goes to the first name in sorted order
    assert texts["ct"] == FALLBACK_HEALTHY_TEXT and "ct" not in texts  # a default is read, not stored
    assert folder_healthy_texts(prompts, [])["us"] == HEALTHY_TEXT["us"]


def test_phantoms_builder_and_clip_read_the_same_healthy_texts(phantom_dir):
    """The phantoms write HEALTHY_TEXT for their healthy scans, and the pair builder (meta.csv modality) and
    the CLIP trainer (file-name prefix) both read it back through the one rule."""
    from negdpo.core.scans import ScanFolder
    from negdpo.preference.clip.data import pairs_from_scans
    from negdpo.preference.pairs.items import healthy_texts

    rows = list(csv.DictReader((phantom_dir / "meta.csv").open()))
    prompts = ScanFolder(phantom_dir).prompts
    assert {prompts[r["file"]] for r in rows if r["positive"] == "0"} == set(HEALTHY_TEXT.values())
    assert dict(healthy_texts(phantom_dir, None)) == HEALTHY_TEXT
    assert healthy_texts(phantom_dir, "custom")["mri"] == "custom"
    pairs = pairs_from_scans(phantom_dir, "train")
    assert pairs and all(p.text_neg == HEALTHY_TEXT[modality_of(p.pair_id.split("/")[1])] for p in pairs)
