"""The fused inference kernel (mean_field_inference, the Crf3dMeanField op of crf/_ops.py):
against the float64 brute-force mean field where the kernels are exact, against the composed TF
mean field on the same lattice, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from crf_reference import mean_field_reference

import crf_rnn_3d.crf.functional as mf
from crf_rnn_3d.crf import _ops
from crf_rnn_3d.lattice_op import Lattice


def settings(classes: int, rng: np.random.Generator, **overrides):
    values = dict(
        spacing=[2.0, 1.0, 0.8],
        theta_alpha=4.0,
        theta_beta=[1.0, 0.7],
        theta_gamma=2.0,
        bilateral_weight=tf.constant(rng.uniform(0.5, 3.0, classes), tf.float32),
        spatial_weight=tf.constant(rng.uniform(0.5, 2.0, classes), tf.float32),
        compatibility=tf.constant(rng.uniform(0.0, 1.5, (classes, classes)), tf.float32),
        num_iterations=4,
    )
    values.update(overrides)
    return values


def inputs(shape, classes, channels, seed, spread=3.0):
    rng = np.random.default_rng(seed)
    unaries = tf.constant((spread * rng.normal(size=(*shape, classes))).astype(np.float32))
    image = tf.constant(rng.normal(size=(*shape, channels)).astype(np.float32))
    return unaries, image, rng


@pytest.mark.parametrize("normalisation", ["mean", "symmetric"])
@pytest.mark.parametrize("classes", [1, 2, 3, 8])
def test_spatial_only_matches_float64_reference(normalisation, classes) -> None:
    """With w1 = 0 only the separable spatial kernel acts, and it is exact here (every axis is
    within its 4-sigma radius): the fused kernel must match the brute-force float64 mean field.
    Two batch items, 3-D, anisotropic spacing. For K = 2 and 3 the kernel filters the first
    K - 1 classes and derives the last one's spatial message from the filtered total; K = 1 and
    K = 8 (the widest padded row) filter every class."""
    unaries, image, rng = inputs((2, 5, 6, 7), classes, 2, seed=classes)
    kw = settings(classes, rng, bilateral_weight=tf.zeros([classes]), num_iterations=3)
    logits, probs = mf.mean_field_inference(unaries, image, normalisation=normalisation, **kw)
    expected = mean_field_reference(
        unaries.numpy().astype(np.float64),
        image.numpy().astype(np.float64),
        tuple(kw["spacing"]),
        kw["theta_alpha"],
        tuple(kw["theta_beta"]),
        kw["theta_gamma"],
        np.zeros(classes),
        kw["spatial_weight"].numpy().astype(np.float64),
        kw["compatibility"].numpy().astype(np.float64),
        3,
        normalisation,
    )
    np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=2e-5)
    if classes > 1:  # (one class: the message moves every logit alike)
        assert np.abs(expected - unaries.numpy()).max() > 0.1  # the CRF did change the logits
    softmax = np.exp(expected - expected.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs.numpy(), softmax, rtol=0, atol=2e-6)


@pytest.mark.parametrize("normalisation", ["mean", "symmetric"])
@pytest.mark.parametrize(
    "shape,spacing", [((2, 12, 14, 9), [2.0, 1.0, 1.0]), ((1, 33, 40), [1.0, 1.3])]
)
def test_matches_composed_mean_field(normalisation, shape, spacing) -> None:
    """Both kernels: the fused kernel against mean_field (TF ops over the same lattice and the
    same separable filter), with unaries spread widely (softmax inputs from -60 to 60)."""
    unaries, image, rng = inputs(shape, 4, 2, seed=len(shape), spread=20.0)
    kw = settings(4, rng, spacing=spacing, theta_gamma=3.0)
    expected = mf.mean_field(unaries, image, normalisation=normalisation, **kw)
    logits, probs = mf.mean_field_inference(unaries, image, normalisation=normalisation, **kw)
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=0, atol=2e-4)
    np.testing.assert_allclose(probs.numpy(), tf.nn.softmax(expected).numpy(), rtol=0, atol=1e-5)
    assert np.abs(expected.numpy() - unaries.numpy()).max() > 1.0


@pytest.mark.parametrize("normalisation", ["mean", "symmetric"])
@pytest.mark.parametrize("classes", [2, 5, 9])
def test_lattice_without_splat_lists(normalisation, classes) -> None:
    """A volume whose lattice has no splat lists (wide widths: few points for many voxels), so
    that the kernel splats and slices inside its own passes over the voxels (in 4 splat parts),
    against the composed TF mean field on the same lattice; K = 2 and 5 take rows padded to 8
    floats (K = 2 filters K - 1 spatial channels), K = 9 the generic path."""
    unaries, image, rng = inputs((1, 24, 40, 40), classes, 2, seed=classes, spread=5.0)
    kw = settings(classes, rng, spacing=[2.0, 1.0, 1.0], theta_alpha=8.0, theta_beta=[3.0, 3.0])
    features = mf.bilateral_features(image, kw["spacing"], kw["theta_alpha"], kw["theta_beta"])
    assert Lattice(features).tensors.splat_offsets.shape == (0,)  # no lists: the fused form
    expected = mf.mean_field(unaries, image, normalisation=normalisation, **kw)
    logits, probs = mf.mean_field_inference(unaries, image, normalisation=normalisation, **kw)
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=0, atol=2e-4)
    np.testing.assert_allclose(probs.numpy(), tf.nn.softmax(expected).numpy(), rtol=0, atol=1e-5)
    assert np.abs(expected.numpy() - unaries.numpy()).max() > 1.0


def test_without_logits() -> None:
    unaries, image, rng = inputs((1, 6, 7, 5), 3, 2, seed=6)
    kw = settings(3, rng)
    logits, probs = mf.mean_field_inference(unaries, image, **kw)
    none, probs_only = mf.mean_field_inference(unaries, image, return_logits=False, **kw)
    assert none is None and logits.shape == unaries.shape
    np.testing.assert_array_equal(probs_only.numpy(), probs.numpy())


def test_one_iteration_and_many_classes() -> None:
    """K = 9 (no fast path) and a single iteration: L = U - mu (w1 A(Q) + w2 G(Q))."""
    unaries, image, rng = inputs((1, 6, 7, 5), 9, 1, seed=3)
    kw = settings(9, rng, theta_beta=[1.0], num_iterations=1)
    expected = mf.mean_field(unaries, image, **kw)
    logits, _ = mf.mean_field_inference(unaries, image, **kw)
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=0, atol=2e-5)


def test_no_gradient() -> None:
    unaries, image, rng = inputs((1, 4, 4), 2, 1, seed=4)
    kw = settings(2, rng, spacing=[1.0, 1.0], theta_beta=[1.0])
    with tf.GradientTape() as tape:
        tape.watch(unaries)
        loss = tf.reduce_sum(mf.mean_field_inference(unaries, image, **kw)[0])
    with pytest.raises(LookupError, match="inference-only and has no gradient"):
        tape.gradient(loss, unaries)


def _op(unaries, lattice, w1, w2, mu, **attrs):
    defaults = dict(
        spatial_taps=[1.0, 1.0], spatial_radii=[0, 0], num_iterations=2, normalisation="mean"
    )
    defaults.update(attrs)
    # the raw op (not fused_mean_field), so that taps and radii can disagree
    taps = tf.constant(defaults.pop("spatial_taps"), tf.float32)
    radii = tf.constant(defaults.pop("spatial_radii"), tf.int32)
    return _ops.load().crf3d_mean_field(
        unaries, *lattice.tensors, w1, w2, mu, taps, radii, **defaults
    )


def test_bad_inputs() -> None:
    unaries = tf.zeros([1, 4, 5, 3])
    lattice = Lattice(tf.random.normal([1, 4, 5, 2]))
    w, mu = tf.ones([3]), tf.ones([3, 3])
    with pytest.raises(tf.errors.InvalidArgumentError, match="must have shape \\[3\\]"):
        _op(unaries, lattice, tf.ones([2]), w, mu)
    with pytest.raises(tf.errors.InvalidArgumentError, match="compatibility must have shape"):
        _op(unaries, lattice, w, w, tf.ones([3, 2]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="do not match the lattice's"):
        _op(tf.zeros([1, 4, 6, 3]), lattice, w, w, mu)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1 radii for 2 spatial axes"):
        _op(unaries, lattice, w, w, mu, spatial_taps=[1.0], spatial_radii=[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="the radii need 4 taps"):
        _op(unaries, lattice, w, w, mu, spatial_taps=[1.0, 1.0], spatial_radii=[1, 0])
    nan_unaries = tf.tensor_scatter_nd_update(unaries, [[0, 2, 3, 1]], [float("nan")])
    with pytest.raises(tf.errors.InvalidArgumentError, match="unaries contain NaN or Inf"):
        _op(nan_unaries, lattice, w, w, mu)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be finite"):
        _op(unaries, lattice, w, w, tf.constant([[0.0, 1.0, 1.0]] * 2 + [[1.0, float("inf"), 0.0]]))
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="num_iterations"):
        _op(unaries, lattice, w, w, mu, num_iterations=0)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        unaries_, image, rng = inputs((1, 4, 4), 2, 1, seed=5)
        mf.mean_field_inference(
            unaries_, image, normalisation="none", **settings(2, rng, spacing=[1.0, 1.0])
        )
