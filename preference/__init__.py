"""Preference learning: ``pairs`` builds the pair datasets, ``clip`` trains CLIP on them."""
