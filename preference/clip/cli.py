"""``accelerate launch clip_train.py [--config FILE] [--key value ...]``: parse the config, train, print the
before -> after metrics. Imports torch only after the config is valid, so ``--help`` and setting errors are fast."""

from __future__ import annotations


def _run(argv: list[str]) -> int:
    from negdpo.core.config import bundled_config, parse_config

    from .config import ClipTrainConfig

    cfg = parse_config(ClipTrainConfig, argv, default_config=str(bundled_config("clip_demo.yaml")))
    from negdpo.core.models import ModelNotAvailableError, resolve_clip

    try:  # before phantoms are made or --output_dir is claimed
        resolve_clip(cfg.pretrained_model_name_or_path)
    except ModelNotAvailableError as err:
        raise ModelNotAvailableError(f"--pretrained_model_name_or_path: {err}") from err
    from accelerate import PartialState

    from .train import train

    summary = train(cfg)
    if PartialState().is_main_process:
        b, a = summary["before"], summary["after"]
        print(f"preference accuracy {b['eval/preference/accuracy']:.3f} -> {a['eval/preference/accuracy']:.3f}; "
              f"R@1 i2t {b['eval/r1_i2t']:.3f} -> {a['eval/r1_i2t']:.3f}; "
              f"entropy {b['eval/attention_entropy']:.3f} -> {a['eval/attention_entropy']:.3f}; "
              f"{summary['samples_per_s']} samples/s; checkpoint {summary.get('checkpoint')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from negdpo.core.console import run_main

    return run_main("clip_train", _run, argv)
