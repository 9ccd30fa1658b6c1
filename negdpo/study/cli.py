"""``negdpo study --config configs/phantom_study.yaml [--preset quick|medium|full] [--key value ...]``."""

from __future__ import annotations

from negdpo.core.config import parse_config
from negdpo.core.console import run_main
from negdpo.core.models import ModelNotAvailableError, resolve_clip, resolve_diffusion, resolve_sam
from negdpo.study.config import StudyConfig, load_study_config
from negdpo.study.pipeline import run_study

PROG = "negdpo study"


def check_models(cfg: StudyConfig) -> None:
    """The generator, CLIP and SAM the study names resolve (presets, cached hub ids, folders) before any stage
    runs or writes: a typo is one line, not a failure hours into the run."""
    checks = [("gen_model", lambda: resolve_diffusion(cfg.gen_model)), ("clip_model", lambda: resolve_clip(cfg.clip_model))]
    if cfg.eval_sam != "none":
        checks.append(("eval_sam", lambda: resolve_sam(cfg.eval_sam)))
    for key, resolve in checks:
        try:
            resolve()
        except ModelNotAvailableError as err:
            raise ModelNotAvailableError(f"{key}: {err}") from err


def _run(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        parse_config(StudyConfig, ["--help"])
    cfg = load_study_config(None, None, argv)
    check_models(cfg)
    run_study(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """User errors (bad flag, value or YAML key, a missing model): one line and exit 2."""
    return run_main(PROG, _run, argv)
