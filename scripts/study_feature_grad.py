"""Which gradient of the lattice filter w.r.t. the features agrees with the exact one?

Two routes (docs/lattice_op.md, "Gradient with respect to the features"):

  route 1  differentiate the lattice's own output: its barycentric splat/slice weights move with
           the features (the lattice structure is piecewise constant). Measured here as the
           central finite difference of the lattice output (delta 1e-3), which is what an
           exact implementation of route 1 would return;
  route 2  differentiate the Gaussian kernel, d/df_i sum_j k_ij v_j = sum_j k_ij (f_j - f_i) v_j,
           and evaluate the sums with further filters on the same lattice (what the op's
           registered gradient does, src/lattice_op/lattice.py::feature_gradient).

Both are compared with the exact gradient: TensorFlow's autodiff through a dense float64
Gaussian kernel, for the loss sum(w * K v / K 1) (the normalised filter a CRF uses) on small 2D
and 3D grids with F = 2..7. Prints cosine similarity and relative L2 error of each route.

  make study-feature-grad      (about 10 s; route 1 needs 2 lattice runs per feature value)
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from crf_rnn_3d.datasets.phantoms import grid_features, grid_values
from crf_rnn_3d.lattice_op import Lattice

CASES = [((8, 7), 2), ((8, 7), 4), ((8, 7), 7), ((5, 4, 4), 3), ((5, 4, 4), 5), ((5, 4, 4), 7)]
DELTA = 1e-3


def exact_gradient(feats: np.ndarray, vals: np.ndarray, w: np.ndarray) -> np.ndarray:
    f = tf.Variable(feats.astype(np.float64))
    with tf.GradientTape() as tape:
        flat = tf.reshape(f, [-1, feats.shape[-1]])
        sq = tf.reduce_sum(flat * flat, -1)
        k = tf.exp(
            -0.5 * tf.maximum(sq[:, None] + sq[None] - 2 * tf.matmul(flat, flat, False, True), 0.0)
        )
        v = tf.constant(vals.reshape(-1, vals.shape[-1]), tf.float64)
        out = tf.matmul(k, v) / tf.matmul(k, tf.ones_like(v[:, :1]))
        loss = tf.reduce_sum(out * w.reshape(out.shape))
    return tape.gradient(loss, f).numpy()


def lattice_loss(feats: np.ndarray, vals: np.ndarray, w: np.ndarray) -> tf.Tensor:
    lat = Lattice(feats[None])
    out = lat.filter(vals[None]) / lat.filter(np.ones_like(vals[None, ..., :1]))
    return tf.reduce_sum(tf.cast(out, tf.float64) * w[None])


def route1(feats: np.ndarray, vals: np.ndarray, w: np.ndarray) -> np.ndarray:
    flat = feats.astype(np.float64).ravel()
    grad = np.zeros_like(flat)
    for i in range(flat.size):
        for sign in (1.0, -1.0):
            x = flat.copy()
            x[i] += sign * DELTA
            loss = lattice_loss(x.reshape(feats.shape).astype(np.float32), vals, w)
            grad[i] += sign * float(loss) / (2 * DELTA)
    return grad.reshape(feats.shape)


def route2(feats: np.ndarray, vals: np.ndarray, w: np.ndarray) -> np.ndarray:
    f = tf.Variable(feats)
    with tf.GradientTape() as tape:
        lat = Lattice(f[None])
        out = lat.filter(vals[None]) / lat.filter(np.ones_like(vals[None, ..., :1]))
        loss = tf.reduce_sum(out * w[None].astype(np.float32))
    return tape.gradient(loss, f).numpy()


def agreement(exact: np.ndarray, approx: np.ndarray) -> tuple[float, float]:
    a, b = exact.ravel(), approx.ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return cosine, float(np.linalg.norm(a - b) / np.linalg.norm(a))


def main() -> None:
    print(
        "| grid | F | route 1 cosine | route 1 rel. error | route 2 cosine | route 2 rel. error |"
    )
    print("|---|---|---|---|---|---|")
    for spatial, num_f in CASES:
        rng = np.random.default_rng(num_f)
        feats = grid_features(spatial, num_f, rng, spacing=0.5)
        vals = grid_values(spatial, 2, "smooth", rng)
        w = rng.normal(size=vals.shape)
        exact = exact_gradient(feats, vals, w)
        c1, r1 = agreement(exact, route1(feats, vals, w))
        c2, r2 = agreement(exact, route2(feats, vals, w))
        grid = " x ".join(map(str, spatial))
        print(f"| {grid} | {num_f} | {c1:.3f} | {r1:.2f} | {c2:.3f} | {r2:.2f} |", flush=True)


if __name__ == "__main__":
    main()
