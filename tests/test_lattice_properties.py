"""Algebraic properties of the lattice op: adjoint, gradient, linearity, batch independence,
shift invariance, thread-count independence, and use inside tf.function and model.fit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from crf_rnn_3d.datasets.phantoms import grid_features, grid_values
from crf_rnn_3d.lattice_op import Lattice, permutohedral_filter

ROOT = Path(__file__).resolve().parents[1]


def make_case(seed: int, spatial=(7, 6, 5), num_f: int = 4, channels: int = 3, batch: int = 1):
    rng = np.random.default_rng(seed)
    feats = np.stack([grid_features(spatial, num_f, rng) for _ in range(batch)])
    vals = np.stack([grid_values(spatial, channels, "random", rng) for _ in range(batch)])
    return feats, vals


def test_adjoint_identity() -> None:
    feats, x = make_case(1)
    y = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    lat = Lattice(feats)
    kx = lat.filter(x).numpy().astype(np.float64)
    kty = lat.filter(y, reverse=True).numpy().astype(np.float64)
    lhs, rhs = np.sum(kx * y), np.sum(x * kty)
    assert abs(lhs - rhs) <= 1e-5 * (abs(lhs) + abs(rhs))
    # The forward operator itself is not symmetric, so the identity is not trivially met.
    ky = lat.filter(y).numpy().astype(np.float64)
    assert abs(np.sum(kx * y) - np.sum(x * ky)) > 1e-3 * abs(lhs)


def test_registered_gradient_matches_numerical() -> None:
    feats, vals = make_case(3, spatial=(4, 3, 3), num_f=3, channels=2)
    lat = Lattice(feats)
    for reverse in (False, True):
        theoretical, numerical = tf.test.compute_gradient(
            lambda v, r=reverse: lat.filter(v, reverse=r), [tf.constant(vals)], delta=1e-2
        )
        # The op is linear, so central differences are exact up to float32 rounding.
        np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-3, rtol=1e-2)


def test_gradient_tape_eager_and_in_function() -> None:
    feats, vals = make_case(4)
    weights = np.random.default_rng(5).normal(size=vals.shape).astype(np.float32)
    lat = Lattice(feats)
    v = tf.Variable(vals)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(lat.filter(v) * weights)
    eager = tape.gradient(loss, v).numpy()
    # d/dv <K v, w> = K^T w
    np.testing.assert_allclose(
        eager, lat.filter(weights, reverse=True).numpy(), rtol=1e-5, atol=1e-6
    )

    @tf.function
    def grad_in_graph(f, x):
        with tf.GradientTape() as t:
            t.watch(x)
            out = tf.reduce_sum(permutohedral_filter(x, f) * weights)
        return t.gradient(out, x)

    np.testing.assert_allclose(grad_in_graph(feats, vals).numpy(), eager, rtol=1e-5, atol=1e-6)


def test_linear_in_values() -> None:
    feats, x = make_case(7)
    y = np.random.default_rng(8).normal(size=x.shape).astype(np.float32)
    lat = Lattice(feats)
    combined = lat.filter(2.5 * x - 0.5 * y).numpy()
    separate = 2.5 * lat.filter(x).numpy() - 0.5 * lat.filter(y).numpy()
    np.testing.assert_allclose(combined, separate, rtol=1e-4, atol=1e-4)


def test_batch_items_are_independent() -> None:
    feats, vals = make_case(9, batch=3)
    together = Lattice(feats).filter(vals).numpy()
    for b in range(3):
        alone = Lattice(feats[b : b + 1]).filter(vals[b : b + 1]).numpy()
        np.testing.assert_allclose(together[b : b + 1], alone, rtol=1e-6, atol=1e-6)
    # Changing one item's values leaves the others untouched.
    changed = vals.copy()
    changed[1] += 5.0
    after = Lattice(feats).filter(changed).numpy()
    np.testing.assert_array_equal(after[0], together[0])
    np.testing.assert_array_equal(after[2], together[2])


def test_shift_of_features_leaves_output_unchanged() -> None:
    """The op removes each channel's minimum before embedding, so a common shift of the
    features changes nothing. Features on a 1/64 grid keep every shifted value exact, so the
    outputs must agree to the bit, even for shifts far larger than the features' spread
    (where single-precision lattice coordinates would otherwise lose all resolution)."""
    rng = np.random.default_rng(10)
    feats = np.round(rng.normal(scale=2.0, size=(1, 9, 8, 4)) * 64) / 64
    vals = rng.normal(size=(1, 9, 8, 3)).astype(np.float32)
    base = permutohedral_filter(vals, feats.astype(np.float32)).numpy()
    shift = np.array([3.0, -7.0, 20000.0, 0.5])
    shifted = permutohedral_filter(vals, (feats + shift).astype(np.float32)).numpy()
    np.testing.assert_array_equal(shifted, base)


def test_features_too_wide_for_packed_keys_give_the_same_filter() -> None:
    """The build packs each lattice key into a 64-bit code when the features' ranges allow it
    and keeps the keys wide otherwise (permutohedral.h, KeyPacking). A second cluster 5000
    units away along one channel widens every packed field past 64 bits (F = 7: 7 fields of
    13 bits or more), so the pair is built with wide keys, while the first cluster alone is
    packed. The first cluster holds every channel's minimum, so it lands on the same lattice
    coordinates in both builds, and the far cluster adds nothing to it (exp(-5000^2 / 2) = 0):
    its filtered values must agree to float rounding."""
    feats, vals = make_case(11, spatial=(9, 8, 7), num_f=7, channels=3)
    far = feats.copy()
    far[..., 6] += 5000.0
    pair = Lattice(np.concatenate([feats, far], axis=1))
    together = pair.filter(np.concatenate([vals, 2.0 * vals], axis=1)).numpy()
    alone = Lattice(feats).filter(vals).numpy()
    scale = float(np.max(np.abs(alone)))
    np.testing.assert_allclose(together[:, :9], alone, rtol=1e-5, atol=1e-6 * scale)
    # The far cluster is filtered on its own too: twice the values, twice the output's scale.
    assert np.max(np.abs(together[:, 9:])) > 0.5 * scale


def test_lattice_is_built_once_in_a_graph() -> None:
    """Several filters and their gradients in one tf.function run one lattice build."""
    feats, vals = make_case(11)

    @tf.function
    def step(f, v):
        lat = Lattice(f)
        with tf.GradientTape() as tape:
            tape.watch(v)
            q = v
            for _ in range(5):
                q = lat.filter(tf.nn.softmax(q)) + v
            loss = tf.reduce_sum(q * q)
        return loss, tape.gradient(loss, v)

    graph = step.get_concrete_function(tf.constant(feats), tf.constant(vals)).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("Crf3dLatticeBuild") == 1
    assert types.count("Crf3dLatticeFilter") == 10  # 5 forward, 5 adjoint


def test_trains_inside_model_fit() -> None:
    """A Keras model whose layer filters over a lattice learns a scale through model.fit."""
    feats, vals = make_case(12, batch=2, channels=1)
    target = 3.0 * Lattice(feats).filter(vals).numpy()

    class Smooth(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

        def call(self, inputs):
            values, features = inputs
            return self.scale * Lattice(features).filter(values)

    v_in = keras.Input(shape=vals.shape[1:])
    f_in = keras.Input(shape=feats.shape[1:])
    model = keras.Model([v_in, f_in], Smooth()([v_in, f_in]))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit([vals, feats], target, epochs=150, batch_size=2, verbose=0)
    assert history.history["loss"][-1] < 0.01 * history.history["loss"][0]
    assert abs(float(model.layers[-1].scale.numpy()) - 3.0) < 0.1


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count_does_not_change_result(threads: int, tmp_path: Path) -> None:
    """The build hashes in per-thread chunks above 16k voxels per thread; numbering of lattice
    points then depends on the thread count, but the filtered values must not."""
    script = textwrap.dedent(
        f"""
        import numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads({threads})
        from crf_rnn_3d.lattice_op import Lattice
        from crf_rnn_3d.datasets.phantoms import grid_features, grid_values
        rng = np.random.default_rng(0)
        f = grid_features((48, 40, 36), 4, rng, spacing=0.4)[None]
        v = grid_values((48, 40, 36), 2, "random", rng)[None]
        np.save(r"{tmp_path}/out.npy", Lattice(f).filter(v).numpy())
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env)
    out = np.load(tmp_path / "out.npy")
    rng = np.random.default_rng(0)
    f = grid_features((48, 40, 36), 4, rng, spacing=0.4)[None]
    v = grid_values((48, 40, 36), 2, "random", rng)[None]
    np.testing.assert_array_equal(out, Lattice(f).filter(v).numpy())
