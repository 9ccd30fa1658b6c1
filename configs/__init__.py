"""Bundled run configs (YAML), installed as package data ``negdpo.configs`` so entry points find them
without a source checkout (:func:`negdpo.core.config.bundled_config`)."""
