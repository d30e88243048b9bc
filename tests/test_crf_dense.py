"""dense_crf (NumPy post-processing) against float64 references and, when installed, pydensecrf."""

from __future__ import annotations

import numpy as np
import pytest
from crf_reference import mean_field_reference, pydensecrf_reference

from crf_rnn_3d.crf.dense_crf import dense_crf


def phantom(shape, classes, seed, noise=1.5):
    """A ball-in-ball label map, an image that shows it with noise, and noisy probabilities."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) - s / 2 for s in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    labels = np.zeros(shape, dtype=np.int64)
    for k in range(1, classes):
        labels[radius < min(shape) * (0.45 - 0.15 * (k - 1))] = k
    image = (40.0 * labels + rng.normal(0.0, 15.0, shape)).astype(np.float32)
    logits = 2.0 * np.eye(classes)[labels] + rng.normal(0.0, noise, (*shape, classes))
    probs = np.exp(logits)
    return labels, image, (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


# theta_gamma = 2 voxels: the separable kernel's 4-sigma radius covers every axis below, so the
# exact path is exact.
SETTINGS = dict(
    theta_alpha=4.0, theta_beta=25.0, theta_gamma=2.0, bilateral_weight=4.0, spatial_weight=2.0
)


@pytest.mark.parametrize("shape,spacing", [((9, 6), (1.0, 1.5)), ((4, 5, 6), (2.0, 1.0, 1.0))])
def test_default_mode_matches_float64_mean_field(shape, spacing) -> None:
    _, image, probs = phantom(shape, 3, seed=1)
    out = dense_crf(probs, image, spacing, num_iterations=4, exact=True, **SETTINGS)
    unaries = np.log(np.clip(probs.astype(np.float64), 1e-5, None))[None]
    logits = mean_field_reference(
        unaries,
        image[None, ..., None],
        spacing,
        SETTINGS["theta_alpha"],
        (SETTINGS["theta_beta"],),
        SETTINGS["theta_gamma"],
        np.full(3, SETTINGS["bilateral_weight"]),
        np.full(3, SETTINGS["spatial_weight"]),
        1.0 - np.eye(3),
        4,
        "mean",
    )[0]
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    assert out.dtype == np.float32 and out.shape == probs.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)  # float32 arithmetic
    assert np.abs(expected - probs).max() > 0.1


def test_any_layout_and_dtype() -> None:
    """float64, Fortran-ordered and strided inputs give what contiguous float32 ones give (the
    arrays handed to TensorFlow are copied into aligned buffers of their own)."""
    _, image, probs = phantom((12, 10, 9), 3, seed=4)
    expected = dense_crf(probs, image, (2.0, 1.0, 1.0), **SETTINGS)
    wide_probs = np.zeros((12, 10, 18, 3))
    wide_probs[:, :, ::2] = probs
    out = dense_crf(
        wide_probs[:, :, ::2],
        np.asfortranarray(image.astype(np.float64)),
        (2.0, 1.0, 1.0),
        **SETTINGS,
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert np.abs(expected - probs).max() > 0.1
    assert np.allclose(out.sum(-1), 1.0, atol=1e-5)


def test_pydensecrf_mode_matches_literal_pydensecrf_update() -> None:
    """Our Potts mu = w (1 - I) with symmetric normalisation against pydensecrf's own form
    (-w I, energies subtracted), written out independently: they must agree."""
    _, image, probs = phantom((7, 6, 5), 2, seed=2)
    probs[0, 0, 0] = [0.0, 1.0]  # exercises the clip at 1e-5
    out = dense_crf(probs, image, mode="pydensecrf", num_iterations=5, exact=True, **SETTINGS)
    expected = pydensecrf_reference(
        probs,
        image[..., None],
        SETTINGS["theta_alpha"],
        (SETTINGS["theta_beta"],),
        SETTINGS["theta_gamma"],
        SETTINGS["bilateral_weight"],
        SETTINGS["spatial_weight"],
        5,
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
    assert np.abs(expected - probs).max() > 0.1


def test_pydensecrf_mode_gives_pydensecrfs_labels() -> None:
    """With pydensecrf2 installed (make .venv/.installed-bench), the same labels on >= 99.5% of
    the voxels of a noisy 3D phantom (both sides use a permutohedral lattice; ours is not
    theirs, so a few boundary voxels may differ)."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    utils = pytest.importorskip("pydensecrf.utils")
    shape, classes = (16, 24, 24), 3
    _, image, probs = phantom(shape, classes, seed=3)
    d = dcrf.DenseCRF(int(np.prod(shape)), classes)
    d.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(np.moveaxis(probs, -1, 0))))
    d.addPairwiseEnergy(
        utils.create_pairwise_gaussian((SETTINGS["theta_gamma"],) * 3, shape),
        compat=SETTINGS["spatial_weight"],
    )
    d.addPairwiseEnergy(
        utils.create_pairwise_bilateral(
            (SETTINGS["theta_alpha"],) * 3, (SETTINGS["theta_beta"],), image, chdim=-1
        ),
        compat=SETTINGS["bilateral_weight"],
    )
    theirs = np.array(d.inference(5)).reshape((classes, *shape)).argmax(0)
    ours = dense_crf(probs, image, mode="pydensecrf", num_iterations=5, **SETTINGS).argmax(-1)
    assert np.mean(theirs == ours) >= 0.995
    # and the CRF did change the labels (the check is not trivially met)
    assert np.mean(theirs == probs.argmax(-1)) < 0.97


@pytest.mark.parametrize(
    "probs_shape,image_shape,kwargs,message",
    [
        ((5, 4, 1), (5, 4), {}, r"K >= 2 classes .* got \(5, 4, 1\)"),
        ((5,), (5,), {}, r"at least 2 axes\); got \(5,\)"),
        ((5, 4, 2), (5, 3), {}, r"image must have shape \(5, 4\) or .*got \(5, 3\)"),
        ((5, 4, 2), (5, 4), {"spacing": (1.0,)}, r"spacing must have one entry per spatial axis"),
        ((5, 4, 2), (5, 4), {"spacing": (1.0, -1.0)}, r"spacing\[1\] must be a finite number > 0"),
        ((5, 4, 2), (5, 4, 2), {"theta_beta": [1, 2, 3]}, r"one per image channel \(2\); got 3"),
        ((5, 4, 2), (5, 4), {"theta_alpha": 0}, "theta_alpha must be a finite number > 0"),
        ((5, 4, 2), (5, 4), {"num_iterations": 0}, "num_iterations must be an integer >= 1"),
        ((5, 4, 2), (5, 4), {"mode": "crf"}, r"mode must be one of \('default', 'pydensecrf'\)"),
        ((5, 4, 2), (5, 4), {"bilateral_weight": np.nan}, "bilateral_weight must be a finite"),
    ],
)
def test_bad_arguments(probs_shape, image_shape, kwargs, message) -> None:
    probs = np.full(probs_shape, 0.5, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        dense_crf(probs, np.zeros(image_shape, np.float32), **kwargs)


def test_bad_values() -> None:
    probs = np.full((4, 4, 2), 0.5, dtype=np.float32)
    image = np.zeros((4, 4), np.float32)
    bad = probs.copy()
    bad[1, 1, 0] = 1.5
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]; found values in \[0.5, 1.5\]"):
        dense_crf(bad, image)
    bad[1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="probabilities must be finite"):
        dense_crf(bad, image)
    image[2, 2] = np.inf
    with pytest.raises(ValueError, match="image must hold finite numbers"):
        dense_crf(probs, image)


def test_features_written_in_place_equal_the_layers_bit_for_bit() -> None:
    """dense_crf's compiled path writes the bilateral features into one buffer itself; they
    must be the very floats functional.bilateral_features computes (so the lattice is the
    layer's), and the result the one mean_field_inference gives from the image."""
    import tensorflow as tf

    from crf_rnn_3d.crf import functional as mf
    from crf_rnn_3d.crf.dense_crf import _bilateral_features

    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 30.0, (7, 9, 11, 2))  # float64, as users often pass it
    spacing, betas = (2.5, 0.7, 1.3), (17.0, 0.3)
    ours = _bilateral_features(image.astype(np.float32), spacing, 4.2, betas)
    layer = mf.bilateral_features(tf.constant(image[None], tf.float32), spacing, 4.2, betas)
    np.testing.assert_array_equal(ours, layer.numpy())

    _, img, probs = phantom((7, 9, 11), 3, seed=3)
    settings = dict(SETTINGS, theta_beta=[25.0])
    out = dense_crf(probs, img, spacing, num_iterations=3, backend="compiled", **settings)
    potts = 1.0 - np.eye(3, dtype=np.float32)
    _, expected = mf.mean_field_inference(
        tf.constant(np.log(np.clip(probs, 1e-5, None))[None]),
        tf.constant(img[None, ..., None]),
        spacing=spacing,
        theta_alpha=SETTINGS["theta_alpha"],
        theta_beta=[25.0],
        theta_gamma=SETTINGS["theta_gamma"],
        bilateral_weight=tf.fill([3], SETTINGS["bilateral_weight"]),
        spatial_weight=tf.fill([3], SETTINGS["spatial_weight"]),
        compatibility=tf.constant(potts),
        num_iterations=3,
        return_logits=False,
    )
    np.testing.assert_array_equal(out, expected.numpy()[0])


def test_image_beyond_float32_is_an_error() -> None:
    _, image, probs = phantom((4, 5, 6), 2, seed=0)
    huge = image.astype(np.float64)
    huge[1, 2, 3] = 1e300  # finite in float64, Inf in float32
    with pytest.raises(ValueError, match="float32"):
        dense_crf(probs, huge, backend="compiled")
