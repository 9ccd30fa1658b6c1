"""Deterministic synthetic scans with exact lesion masks and healthy twins.

Two modalities: an MRI-like axial brain slice and an ultrasound-like image with speckle. Each
subject has ``slices`` images; positive subjects carry a lesion on every slice, healthy-only subjects
none. Every image is rendered twice from the same random fields: once with the lesion composited
(the positive) and once without (its healthy *twin*). The lesion's soft edge lives inside the mask
dilated by 2 px, so positive and twin are byte-identical outside that band.

Output layout (the scan folder layout of ``negdpo.core.scans`` plus twins and metadata)::

    DIR/{train,val,test}_{images,masks,twins}/<modality>_<subject>_<slice>.png
    DIR/pretrain_{images,masks,twins}/<modality>_p<subject>_<slice>.png   with pretrain_n > 0 only
    DIR/negatives/            healthy-only training images
    DIR/prompts.json          {file name: text}
    DIR/meta.csv              file, subject_id, split, modality, positive, group, lesion stats
    DIR/phantoms.json         the settings
    DIR/preview.png           labelled grid: image | lesion mask | healthy twin, a row per example

Lesion groups (``meta.csv`` column ``group``, empty for healthy scans): ``mri_bright`` and
``mri_dark`` (MRI lesions brighter / darker than the tissue they replace) and ``us`` (hypoechoic
ultrasound masses). ``lesion_area = (lo, hi)`` draws each lesion's nominal area log-uniformly from that
share of the image (the mask area, column ``lesion_area_frac``, deviates by the lobulation); ``None``
keeps the original radius law (radius 4-13% of the side x a per-subject scale).

``pretrain_n`` extra subjects form a ``pretrain`` split, disjoint from train/val/test by construction
(their own subject ids ``<modality>_pNNNN`` and random streams): the stand-in for the web-scale data
the real models were pre-trained on. Adding them changes no byte of the train/val/test scans.

``generate`` owns these entries: a folder holding another phantom set is refused unless
``overwrite=True``, which removes them first (a rerun with the same settings replaces them; other
files are left alone), so no image of an earlier, larger set stays behind (``negdpo.core.outdir``).

Formulas and sources: docs/method.md#phantoms.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .figures import write_grid  # noqa: F401  (re-exported: ``negdpo.core.phantoms.write_grid`` is an alias)
from .imageio import save_png
from .outdir import MARKER, prepare_output_dir, run_lock
from .prompts import HEALTHY_TEXT

MODALITIES = ("mri", "us")
EDGE_PX = 1.5  # width of the lesion's soft edge; alpha > 0 only within EDGE_PX/2 outside the mask


@dataclass(frozen=True)
class PhantomConfig:
    out: str
    n: int = 40  # subjects (split evenly over modalities)
    size: int = 256
    seed: int = 0
    slices: int = 2  # images per subject
    healthy_fraction: float = 0.25
    modalities: tuple[str, ...] = MODALITIES
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    preview: bool = True
    pretrain_n: int = 0  # extra subjects in a disjoint ``pretrain`` split
    lesion_area: tuple[float, float] | None = None  # (lo, hi) share of the image; None = original radius law

    def __post_init__(self) -> None:
        problems = [msg for bad, msg in (
            (self.n < 1, f"n={self.n}: need at least 1 subject"),
            (self.size < 16, f"size={self.size}: need at least 16 px"),
            (self.slices < 1, f"slices={self.slices}: need at least 1 image per subject"),
            (not 0.0 <= self.healthy_fraction <= 1.0, f"healthy_fraction={self.healthy_fraction}: must be in [0, 1]"),
            (not self.modalities or not set(self.modalities) <= set(MODALITIES),
             f"modalities={list(self.modalities)}: choose from {list(MODALITIES)}"),
            (len(self.split_fractions) != 3 or min(self.split_fractions) < 0
             or abs(sum(self.split_fractions) - 1.0) > 1e-6,
             f"split_fractions={list(self.split_fractions)}: three non-negative shares summing to 1"),
            (self.pretrain_n < 0, f"pretrain_n={self.pretrain_n}: must be >= 0"),
            (self.lesion_area is not None and (len(self.lesion_area) != 2
                                               or not 0.0 < self.lesion_area[0] <= self.lesion_area[1] < 0.5),
             f"lesion_area={self.lesion_area}: (lo, hi) with 0 < lo <= hi < 0.5"),
        ) if bad]
        if problems:
            raise ValueError("phantoms: " + "; ".join(problems))


@dataclass
class Lesion:
    cx: float  # pixel coordinates
    cy: float
    radius: float
    contrast: float  # signed intensity change (MRI) / echogenicity factor (US)
    ring: bool
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for k = 2, 3, 4


@dataclass
class Rendered:
    image: np.ndarray  # float [0, 1]
    twin: np.ndarray
    mask: np.ndarray  # bool
    lesion: Lesion | None


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return x, y


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma`` px.

    Large sigmas are filtered on a coarser grid and upsampled (same statistics, ~f^2 cheaper).
    """
    f = max(1, int(sigma // 3))
    small = -(-size // f)
    field = ndimage.gaussian_filter(rng.standard_normal((small, small)), sigma / f, mode="wrap")
    if f > 1:
        field = ndimage.zoom(field, f, order=1, mode="grid-wrap", grid_mode=True)[:size, :size]
    return field / (field.std() + 1e-12)


def _lesion_alpha(lesion: Lesion, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft lesion coverage alpha in [0, 1] and the exact mask (alpha >= 0.5, i.e. inside r(theta))."""
    x, y = _grid(size)
    dx, dy = x - lesion.cx, y - lesion.cy
    dist = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    r = np.full_like(dist, lesion.radius)
    for k, (amp, phase) in enumerate(lesion.harmonics, start=2):
        r = r + lesion.radius * amp * np.cos(k * theta + phase)
    alpha = np.clip((r - dist) / EDGE_PX + 0.5, 0.0, 1.0)
    return alpha, alpha >= 0.5


def _sample_lesion(rng: np.random.Generator, size: int, inside: np.ndarray, scale: float,
                   contrast: float, area: tuple[float, float] | None = None) -> Lesion:
    """Lesion centred on a random pixel of ``inside`` (eroded so the lesion stays in the anatomy).

    ``area``: nominal area drawn log-uniformly from (lo, hi) x the image area (one draw either way, so
    the random stream of everything after the lesion is the same for both laws).
    """
    if area is None:
        radius = float(rng.uniform(0.04, 0.13) * size * scale)
    else:
        frac = math.exp(rng.uniform(math.log(area[0]), math.log(area[1])))
        radius = float(math.sqrt(frac / math.pi) * size)
    safe = ndimage.binary_erosion(inside, iterations=max(1, int(radius * 1.4) + 2))
    ys, xs = np.nonzero(safe if safe.any() else inside)
    i = int(rng.integers(len(xs)))
    harmonics = tuple((float(rng.uniform(0.0, 0.15)), float(rng.uniform(0, 2 * math.pi))) for _ in range(3))
    return Lesion(cx=float(xs[i]), cy=float(ys[i]), radius=radius, contrast=contrast,
                  ring=bool(rng.random() < 0.3), harmonics=harmonics)


# -- MRI -----------------------------------------------------------------------------------------
def render_mri(rng: np.random.Generator, size: int, anatomy: dict, positive: bool,
               area: tuple[float, float] | None = None) -> Rendered:
    x, y = _grid(size)
    u, v = (x - size / 2) / (size / 2), (y - size / 2) / (size / 2)
    rot = anatomy["rot"] + rng.normal(0, 0.02)
    ur, vr = u * math.cos(rot) + v * math.sin(rot), -u * math.sin(rot) + v * math.cos(rot)
    a, b = anatomy["a"] * rng.uniform(0.97, 1.0), anatomy["b"] * rng.uniform(0.97, 1.0)
    head = (ur / a) ** 2 + (vr / b) ** 2
    brain_mask = head < 0.86
    skull = (head >= 0.86) & (head < 1.0)
    wobble = 0.08 * _smooth_noise(rng, size, size / 12)
    white = (ur / (a * 0.62)) ** 2 + (vr / (b * 0.66)) ** 2 + wobble < 1.0
    vent_l = ((ur + 0.11) / 0.07) ** 2 + ((vr + 0.02) / (0.2 * anatomy["vent"])) ** 2 < 1.0
    vent_r = ((ur - 0.11) / 0.07) ** 2 + ((vr + 0.02) / (0.2 * anatomy["vent"])) ** 2 < 1.0
    base = np.zeros((size, size))
    base[skull] = 0.82
    base[brain_mask] = 0.42
    base[brain_mask & white] = 0.58
    base[brain_mask & (vent_l | vent_r)] = 0.12
    base = base + brain_mask * 0.035 * _smooth_noise(rng, size, size / 40)
    base = ndimage.gaussian_filter(base, 0.8)
    noise = 0.012 * rng.standard_normal((size, size))
    twin = np.clip(base + noise, 0, 1)
    if not positive:
        return Rendered(twin, twin, np.zeros((size, size), bool), None)
    sign = anatomy["lesion_sign"]
    lesion = _sample_lesion(rng, size, brain_mask & ~(vent_l | vent_r), anatomy["lesion_scale"],
                            sign * anatomy["lesion_contrast"], area)
    alpha, mask = _lesion_alpha(lesion, size)
    inner = base + lesion.contrast + 0.04 * _smooth_noise(rng, size, 2.0)
    if lesion.ring:  # rim-enhancing lesion with a darker core
        x0, y0 = x - lesion.cx, y - lesion.cy
        core = np.clip(1.0 - np.hypot(x0, y0) / (0.6 * lesion.radius), 0, 1)
        inner = inner - 0.25 * core
    image = np.clip((1 - alpha) * base + alpha * inner + noise, 0, 1)
    return Rendered(image, twin, mask, lesion)


# -- ultrasound ----------------------------------------------------------------------------------
def render_us(rng: np.random.Generator, size: int, anatomy: dict, positive: bool,
              area: tuple[float, float] | None = None) -> Rendered:
    x, y = _grid(size)
    apex_x, apex_y = size / 2, -0.08 * size
    depth = np.hypot(x - apex_x, y - apex_y) / size
    ang = np.arctan2(x - apex_x, y - apex_y)
    fan = (np.abs(ang) < anatomy["fan"]) & (depth > 0.12) & (depth < 1.02)
    layers = anatomy["layers"]
    band = np.interp(depth, layers[:, 0], layers[:, 1])
    tissue = band * (1 + 0.25 * _smooth_noise(rng, size, size / 25))
    tissue = np.clip(tissue, 0.05, 1.0) * np.exp(-anatomy["atten"] * depth)
    re, im = rng.standard_normal((2, size, size))
    speckle = np.hypot(ndimage.gaussian_filter(re, 0.9), ndimage.gaussian_filter(im, 0.9))
    speckle = speckle / speckle.mean()

    def compose(echo: np.ndarray) -> np.ndarray:
        return np.clip(echo * speckle * 0.55 * fan, 0, 1)

    twin = compose(tissue)
    if not positive:
        return Rendered(twin, twin, np.zeros((size, size), bool), None)
    inside = fan & (depth > 0.3) & (depth < 0.85)
    lesion = _sample_lesion(rng, size, inside, anatomy["lesion_scale"], anatomy["lesion_factor"], area)
    alpha, mask = _lesion_alpha(lesion, size)
    echo = tissue * ((1 - alpha) + alpha * lesion.contrast)
    image = compose(echo)
    return Rendered(image, twin, mask, lesion)


def _anatomy(rng: np.random.Generator, modality: str) -> dict:
    if modality == "mri":
        return {"rot": rng.normal(0, 0.08), "a": rng.uniform(0.7, 0.82), "b": rng.uniform(0.82, 0.92),
                "vent": rng.uniform(0.7, 1.3), "lesion_sign": float(rng.choice([1.0, 1.0, -1.0])),
                "lesion_contrast": rng.uniform(0.12, 0.35), "lesion_scale": rng.uniform(0.7, 1.3)}
    depths = np.array([0.0, 0.18, 0.28, 0.45, 0.7, 1.05])
    values = np.array([0.9, 0.9, rng.uniform(0.3, 0.45), rng.uniform(0.6, 0.8), rng.uniform(0.5, 0.7), 0.4])
    return {"fan": rng.uniform(0.5, 0.65), "layers": np.stack([depths, values], 1),
            "atten": rng.uniform(0.3, 0.8), "lesion_factor": rng.uniform(0.15, 0.5),
            "lesion_scale": rng.uniform(0.8, 1.4)}


RENDERERS = {"mri": render_mri, "us": render_us}
GROUPS = ("mri_bright", "mri_dark", "us")


def lesion_group(modality: str, lesion: Lesion | None) -> str:
    """``mri_bright`` / ``mri_dark`` / ``us`` for a lesion, ``""`` for a healthy scan."""
    if lesion is None:
        return ""
    if modality == "mri":
        return "mri_bright" if lesion.contrast > 0 else "mri_dark"
    return "us"


# Report templates; the first of each list is the wording of the train/val/test scans (the healthy ones are
# core.prompts.HEALTHY_TEXT), the pre-training pool draws among all of them (varied wording, as in web-scale
# image/report pairs).
REPORTS = {
    ("mri", True): ("A T1-weighted axial brain MRI showing a {size} {kind} {ring}tumour in the {side} {region} lobe.",
                    "Axial T1 brain MRI: {size} {kind} {ring}lesion in the {side} {region} lobe.",
                    "{Kind} {ring}tumour, {size}, {side} {region} lobe, on an axial brain MRI.",
                    "Brain MRI with a {size} {kind} {ring}mass in the {region} lobe, {side} side."),
    ("mri", False): (HEALTHY_TEXT["mri"], "Normal axial brain MRI: no tumour.", "Axial T1 brain MRI, no tumour seen."),
    ("us", True): ("A breast ultrasound image showing a {size} hypoechoic mass with {margin} margins.",
                   "Breast ultrasound: {size} hypoechoic lesion with {margin} margins.",
                   "A dark, {size} breast mass with {margin} borders on ultrasound.",
                   "Hypoechoic {size} mass, {margin} margins, breast ultrasound."),
    ("us", False): (HEALTHY_TEXT["us"], "Normal breast ultrasound: no mass.", "Breast ultrasound, no mass seen."),
}


def _describe(modality: str, lesion: Lesion | None, size: int, variant: int = 0) -> str:
    """The scan's report: template ``variant`` (mod the number of templates) of ``REPORTS``."""
    templates = REPORTS[modality, lesion is not None]
    template = templates[variant % len(templates)]
    if lesion is None:
        return template
    if modality == "mri":
        kind = "bright" if lesion.contrast > 0 else "dark"
        words = {"size": _size_word(lesion, size), "kind": kind, "Kind": kind.capitalize(),
                 "ring": "ring-enhancing " if lesion.ring else "",
                 "side": "left" if lesion.cx < size / 2 else "right",  # radiological convention not modelled
                 "region": "frontal" if lesion.cy < size * 0.4 else ("parietal" if lesion.cy < size * 0.6
                                                                      else "occipital")}
    else:
        words = {"size": _size_word(lesion, size),
                 "margin": "irregular" if max(a for a, _ in lesion.harmonics) > 0.08 else "smooth"}
    return template.format(**words)


def _size_word(lesion: Lesion, size: int) -> str:
    r = lesion.radius / size
    return "small" if r < 0.06 else ("medium" if r < 0.1 else "large")


def _assign_splits(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> list[str]:
    """Shuffled split labels; with >= 3 subjects every split gets at least one."""
    if n >= 3:
        n_val, n_test = (max(1, round(n * f)) for f in fractions[1:])
        labels = ["val"] * n_val + ["test"] * n_test
        labels = ["train"] * max(1, n - len(labels)) + labels
    else:
        labels = (["train", "test"])[:n]
    labels = labels[:n]
    return [labels[i] for i in rng.permutation(n)]


OWNED = ("train_images", "train_masks", "train_twins", "val_images", "val_masks", "val_twins", "test_images",
         "test_masks", "test_twins", "pretrain_images", "pretrain_masks", "pretrain_twins", "negatives",
         "prompts.json", "meta.csv", "phantoms.json", "preview.png")


def _settings(cfg: PhantomConfig) -> dict:
    settings = json.loads(json.dumps(asdict(cfg)))
    settings.pop("out")
    return settings


def generate(cfg: PhantomConfig, overwrite: bool = False) -> Path:
    """Write the phantom set (same config -> same bytes); see the module doc for an existing folder."""
    out = Path(cfg.out)
    with run_lock(out):
        _generate_locked(cfg, out, overwrite)
    return out


def _generate_locked(cfg: PhantomConfig, out: Path, overwrite: bool) -> None:
    if (out / "phantoms.json").is_file() and not (out / MARKER).exists():  # a set written before markers existed
        (out / MARKER).write_text(json.dumps({"owner": "phantoms", "fingerprint": None}))
    prepare_output_dir(out, "phantoms", overwrite, owned=OWNED, settings=_settings(cfg))
    _write_set(cfg, out)


def _write_set(cfg: PhantomConfig, out: Path) -> None:
    root_ss = np.random.SeedSequence(cfg.seed)
    n_per_mod = [cfg.n // len(cfg.modalities) + (i < cfg.n % len(cfg.modalities))
                 for i in range(len(cfg.modalities))]
    prompts: dict[str, str] = {}
    rows: list[dict] = []
    preview: list[tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []  # 4 per modality
    for mod_idx, (modality, n_subj) in enumerate(zip(cfg.modalities, n_per_mod)):
        mod_ss = root_ss.spawn(len(cfg.modalities))[mod_idx]
        split_rng = np.random.default_rng(mod_ss.spawn(1)[0])
        # positive/healthy assignment first, then split within each group (both groups in every split)
        n_healthy = int(round(n_subj * cfg.healthy_fraction))
        healthy = set(split_rng.permutation(n_subj)[:n_healthy].tolist())
        pos_ids = [s for s in range(n_subj) if s not in healthy]
        neg_ids = sorted(healthy)
        split_of: dict[int, str] = {}
        for group in (pos_ids, neg_ids):
            for sid, split in zip(group, _assign_splits(len(group), cfg.split_fractions, split_rng)):
                split_of[sid] = split
        subject_ss = np.random.SeedSequence([cfg.seed, mod_idx, 7919]).spawn(n_subj)
        for sid in range(n_subj):
            _write_subject(cfg, out, modality, f"{modality}_{sid:04d}", split_of[sid], sid not in healthy,
                           np.random.default_rng(subject_ss[sid]), prompts, rows, preview)
    for mod_idx, modality in enumerate(cfg.modalities):  # the pre-training pool: own ids, own random streams
        n_pre = cfg.pretrain_n // len(cfg.modalities) + (mod_idx < cfg.pretrain_n % len(cfg.modalities))
        pre_ss = np.random.SeedSequence([cfg.seed, mod_idx, 104729]).spawn(n_pre + 1)
        n_healthy = int(round(n_pre * cfg.healthy_fraction))
        healthy = set(np.random.default_rng(pre_ss[-1]).permutation(n_pre)[:n_healthy].tolist())
        for sid in range(n_pre):
            _write_subject(cfg, out, modality, f"{modality}_p{sid:04d}", "pretrain", sid not in healthy,
                           np.random.default_rng(pre_ss[sid]), prompts, rows, None)
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1, sort_keys=True))
    with open(out / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "phantoms.json").write_text(json.dumps(_settings(cfg), indent=1))
    if cfg.preview and preview:
        write_grid(out / "preview.png", [list(t) for _, t in preview],
                   column_labels=["image", "lesion mask", "healthy twin"], row_labels=[n for n, _ in preview],
                   title=f"phantoms: {cfg.n} subjects x {cfg.slices} slices, {cfg.size} px, seed {cfg.seed}")


def _write_subject(cfg: PhantomConfig, out: Path, modality: str, subject_id: str, split: str, positive: bool,
                   rng: np.random.Generator, prompts: dict, rows: list, preview: list | None) -> None:
    """Render and save every slice of one subject; appends its prompts, meta rows and preview entries."""
    anatomy = _anatomy(rng, modality)
    for slc in range(cfg.slices):
        r = RENDERERS[modality](rng, cfg.size, anatomy, positive, cfg.lesion_area)
        name = f"{subject_id}_{slc}.png"
        save_png(out / f"{split}_images" / name, r.image)
        save_png(out / f"{split}_masks" / name, r.mask)
        save_png(out / f"{split}_twins" / name, r.twin)
        if not positive and split == "train":
            save_png(out / "negatives" / name, r.twin)
        variant = zlib.crc32(f"{cfg.seed}/{name}".encode()) if split == "pretrain" else 0  # no draw from rng
        prompts[name] = _describe(modality, r.lesion, cfg.size, variant)
        les = r.lesion
        rows.append({"file": name, "subject_id": subject_id, "split": split, "modality": modality,
                     "positive": int(positive), "lesion_area": int(r.mask.sum()),
                     "lesion_contrast": round(les.contrast, 4) if les else 0.0,
                     "lesion_cx": round(les.cx, 1) if les else "", "lesion_cy": round(les.cy, 1) if les else "",
                     "group": lesion_group(modality, les),
                     "lesion_area_frac": round(float(r.mask.mean()), 5) if les else 0.0})
        if preview is not None and positive and slc == 0 and sum(m == modality for m, _ in preview) < 4:
            preview.append((f"{Path(name).stem} ({split})", (r.image, r.mask.astype(np.float32), r.twin)))


def ensure_phantoms(out: str | Path, **kwargs) -> Path:
    """Generate phantoms into ``out`` unless a complete set with the same settings is there.

    A phantom set with other settings there is replaced; a folder holding anything else is refused.
    """
    out = Path(out)
    cfg = PhantomConfig(out=str(out), **kwargs)
    stamp = out / "phantoms.json"

    def ready() -> bool:
        return stamp.exists() and json.loads(stamp.read_text()) == _settings(cfg)

    if ready():
        return out
    with run_lock(out, wait=900):  # several processes (ranks) may ask at once: one writes, the others wait
        if not ready():
            _generate_locked(cfg, out, overwrite=stamp.exists())
    return out
