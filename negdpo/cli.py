"""``negdpo <command> [options]``: one CLI for the non-training commands.

Each command lives in the package that owns it and exposes ``main(argv) -> int``; this module
only dispatches (imports are lazy, so ``negdpo phantoms`` does not import torch).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "phantoms": ("negdpo.core.phantoms_cli", "generate synthetic scans with masks and healthy twins"),
    "import": ("negdpo.core.importers.cli", "import BUSI, figshare, BraTS, NIfTI or DICOM data into a scan folder"),
    "models": ("negdpo.core.models.cli", "build the tiny presets / check that real weights are available"),
    "sample": ("negdpo.generator.sample", "turn positives + masks into negatives with a (LoRA) generator"),
    "build-pairs": ("negdpo.preference.pairs.build_cli", "generate, judge and write preference-pair datasets"),
    "evaluate": ("negdpo.segmentation.cli", "zero-shot segmentation evaluation of CLIP checkpoints"),
    "pretrain-sam": ("negdpo.segmentation.sam_pretrain", "pre-train the tiny SAM as a promptable segmenter on a pre-training pool"),
    "train-vlm": ("negdpo.segmentation.vlm_train", "train a (tiny) vision-language model as a report writer for VL-SAM"),
    "study": ("negdpo.study", "the phantom study: the whole chain end to end"),
}


def usage() -> str:
    lines = ["usage: negdpo <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`negdpo <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"negdpo: error: unknown command '{name}' (commands: {', '.join(COMMANDS)}; negdpo --help)",
              file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as err:
        print(f"negdpo: error: command '{name}' is not available in this version ({err})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
