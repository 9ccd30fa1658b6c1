"""Shared fixtures. Every test runs offline (HF_HUB_OFFLINE=1) on CPU with tiny presets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("NEGDPO_HOME", str(Path(tempfile.gettempdir()) / "negdpo-test-home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on a 2-core CPU: one intra-op thread is ~3-5x faster than two (oversubscription)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_negdpo_logger():
    """A command run in-process (``run_main`` -> ``setup_logging``) stops the ``negdpo`` logger propagating to the
    root; restore it after each test so a later test's ``caplog`` sees negdpo's warnings whatever ran before."""
    import logging

    log = logging.getLogger("negdpo")
    saved = log.handlers[:], log.propagate, log.level
    yield
    log.handlers[:], log.propagate, log.level = saved[0], saved[1], saved[2]


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom set: 12 subjects (both modalities) x 2 slices at 64 px, seed 0."""
    from negdpo.core.phantoms import PhantomConfig, generate

    return generate(PhantomConfig(out=str(tmp_path_factory.mktemp("phantoms")), n=12, size=64, seed=0, slices=2))


@pytest.fixture(scope="session")
def tiny_clip():
    from negdpo.core.models import load_clip

    return load_clip("tiny")


@pytest.fixture(scope="session")
def tiny_sd_path() -> str:
    from negdpo.core.models import resolve_diffusion

    return resolve_diffusion("tiny")


@pytest.fixture(scope="session")
def adapted_tiny_sd(phantom_dir, tmp_path_factory) -> str:
    """The tiny preset with its autoencoder adapted to ``phantom_dir`` (short run, once per session)."""
    import torch
    from negdpo.generator.autoencoder import adapt_autoencoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is ~3x faster than two on a shared CPU
    try:
        return adapt_autoencoder("tiny", str(phantom_dir), str(tmp_path_factory.mktemp("vae") / "tiny-phantoms"),
                                 steps=50, batch_size=8, lr=3e-3, seed=0)
    finally:
        torch.set_num_threads(threads)


def pytest_configure(config):
    """Test tiers (CONTRIBUTING.md, "Test tiers"):

    * ``integration``: end-to-end runs (kill chains, the study, learning runs, benchmarks, the README demo);
      part of the default run and of CI, left out of the inner loop with ``-m "not integration"``;
    * ``slow``: real-size or long runs, deselected by default (run them with ``-m slow``).
    """
    config.addinivalue_line("markers", "slow: real-size or long runs; deselected unless selected with -m slow")
    config.addinivalue_line("markers", "integration: end-to-end runs (kill chains, study, learning runs, "
                                       "benchmarks); in the default run, skipped by -m 'not integration'")
    expr = config.option.markexpr
    if "slow" not in expr:  # -m "not integration" (the inner loop) leaves the slow runs out too
        config.option.markexpr = f"({expr}) and not slow" if expr else "not slow"
