"""Kernel widths predicted per case (variant vnet_crf_theta_per_case, issue 15).

- mean_field with one set of widths per batch item: each item against the float64 NumPy
  brute force (tests/crf_reference.py) with that item's widths, and the lattice path against
  separate calls per item;
- CrfRnn's per-case ``theta`` input: its checks;
- the widths' head (models.vnet.CaseTheta): the sigmoid-to-log-bounds map by hand, bounds held
  for extreme head outputs, exactly the configured widths at initialisation, where the variant's
  output equals vnet_crf's;
- the gradient reaches the head: central finite differences of the whole model's loss in
  float64 (exact bilateral filter), and a float32 lattice check against it;
- run identity, config errors, ``.keras`` round trip, TensorBoard widths, and a train +
  evaluate of the variant through the command line on the smoke phantoms.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from crf_reference import mean_field_reference
from experiments_fixtures import compose_config, smoke_config

from crf_rnn_3d.crf import CrfRnn
from crf_rnn_3d.crf import functional as mf
from crf_rnn_3d.datasets.errors import DataError
from crf_rnn_3d.experiments import common
from crf_rnn_3d.models.vnet import CASE_THETA_DEFAULTS, CaseTheta, build_vnet, case_theta_scalars

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "vnet_crf_theta_per_case"
TINY = {
    "levels": 2,
    "base_channels": 2,
    "convs_per_level": [1, 1],
    "bottom_convs": 1,
    "kernel_size": 3,
    "activation": "relu",
    "dropout": 0.0,
}
SPACING = (2.0, 1.5, 1.5)
CRF = {
    "theta_alpha": 4.0,
    "theta_beta": 0.8,
    "theta_gamma": 2.0,
    "num_iterations": 2,
    "bilateral_weight_init": 1.5,
    "spatial_weight_init": 0.7,
    "compatibility_init": 1.2,
}
CASE = {"theta_per_case": True, "theta_case_factor": 2.0, "theta_case_hidden": 4}


# ------------------------------------------------------------------ mean field, per item


def _batch(spatial, channels, classes, batch, seed):
    rng = np.random.default_rng(seed)
    unaries = 1.5 * rng.normal(size=(batch, *spatial, classes))
    image = rng.normal(size=(batch, *spatial, channels))
    return unaries, image


def _weights(classes):
    w1 = np.linspace(0.8, 1.6, classes)
    w2 = np.linspace(1.1, 0.5, classes)
    mu = 1.3 * (1.0 - np.eye(classes))
    return w1, w2, mu


def test_mean_field_per_item_widths_match_reference_per_item() -> None:
    """float64, exact bilateral filter, separable spatial filter whose radius (from
    theta_gamma_max) covers every axis: each item equals the NumPy brute force with its own
    widths (to 1e-10), and the items' widths really differ in effect."""
    spatial, spacing, channels, classes = (4, 5, 3), (2.0, 1.0, 1.5), 2, 3
    unaries, image = _batch(spatial, channels, classes, batch=3, seed=1)
    alpha = np.array([2.5, 6.0, 3.5])
    beta = np.array([[0.5, 1.5], [2.0, 0.7], [1.0, 1.0]])
    gamma = np.array([1.2, 3.0, 2.2])
    w1, w2, mu = _weights(classes)
    got = mf.mean_field(
        tf.constant(unaries),
        tf.constant(image),
        spacing=spacing,
        theta_alpha=tf.constant(alpha),
        theta_beta=tf.constant(beta),
        theta_gamma=tf.constant(gamma),
        bilateral_weight=tf.constant(w1),
        spatial_weight=tf.constant(w2),
        compatibility=tf.constant(mu),
        num_iterations=3,
        bilateral_filter="exact",
        theta_gamma_max=20.0,
    ).numpy()
    for b in range(3):
        want = mean_field_reference(
            unaries[b : b + 1], image[b : b + 1], spacing, alpha[b], tuple(beta[b]), gamma[b],
            w1, w2, mu, 3,
        )  # fmt: skip
        np.testing.assert_allclose(got[b : b + 1], want, rtol=0, atol=1e-10, err_msg=f"item {b}")
    # not vacuous: item 0 with item 1's widths is another result
    other = mean_field_reference(
        unaries[:1], image[:1], spacing, alpha[1], tuple(beta[1]), gamma[1], w1, w2, mu, 3
    )
    assert np.max(np.abs(other - got[:1])) > 1e-3


@pytest.mark.parametrize(
    ("spatial_filter", "backend"),
    [("separable", "compiled"), ("lattice", "compiled"), ("separable", "tf")],
)
def test_mean_field_per_item_lattice_equals_separate_calls(spatial_filter, backend) -> None:
    """The production path (lattice, float32): a batch with widths per item gives what each
    item gives alone with its widths as plain numbers (float32 rounding); also on the
    TensorFlow-ops backend (what a GPU runs)."""
    spatial, spacing, channels, classes = (6, 7, 5), (1.5, 1.0, 1.0), 1, 2
    unaries, image = _batch(spatial, channels, classes, batch=2, seed=2)
    alpha, beta, gamma = [3.0, 5.0], [[0.6], [1.4]], [1.0, 2.5]
    w1, w2, mu = _weights(classes)
    common_args = dict(
        spacing=spacing,
        bilateral_weight=tf.constant(w1, tf.float32),
        spatial_weight=tf.constant(w2, tf.float32),
        compatibility=tf.constant(mu, tf.float32),
        num_iterations=2,
        spatial_filter=spatial_filter,
        backend=backend,
    )
    batch = mf.mean_field(
        tf.constant(unaries, tf.float32),
        tf.constant(image, tf.float32),
        theta_alpha=tf.constant(alpha),
        theta_beta=tf.constant(beta),
        theta_gamma=tf.constant(gamma),
        theta_gamma_max=3.0,
        **common_args,
    ).numpy()
    for b in range(2):
        alone = mf.mean_field(
            tf.constant(unaries[b : b + 1], tf.float32),
            tf.constant(image[b : b + 1], tf.float32),
            theta_alpha=alpha[b],
            theta_beta=beta[b],
            theta_gamma=tf.constant(gamma[b]),  # a scalar tensor: the same radius (3 mm)
            theta_gamma_max=3.0,
            **common_args,
        ).numpy()
        np.testing.assert_allclose(batch[b : b + 1], alone, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ CrfRnn's theta input


def _theta(batch, channels, alpha=3.0, beta=1.0, gamma=2.0, dtype=tf.float32):
    return {
        "theta_alpha": tf.fill([batch], tf.constant(alpha, dtype)),
        "theta_beta": tf.fill([batch, channels], tf.constant(beta, dtype)),
        "theta_gamma": tf.fill([batch], tf.constant(gamma, dtype)),
    }


def test_crf_rnn_theta_input_equals_fixed_widths() -> None:
    """The same widths given per case or as settings: the same refined logits (float64, exact
    bilateral filter, to 1e-12)."""
    unaries, image = _batch((5, 4, 3), 2, 2, batch=2, seed=3)
    fixed = CrfRnn(3.0, [1.0, 0.5], 2.0, bilateral_filter="exact", dtype="float64")
    per_case = CrfRnn(3.0, 1.0, 1.0, theta_gamma_max=2.0, bilateral_filter="exact",
                      dtype="float64")  # fmt: skip
    theta = _theta(2, 2, dtype=tf.float64)
    theta["theta_beta"] = tf.constant([[1.0, 0.5], [1.0, 0.5]], tf.float64)
    want = fixed([unaries, image]).numpy()
    got = per_case([unaries, image], theta=theta).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_crf_rnn_theta_skips_the_fused_kernel() -> None:
    """fused_inference has no gradient and fixed widths: with per-case theta the composed path
    runs (same logits as a layer without the fused kernel, and a gradient exists)."""
    unaries, image = _batch((6, 5, 4), 1, 2, batch=2, seed=4)
    u, im = tf.constant(unaries, tf.float32), tf.constant(image, tf.float32)
    theta = _theta(2, 1, alpha=2.5, beta=0.7, gamma=1.5)
    fused = CrfRnn(theta_gamma=1.5, fused_inference=True)
    plain = CrfRnn(theta_gamma=1.5)
    with tf.GradientTape() as tape:
        tape.watch(theta["theta_alpha"])
        out = fused([u, im], theta=theta)
    assert tape.gradient(out, theta["theta_alpha"]) is not None
    np.testing.assert_array_equal(out.numpy(), plain([u, im], theta=theta).numpy())


def test_crf_rnn_theta_errors() -> None:
    u, im = tf.zeros((2, 4, 4, 4, 2)), tf.zeros((2, 4, 4, 4, 1))
    layer = CrfRnn(theta_gamma=2.0)
    layer([u, im])
    with pytest.raises(ValueError, match="theta must be a dict with keys"):
        layer([u, im], theta={"theta_alpha": tf.ones([2])})
    bad = {**_theta(2, 1), "theta_alpha": tf.ones([2, 1])}
    with pytest.raises(ValueError, match=r"theta\['theta_alpha'\] must have shape \[batch\]"):
        layer([u, im], theta=bad)
    bad = {**_theta(2, 1), "theta_beta": tf.ones([2, 3])}
    with pytest.raises(ValueError, match="one width per image channel"):
        layer([u, im], theta=bad)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one entry per batch item"):
        layer([u, im], theta=_theta(3, 1))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"theta_beta'\] must be finite"):
        layer([u, im], theta=_theta(2, 1, beta=-1.0))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"theta_alpha'\] must be finite"):
        layer([u, im], theta=_theta(2, 1, alpha=float("nan")))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"<= theta_gamma_max \(4.0 mm\)"):
        layer([u, im], theta=_theta(2, 1, gamma=4.5))  # default max: 2 x theta_gamma
    learnt = CrfRnn(learn_theta=True)
    learnt([u, im])
    with pytest.raises(ValueError, match="exclude each other"):
        learnt([u, im], theta=_theta(2, 1))


# ------------------------------------------------------------------------ the widths' head


def test_head_map_by_hand_and_bounds_for_extreme_outputs() -> None:
    """w = w0 * f^(2 sigmoid(z) - 1): z = 0 gives w0 exactly, z = log 3 (sigmoid 3/4) gives
    w0 * sqrt(f); outputs of any size stay within [w0 / f, w0 * f] and reach them."""
    head = CaseTheta(10.0, [1.0, 0.25], 3.0, factor=2.0, hidden=3)
    w0 = np.array([10.0, 1.0, 0.25, 3.0])
    z = tf.constant([[0.0] * 4, [math.log(3.0)] * 4], tf.float32)
    got = head.widths(z).numpy()
    np.testing.assert_array_equal(got[0], w0.astype(np.float32))
    np.testing.assert_allclose(got[1], w0 * math.sqrt(2.0), rtol=2e-6)
    for big in (20.0, 50.0, 1e4, 1e30):
        for sign in (1.0, -1.0):
            widths = head.widths(tf.fill([1, 4], tf.constant(sign * big))).numpy()[0]
            low, high = (w0 / 2.0).astype(np.float32), (w0 * 2.0).astype(np.float32)
            assert np.all(widths >= low) and np.all(widths <= high), (sign * big, widths)
            if big >= 50.0:
                np.testing.assert_allclose(widths, high if sign > 0 else low, rtol=1e-6)
    # the whole layer with huge weights: its outputs stay within the bounds
    features = tf.constant(np.random.default_rng(0).normal(size=(3, 2, 2, 2, 5)), tf.float32)
    head(features)
    for layer in (head.dense_hidden, head.dense_out):
        layer.kernel.assign(1e4 * np.random.default_rng(1).normal(size=layer.kernel.shape))
    out = head(features)
    for key, index in (("theta_alpha", [0]), ("theta_beta", [1, 2]), ("theta_gamma", [3])):
        values = np.asarray(out[key]).reshape(3, -1)
        assert np.all(values >= (w0[index] / 2).astype(np.float32)), (key, values)
        assert np.all(values <= (w0[index] * 2).astype(np.float32)), (key, values)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factor": 1.0}, "factor must be a finite number > 1, got 1.0"),
        ({"hidden": 0}, "hidden must be an integer >= 1, got 0"),
        ({"theta_beta": []}, "theta_beta must be finite widths > 0"),
        ({"theta_alpha": float("inf")}, "theta_alpha must be finite widths > 0"),
    ],
)
def test_head_bad_settings(kwargs, message) -> None:
    settings = {"theta_alpha": 10.0, "theta_beta": [1.0], "theta_gamma": 3.0, **kwargs}
    with pytest.raises(ValueError, match=f"^{message}"):
        CaseTheta(**settings)


def _models(seed: int = 7, precision: str = "float32", crf=None):
    crf = {**CRF, **(crf or {})}
    keras.utils.set_random_seed(seed)
    fixed = build_vnet((8, 8, 8, 1), 2, TINY, crf=crf, spacing=SPACING, precision=precision)
    keras.utils.set_random_seed(seed)
    per_case = build_vnet((8, 8, 8, 1), 2, TINY, crf={**crf, **CASE}, spacing=SPACING,
                          precision=precision)  # fmt: skip
    return fixed, per_case


def _image(batch: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, 8, 8, 8, 1))
    image[:, :, :, 4:] += 2.0  # an edge, so the appearance kernel matters
    return image.astype(np.float32)


def test_variant_starts_where_vnet_crf_starts() -> None:
    """Same seed: the V-Net weights are equal, the head predicts exactly the configured widths
    for every case, and the refined logits equal vnet_crf's (lattice path, float32)."""
    fixed, per_case = _models()
    shared = {w.path: np.asarray(w) for w in fixed.weights}
    extra = {w.path for w in per_case.weights} - set(shared)
    assert extra and all(p.startswith("case_theta/") for p in extra), extra
    for w in per_case.weights:
        if w.path in shared:
            np.testing.assert_array_equal(np.asarray(w), shared[w.path], err_msg=w.path)
    image = _image()
    widths = _widths(per_case, image)
    f32 = np.float32
    np.testing.assert_array_equal(widths["theta_alpha"], [f32(4.0), f32(4.0)])
    np.testing.assert_array_equal(widths["theta_beta"], [[f32(0.8)], [f32(0.8)]])
    np.testing.assert_array_equal(widths["theta_gamma"], [f32(2.0), f32(2.0)])
    assert per_case.get_layer("crf").theta_gamma_max == 4.0  # the head's upper bound
    want, got = fixed(image).numpy(), per_case(image).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _widths(model: keras.Model, image: np.ndarray) -> dict:
    """The widths the model's head predicts for `image` (the head on the deepest features)."""
    deepest = keras.Model(model.input, model.get_layer("bottom_out").output)
    return model.get_layer("case_theta")(deepest(image))


def _randomise_head(model: keras.Model, seed: int, scale: float = 0.5) -> list:
    rng = np.random.default_rng(seed)
    head = model.get_layer("case_theta")
    variables = head.trainable_variables
    for v in variables:
        v.assign(scale * rng.normal(size=v.shape))
    return variables


def _loss(model: keras.Model, image: np.ndarray, target: np.ndarray) -> tf.Tensor:
    logits = model(image, training=True)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(target, logits))


def _tiny_case():
    image = _image(batch=1, seed=4).astype(np.float64)
    target = (np.arange(8)[None, None, None, :] >= 4) * np.ones((1, 8, 8, 8), np.int64)
    return image, target.astype(np.int64)


def test_gradient_reaches_head_float64_finite_differences() -> None:
    """The whole model (tiny V-Net + widths' head + CRF, exact bilateral filter) in float64,
    the head's parameters set to random values: the gradient of the mean cross-entropy with
    respect to every head parameter (51) against central differences (h = 1e-6). Relative
    error |g - fd| / |fd| < 1e-6 asserted; measured 4.9e-8 with |fd| = 2.9e-3 (the difference
    quotient's rounding, ~1e-16 x loss / h, is ~1e-10 per component)."""
    _, model = _models(precision="float64", crf={"bilateral_filter": "exact"})
    variables = _randomise_head(model, seed=11)
    image, target = _tiny_case()
    assert model.output.dtype == "float64"
    with tf.GradientTape() as tape:
        loss = _loss(model, image, target)
    grads = np.concatenate([np.ravel(g.numpy()) for g in tape.gradient(loss, variables)])
    values = [v.numpy() for v in variables]
    compiled = tf.function(lambda: _loss(model, image, target))
    h, numeric = 1e-6, []
    for i, v in enumerate(variables):
        for j in range(values[i].size):
            sides = []
            for step in (h, -h):
                moved = values[i].copy().ravel()
                moved[j] += step
                v.assign(moved.reshape(values[i].shape))
                sides.append(float(compiled()))
            v.assign(values[i])
            numeric.append((sides[0] - sides[1]) / (2 * h))
    numeric = np.array(numeric)
    assert np.linalg.norm(numeric) > 1e-4, numeric  # the check is not vacuous
    error = np.linalg.norm(grads - numeric) / np.linalg.norm(numeric)
    assert error < 1e-6, (error, grads, numeric)


def test_gradient_reaches_head_float32_lattice() -> None:
    """The production path (float32, lattice bilateral filter) with the float64 model's weights:
    the head's gradient points the way of the float64 exact one (cosine >= 0.9, measured 0.985;
    the lattice approximates the Gaussian, so not equal), finite and not zero."""
    _, exact_model = _models(precision="float64", crf={"bilateral_filter": "exact"})
    _randomise_head(exact_model, seed=11)
    _, lattice_model = _models(precision="float32")
    values = {w.path: np.asarray(w) for w in exact_model.weights}
    for w in lattice_model.weights:
        w.assign(values[w.path].astype(np.float32))
    image, target = _tiny_case()
    grads = {}
    for name, model, dtype in (("exact", exact_model, np.float64),
                               ("lattice", lattice_model, np.float32)):  # fmt: skip
        variables = model.get_layer("case_theta").trainable_variables
        with tf.GradientTape() as tape:
            loss = _loss(model, image.astype(dtype), target)
        g = tape.gradient(loss, variables)
        grads[name] = np.concatenate([np.ravel(x.numpy()).astype(np.float64) for x in g])
    exact, lattice = grads["exact"], grads["lattice"]
    cosine = exact @ lattice / (np.linalg.norm(exact) * np.linalg.norm(lattice))
    assert np.all(np.isfinite(lattice)) and np.linalg.norm(lattice) > 1e-4, lattice
    assert cosine >= 0.9, (cosine, exact, lattice)


# ------------------------------------------------------------------- config, saving, runs


def test_run_identity_and_keys() -> None:
    """The head's keys are part of the per-case variant's identity only: the other CRF variants
    keep the folders they had before the keys existed."""
    assert common.CASE_THETA_KEYS == tuple(CASE_THETA_DEFAULTS)
    cfg = compose_config(["experiment=promise_cv"])
    assert common.variant_crf(cfg, VARIANT)["theta_per_case"] is True
    fixed = common.run_identity(cfg, 0, "vnet_crf")["crf"]
    assert not set(common.CASE_THETA_KEYS) & set(fixed)
    case = common.run_identity(cfg, 0, VARIANT)["crf"]
    assert {k: case[k] for k in common.CASE_THETA_KEYS} == {
        "theta_per_case": True, "theta_case_factor": 2.0, "theta_case_hidden": 16,
    }  # fmt: skip
    other = compose_config(["experiment=promise_cv", "crf.theta_case_factor=3"])
    assert common.run_dir(other, 0, "vnet_crf") == common.run_dir(cfg, 0, "vnet_crf")
    assert common.run_dir(other, 0, VARIANT) != common.run_dir(cfg, 0, VARIANT)
    for preset in ("smoke", "demo", "brats_holdout"):
        variants = compose_config([f"experiment={preset}"]).variants
        assert variants[VARIANT].label == "V-Net + CRF (theta per case)", preset


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ("crf.learn_theta=true", "crf.learn_theta"),
        ("crf.theta_case_factor=0.5", "crf.theta_case_factor"),
        (
            "variants.vnet_crf_theta_per_case.crf_overrides.theta_case_hidden=0",
            "crf.theta_case_hidden",
        ),
        ("crf.theta_gamma_max=5.0", "crf.theta_gamma_max"),  # below 3 mm x 2
        ("crf.theta_alpha=-1", "crf.theta_alpha"),
    ],
)
def test_bad_variant_settings_name_the_key(tmp_path, override, setting) -> None:
    """model_io.build_model turns the head's refusals into a ConfigError naming the crf key
    (the command line's one line and exit code 2)."""
    from crf_rnn_3d.datasets.errors import ConfigError
    from crf_rnn_3d.experiments.model_io import build_model

    cfg = smoke_config(tmp_path, override)
    with pytest.raises(ConfigError, match=rf"^setting {setting}: "):
        build_model(cfg, VARIANT, (8, 8, 8, 1), SPACING)
    with pytest.raises(ValueError, match="theta_per_case must be true or false"):
        build_vnet((8, 8, 8, 1), 2, TINY, crf={**CRF, "theta_per_case": "yes"}, spacing=SPACING)


def test_keras_file_round_trip(tmp_path) -> None:
    """A trained-looking head (random weights, widths away from the configured ones) survives
    model.save / model_io.load_keras_model: same widths, same logits."""
    from crf_rnn_3d.experiments.model_io import load_keras_model

    _, model = _models()
    _randomise_head(model, seed=3)
    image = _image()
    widths = _widths(model, image)
    assert not np.allclose(widths["theta_alpha"], 4.0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = load_keras_model(path)
    again = _widths(loaded, image)
    for key in widths:
        np.testing.assert_array_equal(again[key], widths[key])
    np.testing.assert_array_equal(loaded(image).numpy(), model(image).numpy())
    assert loaded.get_layer("case_theta").get_config()["hidden"] == 4
    with pytest.raises(DataError, match="no such file"):
        load_keras_model(tmp_path / "none.keras")
    (tmp_path / "bad.keras").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"bad\.keras"):
        load_keras_model(tmp_path / "bad.keras")


def test_training_call_records_batch_mean_for_logging() -> None:
    _, model = _models()
    _randomise_head(model, seed=5)
    image = _image(batch=3)
    widths = _widths(model, image)
    assert case_theta_scalars(model)["crf/case_theta/theta_alpha"] == 4.0  # not trained yet
    model(image, training=False)
    assert case_theta_scalars(model)["crf/case_theta/theta_alpha"] == 4.0  # inference: kept
    model(image, training=True)
    scalars = case_theta_scalars(model)
    assert set(scalars) == {f"crf/case_theta/{k}" for k in
                            ("theta_alpha", "theta_beta_0", "theta_gamma")}  # fmt: skip
    assert scalars["crf/case_theta/theta_alpha"] == pytest.approx(
        float(np.mean(widths["theta_alpha"])), rel=1e-6
    )
    assert scalars["crf/case_theta/theta_beta_0"] == pytest.approx(
        float(np.mean(widths["theta_beta"])), rel=1e-6
    )
    assert case_theta_scalars(_models()[0]) == {}


@pytest.mark.slow
def test_cli_train_and_evaluate_the_variant(tmp_path) -> None:
    """`python -m crf_rnn_3d.experiments.train ... variant=vnet_crf_theta_per_case` on the smoke
    phantoms (3 steps): trains, evaluates (the train command's evaluation), saves model.keras,
    logs the widths' batch means at each step within their bounds; `evaluate` on the command
    line then gives the same Dice. Slow (48 s on the busy 2-core machine: two processes that
    import TensorFlow); the fast suite trains and evaluates the variant in-process in
    tests/test_experiments_smoke.py (experiment=smoke lists it)."""
    from crf_rnn_3d.experiments.model_io import load_keras_model
    from crf_rnn_3d.experiments.prepare import prepare

    overrides = ["train.steps=3", "train.checkpoint_every=3", "train.log_every=1",
                 "train.image_every=10", "fold=0", f"variant={VARIANT}"]  # fmt: skip
    cfg = smoke_config(tmp_path, *overrides)
    prepare(cfg)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    paths = [f"data.root={tmp_path}/raw", f"data.processed={tmp_path}/processed",
             f"runs_dir={tmp_path}/runs", f"reports_dir={tmp_path}/results", "progress=false",
             f"hydra.run.dir={tmp_path}/hydra"]  # fmt: skip
    for stage in ("train", "evaluate"):
        proc = subprocess.run(
            [sys.executable, "-m", f"crf_rnn_3d.experiments.{stage}", "experiment=smoke",
             *paths, *overrides],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        if stage == "train":
            run = common.run_dir(cfg, 0, VARIANT)
            first = json.loads((run / "evaluation.json").read_text())
    second = json.loads((run / "evaluation.json").read_text())
    assert first["variant"] == VARIANT and first["dice"] == second["dice"]
    assert len(first["dice"]) == len(common.fold_cases(cfg, 0)["val"])
    state = json.loads((run / "state.json").read_text())
    assert state["complete"] and state["steps_done"] == 3
    model = load_keras_model(run / "model.keras")
    head = model.get_layer("case_theta")
    low, high = head.bounds()
    names = ["theta_alpha", "theta_beta_0", "theta_gamma"]
    logged: dict[str, dict[int, float]] = {n: {} for n in names}
    for events in (run / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                if value.tag.startswith("crf/case_theta/"):
                    name = value.tag.rsplit("/", 1)[1]
                    logged[name][event.step] = float(tf.make_ndarray(value.tensor))
    for i, name in enumerate(names):
        assert sorted(logged[name]) == [1, 2, 3], logged
        assert all(low[i] * (1 - 1e-6) <= v <= high[i] * (1 + 1e-6)
                   for v in logged[name].values()), (name, logged[name])  # fmt: skip
