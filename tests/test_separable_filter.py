"""The compiled separable filter (src/lattice_op/separable.py) against scipy.ndimage in float64:
its output in float32 and float64, and its gradients with respect to the values and the taps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from crf_rnn_3d.lattice_op import gaussian_taps, separable_filter


def scipy_reference(values: np.ndarray, taps: list[np.ndarray]) -> np.ndarray:
    """Correlation with zero outside the grid, one spatial axis at a time, in float64."""
    out = values.astype(np.float64)
    for axis, axis_taps in enumerate(taps):
        out = ndimage.correlate1d(
            out, np.asarray(axis_taps, np.float64), axis=axis + 1, mode="constant", cval=0.0
        )
    return out


@pytest.mark.parametrize(
    "shape,radii",
    [
        ((2, 7, 1), (4,)),  # 1-D, two batch items
        ((1, 5, 6, 3), (4, 1)),
        ((2, 4, 9, 11, 2), (1, 4, 5)),  # radius beyond an axis (4 voxels, radius 1 fits)
        ((1, 3, 4, 5, 6, 2), (1, 0, 2, 9)),  # 4-D; an axis of a single tap; radius > length
        ((1, 6, 20, 70, 1), (2, 3, 7)),  # rows longer than 64 floats: the strip path
        ((1, 30, 3, 37, 9), (6, 1, 11)),  # strips whose width is no multiple of 16 or 256
    ],
)
def test_matches_scipy_correlate(shape, radii) -> None:
    rng = np.random.default_rng(sum(shape))
    values = rng.normal(size=shape).astype(np.float32)
    # asymmetric taps: a correlation, not a convolution, and the axes must not be mixed up
    taps = [rng.normal(size=2 * r + 1) for r in radii]
    out = separable_filter(tf.constant(values), taps).numpy()
    expected = scipy_reference(values, taps)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6 * scale * sum(radii) + 1e-6)
    assert out.dtype == np.float32 and out.shape == shape


@pytest.mark.parametrize(
    "shape,radii", [((2, 7, 1), (4,)), ((1, 5, 6, 3), (4, 1)), ((1, 6, 20, 70, 1), (2, 3, 7))]
)
def test_float64_matches_scipy_correlate(shape, radii) -> None:
    """The float64 kernel: the same sums to double precision."""
    rng = np.random.default_rng(7 + sum(shape))
    values = rng.normal(size=shape)
    taps = [rng.normal(size=2 * r + 1) for r in radii]
    out = separable_filter(tf.constant(values, tf.float64), taps).numpy()
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, scipy_reference(values, taps), rtol=0, atol=1e-12)


def scipy_taps_gradient(values: np.ndarray, grad: np.ndarray, taps: list[np.ndarray]) -> list:
    """d sum(grad * filter(values)) / d taps_a[k]: the filter is linear in each axis's taps, so
    the derivative is the output with axis a's taps replaced by the unit vector e_k."""
    out = []
    for axis, axis_taps in enumerate(taps):
        grads = []
        for k in range(len(axis_taps)):
            unit = np.zeros(len(axis_taps))
            unit[k] = 1.0
            swapped = [unit if a == axis else t for a, t in enumerate(taps)]
            grads.append(float(np.sum(grad * scipy_reference(values, swapped))))
        out.append(np.asarray(grads))
    return out


def _taps_gradient(values, grad, taps, dtype):
    tensors = [tf.constant(t, dtype) for t in taps]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = tf.reduce_sum(
            tf.constant(grad, dtype) * separable_filter(tf.constant(values, dtype), tensors)
        )
    return [g.numpy() for g in tape.gradient(loss, tensors)]


@pytest.mark.parametrize(
    "shape,radii",
    [
        ((2, 9, 2), (3,)),
        ((1, 6, 4, 3), (2, 5)),  # a radius beyond an axis: its outer taps never meet a voxel
        ((2, 4, 5, 6, 2), (1, 0, 2)),  # an axis of a single tap
        ((1, 3, 4, 90, 1), (1, 2, 6)),  # rows longer than a strip: the per-row path
    ],
)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_taps_gradient_matches_scipy(shape, radii, dtype) -> None:
    rng = np.random.default_rng(sum(shape) + sum(radii))
    values = rng.normal(size=shape)
    grad = rng.normal(size=shape)
    taps = [rng.normal(size=2 * r + 1) for r in radii]
    if dtype == tf.float32:  # the reference on the float32-rounded inputs
        values, grad = values.astype(np.float32), grad.astype(np.float32)
        taps = [t.astype(np.float32) for t in taps]
    got = _taps_gradient(values, grad, taps, dtype)
    expected = scipy_taps_gradient(
        values.astype(np.float64), grad.astype(np.float64), [t.astype(np.float64) for t in taps]
    )
    scale = max(np.abs(e).max() for e in expected)
    atol = 1e-12 * scale if dtype == tf.float64 else 2e-6 * scale * sum(radii) + 1e-6
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype.as_numpy_dtype
        np.testing.assert_allclose(g, e, rtol=0, atol=atol)
    if radii == (2, 5):  # axis 1 has 4 voxels: its taps at offsets +-4, +-5 never meet one
        assert not np.any(got[1][[0, 1, -2, -1]]) and np.all(got[1][2:-2] != 0.0)


def test_float64_gradients_against_numerical() -> None:
    """tf.test.compute_gradient in float64 with respect to the values and every axis's taps."""
    rng = np.random.default_rng(11)
    values = tf.constant(rng.normal(size=(2, 5, 6, 2)))
    taps = [tf.constant(rng.normal(size=5)), tf.constant(rng.normal(size=3))]
    theoretical, numerical = tf.test.compute_gradient(
        lambda v, t0, t1: separable_filter(v, [t0, t1]), [values, *taps], delta=1e-6
    )
    for t, n in zip(theoretical, numerical, strict=True):
        np.testing.assert_allclose(t, n, rtol=0, atol=1e-8)


def test_taps_gradient_of_the_adjoint() -> None:
    """The values' gradient is the adjoint op, C^T g; its own gradient with respect to the taps
    (a second derivative) is that of sum(h * C^T g) = sum(g * C h)."""
    rng = np.random.default_rng(12)
    shape = (1, 6, 5, 2)
    x, g, h = (rng.normal(size=shape) for _ in range(3))
    taps_np = [rng.normal(size=5), rng.normal(size=3)]
    taps = [tf.constant(t) for t in taps_np]
    with tf.GradientTape() as outer:
        outer.watch(taps)
        xt = tf.constant(x)
        with tf.GradientTape() as inner:
            inner.watch(xt)
            loss = tf.reduce_sum(tf.constant(g) * separable_filter(xt, taps))
        adjoint = inner.gradient(loss, xt)
        second = tf.reduce_sum(tf.constant(h) * adjoint)
    got = outer.gradient(second, taps)
    expected = scipy_taps_gradient(h, g, taps_np)
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.numpy(), e, rtol=0, atol=1e-12)


def test_gaussian_matches_dense_gaussian_sum() -> None:
    """With Gaussian taps whose radius covers each axis, the filter is the exact Gaussian sum
    over the voxels inside the grid (hand-built from pairwise distances)."""
    shape, sigmas = (5, 7, 6), (1.0, 2.5, 1.5)
    rng = np.random.default_rng(0)
    values = rng.uniform(size=(1, *shape, 2)).astype(np.float32)
    taps = [gaussian_taps(s, 10.0, n) for s, n in zip(sigmas, shape, strict=True)]
    assert [len(t) for t in taps] == [2 * n - 1 for n in shape]  # capped at length - 1
    out = separable_filter(tf.constant(values), taps).numpy()[0].reshape(-1, 2)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    d2 = (((grid[:, None, :] - grid[None, :, :]) / np.asarray(sigmas)) ** 2).sum(-1)
    expected = np.exp(-0.5 * d2) @ values[0].reshape(-1, 2).astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=0)


def test_gradient_is_the_adjoint() -> None:
    """Asymmetric taps: the adjoint must reverse each axis's taps."""
    rng = np.random.default_rng(1)
    values = tf.constant(rng.normal(size=(2, 5, 6, 2)).astype(np.float32))
    taps = [[0.1, 0.5, 1.0, 0.2, 0.3], [0.4, 1.0, 0.7]]
    theoretical, numerical = tf.test.compute_gradient(
        lambda v: separable_filter(v, taps), [values], delta=1e-2
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=0, atol=1e-3)
    # and exactly: <y, A x> = <A^T y, x>
    x = rng.normal(size=(1, 5, 6, 1)).astype(np.float32)
    y = rng.normal(size=(1, 5, 6, 1)).astype(np.float32)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        inner = tf.reduce_sum(tf.constant(y) * separable_filter(xt, taps))
    adjoint_y = tape.gradient(inner, xt).numpy()
    ax = scipy_reference(x, [np.asarray(t) for t in taps])
    assert abs(float(np.sum(y * ax)) - float(np.sum(adjoint_y * x))) < 1e-4


def test_gaussian_taps_values_and_radius() -> None:
    taps = gaussian_taps(2.0, 4.0)
    assert len(taps) == 17 and taps[8] == 1.0
    assert taps[0] == pytest.approx(math.exp(-8.0)) and taps[9] == pytest.approx(math.exp(-0.125))
    assert len(gaussian_taps(2.0, 4.0, length=3)) == 5
    assert gaussian_taps(2.0, 4.0, length=1) == [1.0]
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        gaussian_taps(0.0, 4.0)
    with pytest.raises(ValueError, match="truncate must be a finite number > 0"):
        gaussian_taps(1.0, float("nan"))


def test_bad_arguments() -> None:
    values = tf.zeros([1, 4, 4, 1])
    with pytest.raises(ValueError, match="axis 1 has 2 taps; an odd number"):
        separable_filter(values, [[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="axis 0 has taps that are not finite"):
        separable_filter(values, [[float("inf")], [1.0]])
    with pytest.raises(ValueError, match="have 2 spatial axes but 3 tap sequences"):
        separable_filter(values, [[1.0], [1.0], [1.0]])
    with pytest.raises(ValueError, match="values must be float32 or float64, got float16"):
        separable_filter(tf.zeros([1, 4, 1], tf.float16), [[1.0]])
    with pytest.raises(ValueError, match="axis 0 has 2 taps; an odd number"):
        separable_filter(values, [tf.ones([2]), [1.0]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank >= 3"):
        separable_filter(tf.zeros([4, 1]), [])
    # the kernel's own checks, reached with a shape unknown when the graph is traced
    fn = tf.function(
        lambda v: separable_filter(v, [[1.0], [1.0]]),
        input_signature=[tf.TensorSpec(None, tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="2 radii for 3 spatial axes"):
        fn(tf.zeros([1, 2, 2, 2, 1]))
