"""Preference pairs (HF Datasets) and BiomedCLIP preference training (CLIP-DPO, DHN-NCE baseline)."""
