"""The healthy and lesion texts of each modality, and the one rule that picks a folder's healthy text.

Every stage reads its default texts here: the phantoms' first report templates, the pair builder's and the
CLIP trainer's healthy (negative) text, and M2IB's ``contrast`` target. A modality is a key of
``HEALTHY_TEXT`` (``mri``, ``us``); the importers' file-name prefixes ``brain`` and ``breast`` name the same
two (``MODALITY_ALIASES``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping

#: The healthy report of each modality (the phantoms' wording of a lesion-free train/val/test scan).
HEALTHY_TEXT = {"mri": "A T1-weighted axial brain MRI with no tumour.",
                "us": "A breast ultrasound image with no mass."}
#: File-name prefixes / modality names that mean a modality of ``HEALTHY_TEXT``.
MODALITY_ALIASES = {"brain": "mri", "breast": "us"}
#: Any other modality.
FALLBACK_HEALTHY_TEXT = "A medical image with no tumour."
FALLBACK_LESION_TEXT = "A medical image showing a tumour."


def modality_of(name: str) -> str:
    """The modality of a scan file name or modality name: the prefix before the first ``_``, lower-cased,
    aliases resolved (``brain_0001.png`` -> ``mri``; ``us`` -> ``us``; ``ct_1.png`` -> ``ct``)."""
    prefix = name.split("_", 1)[0].lower()
    return MODALITY_ALIASES.get(prefix, prefix)


def default_healthy_text(modality: str, strict: bool = False) -> str:
    """The healthy text of ``modality`` (a name or file name, see :func:`modality_of`); an unknown modality
    gets ``FALLBACK_HEALTHY_TEXT``, or with ``strict`` a ValueError naming the known ones."""
    key = modality_of(modality)
    if key in HEALTHY_TEXT:
        return HEALTHY_TEXT[key]
    if strict:
        raise ValueError(f"no healthy text for modality '{key}' (from '{modality}'); known: "
                         f"{', '.join([*HEALTHY_TEXT, *MODALITY_ALIASES])}")
    return FALLBACK_HEALTHY_TEXT


def folder_healthy_texts(prompts: Mapping[str, str], healthy: Iterable[str],
                         modality: Callable[[str], str] = modality_of) -> dict[str, str]:
    """The one rule for a scan folder: per modality, the most common prompt of its healthy scans (``healthy``:
    their file names; ``modality``: file name -> modality key; ties go to the first name in sorted order).
    A modality without healthy scans gets :func:`default_healthy_text`."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for name in sorted(healthy):
        if name in prompts:
            counts[modality(name)][prompts[name]] += 1
    return HealthyTexts({mod: c.most_common(1)[0][0] for mod, c in counts.items()})


class HealthyTexts(dict):
    """{modality: healthy text}; a missing modality reads :func:`default_healthy_text` (not stored)."""

    def __missing__(self, key: str) -> str:
        return default_healthy_text(key)
