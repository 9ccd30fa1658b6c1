"""``accelerate launch gen_train.py [--config FILE] [--key value ...]``: parse the config, train, print where
everything is. Imports torch only after the config is valid, so ``--help`` and setting errors are fast."""

from __future__ import annotations


def _run(argv: list[str]) -> int:
    from negdpo.core.config import bundled_config, parse_config

    from .config import GenTrainConfig

    cfg = parse_config(GenTrainConfig, argv, default_config=str(bundled_config("demo.yaml")))
    from .train import train

    summary = train(cfg)
    if "adapter" in summary:  # the main process
        print(f"\ndone in {summary['wall_s']} s ({summary['steps']} steps)")
        print(f"  adapter : {summary['adapter']}")
        print(f"  logs    : {summary['logs']} (tensorboard --logdir {summary['logs']}); per-step: {summary['metrics']}")
        if summary.get("preview"):
            print(f"  preview : {summary['preview']} (source | mask | policy | reference | healthy target)")
        if "heldout_after" in summary:
            b, a = summary.get("heldout_before", {}), summary["heldout_after"]
            print(f"  held-out implicit accuracy (z > 0; ties count as wrong): "
                  f"{b.get('implicit_acc', float('nan')):.3f} -> {a['implicit_acc']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from negdpo.core.console import run_main

    return run_main("gen_train", _run, argv)
