"""Importers of public datasets into the MedCLIP-SAMv2 scan-folder layout (``negdpo import FORMAT SRC --out DIR``).

One module per format family: ``busi`` (breast ultrasound PNGs), ``figshare`` (brain-tumour .mat files),
``brats`` (per-case NIfTI), ``volumes`` (generic ``nifti`` volumes and ``dicom`` files); ``common`` holds the
splits, prompts, writer and preview; ``cli`` the command. docs/method.md#importers.
"""

from __future__ import annotations

from .brats import BRATS
from .busi import BUSI
from .common import Format
from .figshare import FIGSHARE
from .volumes import DICOM, NIFTI

FORMATS: dict[str, Format] = {f.name: f for f in (BUSI, FIGSHARE, BRATS, NIFTI, DICOM)}
