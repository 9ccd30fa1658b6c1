"""Shared by every stage: scan I/O, phantoms, model loading, config and seeding."""
