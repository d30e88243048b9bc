"""The splat without lists (docs/lattice_op.md, "Two forms of the splat"): a lattice far smaller
than its vertex entries is built without the CSR splat lists, and its filter sums each part of
the voxels into a row per lattice point instead. Checked against the float64 brute force, the
splat with lists (the same sums in another order) and the TF-op path."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from crf_rnn_3d.lattice_op import Lattice, _library
from crf_rnn_3d.lattice_op.reference import exact_normalised_filter

InvalidArg = tf.errors.InvalidArgumentError


def smooth_features(shape=(24, 28, 30), theta=6.0, seed=0) -> np.ndarray:
    """[1, *shape, 4]: positions / theta and one smooth intensity: a lattice of a few hundred
    points for 5k-20k voxels, so 32 (M + 1) <= N (F + 1) and the build lists no splat entries
    (the default 20,160 voxels make 2 parts, SplatParts)."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    intensity = np.sin(grids[0] / 5.0) + np.cos(grids[1] / 7.0) + 0.05 * rng.normal(size=shape)
    f = np.stack([g / theta for g in grids] + [intensity / 0.5], axis=-1)
    return f[None].astype(np.float32)


def test_small_lattice_is_built_without_lists_and_filters_like_the_exact_gaussian() -> None:
    f = smooth_features()
    lat = Lattice(f, backend="compiled")
    n, d1 = f[0, ..., 0].size, f.shape[-1] + 1
    m = int(lat.num_points)
    assert 32 * (m + 1) <= n * d1  # the build's rule for no lists (SplatNeedsLists)
    assert lat.tensors.splat_offsets.shape == (0,)
    assert lat.tensors.splat_voxels.shape == (0,)
    assert lat.tensors.splat_weights.shape == (0,)
    rng = np.random.default_rng(1)
    values = rng.uniform(-1.0, 1.0, (1, *f.shape[1:-1], 3)).astype(np.float32)
    ours = (lat.filter(values) / lat.filter(np.ones_like(values[..., :1]))).numpy()
    rows = rng.choice(n, 300, replace=False)
    exact = exact_normalised_filter(values.reshape(n, 3), f.reshape(n, -1), rows)
    err = np.abs(ours.reshape(n, 3)[rows] - exact)
    # the lattice's own approximation error (tests/test_lattice_accuracy.py's bounds at F = 4)
    assert err.max() <= 0.12 * 2.0 and np.sqrt(np.mean(err**2)) <= 0.025 * 2.0


def _with_lists(lat: Lattice) -> tuple[tf.Tensor, ...]:
    """The same lattice's tensors with the CSR splat lists added (built here with NumPy: entries
    of each point in entry order, as the core's BuildSplatCsr writes them)."""
    t = lat.tensors
    index = t.vertex_index.numpy().reshape(-1)
    weight = t.vertex_weight.numpy().reshape(-1)
    m = int(lat.num_points)
    order = np.argsort(index, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(index, minlength=m))]).astype(np.int32)
    voxels = (order // t.vertex_index.shape[-1]).astype(np.int32)
    return (
        t.vertex_index,
        t.vertex_weight,
        t.blur_neighbours,
        tf.constant(offsets),
        tf.constant(voxels),
        tf.constant(weight[order]),
    )


@pytest.mark.parametrize("channels", [1, 2, 5, 7])
@pytest.mark.parametrize("reverse", [False, True])
def test_without_lists_equals_with_lists(channels, reverse) -> None:
    f = smooth_features(seed=channels)  # 20,160 voxels: 2 parts
    lat = Lattice(f, backend="compiled")
    rng = np.random.default_rng(channels)
    values = rng.normal(size=(1, *f.shape[1:-1], channels)).astype(np.float32)
    ops = _library.load()
    without = ops.crf3d_lattice_filter(values, lat.features, *lat.tensors, reverse=reverse)
    with_lists = ops.crf3d_lattice_filter(values, lat.features, *_with_lists(lat), reverse=reverse)
    scale = np.abs(with_lists.numpy()).max()
    assert np.abs(without.numpy() - with_lists.numpy()).max() <= 1e-5 * scale


def test_without_lists_matches_the_tf_path_with_gradients() -> None:
    f = tf.constant(smooth_features((16, 18, 20), seed=3))
    rng = np.random.default_rng(3)
    values = tf.constant(rng.normal(size=(1, 16, 18, 20, 2)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(1, 16, 18, 20, 2)).astype(np.float32))
    results = {}
    for backend in ("compiled", "tf"):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([f, values])
            lat = Lattice(f, backend=backend)
            loss = tf.reduce_sum(lat.filter(values) * weights)
        results[backend] = [loss.numpy(), *(g.numpy() for g in tape.gradient(loss, [values, f]))]
    assert Lattice(f, backend="compiled").tensors.splat_offsets.shape == (0,)
    for ours, theirs in zip(results["compiled"], results["tf"], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


def test_corrupted_tensors_without_lists() -> None:
    f = smooth_features((16, 18, 20))
    lat = Lattice(f, backend="compiled")
    t = lat.tensors
    values = np.ones((1, 16, 18, 20, 2), np.float32)
    ops = _library.load()
    with pytest.raises(InvalidArg, match="must be empty too"):
        ops.crf3d_lattice_filter(
            values, lat.features, *t[:4], tf.zeros([3], tf.int32), t.splat_weights
        )
    bad_index = tf.tensor_scatter_nd_update(
        t.vertex_index, [[0, 3, 4, 5, 1]], [tf.shape(t.blur_neighbours)[1] + 5]
    )
    with pytest.raises(InvalidArg, match="out of range"):
        ops.crf3d_lattice_filter(values, lat.features, bad_index, *t[1:])
    negative = tf.tensor_scatter_nd_update(t.vertex_index, [[0, 1, 1, 1, 0]], [-1])
    with pytest.raises(InvalidArg, match="out of range"):
        ops.crf3d_lattice_filter(values, lat.features, negative, *t[1:])
