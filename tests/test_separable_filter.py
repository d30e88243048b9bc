"""The compiled separable filter (src/lattice_op/separable.py) against scipy.ndimage in float64."""

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
    with pytest.raises(ValueError, match="values must be float32, got float64"):
        separable_filter(tf.zeros([1, 4, 1], tf.float64), [[1.0]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank >= 3"):
        separable_filter(tf.zeros([4, 1]), [])
    # the kernel's own checks, reached with a shape unknown when the graph is traced
    fn = tf.function(
        lambda v: separable_filter(v, [[1.0], [1.0]]),
        input_signature=[tf.TensorSpec(None, tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="2 radii for 3 spatial axes"):
        fn(tf.zeros([1, 2, 2, 2, 1]))
