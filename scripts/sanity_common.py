"""Shared pieces of the paper's sanity experiment (its Fig. 3): distort a correct segmentation as
a poor network would, then train only a CrfRnn layer's weights to map (distorted, image) back to
the reference. Used by scripts/sanity_2d.py and scripts/sanity_3d.py."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]


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
    """results/<name>/<UTC timestamp>/ (never overwritten: a second run gets a new folder)."""
    base = Path(results) if results else ROOT / "results" / name
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
