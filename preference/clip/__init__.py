"""BiomedCLIP preference training: CLIP-DPO (baseline DHN-NCE), attention entropy, mask-aware OT stages."""
