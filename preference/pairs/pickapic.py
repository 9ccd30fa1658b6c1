"""Convert generator pairs to the Pick-a-Pic column layout read by the public Diffusion-DPO scripts.

    caption = prompt, jpg_0 = chosen, jpg_1 = rejected (encoded image bytes), label_0 = 1.0, label_1 = 0.0

plus ``image_0_uid``/``image_1_uid``/``best_image_uid`` (= pair_id-derived uids), ``model_0``/``model_1``
(gen_model), ``has_label``/``are_different`` = True, and for inpainting our ``source``/``mask`` bytes
and ``pair_id``. The scripts open the bytes with PIL, so ``fmt="png"`` (lossless) works as well as
the default ``"jpeg"`` (quality 95, the original layout).

    python -m negdpo.preference.pairs.pickapic OUT OUT/pickapic [--format png]
"""

from __future__ import annotations

import shutil
from io import BytesIO
from pathlib import Path

from PIL import Image

from .schema import dataset_dir, find_dataset


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def to_pickapic(ds, fmt: str = "jpeg"):
    """One ``datasets.Dataset`` of generator pairs -> the Pick-a-Pic layout (a new Dataset)."""
    from datasets import Features, Value

    if fmt not in ("jpeg", "png"):
        raise ValueError(f"format must be 'jpeg' or 'png', got '{fmt}'")
    feats = Features({"caption": Value("string"), "jpg_0": Value("binary"), "jpg_1": Value("binary"),
                      "label_0": Value("float64"), "label_1": Value("float64"), "image_0_uid": Value("string"),
                      "image_1_uid": Value("string"), "best_image_uid": Value("string"),
                      "model_0": Value("string"), "model_1": Value("string"), "has_label": Value("bool"),
                      "are_different": Value("bool"), "source": Value("binary"), "mask": Value("binary"),
                      "pair_id": Value("string")})

    def convert(row: dict) -> dict:
        uid0, uid1 = f"{row['pair_id']}/chosen", f"{row['pair_id']}/rejected"
        rej_model = "real" if row["seed_rejected"] == -1 else row["gen_model"]
        return {"caption": row["prompt"], "jpg_0": _encode(row["chosen"], fmt), "jpg_1": _encode(row["rejected"], fmt),
                "label_0": 1.0, "label_1": 0.0, "image_0_uid": uid0, "image_1_uid": uid1, "best_image_uid": uid0,
                "model_0": row["gen_model"], "model_1": rej_model, "has_label": True, "are_different": True,
                "source": _encode(row["source"], "png"), "mask": _encode(row["mask"], "png"),
                "pair_id": row["pair_id"]}

    return ds.map(convert, remove_columns=ds.column_names, features=feats)


def convert(out: str | Path, dest: str | Path, fmt: str = "jpeg") -> Path:
    """``OUT/generator`` (DatasetDict) -> ``dest`` (save_to_disk) in the Pick-a-Pic layout; an earlier conversion
    in ``dest`` is replaced, any other non-empty folder is refused (never deleted)."""
    import datasets

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / "dataset_dict.json").is_file())):
        raise FileExistsError(f"{dest}: not a Pick-a-Pic conversion (no dataset_dict.json), so it is not replaced "
                              "or deleted; choose another destination (or remove it yourself)")
    path = find_dataset(out, "generator")
    if path is None:
        raise FileNotFoundError(f"{out}: no generator pairs (expected {dataset_dir(out, 'generator')})")
    dsd = datasets.load_from_disk(str(path))
    conv = datasets.DatasetDict({s: to_pickapic(d, fmt) for s, d in dsd.items()})
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    conv.save_to_disk(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _main(argv: list[str]) -> int:
    from negdpo.core.console import CommandParser

    p = CommandParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a build-pairs output folder")
    p.add_argument("dest")
    p.add_argument("--format", default="jpeg", choices=["jpeg", "png"])
    a = p.parse_args(argv)
    print(convert(a.out, a.dest, a.format))
    return 0


def main(argv: list[str] | None = None) -> int:
    """User errors: one line and exit 2 (``--debug``: the traceback)."""
    from negdpo.core.console import run_main

    return run_main("python -m negdpo.preference.pairs.pickapic", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
