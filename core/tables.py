"""The one CSV writer (per-image evaluation metrics, the study's long tables)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None,
              float_format: str | None = None) -> Path:
    """Write ``rows`` to ``path`` atomically (temp file + rename; the parent folder is created).

    ``columns``: the header, in order (a row key not in it is an error); None = every key of the rows in the
    order first seen (no rows and no columns: an empty file). ``float_format`` (e.g. ``".6f"``) formats the
    float cells; None writes Python's shortest round-trip repr.
    """
    path = Path(path)
    rows = list(rows)
    header = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", newline="") as fh:
            if header:
                writer = csv.DictWriter(fh, fieldnames=header)
                writer.writeheader()
                for row in rows:
                    writer.writerow(row if float_format is None else
                                    {k: (format(v, float_format) if isinstance(v, float) else v) for k, v in row.items()})
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves the old file (if any) and no temporary file
        raise
    return path
