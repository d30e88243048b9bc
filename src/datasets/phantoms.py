"""Synthetic phantoms written in the real formats and layouts (the demo and tests run on them).

Two sets, each seeded (case ``i`` draws from ``numpy.random.default_rng([seed, i])``, so a case
does not depend on how many others are made), sized by the ``data.phantom`` config:

- **PROMISE12-like**: ``CaseNN.mhd/.raw`` (int16) and ``CaseNN_segmentation.mhd/.raw`` (uint8
  {0, 1}), with a spacing drawn per case from the configured in-plane and slice choices (so sizes
  differ too). A body ellipse of soft tissue holding a prostate-like organ (an ellipsoid with an
  irregular, smooth surface and a slightly different brightness), a bright bladder above it and a
  dark rectum behind it. The organ's edges are soft: the intensity image is blurred with a
  Gaussian of ``edge_blur_mm`` before a smooth multiplicative bias field and Rician noise are
  applied. The label is the organ's shape sampled at voxel centres, unblurred.
- **BraTS-2015-like**: the ``HGG/<case>/VSD.Brain.XX.O.MR_<Mod>.<id>/...mha`` tree with the
  label in ``VSD.Brain_3more.XX.O.OT.<id>``, built on a real brain: the MNI152 2009 template
  that nilearn ships inside its wheel (grey- and white-matter maps and brain mask; nothing is
  downloaded). CSF is the rest of the brain mask. A tumour is placed in white matter: necrosis
  (label 1) inside an enhancing rim (4) with a non-enhancing patch (3), surrounded by oedema (2),
  all with irregular borders. T1, T1c, T2 and Flair intensities come from a per-tissue contrast
  table in the config; outside the brain every modality is 0 (skull-stripped, as BraTS is).

Arrays are [z, y, x]; spacings (z, y, x) in mm; config values ending in ``_xyz`` are (x, y, z).
A ``phantoms.json`` beside the cases records the settings: :func:`write_phantoms` regenerates
only when it is missing or differs, so re-running leaves the files (and the cache) untouched.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from crf_rnn_3d.datasets.cache import settings_hash
from crf_rnn_3d.datasets.errors import ConfigError
from crf_rnn_3d.datasets.io import atomic_write_json, nifti_to_volume, write_sitk
from crf_rnn_3d.datasets.preprocess import centre_offsets, crop_or_pad, resample_image, xyz_to_zyx

PHANTOM_MANIFEST = "phantoms.json"
PHANTOM_VERSION = 1  # bump when the generator changes, so old phantom sets are regenerated
BRATS_TISSUES = ("csf", "gm", "wm", "necrosis", "oedema", "non_enhancing", "enhancing")
BRATS_LABEL_OF = {"necrosis": 1, "oedema": 2, "non_enhancing": 3, "enhancing": 4}


# --------------------------------------------------------------------------- building blocks


def physical_grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm, centred on the grid's middle: three [z, y, x] arrays."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], scale_mm: float
) -> np.ndarray:
    """A smooth random field [z, y, x] with unit standard deviation and correlation length
    ``scale_mm`` (white noise blurred by a Gaussian of that width, in mm per axis)."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape), [scale_mm / s for s in spacing], mode="wrap"
    )
    std = field.std()
    return field / std if std > 0 else field


def bias_field(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], amplitude: float
) -> np.ndarray:
    """A smooth multiplicative field [z, y, x]: exp of a random linear-plus-quadratic function of
    position, scaled so its log spans at most ``amplitude`` either side of 0 (0.2: about +-20%)."""
    z, y, x = physical_grid(shape, spacing)
    extent = max(n * s for n, s in zip(shape, spacing, strict=True)) / 2
    coords = [z / extent, y / extent, x / extent]
    terms = [*coords, coords[0] * coords[1], coords[1] * coords[2], coords[2] ** 2, coords[1] ** 2]
    log = sum(rng.uniform(-1, 1) * t for t in terms)
    log = np.broadcast_to(log, tuple(shape)).astype(np.float64)
    peak = np.abs(log).max()
    return np.exp(log * (amplitude / peak if peak > 0 else 0.0))


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal with complex Gaussian noise: |signal + n1 + i n2|, n ~ N(0, sigma^2).

    This is the noise of a magnitude MR image (Rician; Rayleigh where the signal is 0).
    """
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imag)


def irregular_blob(
    coords: Sequence[np.ndarray],
    radii_mm: Sequence[float],
    roughness: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Normalised radius [z, y, x] of an ellipsoid: sqrt(sum (c / r)^2) - roughness.

    Values below 1 are inside. ``roughness`` (a smooth field, or 0) bends the surface.
    """
    d = np.sqrt(sum((c / r) ** 2 for c, r in zip(coords, radii_mm, strict=True)))
    return d - roughness


def _to_int16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------- PROMISE12-like


def _choice(rng: np.random.Generator, values: Sequence[float]) -> float:
    return float(values[int(rng.integers(len(values)))])


def promise_phantom(
    rng: np.random.Generator, cfg: Mapping
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One PROMISE12-like case.

    Config keys (``data.phantom``): ``fov_xyz`` (mm), ``inplane_spacings`` and
    ``slice_spacings`` (mm; one of each drawn per case), ``organ_radii_mm`` ([min, max] semi-axis),
    ``organ_roughness``, ``intensities`` (outside, tissue, organ, bladder, rectum),
    ``edge_blur_mm``, ``bias_amplitude``, ``noise_sigma`` (same unit as ``intensities``) and
    ``anatomy`` (sizes and places of the body, organ, bladder and rectum; texture).

    Returns image [z, y, x] int16, label [z, y, x] uint8 {0, 1}, spacing (z, y, x) mm.
    """
    inplane = _choice(rng, cfg["inplane_spacings"])
    spacing = (_choice(rng, cfg["slice_spacings"]), inplane, inplane)
    fov = xyz_to_zyx(cfg["fov_xyz"])
    shape = tuple(max(4, round(f / s)) for f, s in zip(fov, spacing, strict=True))
    z, y, x = physical_grid(shape, spacing)
    lo, hi = cfg["organ_radii_mm"]
    it = cfg["intensities"]
    an = cfg["anatomy"]

    # anatomy (mm): body ellipse, organ near the middle, bladder above it (+z), rectum behind (-y)
    body_x, body_y = an["body_semi_axes_fov_xy"]
    body = np.broadcast_to((y / (body_y * fov[1])) ** 2 + (x / (body_x * fov[2])) ** 2 < 1, shape)
    jitter = float(an["organ_centre_jitter_mm"])
    centre = [rng.uniform(-jitter, jitter) for _ in range(3)]
    radii = [rng.uniform(lo, hi) * f for f in xyz_to_zyx(an["organ_axis_scale_xyz"])]
    rough = float(cfg["organ_roughness"]) * smooth_noise(
        rng, shape, spacing, float(an["roughness_scale_mm"])
    )
    organ = irregular_blob((z - centre[0], y - centre[1], x - centre[2]), radii, rough) < 1
    bz, by, bx = xyz_to_zyx(an["bladder_semi_axes_mm_xyz"])
    bladder_z = centre[0] + radii[0] + float(an["bladder_gap_mm"]) + bz
    bladder_y = centre[1] + float(an["bladder_shift_y_mm"])
    bladder = irregular_blob((z - bladder_z, y - bladder_y, x - centre[2]), (bz, by, bx)) < 1
    rz, ry, rx = xyz_to_zyx(an["rectum_semi_axes_mm_xyz"])
    rectum_y = centre[1] - radii[1] - float(an["rectum_gap_mm"]) - ry
    rectum = irregular_blob((z - centre[0], y - rectum_y, x - centre[2]), (rz, ry, rx)) < 1

    texture = smooth_noise(rng, shape, spacing, float(an["texture_mm"]))
    amp = float(an["texture_amplitude"])
    image = np.where(body, it["tissue"] * (1 + amp * texture), it["outside"])
    image = np.where(bladder & body, it["bladder"], image)
    image = np.where(rectum & body, it["rectum"], image)
    image = np.where(organ, it["organ"] * (1 + amp * texture), image)
    image = ndimage.gaussian_filter(image, [float(cfg["edge_blur_mm"]) / s for s in spacing])
    image = image * bias_field(rng, shape, spacing, float(cfg["bias_amplitude"]))
    image = rician(image, float(cfg["noise_sigma"]), rng)
    return _to_int16(image), organ.astype(np.uint8), spacing


def write_promise_phantoms(
    cfg: Mapping, root: str | os.PathLike, progress: bool = False
) -> dict[str, list[str]]:
    """Writes ``cfg.n_cases`` PROMISE12-like cases into ``root`` with PROMISE12's file names.

    Returns case id (Case00, Case01, ...) -> the files written (header and data files).
    """
    root = Path(root)
    written = {}
    for i in tqdm(range(int(cfg["n_cases"])), desc="PROMISE12 phantoms", disable=not progress):
        rng = np.random.default_rng([int(cfg["seed"]), i])
        image, label, spacing = promise_phantom(rng, cfg)
        case_id = f"Case{i:02d}"
        write_sitk(label, spacing, root / f"{case_id}_segmentation.mhd")
        write_sitk(image, spacing, root / f"{case_id}.mhd")
        written[case_id] = [
            str(root / f"{case_id}{suffix}")
            for suffix in (".mhd", ".raw", "_segmentation.mhd", "_segmentation.raw")
        ]
    return written


# --------------------------------------------------------------------------- BraTS-like


def mni152_tissues(
    resolution_mm: int, spacing: Sequence[float], shape: Sequence[int]
) -> dict[str, np.ndarray]:
    """CSF, GM and WM fractions [z, y, x] (float32 in [0, 1], summing to the brain mask) of
    nilearn's bundled MNI152 template, resampled to ``spacing`` (mm) and centre-cropped/padded
    on the brain's bounding box to ``shape``. ``resolution_mm``: the template's (1 or 2)."""
    from nilearn import datasets as nd  # imported here: only the phantoms need nilearn

    loaders = {
        "mask": nd.load_mni152_brain_mask,
        "gm": nd.load_mni152_gm_template,
        "wm": nd.load_mni152_wm_template,
    }
    vols = {
        k: nifti_to_volume(f(resolution=resolution_mm), f"nilearn MNI152 {k}")
        for k, f in loaders.items()
    }
    src_spacing = vols["mask"].spacing
    stack = np.stack([vols[k].array.astype(np.float32) for k in ("mask", "gm", "wm")], axis=-1)
    if not np.allclose(src_spacing, spacing):
        stack = resample_image(stack, src_spacing, spacing, order=1)
    mask = stack[..., 0] > 0.5
    box = np.argwhere(mask)
    lo, hi = box.min(0), box.max(0) + 1
    centre_offset = centre_offsets(hi - lo, shape)
    offsets = tuple(int(a + b) for a, b in zip(lo, centre_offset, strict=True))
    stack = crop_or_pad(stack, tuple(shape), offsets, 0.0)
    mask = stack[..., 0] > 0.5
    gm = np.clip(stack[..., 1], 0, 1) * mask
    wm = np.clip(stack[..., 2], 0, 1) * mask
    total = gm + wm
    scale = np.where(total > 1, 1 / np.maximum(total, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    csf = np.where(mask, 1 - gm - wm, 0.0)
    return {"csf": csf.astype(np.float32), "gm": gm.astype(np.float32), "wm": wm.astype(np.float32)}


def brats_phantom(
    rng: np.random.Generator,
    tissues: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    cfg: Mapping,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One BraTS-like case on the given brain.

    Args:
      tissues: ``csf``, ``gm``, ``wm`` fractions [z, y, x] (see :func:`mni152_tissues`).
      spacing: (z, y, x) mm.
      cfg: ``data.phantom`` with ``tumour_radius_mm`` ([min, max] of the core), ``oedema_scale``
        ([min, max] oedema radius / core radius), ``necrosis_fraction`` (of the core radius),
        ``tumour_roughness``, ``contrasts`` (modality -> tissue -> intensity, tissues as in
        :data:`BRATS_TISSUES`), ``bias_amplitude``, ``noise_sigma``, ``modalities`` and
        ``anatomy`` (where the tumour may sit, the scales of its irregularity, texture).
    Returns:
      modality -> image [z, y, x] int16 (0 outside the brain), label [z, y, x] uint8 in {0..4}.
    """
    shape = tissues["wm"].shape
    brain = (tissues["csf"] + tissues["gm"] + tissues["wm"]) > 0.5
    # tumour centre: a white-matter voxel at least one core radius inside the brain
    r_core = rng.uniform(*cfg["tumour_radius_mm"])
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    an = cfg["anatomy"]
    candidates = np.argwhere(
        (tissues["wm"] > 0.5) & (depth > r_core * float(an["centre_depth_factor"]))
    )
    if len(candidates) == 0:
        raise ConfigError(
            "data.phantom.tumour_radius_mm", "a tumour that fits inside the white matter", r_core
        )
    centre = candidates[int(rng.integers(len(candidates)))]
    z, y, x = physical_grid(shape, spacing)
    mid = [(n - 1) / 2 for n in shape]
    c = [(centre[a] - mid[a]) * spacing[a] for a in range(3)]
    coords = (z - c[0], y - c[1], x - c[2])
    rough = float(cfg["tumour_roughness"])
    jitter = float(an["radius_jitter"])
    radii = [r_core * rng.uniform(1 - jitter, 1 + jitter) for _ in range(3)]
    core_rough = smooth_noise(rng, shape, spacing, float(an["core_roughness_scale_mm"]))
    d_core = irregular_blob(coords, radii, rough * core_rough)
    scale = rng.uniform(*cfg["oedema_scale"])
    oedema_rough = smooth_noise(rng, shape, spacing, float(an["oedema_roughness_scale_mm"]))
    d_oed = irregular_blob(coords, [r * scale for r in radii], 2 * rough * oedema_rough)
    patch_field = smooth_noise(rng, shape, spacing, float(an["non_enhancing_scale_mm"]))
    patch = patch_field > float(an["non_enhancing_threshold"])

    label = np.zeros(shape, np.uint8)
    label[(d_oed < 1) & brain & (tissues["csf"] < float(an["oedema_max_csf"]))] = 2
    core = (d_core < 1) & brain
    label[core] = 4
    label[core & patch] = 3
    label[(d_core < float(cfg["necrosis_fraction"])) & brain] = 1

    # tissue fractions: tumour classes replace the healthy ones where they are
    fractions = dict(tissues)
    healthy = 1.0 - (label > 0)
    fractions = {k: v * healthy for k, v in fractions.items()}
    for name, value in BRATS_LABEL_OF.items():
        fractions[name] = (label == value).astype(np.float32)

    images = {}
    bias = bias_field(rng, shape, spacing, float(cfg["bias_amplitude"]))
    texture = smooth_noise(rng, shape, spacing, float(an["texture_mm"]))
    amp, blur = float(an["texture_amplitude"]), float(an["partial_volume_mm"])
    for mod in cfg["modalities"]:
        table = cfg["contrasts"][mod]
        unknown = sorted(set(table) - set(BRATS_TISSUES))
        if unknown or set(table) != set(BRATS_TISSUES):
            raise ConfigError(
                f"data.phantom.contrasts.{mod}",
                f"an intensity for each of {BRATS_TISSUES}",
                dict(table),
            )
        img = sum(float(table[t]) * fractions[t] for t in BRATS_TISSUES)
        img = img * (1 + amp * texture)
        img = ndimage.gaussian_filter(img, [blur / s for s in spacing])  # partial volume
        img = rician(img * bias, float(cfg["noise_sigma"]), rng)
        images[mod] = np.where(brain, _to_int16(img), 0).astype(np.int16)
    return images, label


def write_brats_phantoms(
    cfg: Mapping, root: str | os.PathLike, progress: bool = False
) -> dict[str, list[str]]:
    """Writes ``cfg.n_cases`` BraTS-2015-like cases as ``root/HGG/<case>/VSD...`` .mha files.

    Each file gets its own numeric id (as in the download, ids differ per file and case).
    Returns case id -> the files written.
    """
    root = Path(root)
    spacing = tuple(float(s) for s in xyz_to_zyx(cfg["spacing_xyz"]))
    shape = tuple(int(n) for n in xyz_to_zyx(cfg["shape_xyz"]))
    tissues = mni152_tissues(int(cfg["template_resolution_mm"]), spacing, shape)
    written = {}
    next_id = 54512
    for i in tqdm(range(int(cfg["n_cases"])), desc="BraTS phantoms", disable=not progress):
        rng = np.random.default_rng([int(cfg["seed"]), i])
        images, label = brats_phantom(rng, tissues, spacing, cfg)
        case_id = f"brats_synth_pat{i:04d}_1"
        folder = root / "HGG" / case_id
        files = []
        for mod, image in images.items():
            name = f"VSD.Brain.XX.O.MR_{mod}.{next_id}"
            files.append(folder / name / f"{name}.mha")
            write_sitk(image, spacing, files[-1], compress=True)
            next_id += 1
        name = f"VSD.Brain_3more.XX.O.OT.{next_id}"
        files.append(folder / name / f"{name}.mha")
        write_sitk(label, spacing, files[-1], compress=True)
        next_id += 1
        written[case_id] = [str(f) for f in files]
    return written


# --------------------------------------------------------------------------- entry


WRITERS: dict[str, Callable[..., dict[str, list[str]]]] = {
    "promise12": write_promise_phantoms,
    "brats2015": write_brats_phantoms,
}


def write_phantoms(
    fmt: str, cfg: Mapping, root: str | os.PathLike, progress: bool = False
) -> tuple[list[str], bool]:
    """Writes the phantom set of format ``fmt`` (``promise12`` or ``brats2015``) into ``root``.

    ``cfg`` is the plain ``data.phantom`` mapping. Skips the work when ``root/phantoms.json``
    records the same settings and every file it lists exists; otherwise removes the files that
    the old record lists (and nothing else), writes the new cases, then the record.
    Returns (case ids, whether anything was written).
    """
    if fmt not in WRITERS:
        raise ConfigError("data.format", f"one of {sorted(WRITERS)} for phantoms", fmt)
    root = Path(root)
    settings = {"format": fmt, "phantom": cfg, "version": PHANTOM_VERSION}
    shash = settings_hash(settings)
    record_path = root / PHANTOM_MANIFEST
    old = None
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text())
        except ValueError:
            old = None
    if (
        old is not None
        and old.get("settings_hash") == shash
        and all(os.path.isfile(f) for files in old["cases"].values() for f in files)
    ):
        return sorted(old["cases"]), False
    if old is not None:
        for files in old.get("cases", {}).values():
            for f in files:
                if os.path.isfile(f):
                    os.unlink(f)
                    _remove_empty_parents(Path(f).parent, root)
        record_path.unlink()
    written = WRITERS[fmt](cfg, root, progress)
    atomic_write_json(record_path, {"settings_hash": shash, "settings": settings, "cases": written})
    return sorted(written), True


def _remove_empty_parents(folder: Path, root: Path) -> None:
    while folder != root and root in folder.parents and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


# Lattice-op test grids (tests, benchmarks and studies share them)


def grid_features(
    spatial: tuple[int, ...], num_features: int, rng: np.random.Generator, spacing: float = 0.6
) -> np.ndarray:
    """Features [*spatial, F]: voxel positions * spacing (as many axes as fit in F), then
    intensity-like channels (a smooth pattern plus noise) for the rest."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), -1)
    grid = grid.astype(np.float64) * spacing
    pos = grid[..., : min(len(spatial), num_features)]
    extra = num_features - pos.shape[-1]
    if extra == 0:
        return pos.astype(np.float32)
    smooth = 1.5 * np.sin(0.7 * grid.sum(-1, keepdims=True) + np.arange(extra))
    noisy = smooth + 0.3 * rng.normal(size=(*spatial, extra))
    return np.concatenate([pos, noisy], -1).astype(np.float32)


def grid_values(
    spatial: tuple[int, ...], channels: int, kind: str, rng: np.random.Generator
) -> np.ndarray:
    """Values [*spatial, C] in [-1, 1]: a smooth cosine pattern or uniform noise."""
    if kind == "smooth":
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), -1)
        vals = np.cos(0.3 * grid.sum(-1, keepdims=True) + 0.5 * np.arange(channels))
    else:
        vals = rng.uniform(-1.0, 1.0, size=(*spatial, channels))
    return vals.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Benchmark phantoms (scripts/bench_lattice.py, scripts/bench_crf.py). Deterministic for a
# given seed: changing them changes the benchmark inputs quoted in docs/benchmarks.md.
# ---------------------------------------------------------------------------------------------

# The lattice benchmark's references (docs/benchmarks.md): shapes (z, y, x), spacing in mm,
# number of labels, and the kernel widths its features are scaled by (intensities z-scored,
# so theta_beta is in standard deviations; positions in mm).
LATTICE_BENCH_FULL_SHAPES = {"promise": (63, 200, 200), "brats": (155, 240, 240)}
LATTICE_BENCH_QUICK_SHAPES = {"promise": (24, 80, 80), "brats": (40, 64, 64)}
LATTICE_BENCH_SPACING = {"promise": (2.0, 1.0, 1.0), "brats": (1.0, 1.0, 1.0)}
LATTICE_BENCH_LABELS = {"promise": 2, "brats": 5}
LATTICE_BENCH_THETA = {"alpha_mm": 5.0, "beta_zscore": 0.5, "gamma_mm": 3.0}


def _config_file(*parts: str) -> str:
    """A file of the shipped configs (the package crf_rnn_3d.configs)."""
    import importlib.resources

    from crf_rnn_3d import CONFIG_MODULE

    return str(importlib.resources.files(CONFIG_MODULE).joinpath(*parts))


def _bench_grid_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Broadcastable (z, y, x) coordinate arrays in mm, float32, centred on the volume."""
    axes = []
    for a, (n, s) in enumerate(zip(shape, spacing, strict=True)):
        c = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * s
        view = [1, 1, 1]
        view[a] = n
        axes.append(c.reshape(view))
    return axes


def _bench_soft_ellipsoid(
    grid: list[np.ndarray], centre_mm, radii_mm, edge_mm: float = 2.0
) -> np.ndarray:
    """1 inside, 0 outside, a logistic border about edge_mm wide; float32."""
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre_mm, radii_mm, strict=True))
    dist = (np.sqrt(r2) - 1.0) * float(min(radii_mm))  # approximate distance in mm
    return (1.0 / (1.0 + np.exp(np.clip(dist / edge_mm, -30, 30)))).astype(np.float32)


def _bench_smooth_field(
    shape: tuple[int, ...], scale_vox: float, rng: np.random.Generator
) -> np.ndarray:
    """Zero-mean, unit-variance random field, smooth over about scale_vox voxels (float32).

    Made at low resolution and interpolated up, so it costs about one pass over the volume.
    """
    low = tuple(max(4, math.ceil(n / scale_vox) + 3) for n in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(low), sigma=1.0, mode="wrap")
    zoom = [n / m for n, m in zip(shape, low, strict=True)]
    up = ndimage.zoom(field.astype(np.float32), zoom, order=1, grid_mode=True, mode="grid-wrap")
    up = up[tuple(slice(0, n) for n in shape)]
    up -= up.mean()
    up /= up.std() + 1e-12
    return up


def _bench_zscore(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    ref = x if mask is None else x[mask]
    return ((x - ref.mean()) / (ref.std() + 1e-12)).astype(np.float32)


def _bench_label_probabilities(
    anatomy: list[np.ndarray], labels: int, shape, rng: np.random.Generator
) -> np.ndarray:
    """Smooth label-probability-like values: softmax of anatomy-driven smooth logits, [*S, L]."""
    logits = []
    for k in range(labels):
        base = 4.0 * anatomy[k % len(anatomy)] if k > 0 else np.zeros(shape, np.float32)
        logits.append(base + 1.5 * _bench_smooth_field(shape, 12.0, rng))
    z = np.stack(logits, -1)
    z -= z.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def lattice_bench_promise(shape: tuple[int, int, int], seed: int = 0):
    """PROMISE12-like T2 volume [*S, 1] (z-scored), its anatomy masks, spacing (2, 1, 1) mm."""
    rng = np.random.default_rng(seed)
    spacing = LATTICE_BENCH_SPACING["promise"]
    g = _bench_grid_mm(shape, spacing)
    ext = [n * s for n, s in zip(shape, spacing, strict=True)]
    body = _bench_soft_ellipsoid(g, (0, 0, 0), (ext[0] * 2, 0.42 * ext[1], 0.47 * ext[2]), 3.0)
    prostate = _bench_soft_ellipsoid(g, (0, 8, 0), (0.22 * ext[0], 18, 22), 2.0)
    zone = _bench_soft_ellipsoid(g, (0, 6, 0), (0.15 * ext[0], 9, 11), 2.0)  # central gland
    bladder = _bench_soft_ellipsoid(g, (0.3 * ext[0], -22, 0), (0.3 * ext[0], 25, 30), 2.0)
    rectum = _bench_soft_ellipsoid(g, (0, 36, 0), (0.5 * ext[0], 10, 12), 2.0)
    bones = _bench_soft_ellipsoid(g, (0, 10, -60), (ext[0], 14, 14), 2.0) + _bench_soft_ellipsoid(
        g, (0, 10, 60), (ext[0], 14, 14), 2.0
    )
    texture = _bench_smooth_field(shape, 6.0, rng)
    img = 0.05 + body * (0.45 + 0.06 * texture)
    img += prostate * (0.25 - 0.45 * zone * 0.5) + bladder * 0.9 - rectum * 0.3 - bones * 0.25
    bias = np.exp(0.25 * _bench_smooth_field(shape, 60.0, rng)).astype(np.float32)
    img = img * bias + rng.normal(0.0, 0.06, size=shape).astype(np.float32)
    image = _bench_zscore(np.abs(img))[..., None]
    return image, [prostate, bladder, rectum], spacing


def lattice_bench_brats(shape: tuple[int, int, int], seed: int = 1):
    """BraTS-like (T1, T1c, T2, FLAIR) volume [*S, 4], z-scored inside the brain, 1 mm."""
    rng = np.random.default_rng(seed)
    spacing = LATTICE_BENCH_SPACING["brats"]
    g = _bench_grid_mm(shape, spacing)
    ext = [n * s for n, s in zip(shape, spacing, strict=True)]
    brain = _bench_soft_ellipsoid(g, (0, 0, 0), (0.42 * ext[0], 0.36 * ext[1], 0.29 * ext[2]), 1.5)
    vents = _bench_soft_ellipsoid(g, (0.05 * ext[0], -0.02 * ext[1], 0), (12, 22, 8), 1.5)
    folds = _bench_smooth_field(shape, 5.0, rng)  # grey / white matter pattern
    wm = brain * (1.0 / (1.0 + np.exp(-3.0 * folds)))
    gm = brain - wm
    tc = (0.1 * ext[0], 0.12 * ext[1], 0.1 * ext[2])
    edema = _bench_soft_ellipsoid(g, tc, (28, 32, 26), 4.0) * brain
    core = _bench_soft_ellipsoid(g, tc, (15, 17, 14), 1.5)
    necrosis = _bench_soft_ellipsoid(g, tc, (8, 9, 8), 1.5)
    enhancing = np.clip(core - necrosis, 0, 1)
    edema = np.clip(edema - core, 0, 1)
    csf = np.clip(vents + brain * 0.3 * (1.0 / (1.0 + np.exp(-4.0 * (folds - 1.8)))), 0, 1)
    tissues = [wm, gm, csf, edema, enhancing, necrosis]
    # Intensity of each tissue in (T1, T1c, T2, FLAIR): correlated across modalities.
    table = np.array(
        [
            [0.90, 0.85, 0.45, 0.55],  # white matter
            [0.65, 0.62, 0.65, 0.70],  # grey matter
            [0.20, 0.22, 1.00, 0.15],  # CSF
            [0.55, 0.55, 0.90, 0.95],  # edema
            [0.60, 1.10, 0.75, 0.80],  # enhancing tumour
            [0.30, 0.35, 0.95, 0.50],  # necrosis
        ],
        np.float32,
    )
    inside = brain > 0.5
    mods = []
    for m in range(4):
        img = sum(t * table[i, m] for i, t in enumerate(tissues))
        img = img * (1.0 + 0.05 * _bench_smooth_field(shape, 8.0, rng))
        img = img * np.exp(0.15 * _bench_smooth_field(shape, 70.0, rng))
        img = img + brain * rng.normal(0.0, 0.04, size=shape).astype(np.float32)
        z = _bench_zscore(img, inside)
        z[brain < 0.02] = 0.0  # skull-stripped background is constant, as in BraTS
        mods.append(z)
    anatomy = [edema + enhancing + necrosis, enhancing + necrosis, necrosis, enhancing]
    return np.stack(mods, -1), anatomy, spacing


def lattice_bench_reference(
    name: str,
    shape: tuple[int, int, int],
    theta_alpha_mm: float = LATTICE_BENCH_THETA["alpha_mm"],
    theta_beta: float = LATTICE_BENCH_THETA["beta_zscore"],
    theta_gamma_mm: float = LATTICE_BENCH_THETA["gamma_mm"],
) -> dict[str, np.ndarray]:
    """Every array a lattice-benchmark worker needs for one reference ("promise" or "brats"),
    channels-last with a batch axis of 1: image [*S, M], bilateral features [1, *S, 3 + M]
    (positions in mm / theta_alpha_mm, z-scored intensities / theta_beta), spatial features
    [1, *S, 3] (mm / theta_gamma_mm), label probabilities probs2 / probs5 [1, *S, 2 or 5] and
    the spacing (z, y, x) in mm."""
    maker = lattice_bench_promise if name == "promise" else lattice_bench_brats
    image, anatomy, spacing = maker(shape)
    rng = np.random.default_rng(7)
    g = _bench_grid_mm(shape, spacing)
    pos = np.stack(np.broadcast_arrays(*g), -1).astype(np.float32)
    pos -= pos.min(axis=(0, 1, 2))
    bilateral = np.concatenate([pos / theta_alpha_mm, image / theta_beta], -1)
    labels = LATTICE_BENCH_LABELS[name]
    probs = {c: _bench_label_probabilities(anatomy, c, shape, rng) for c in sorted({2, 5, labels})}
    return {
        "image": image,
        "bilateral": np.ascontiguousarray(bilateral[None], dtype=np.float32),
        "spatial": np.ascontiguousarray((pos / theta_gamma_mm)[None], dtype=np.float32),
        "probs2": probs[2][None],
        "probs5": probs[5][None],
        "spacing": np.asarray(spacing, np.float64),
    }


# The CRF benchmark's phantoms (scripts/bench_crf.py): the data sets' phantom generators above
# at the benchmark's sizes, with a poor network's probabilities.


def poor_network_probabilities(
    labels: np.ndarray, spacing: tuple[float, ...], classes: int, rng: np.random.Generator
) -> np.ndarray:
    """What a poor network would give: one-hot labels blurred (sigma 2 mm), plus a smooth
    random field (correlation ~4 mm) and voxel noise on the logits, softmaxed. float32
    [*spatial, K]."""
    sigma = [2.0 / s for s in spacing]
    logits = np.empty((*labels.shape, classes), dtype=np.float32)
    for k in range(classes):
        onehot = (labels == k).astype(np.float32)
        smooth_noise = ndimage.gaussian_filter(
            rng.normal(size=labels.shape).astype(np.float32), [4.0 / s for s in spacing]
        )
        smooth_noise /= smooth_noise.std() + 1e-12
        logits[..., k] = (
            4.0 * ndimage.gaussian_filter(onehot, sigma)
            + 0.8 * smooth_noise
            + 1.2 * rng.normal(size=labels.shape)
        )
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True)


def crf_bench_promise_case(rng: np.random.Generator):
    """A PROMISE12-like phantom (src/datasets/phantoms.py) at 2 x 1 x 1 mm: 63 x 200 x 200."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(_config_file("data", "synthetic_promise.yaml")))
    phantom = dict(cfg["phantom"])
    phantom.update(fov_xyz=[200.0, 200.0, 126.0], inplane_spacings=[1.0], slice_spacings=[2.0])
    image, label, spacing = promise_phantom(rng, phantom)
    image = image.astype(np.float32)[..., None]
    return image, label.astype(np.int64), spacing, 2


def crf_bench_brats_case(rng: np.random.Generator):
    """A BraTS-2015-like phantom (MNI152 brain, 4 modalities, labels 0..4): 155 x 240 x 240."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(_config_file("data", "brats2015.yaml"))
    cfg = OmegaConf.merge(
        {"data": base}, {"data": OmegaConf.load(_config_file("data", "synthetic_brats.yaml"))}
    )
    phantom = OmegaConf.to_container(cfg.data.phantom, resolve=True)
    spacing = (1.0, 1.0, 1.0)
    shape = tuple(phantom["shape_xyz"][::-1])
    tissues = mni152_tissues(int(phantom["template_resolution_mm"]), spacing, shape)
    images, label = brats_phantom(rng, tissues, spacing, phantom)
    image = np.stack([images[m].astype(np.float32) for m in phantom["modalities"]], axis=-1)
    return image, label.astype(np.int64), spacing, 5


def crf_bench_case(name: str, seed: int):
    """One benchmark phantom ("promise" or "brats"): (image [*spatial, M] with each channel
    scaled to unit standard deviation, so that one theta_beta suits all; labels; spacing;
    number of classes; a poor network's probabilities [*spatial, K]), all float32."""
    makers = {"promise": crf_bench_promise_case, "brats": crf_bench_brats_case}
    rng = np.random.default_rng(seed)
    image, labels, spacing, classes = makers[name](rng)
    probs = poor_network_probabilities(labels, spacing, classes, rng).astype(np.float32)
    std = image.reshape(-1, image.shape[-1]).std(0)
    image = np.ascontiguousarray(image / np.where(std > 0, std, 1.0), dtype=np.float32)
    return image, labels, spacing, classes, probs
