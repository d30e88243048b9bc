"""The paper's sanity experiment (its Fig. 3): distort a correct segmentation as a poor network
would, then train only a CrfRnn layer's weights to map (distorted, image) back to the reference.

Three experiments share these pieces (command lines in scripts/sanity_2d.py, sanity_3d.py and
sanity_theta.py; settings in configs/sanity/2d.yaml and 3d.yaml):

- 2D (:func:`run_2d`): matplotlib's bundled Grace Hopper photograph (RGB) and a person /
  background reference (``scripts/sanity_2d_reference.png`` in a clone, made by
  :func:`make_reference`).
- 3D (:func:`run_3d`): the PROMISE12-like phantom of :mod:`crf_rnn_3d.datasets.phantoms` with
  soft, low-contrast borders (one channel).
- learning theta (:func:`run_theta`): CrfRnn(learn_theta=True) started with kernel widths far
  too wide, against grid searches over fixed widths (docs/crf.md, "Learning theta").

Each run writes a new ``<results>/<UTC time>/`` folder (metrics.json, figure.png, config.yaml).
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from scipy import ndimage

from crf_rnn_3d import CONFIG_MODULE

# The 2D reference segmentation ships in a clone's scripts/ folder (not in the wheel).
REFERENCE = Path(__file__).resolve().parents[2] / "scripts" / "sanity_2d_reference.png"


def config_file(dim: int) -> Path:
    """configs/sanity/{2d,3d}.yaml of the installed package (crf_rnn_3d.configs)."""
    return Path(str(importlib.resources.files(CONFIG_MODULE) / "sanity" / f"{dim}d.yaml"))


def load_config(dim: int, overrides: Sequence[str] = ()) -> Any:
    """The 2D or 3D experiment's settings with dotlist overrides (``train.steps=30``)."""
    return OmegaConf.merge(
        OmegaConf.load(config_file(dim)), OmegaConf.from_dotlist(list(overrides))
    )


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


def distort(
    labels: np.ndarray, num_classes: int, cfg: Mapping[str, Any], rng: np.random.Generator
) -> np.ndarray:
    """Unary logits [*spatial, K] (float32) of a poor network that saw `labels` [*spatial]:
    the one-hot map shifted by ``shift`` voxels (borders in the wrong place), blurred with a
    Gaussian of ``blur_sigma`` voxels (soft, uncertain borders), scaled to logits of
    +-``confidence``, plus speckle: in a fraction ``speckle`` of the voxels a random class's
    logit gets +3 ``confidence`` (so it wins there)."""
    onehot = np.eye(num_classes, dtype=np.float32)[labels]
    shift = [float(s) for s in cfg["shift"]] + [0.0]
    moved = ndimage.shift(onehot, shift, order=1, mode="nearest")
    soft = ndimage.gaussian_filter(moved, [float(cfg["blur_sigma"])] * labels.ndim + [0.0])
    logits = float(cfg["confidence"]) * (2.0 * soft - 1.0)
    speckle = rng.uniform(size=labels.shape) < float(cfg["speckle"])
    wrong = rng.integers(0, num_classes, size=labels.shape)
    logits[speckle, wrong[speckle]] += 3.0 * float(cfg["confidence"])
    return logits.astype(np.float32)


def overlap(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> dict[str, float]:
    """Mean Dice and IoU over the foreground classes 1..K-1, and pixel accuracy."""
    dice, iou = [], []
    for k in range(1, num_classes):
        p, r = pred == k, ref == k
        inter, total, union = np.sum(p & r), p.sum() + r.sum(), np.sum(p | r)
        dice.append(2.0 * inter / total if total else 1.0)
        iou.append(inter / union if union else 1.0)
    return {
        "dice": float(np.mean(dice)),
        "iou": float(np.mean(iou)),
        "accuracy": float(np.mean(pred == ref)),
    }


def train_crf(
    unaries: np.ndarray,
    image: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    crf_cfg: Mapping[str, Any],
    train_cfg: Mapping[str, Any],
    theta_trace: list[dict[str, Any]] | None = None,
) -> tuple[Any, list[float]]:
    """Fits only a CrfRnn's weights (w1, w2, mu; with ``learn_theta: true`` in `crf_cfg` also
    its kernel widths) on one example: unaries [*spatial, K], image [*spatial, M], reference
    labels [*spatial]; cross-entropy on the refined logits. Returns the trained layer and the
    loss per step; `theta_trace`, when given, gets the layer's theta_values() before the first
    step and after every step."""
    import keras
    import tensorflow as tf

    from crf_rnn_3d.crf import CrfRnn

    keras.utils.set_random_seed(int(train_cfg["seed"]))
    layer = CrfRnn(spacing=list(spacing), **dict(crf_cfg))
    u = tf.constant(unaries[None], tf.float32)
    im = tf.constant(image[None], tf.float32)
    target = tf.constant(reference[None], tf.int32)
    layer([u, im])
    optimizer = keras.optimizers.Adam(float(train_cfg["learning_rate"]))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(target, layer([u, im], training=True))
        grads = tape.gradient(loss, layer.trainable_variables)
        optimizer.apply_gradients(zip(grads, layer.trainable_variables, strict=True))
        return loss

    losses = []
    if theta_trace is not None:
        theta_trace.append(layer.theta_values())
    for _ in range(int(train_cfg["steps"])):
        losses.append(float(step()))
        if theta_trace is not None:
            theta_trace.append(layer.theta_values())
    return layer, losses


def predict(layer: Any, unaries: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Labels [*spatial] from the layer at inference."""
    out = layer([unaries[None].astype(np.float32), image[None].astype(np.float32)])
    return np.asarray(out)[0].argmax(-1)


def run_dir(name: str, results: str | os.PathLike | None = None) -> Path:
    """<results>/<UTC timestamp>/, by default results/<name>/ under the working directory
    (never overwritten: a second run gets a new folder)."""
    base = Path(results) if results else Path("results") / name
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d_%H-%M-%S")
    path = base / stamp
    suffix = 1
    while path.exists():
        path = base / f"{stamp}_{suffix}"
        suffix += 1
    path.mkdir(parents=True)
    return path


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """JSON written to a temporary name, then renamed."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def layer_weights(layer: Any) -> dict[str, Any]:
    """The trained weights (mu with its effective zero diagonal) and the kernel widths in use
    (learnt or set) as plain lists."""
    mu = np.asarray(layer.compatibility) * (1.0 - np.eye(layer.num_classes))
    return {
        "bilateral_weight": np.asarray(layer.bilateral_weight).round(4).tolist(),
        "spatial_weight": np.asarray(layer.spatial_weight).round(4).tolist(),
        "compatibility": mu.round(4).tolist(),
        "theta": layer.theta_values(),
    }


def save_figure(path: Path, rows: Sequence[Sequence[tuple[str, np.ndarray]]]) -> None:
    """A grid of titled panels (RGB, grey images or label maps), written to a temporary name
    and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows, ncols = len(rows), len(rows[0])
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4 * ncols, 4.4 * nrows), layout="constrained", squeeze=False
    )
    for row, panels in zip(axes, rows, strict=True):
        for ax, (title, data) in zip(row, panels, strict=True):
            data = np.asarray(data)
            ax.imshow(
                data if data.dtype == np.uint8 and data.ndim == 3 else data.astype(np.float32),
                cmap=None if data.ndim == 3 else "gray",
                interpolation="nearest",
            )
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# 2D: the photograph
# ---------------------------------------------------------------------------------------------

# Hand-drawn outline of the person (x, y) in pixels of the 512 x 600 photograph.
REFERENCE_POLYGON = [
    (260, 22), (300, 28), (335, 45), (355, 70), (365, 100), (372, 125), (370, 160), (368, 200),
    (372, 240), (362, 290), (345, 320), (335, 330), (380, 345), (430, 365), (470, 385),
    (495, 410), (508, 450), (512, 600), (10, 600), (12, 470), (25, 430), (60, 395), (120, 370),
    (185, 345), (200, 330), (180, 300), (162, 270), (155, 230), (152, 180), (150, 150),
    (155, 120), (170, 95), (178, 60), (200, 40), (230, 28),
]  # fmt: skip


def photograph() -> np.ndarray:
    """matplotlib's bundled Grace Hopper photograph, uint8 [600, 512, 3]."""
    import matplotlib.cbook as cbook
    import matplotlib.image as mimage

    return np.asarray(mimage.imread(cbook.get_sample_data("grace_hopper.jpg")))


def make_reference(image: np.ndarray) -> np.ndarray:
    """The 2D reference segmentation from the photograph `image` [H, W, 3]: uint8 [H, W] {0, 1}.

    A person outline drawn by hand as a polygon (REFERENCE_POLYGON, pixel coordinates read off
    the photo), then, within 12 pixels of that outline, each pixel reassigned by colour with two
    6-component Gaussian mixtures (scikit-learn) fitted to the pixels well inside and well
    outside it, the log-likelihood ratio smoothed (sigma 1.5 px), a 2-px opening and closing (on
    an edge-padded copy), the largest component kept and its holes filled."""
    from matplotlib.path import Path as PolygonPath
    from scipy import ndimage
    from sklearn.mixture import GaussianMixture

    height, width = image.shape[:2]
    yy, xx = np.mgrid[:height, :width]
    points = np.c_[xx.ravel() + 0.5, yy.ravel() + 0.5]
    inside = PolygonPath(REFERENCE_POLYGON).contains_points(points).reshape(height, width)
    band, pad = 12, 16
    # morphology on an edge-padded copy, so the image border is no boundary of the person
    inside = np.pad(inside, pad, mode="edge")
    inner = ndimage.binary_erosion(inside, iterations=band)[pad:-pad, pad:-pad]
    outer = ~ndimage.binary_dilation(inside, iterations=band)[pad:-pad, pad:-pad]
    inside = inside[pad:-pad, pad:-pad]
    colours = image.reshape(-1, 3).astype(np.float64) / 255.0
    person = GaussianMixture(6, random_state=0).fit(colours[inner.ravel()][::7])
    rest = GaussianMixture(6, random_state=0).fit(colours[outer.ravel()][::7])
    ratio = (person.score_samples(colours) - rest.score_samples(colours)).reshape(height, width)
    ratio = ndimage.gaussian_filter(ratio, 1.5)
    mask = np.pad(np.where(~inner & ~outer, ratio > 0, inside), pad, mode="edge")
    mask = ndimage.binary_closing(ndimage.binary_opening(mask, iterations=2), iterations=2)
    mask = mask[pad:-pad, pad:-pad]
    components, count = ndimage.label(mask)
    sizes = ndimage.sum(mask, components, range(1, count + 1))
    mask = ndimage.binary_fill_holes(components == 1 + int(np.argmax(sizes)))
    return mask.astype(np.uint8)


def load_reference(path: str | os.PathLike = REFERENCE) -> np.ndarray:
    """The 2D reference segmentation (a PNG), int64 [H, W] {0, 1}."""
    import matplotlib.image as mimage

    if not Path(path).is_file():
        raise FileNotFoundError(f"sanity reference {path}: no such file")
    ref = np.asarray(mimage.imread(path))
    if ref.ndim == 3:
        ref = ref[..., 0]
    return (ref > 0.5).astype(np.int64)


def run_2d(
    cfg: Any,
    results: str | os.PathLike | None = None,
    log: Any = print,
    reference_path: str | os.PathLike = REFERENCE,
) -> dict[str, Any]:
    """The 2D experiment on the photograph; returns the metrics (also written to the run
    folder, ``results`` or results/sanity_2d/)."""
    image = photograph()
    reference = load_reference(reference_path)
    if cfg.crop is not None:
        y0, y1, x0, x1 = cfg.crop
        image, reference = image[y0:y1, x0:x1], reference[y0:y1, x0:x1]
    step = int(cfg.downsample)
    image, reference = image[::step, ::step], reference[::step, ::step]
    rng = np.random.default_rng(int(cfg.train.seed))
    unaries = distort(reference, 2, cfg.distortion, rng)
    rgb = image.astype(np.float32)
    distorted = unaries.argmax(-1)
    before = overlap(distorted, reference, 2)
    log(f"image {image.shape}, distorted: Dice {before['dice']:.4f} IoU {before['iou']:.4f}")
    crf_cfg = OmegaConf.to_container(cfg.crf)
    layer, losses = train_crf(unaries, rgb, reference, (1.0, 1.0), crf_cfg, cfg.train)
    output = predict(layer, unaries, rgb)
    after = overlap(output, reference, 2)
    log(f"CRF output ({cfg.train.steps} steps): Dice {after['dice']:.4f} IoU {after['iou']:.4f}")
    metrics = {
        "before": before,
        "after": after,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "weights": layer_weights(layer),
        "shape": list(image.shape),
    }
    out = run_dir("sanity_2d", results)
    write_json(out / "metrics.json", metrics)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    save_figure(
        out / "figure.png",
        [
            [
                ("image", image),
                (f"distorted (Dice {before['dice']:.3f})", distorted),
                ("reference", reference),
                (f"CRF output (Dice {after['dice']:.3f})", output),
            ]
        ],
    )
    log(f"wrote {out}")
    metrics["run_dir"] = str(out)
    return metrics


# ---------------------------------------------------------------------------------------------
# 3D: the phantom
# ---------------------------------------------------------------------------------------------


def phantom(cfg: Any) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Image [z, y, x] float32 (standardised), organ labels [z, y, x] int64, spacing (z, y, x)."""
    from crf_rnn_3d.datasets.phantoms import promise_phantom

    data_file = importlib.resources.files(CONFIG_MODULE) / "data" / "synthetic_promise.yaml"
    data_cfg = OmegaConf.load(str(data_file))
    settings = OmegaConf.to_container(data_cfg.phantom)
    settings.update(
        fov_xyz=list(cfg.fov_xyz),
        inplane_spacings=[float(cfg.inplane_spacing)],
        slice_spacings=[float(cfg.slice_spacing)],
        edge_blur_mm=float(cfg.edge_blur_mm),
    )
    image, label, spacing = promise_phantom(np.random.default_rng(int(cfg.seed)), settings)
    image = image.astype(np.float32)
    image = (image - image.mean()) / image.std()
    return image, label.astype(np.int64), spacing


def run_3d(cfg: Any, results: str | os.PathLike | None = None, log: Any = print) -> dict[str, Any]:
    """The 3D experiment on the phantom; returns the metrics (also written to the run folder,
    ``results`` or results/sanity_3d/)."""
    image, reference, spacing = phantom(cfg.phantom)
    rng = np.random.default_rng(int(cfg.train.seed))
    unaries = distort(reference, 2, cfg.distortion, rng)
    distorted = unaries.argmax(-1)
    before = overlap(distorted, reference, 2)
    log(
        f"phantom {image.shape} at {spacing} mm, distorted: Dice {before['dice']:.4f} "
        f"IoU {before['iou']:.4f}"
    )
    crf_cfg = OmegaConf.to_container(cfg.crf)
    layer, losses = train_crf(unaries, image[..., None], reference, spacing, crf_cfg, cfg.train)
    output = predict(layer, unaries, image[..., None])
    after = overlap(output, reference, 2)
    wrong_before = int(np.sum(distorted != reference))
    wrong_after = int(np.sum(output != reference))
    removed = (wrong_before - wrong_after) / max(wrong_before, 1)
    log(
        f"CRF output ({cfg.train.steps} steps): Dice {after['dice']:.4f} IoU {after['iou']:.4f}; "
        f"wrong voxels {wrong_before} -> {wrong_after} ({100 * removed:.1f}% of the distortion "
        "removed)"
    )
    metrics = {
        "before": before,
        "after": after,
        "wrong_voxels_before": wrong_before,
        "wrong_voxels_after": wrong_after,
        "distortion_removed": removed,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "weights": layer_weights(layer),
        "shape": list(image.shape),
        "spacing_mm": list(spacing),
    }
    out = run_dir("sanity_3d", results)
    write_json(out / "metrics.json", metrics)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    zs = np.nonzero(reference.any(axis=(1, 2)))[0]
    rows = []
    for z in (zs[len(zs) // 4], zs[len(zs) // 2], zs[3 * len(zs) // 4]) if len(zs) else (0,):
        rows.append(
            [
                (f"image, slice z={z}", image[z]),
                (f"distorted (Dice {before['dice']:.3f})", distorted[z]),
                ("reference", reference[z]),
                (f"CRF output (Dice {after['dice']:.3f})", output[z]),
            ]
        )
    save_figure(out / "figure.png", rows)
    log(f"wrote {out}")
    metrics["run_dir"] = str(out)
    return metrics


# ---------------------------------------------------------------------------------------------
# learning theta (scripts/sanity_theta.py)
# ---------------------------------------------------------------------------------------------


def experiment_data(
    dim: int, cfg: Any, reference_path: str | os.PathLike = REFERENCE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """(unaries [*spatial, 2], image [*spatial, M] float32, reference [*spatial], spacing in mm)
    exactly as the 2D / 3D sanity experiment builds them."""
    if dim == 2:
        image, reference = photograph(), load_reference(reference_path)
        if cfg.crop is not None:
            y0, y1, x0, x1 = cfg.crop
            image, reference = image[y0:y1, x0:x1], reference[y0:y1, x0:x1]
        step = int(cfg.downsample)
        image, reference = image[::step, ::step], reference[::step, ::step]
        image, spacing = image.astype(np.float32), (1.0, 1.0)
    else:
        image, reference, spacing = phantom(cfg.phantom)
        image = image[..., None]
    rng = np.random.default_rng(int(cfg.train.seed))
    unaries = distort(reference, 2, cfg.distortion, rng)
    return unaries, image, reference, tuple(float(s) for s in spacing)


def pixels_downsampled(cfg: Any) -> Any:
    """2D: the config with ``theta_search.downsample`` (if set) as its downsampling step, and the
    settings in pixels (distortion shift and blur, theta_alpha, theta_gamma) divided by it, so
    they mean the same lengths on the photograph. theta_beta (colour units) is unchanged."""
    step = cfg.theta_search.get("downsample")
    if step is None:
        return cfg
    step = int(step)
    cfg = OmegaConf.merge(cfg, {"downsample": step * int(cfg.downsample)})
    cfg.distortion.shift = [float(s) / step for s in cfg.distortion.shift]
    cfg.distortion.blur_sigma = float(cfg.distortion.blur_sigma) / step
    cfg.crf.theta_alpha = float(cfg.crf.theta_alpha) / step
    cfg.crf.theta_gamma = float(cfg.crf.theta_gamma) / step
    return cfg


def geomean(values: Any) -> float:
    """Geometric mean of a width or a list of widths (theta_beta over the image channels)."""
    return float(np.exp(np.mean(np.log(np.atleast_1d(np.asarray(values, dtype=np.float64))))))


def scaled_crf(
    cfg: Any, scale: float, alpha: float | None = None, beta: float | None = None
) -> dict[str, Any]:
    """The config's CrfRnn settings with every kernel width multiplied by `scale`, or theta_alpha
    by `alpha` and theta_beta by `beta` where given (theta_gamma then by `scale`)."""
    crf = OmegaConf.to_container(cfg.crf)
    crf["theta_alpha"] = float(crf["theta_alpha"]) * (scale if alpha is None else alpha)
    crf["theta_gamma"] = float(crf["theta_gamma"]) * scale
    b_scale = scale if beta is None else beta
    widths = crf["theta_beta"]
    crf["theta_beta"] = (
        [float(b) * b_scale for b in widths]
        if isinstance(widths, list)
        else float(widths) * b_scale
    )
    return crf


def run_theta(
    dim: int,
    cfg: Any,
    results: str | os.PathLike | None = None,
    log: Any = print,
    previous: dict[str, Any] | None = None,
    reference_path: str | os.PathLike = REFERENCE,
) -> dict[str, Any]:
    """The parts named in ``theta_search.parts`` (joint: grid over one common scale and the
    learnt run; alpha_beta: grid over theta_alpha x theta_beta scales); parts found in
    `previous` (an earlier run's metrics.json) are taken from there. Returns the metrics (also
    written to a new run folder)."""
    parts = list(cfg.theta_search.get("parts", ["joint"]))
    metrics: dict[str, Any] = dict(previous or {})
    if dim == 2:
        cfg = pixels_downsampled(cfg)
        cfg.theta_search.downsample = None  # applied once
    search = cfg.theta_search
    unaries, image, reference, spacing = experiment_data(dim, cfg, reference_path)
    before = overlap(unaries.argmax(-1), reference, 2)
    log(f"data {image.shape} at {spacing}, distorted Dice {before['dice']:.4f}")
    metrics.update(shape=list(image.shape), spacing=list(spacing), distorted=before)
    base = {
        "theta_alpha": float(cfg.crf.theta_alpha),
        "theta_beta": geomean(OmegaConf.to_container(cfg.crf)["theta_beta"]),
        "theta_gamma": float(cfg.crf.theta_gamma),
    }
    metrics["config_theta"] = base
    if "alpha_beta" in parts and "grid_alpha_beta" not in metrics:
        cells = []
        for a in [float(x) for x in search.alpha_beta_scales.alpha]:
            for b in [float(x) for x in search.alpha_beta_scales.beta]:
                t0 = time.perf_counter()
                crf = scaled_crf(cfg, 1.0, alpha=a, beta=b)
                layer, _ = train_crf(unaries, image, reference, spacing, crf, cfg.train)
                dice = overlap(predict(layer, unaries, image), reference, 2)["dice"]
                cells.append({"alpha_scale": a, "beta_scale": b, "dice": dice})
                took = time.perf_counter() - t0
                log(f"grid alpha x{a:g} beta x{b:g}: Dice {dice:.4f} ({took:.0f} s)")
        metrics["grid_alpha_beta"] = cells
        metrics["grid_alpha_beta_best"] = max(cells, key=lambda c: c["dice"])
    if "joint" not in parts or "learnt" in metrics:
        return _finish(dim, cfg, metrics, results, log)
    grid = list(metrics.get("grid", []))
    for scale in [] if grid else [float(s) for s in search.scales]:
        t0 = time.perf_counter()
        layer, losses = train_crf(
            unaries, image, reference, spacing, scaled_crf(cfg, scale), cfg.train
        )
        after = overlap(predict(layer, unaries, image), reference, 2)
        grid.append({"scale": scale, "dice": after["dice"], "iou": after["iou"], "loss": losses})
        log(f"grid x{scale:g}: Dice {after['dice']:.4f} ({time.perf_counter() - t0:.0f} s)")
    best = max(grid, key=lambda g: g["dice"])
    crf = scaled_crf(cfg, float(search.start_scale))
    crf["learn_theta"] = True
    train = OmegaConf.merge(cfg.train, {"steps": int(search.learn_steps)})
    trace: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    layer, losses = train_crf(unaries, image, reference, spacing, crf, train, trace)
    learnt_dice = overlap(predict(layer, unaries, image), reference, 2)
    start_crf = scaled_crf(cfg, float(search.start_scale))
    start_train = OmegaConf.merge(cfg.train, {"steps": 0})
    start_layer, _ = train_crf(unaries, image, reference, spacing, start_crf, start_train)
    start_dice = overlap(predict(start_layer, unaries, image), reference, 2)
    final = trace[-1]
    ratios = {
        "theta_alpha": final["theta_alpha"] / base["theta_alpha"],
        "theta_beta": geomean(final["theta_beta"]) / base["theta_beta"],
        "theta_gamma": final["theta_gamma"] / base["theta_gamma"],
    }
    log(
        f"learnt (start x{float(search.start_scale):g}, {int(search.learn_steps)} steps, "
        f"{time.perf_counter() - t0:.0f} s): Dice {learnt_dice['dice']:.4f}; widths / config: "
        + ", ".join(f"{k} x{v:.3f}" for k, v in ratios.items())
        + f"; grid best x{best['scale']:g} Dice {best['dice']:.4f}"
    )
    metrics.update(
        {
            "dim": dim,
            "shape": list(image.shape),
            "spacing": list(spacing),
            "distorted": before,
            "config_theta": base,
            "grid": grid,
            "grid_best": {"scale": best["scale"], "dice": best["dice"]},
            "learnt": {
                "start_scale": float(search.start_scale),
                "steps": int(search.learn_steps),
                "dice_at_start_untrained": start_dice["dice"],
                "dice": learnt_dice["dice"],
                "iou": learnt_dice["iou"],
                "theta_over_config": ratios,
                "theta_trace": trace,
                "loss": losses,
                "weights": layer_weights(layer),
            },
        }
    )
    return _finish(dim, cfg, metrics, results, log)


def _finish(
    dim: int, cfg: Any, metrics: dict[str, Any], results: str | None, log: Any
) -> dict[str, Any]:
    """Writes metrics.json, config.yaml and figure.png to a new run folder."""
    metrics = {k: v for k, v in metrics.items() if k != "run_dir"}
    metrics["dim"] = dim
    out = run_dir(f"sanity_theta_{dim}d", results)
    write_json(out / "metrics.json", metrics)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    figure(out / "figure.png", metrics)
    log(f"wrote {out}")
    metrics["run_dir"] = str(out)
    return metrics


def time_steps(
    dim: int,
    cfg: Any,
    steps: int,
    log: Any = print,
    reference_path: str | os.PathLike = REFERENCE,
) -> dict[str, float]:
    """Seconds per training step (forward, backward, Adam update; traced once, 2 warm-up steps,
    then the mean of `steps`) on the experiment's data, without and with learn_theta, each
    measured twice in alternation. Returns {"fixed": s, "learnt": s} (the smaller of each
    pair)."""
    import keras
    import tensorflow as tf

    from crf_rnn_3d.crf import CrfRnn

    if dim == 2:
        cfg = pixels_downsampled(cfg)
    unaries, image, reference, spacing = experiment_data(dim, cfg, reference_path)
    u, im = tf.constant(unaries[None]), tf.constant(image[None])
    target = tf.constant(reference[None])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    best: dict[str, float] = {}
    for learn in (False, True, False, True):
        crf = OmegaConf.to_container(cfg.crf)
        layer = CrfRnn(spacing=list(spacing), learn_theta=learn, **crf)
        layer([u, im])
        optimizer = keras.optimizers.Adam(float(cfg.train.learning_rate))

        @tf.function
        def step(layer: Any = layer, optimizer: Any = optimizer) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = loss_fn(target, layer([u, im], training=True))
            grads = tape.gradient(loss, layer.trainable_variables)
            optimizer.apply_gradients(zip(grads, layer.trainable_variables, strict=True))
            return loss

        step(), step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - t0) / steps
        key = "learnt" if learn else "fixed"
        best[key] = min(best.get(key, math.inf), seconds)
        log(f"{dim}D {image.shape}: learn_theta={learn}: {seconds:.3f} s/step")
    return best


def figure(path: Path, metrics: dict[str, Any]) -> None:
    """Up to three panels, for the parts present: the joint grid's Dice against the common scale
    (with the learnt run's final Dice); the theta_alpha x theta_beta grid's Dice as a map with
    the learnt run's path over it; the learnt widths / the config's against the training step
    (log scale). Written via a temporary name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim, learnt = metrics["dim"], metrics.get("learnt")
    base = metrics.get("config_theta")
    panels = [k for k in ("grid", "grid_alpha_beta") if k in metrics] + (
        ["trace"] if learnt else []
    )
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 4.4), layout="constrained", squeeze=False
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "grid":
            scales = [g["scale"] for g in metrics["grid"]]
            ax.plot(scales, [g["dice"] for g in metrics["grid"]], "o-", label="grid: theta fixed")
            ax.axhline(metrics["distorted"]["dice"], color="grey", ls=":", label="distorted input")
            if learnt:
                ax.axhline(learnt["dice"], color="C3", ls="--", label="learnt theta (final)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("all three widths / config's")
            ax.set_ylabel("Dice")
            ax.set_title(f"{dim}D: Dice, one common scale")
            ax.legend(fontsize=8)
        elif panel == "grid_alpha_beta":
            cells = metrics["grid_alpha_beta"]
            alphas = sorted({c["alpha_scale"] for c in cells})
            betas = sorted({c["beta_scale"] for c in cells})
            dice = np.full((len(betas), len(alphas)), np.nan)
            for c in cells:
                dice[betas.index(c["beta_scale"]), alphas.index(c["alpha_scale"])] = c["dice"]
            la, lb = np.log2(alphas), np.log2(betas)
            image = ax.imshow(
                dice,
                origin="lower",
                cmap="viridis",
                extent=(la[0] - 0.5, la[-1] + 0.5, lb[0] - 0.5, lb[-1] + 0.5),
                aspect="auto",
            )
            fig.colorbar(image, ax=ax, label="Dice (theta_gamma x1)")
            for c in cells:
                ax.text(
                    np.log2(c["alpha_scale"]),
                    np.log2(c["beta_scale"]),
                    f"{c['dice']:.3f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w",
                )
            if learnt and base:
                path_a = [
                    np.log2(t["theta_alpha"] / base["theta_alpha"]) for t in learnt["theta_trace"]
                ]
                path_b = [
                    np.log2(geomean(t["theta_beta"]) / base["theta_beta"])
                    for t in learnt["theta_trace"]
                ]
                ax.plot(path_a, path_b, "-", color="C3", lw=1.5, label="learnt theta, per step")
                ax.plot(path_a[0], path_b[0], "o", color="C3", label="start")
                ax.plot(path_a[-1], path_b[-1], "*", color="C3", ms=12, label="end")
                ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
            ax.set_xlabel("log2(theta_alpha / config's)")
            ax.set_ylabel("log2(theta_beta / config's)")
            ax.set_title(f"{dim}D: Dice, theta_alpha x theta_beta grid")
        else:
            steps = np.arange(len(learnt["theta_trace"]))
            for key, colour in (("theta_alpha", "C0"), ("theta_beta", "C1"), ("theta_gamma", "C2")):
                values = [geomean(t[key]) / base[key] for t in learnt["theta_trace"]]
                ax.plot(steps, values, color=colour, label=key)
            if "grid_best" in metrics:
                best = metrics["grid_best"]["scale"]
                ax.axhline(best, color="k", ls="--", label="common-scale grid's best")
            ax.set_yscale("log", base=2)
            ax.set_xlabel("training step")
            ax.set_ylabel("learnt width / config's width")
            ax.set_title(f"learn_theta, started x{learnt['start_scale']:g}")
            ax.legend(fontsize=8)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
