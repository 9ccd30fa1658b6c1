"""``negdpo study --config configs/phantom_study.yaml [--preset quick|medium|full] [--key value ...]``."""

from __future__ import annotations

from negdpo.core.config import parse_config
from negdpo.core.console import run_main
from negdpo.study.config import StudyConfig, load_study_config
from negdpo.study.pipeline import run_study


def _run(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        parse_config(StudyConfig, ["--help"])
    run_study(load_study_config(None, None, argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("negdpo study", _run, argv)
