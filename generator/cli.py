"""``accelerate launch gen_train.py [--config FILE] [--key value ...]``: parse the config, train, print where
everything is. Imports torch only after the config is valid, so ``--help`` and setting errors are fast.

``--train_method onpolicy`` is a loop over sampling, judging and DPO rounds that uses the pair machinery of
``negdpo.preference.pairs``; the generator package must not import it, so the entry script passes the loop in
(``main(argv, onpolicy=negdpo.onpolicy.run_onpolicy)``)."""

from __future__ import annotations

from collections.abc import Callable


def _run(argv: list[str], onpolicy: Callable | None = None) -> int:
    from negdpo.core.config import bundled_config, parse_config

    from .config import GenTrainConfig

    cfg = parse_config(GenTrainConfig, argv, default_config=str(bundled_config("demo.yaml")))
    from .sample import check_generator

    check_generator(cfg.pretrained_model_name_or_path, None)  # before phantoms are made or --output_dir claimed
    if cfg.train_method == "onpolicy":
        if onpolicy is None:
            raise ValueError("--train_method onpolicy runs through gen_train.py (negdpo.onpolicy.run_onpolicy)")
        adapters = onpolicy(cfg)
        print(f"\ndone: {len(adapters)} on-policy round(s)")
        for r, adapter in enumerate(adapters, 1):
            print(f"  round {r} adapter : {adapter}")
        return 0
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
                  f"{b.get('implicit_acc_strict', float('nan')):.3f} -> {a['implicit_acc_strict']:.3f}")
    return 0


def main(argv: list[str] | None = None, onpolicy: Callable | None = None) -> int:
    from negdpo.core.console import run_main

    return run_main("gen_train", lambda a: _run(a, onpolicy), argv)
