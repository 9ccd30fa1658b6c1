"""``negdpo import FORMAT SRC --out DIR [--key value ...]``: a public dataset in its original layout -> a scan folder.

The output is the MedCLIP-SAMv2 layout every negdpo command reads (``{split}_images/``, ``{split}_masks/``,
optional ``negatives/``, ``prompts.json``, ``meta.csv``, ``import.json``, ``preview.png``), split by patient
with seeded ratios. The folder is owned by the command: the same settings again rewrite it, other settings
are refused unless ``--overwrite_output_dir`` (``negdpo.core.outdir``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check, check_choice, check_positive, parse_config
from ..console import run_main
from ..window import ScanReading

logger = logging.getLogger(__name__)
PROG = "negdpo import"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ImportConfig(ScanReading):
    """Settings of one import (``negdpo import --help``)."""

    format: str = field(default="", metadata=_help("dataset format: busi | figshare | brats | nifti | dicom"))
    src: str = field(default="", metadata=_help("the downloaded dataset's folder, in its original layout"))
    out: str = field(default="", metadata=_help("output scan folder (MedCLIP-SAMv2 layout)"))
    train_ratio: float = field(default=0.7, metadata=_help("share of subjects (patients) in train"))
    val_ratio: float = field(default=0.1, metadata=_help("share of subjects in val"))
    test_ratio: float = field(default=0.2, metadata=_help("share of subjects in test"))
    seed: int = field(default=0, metadata=_help("seed of the subject split and of the sampled healthy slices"))
    healthy: str = field(default="split", metadata=_help(
        "lesion-free scans: split (in their patient's split with an empty mask) | negatives (negatives/) | drop"))
    prompt_template: str | None = field(default=None, metadata=_help(
        "prompt of a scan with a lesion, {label} and {modality} filled in (default: the format's)"))
    healthy_prompt: str | None = field(default=None, metadata=_help("prompt of a lesion-free scan"))
    modality: str | None = field(default=None, metadata=_help("meta.csv modality (default: the format's)"))
    name_prefix: str | None = field(default=None, metadata=_help(
        "file-name prefix, the modality key of per-modality defaults (default: breast | brain | scan)"))
    label_text: str | None = field(default=None, metadata=_help(
        "lesion name in prompts for brats/nifti/dicom (default glioma for brats, tumor otherwise)"))
    sequence: str = field(default="flair", metadata=_help("brats: t1 | t1ce | t2 | flair"))
    labels: str | None = field(default=None, metadata=_help(
        "brats/nifti: label values that are lesion, e.g. 1,4 (default: any non-zero label)"))
    axis: int = field(default=2, metadata=_help("brats/nifti: slicing axis of the RAS+ volume (2 axial, 1 coronal, "
                                                "0 sagittal)"))
    min_lesion_px: int = field(default=1, metadata=_help("brats/nifti: lesion voxels for a slice to count as "
                                                         "positive"))
    healthy_slices: int = field(default=2, metadata=_help("brats/nifti: lesion-free slices sampled per volume"))
    subject_pattern: str | None = field(default=None, metadata=_help(
        "nifti/dicom: regex on the file name whose group 1 is the patient id (default: the case / PatientID)"))
    missing_mask: str = field(default="error", metadata=_help("dicom: a file without mask is an error | healthy"))
    on_error: str = field(default="raise", metadata=_help(
        "raise: stop at an unreadable file or bad pixels, naming it | skip: skip and count it"))
    overwrite_output_dir: bool = field(default=False, metadata=_help("replace an earlier import in --out"))

    def __post_init__(self) -> None:
        super().__post_init__()
        from . import FORMATS

        check(self.format in FORMATS, "format", self.format, f"must be one of {list(FORMATS)}")
        check(bool(self.src), "src", self.src, "give the dataset folder: negdpo import FORMAT SRC --out DIR")
        check(bool(self.out), "out", self.out, "give the output folder with --out DIR")
        ratios = (self.train_ratio, self.val_ratio, self.test_ratio)
        check(all(0 <= r <= 1 for r in ratios) and abs(sum(ratios) - 1) < 1e-6, "train_ratio,val_ratio,test_ratio",
              ratios, "must be shares in [0, 1] that sum to 1")
        check_choice(self, "healthy", ("split", "negatives", "drop"))
        check_choice(self, "missing_mask", ("error", "healthy"))
        check_choice(self, "on_error", ("raise", "skip"))
        check_choice(self, "axis", (0, 1, 2))
        check_positive(self, "min_lesion_px")
        check(self.healthy_slices >= 0, "healthy_slices", self.healthy_slices, "must be >= 0")


def usage() -> str:
    from . import FORMATS

    lines = [f"usage: {PROG} FORMAT SRC --out DIR [--key value ...]", "", "formats:"]
    lines += [f"  {name:<9} {fmt.help}" for name, fmt in FORMATS.items()]
    lines += ["", "example: negdpo import busi ~/Downloads/Dataset_BUSI_with_GT --out data/busi", "", "options:"]
    return "\n".join(lines)


def _positionals(argv: list[str]) -> list[str]:
    """``FORMAT SRC --flags`` -> ``--format FORMAT --src SRC --flags``."""
    argv = list(argv)
    head = []
    for key in ("--format", "--src"):
        if argv and not argv[0].startswith("-"):
            head += [key, argv.pop(0)]
    return head + argv


def run(cfg: ImportConfig) -> dict:
    """Import ``cfg.src`` into ``cfg.out``; returns the ``import.json`` summary."""
    from ..outdir import output_dir
    from . import FORMATS
    from .common import OWNED, run_import, settings_of

    src = Path(cfg.src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    settings = {k: v for k, v in settings_of(cfg).items() if k not in ("out", "overwrite_output_dir")}
    with output_dir(cfg.out, "import", cfg.overwrite_output_dir, owned=OWNED, settings=settings) as out:
        return run_import(FORMATS[cfg.format], cfg, out)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        try:
            parse_config(ImportConfig, ["--help"])
        except SystemExit:
            pass
        return 0
    cfg = parse_config(ImportConfig, _positionals(argv))
    summary = run(cfg)
    out = Path(cfg.out)
    for where, c in summary["counts"].items():
        if c["positive"] or c["healthy"]:
            print(f"{where:>9}: {c['positive']} with lesion, {c['healthy']} healthy, {c['subjects']} subjects")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable source(s), e.g. {summary['skipped'][0]}")
    print(f"wrote {out} (meta.csv, prompts.json; preview: {out / 'preview.png'})")
    print(f"next: negdpo evaluate --data {out} --split test --clip base=tiny --out outputs/eval")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
