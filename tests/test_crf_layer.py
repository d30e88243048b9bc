"""CrfRnn against a float64 NumPy brute-force mean field, its gradients against numerical ones,
the one-lattice-per-forward-pass rule, Keras integration (tf.function, fit, config, .keras) and
every bad input."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from crf_reference import dense_kernels, mean_field_reference

import crf_rnn_3d.crf.functional as mf
from crf_rnn_3d.crf import CrfRnn

# (spatial shape, spacing in mm, image channels, classes, batch)
CASES = [
    ((9,), (0.8,), 1, 2, 2),  # every axis within the spatial kernel's 4-sigma radius: exact
    ((6, 5), (1.0, 1.5), 3, 3, 1),
    ((4, 3, 5), (2.0, 1.0, 0.7), 2, 4, 2),
]


def make_inputs(spatial, channels, classes, batch, seed):
    rng = np.random.default_rng(seed)
    unaries = 2.0 * rng.normal(size=(batch, *spatial, classes))
    image = rng.normal(size=(batch, *spatial, channels))
    return unaries, image


def reference_for(layer: CrfRnn, unaries, image, iterations):
    k = unaries.shape[-1]
    theta_beta = layer.theta_beta * image.shape[-1] if len(layer.theta_beta) == 1 else None
    mu = layer.compatibility.numpy().astype(np.float64) * (1.0 - np.eye(k))
    return mean_field_reference(
        unaries,
        image,
        tuple(layer.spacing or [1.0] * (unaries.ndim - 2)),
        layer.theta_alpha,
        tuple(theta_beta or layer.theta_beta),
        layer.theta_gamma,
        layer.bilateral_weight.numpy().astype(np.float64),
        layer.spatial_weight.numpy().astype(np.float64),
        mu,
        iterations,
        layer.normalisation,
    )


@pytest.mark.parametrize("normalisation", ["mean", "symmetric"])
@pytest.mark.parametrize("case", CASES, ids=["1d", "2d", "3d"])
def test_exact_path_matches_float64_reference(case, normalisation) -> None:
    spatial, spacing, channels, classes, batch = case
    unaries, image = make_inputs(spatial, channels, classes, batch, seed=len(spatial))
    layer = CrfRnn(
        theta_alpha=2.5,
        theta_beta=[0.7 + 0.3 * c for c in range(channels)],
        theta_gamma=1.7,
        spacing=spacing,
        num_iterations=2,
        num_iterations_inference=4,
        bilateral_weight_init=1.3,
        spatial_weight_init=0.6,
        compatibility_init=1.8,
        normalisation=normalisation,
        bilateral_filter="exact",
        dtype="float64",
    )
    layer.build([unaries.shape, image.shape])
    # Per-class weights and a non-symmetric mu with a non-zero stored diagonal (must be ignored).
    rng = np.random.default_rng(42)
    layer.bilateral_weight.assign(rng.uniform(0.5, 2.0, classes))
    layer.spatial_weight.assign(rng.uniform(0.2, 1.0, classes))
    layer.compatibility.assign(rng.uniform(0.5, 2.5, (classes, classes)))
    for training, iterations in ((True, 2), (False, 4), (None, 4)):
        out = layer([unaries, image], training=training).numpy()
        ref = reference_for(layer, unaries, image, iterations)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)
        # the CRF changed the logits by far more than the tolerance
        assert np.abs(ref - unaries).max() > 0.1


def test_separable_spatial_kernel_truncation_bound() -> None:
    """Along a 60-voxel axis with sigma = 2 voxels the kernel is cut at 8 voxels (4 sigma); the
    missing tail mass is erfc(4 / sqrt 2) = 6.3e-5 of the kernel, so the normalised output
    (an average of values in [0, 1]) moves by less than 2 x 6.3e-5 from the exact one."""
    rng = np.random.default_rng(3)
    values = rng.uniform(size=(1, 60, 3, 2))
    spacing, theta = (1.5, 1.0), 3.0
    filt = mf.separable_spatial_filter(
        tf.shape(values), spacing, theta, "mean", tf.float64, values.shape
    )
    out = filt(tf.constant(values)).numpy()[0].reshape(-1, 2)
    _, smooth = dense_kernels(np.zeros((60, 3, 1)), spacing, 1.0, (1.0,), theta)
    exact = (smooth / smooth.sum(1, keepdims=True)) @ values[0].reshape(-1, 2)
    err = np.abs(out - exact).max()
    assert err <= 2 * math.erfc(4 / math.sqrt(2))
    assert err > 0  # the truncation is real: this is not the dense kernel


@pytest.mark.parametrize(
    "spatial,spacing,max_tol,rms_tol",
    [((9, 8), (1.0, 1.3), 0.12, 0.025), ((5, 4, 6), None, 0.4, 0.09)],
)
def test_lattice_path_within_lattice_accuracy(spatial, spacing, max_tol, rms_tol) -> None:
    """The lattice path against the exact reference after one iteration. With one iteration,
    logits = U - mu (w1 A(Q)), and Q = softmax(U) is exact, so the logit error is bounded by
    sum_l' |mu_ll'| w1 |A(Q) error|: the op's stated accuracy for a normalised filter of values
    with range R = 1 (tests/test_lattice_accuracy.py: F <= 3 max 0.12 R, RMS 0.025 R; F = 4
    max 0.40 R, RMS 0.09 R) times (K - 1) mu w1. The spatial kernel is exact in both."""
    classes, mu, w1 = 3, 1.5, 1.2
    unaries, image = make_inputs(spatial, 1, classes, 2, seed=11)
    layer = CrfRnn(
        theta_alpha=2.0,
        theta_beta=0.8,
        theta_gamma=1.5,
        spacing=spacing,
        num_iterations=1,
        bilateral_weight_init=w1,
        spatial_weight_init=0.5,
        compatibility_init=mu,
    )
    out = layer([unaries.astype(np.float32), image.astype(np.float32)]).numpy()
    ref = reference_for(layer, unaries, image, 1)
    err = out - ref
    scale = (classes - 1) * mu * w1
    assert np.abs(err).max() <= max_tol * scale
    assert np.sqrt(np.mean(err**2)) <= rms_tol * scale
    # and the lattice is far closer to the exact CRF than doing nothing is
    assert np.sqrt(np.mean(err**2)) < 0.25 * np.sqrt(np.mean((ref - unaries) ** 2))


class CountingLattice(mf.Lattice):
    builds = 0

    def __init__(self, features, backend="auto", **settings):
        type(self).builds += 1
        super().__init__(features, backend=backend, **settings)


@pytest.mark.parametrize("spatial_filter,expected", [("separable", 1), ("lattice", 2)])
def test_one_lattice_build_per_forward_and_backward(monkeypatch, spatial_filter, expected) -> None:
    monkeypatch.setattr(mf, "Lattice", CountingLattice)
    CountingLattice.builds = 0
    unaries, image = make_inputs((6, 5, 4), 2, 3, 2, seed=5)
    layer = CrfRnn(num_iterations=5, spatial_filter=spatial_filter)
    u = tf.Variable(unaries.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer([u, image.astype(np.float32)]) ** 2)
    grads = tape.gradient(loss, [u, *layer.trainable_variables])
    assert all(g is not None for g in grads)
    assert CountingLattice.builds == expected

    # The same in a graph: one build op (per lattice) for 5 iterations plus the backward pass,
    # while the filter op runs many times.
    @tf.function
    def step(x, img):
        with tf.GradientTape() as t:
            t.watch(x)
            y = tf.reduce_sum(layer([x, img]) ** 2)
        return t.gradient(y, [x, *layer.trainable_variables])

    graph = step.get_concrete_function(
        tf.TensorSpec(unaries.shape, tf.float32), tf.TensorSpec(image.shape, tf.float32)
    ).graph

    def count(graph_def, name):
        total = sum(node.op == name for node in graph_def.node)
        for fn in graph_def.library.function:
            total += sum(node.op == name for node in fn.node_def)
        return total

    graph_def = graph.as_graph_def()
    assert count(graph_def, "Crf3dLatticeBuild") == expected
    assert count(graph_def, "Crf3dLatticeFilter") >= 2 * 5


def _exact_layer(classes, iterations=2, **kwargs):
    return CrfRnn(
        theta_alpha=2.0,
        theta_beta=[0.9, 1.4],
        theta_gamma=1.2,
        spacing=(1.0, 1.5),
        num_iterations=iterations,
        bilateral_weight_init=1.1,
        spatial_weight_init=0.7,
        compatibility_init=1.3,
        bilateral_filter="exact",
        dtype="float64",
        **kwargs,
    )


def test_gradients_float64_exact_path() -> None:
    unaries, image = make_inputs((4, 3), 2, 3, 2, seed=8)
    layer = _exact_layer(3, normalisation="symmetric")
    layer.build([unaries.shape, image.shape])
    layer.compatibility.assign(np.random.default_rng(1).uniform(0.5, 2.0, (3, 3)))
    weights = [tf.constant(v.numpy()) for v in layer.trainable_variables]
    img = tf.constant(image)

    @tf.function
    def of_unaries(u):
        return layer([u, img], training=True)

    theo, num = tf.test.compute_gradient(of_unaries, [tf.constant(unaries)], delta=1e-5)
    np.testing.assert_allclose(theo[0], num[0], rtol=0, atol=1e-8)
    assert np.abs(theo[0]).max() > 0.1

    @tf.function
    def of_weights(w1, w2, mu):
        return layer.stateless_call([w1, w2, mu], [], [tf.constant(unaries), img])[0]

    theo, num = tf.test.compute_gradient(of_weights, weights, delta=1e-5)
    for name, t, n in zip(("w1", "w2", "mu"), theo, num, strict=True):
        np.testing.assert_allclose(t, n, rtol=0, atol=1e-8, err_msg=name)
        assert np.abs(t).max() > 1e-3, name
    # mu's diagonal is held at zero: it has no effect and no gradient
    diagonal = [i * 3 + i for i in range(3)]
    assert np.all(theo[2][:, diagonal] == 0)
    assert np.all(np.abs(num[2][:, diagonal]) < 1e-12)


def test_gradients_lattice_path_float32() -> None:
    """The lattice path in float32: the registered gradient is the exact adjoint of the
    lattice's (linear) filter, so the analytic Jacobian must match central differences up to
    float32 rounding (delta 1e-2 on logits of size ~1; the function is smooth)."""
    unaries, image = make_inputs((5, 4), 1, 2, 1, seed=9)
    layer = CrfRnn(theta_alpha=2.0, theta_gamma=1.5, num_iterations=3)
    img = tf.constant(image.astype(np.float32))
    u0 = tf.constant(unaries.astype(np.float32))
    layer([u0, img])
    theo, num = tf.test.compute_gradient(tf.function(lambda u: layer([u, img])), [u0], delta=1e-2)
    np.testing.assert_allclose(theo[0], num[0], rtol=0, atol=5e-3)
    weights = [tf.constant(v.numpy()) for v in layer.trainable_variables]
    theo, num = tf.test.compute_gradient(
        tf.function(lambda w1, w2, mu: layer.stateless_call([w1, w2, mu], [], [u0, img])[0]),
        weights,
        delta=1e-2,
    )
    for t, n in zip(theo, num, strict=True):
        np.testing.assert_allclose(t, n, rtol=0, atol=5e-3)


def test_tf_function_with_unknown_shapes() -> None:
    layer = CrfRnn(theta_alpha=3.0, spacing=(1.0, 2.0, 1.0), num_iterations=3)
    fn = tf.function(
        lambda u, im: layer([u, im]),
        input_signature=[
            tf.TensorSpec([None, None, None, None, 2], tf.float32),
            tf.TensorSpec([None, None, None, None, 1], tf.float32),
        ],
    )
    for shape in ((1, 4, 5, 6), (2, 3, 7, 5)):
        unaries, image = make_inputs(shape[1:], 1, 2, shape[0], seed=sum(shape))
        u, im = unaries.astype(np.float32), image.astype(np.float32)
        np.testing.assert_allclose(fn(u, im).numpy(), layer([u, im]).numpy(), atol=1e-5)
    unaries, image = make_inputs((4, 5, 6), 1, 2, 1, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="same batch and spatial shape"):
        fn(unaries.astype(np.float32), image[:, :3].astype(np.float32))


def _model(spatial, channels, classes, **kwargs):
    u_in = keras.Input(shape=(*spatial, classes), name="unaries")
    im_in = keras.Input(shape=(*spatial, channels), name="image")
    out = CrfRnn(**kwargs)([u_in, im_in])
    return keras.Model([u_in, im_in], out)


def test_model_fit_learns_weights() -> None:
    rng = np.random.default_rng(12)
    spatial = (8, 8)
    target = np.zeros((4, *spatial), dtype=np.int64)
    target[:, :, 4:] = 1
    image = (target[..., None] + 0.1 * rng.normal(size=(4, *spatial, 1))).astype(np.float32)
    noisy = np.eye(2)[target] * 2.0 - 1.0 + 1.2 * rng.normal(size=(4, *spatial, 2))
    model = _model(spatial, 1, 2, theta_alpha=3.0, theta_beta=0.3, num_iterations=3)
    model.compile(
        optimizer=keras.optimizers.Adam(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [v.numpy().copy() for v in model.trainable_variables]
    history = model.fit([noisy.astype(np.float32), image], target, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]
    after = model.trainable_variables
    assert all(np.abs(a.numpy() - b).max() > 1e-3 for a, b in zip(after, before, strict=True))
    # the diagonal of mu never matters, but the off-diagonal entries were trained
    mu = after[2].numpy()
    assert abs(mu[0, 1] - 1.0) > 1e-3


def test_get_config_round_trip() -> None:
    layer = CrfRnn(
        theta_alpha=4.0,
        theta_beta=[0.5, 2.0],
        theta_gamma=2.0,
        spacing=[1.0, 0.5],
        num_iterations=2,
        num_iterations_inference=7,
        bilateral_weight_init=2.0,
        spatial_weight_init=0.3,
        compatibility_init=0.9,
        normalisation="symmetric",
        spatial_filter="lattice",
        name="crf",
    )
    config = layer.get_config()
    clone = CrfRnn.from_config(config)
    assert clone.get_config() == config
    expected = {
        "theta_alpha": 4.0,
        "theta_beta": [0.5, 2.0],
        "theta_gamma": 2.0,
        "spacing": [1.0, 0.5],
        "num_iterations": 2,
        "num_iterations_inference": 7,
        "bilateral_weight_init": 2.0,
        "spatial_weight_init": 0.3,
        "compatibility_init": 0.9,
        "normalisation": "symmetric",
        "bilateral_filter": "lattice",
        "spatial_filter": "lattice",
        "name": "crf",
    }
    assert {k: config[k] for k in expected} == expected


def test_save_and_load_keras_file(tmp_path) -> None:
    spatial = (5, 6, 4)
    unaries, image = make_inputs(spatial, 2, 3, 2, seed=21)
    u, im = unaries.astype(np.float32), image.astype(np.float32)
    model = _model(spatial, 2, 3, theta_beta=[0.5, 1.5], spacing=(2.0, 1.0, 1.0), num_iterations=2)
    layer = model.layers[-1]
    layer.compatibility.assign(np.random.default_rng(0).uniform(size=(3, 3)))
    layer.bilateral_weight.assign([0.5, 1.5, 2.5])
    expected = model.predict([u, im], verbose=0)
    path = tmp_path / "crf.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[-1], CrfRnn)
    np.testing.assert_array_equal(loaded.predict([u, im], verbose=0), expected)
    np.testing.assert_array_equal(loaded.layers[-1].bilateral_weight.numpy(), [0.5, 1.5, 2.5])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"theta_alpha": 0.0}, "theta_alpha must be a finite number > 0, got 0.0"),
        ({"theta_alpha": -2}, "theta_alpha must be a finite number > 0, got -2"),
        ({"theta_gamma": float("nan")}, "theta_gamma must be a finite number > 0"),
        ({"theta_gamma": "wide"}, "theta_gamma must be a positive number, got 'wide'"),
        ({"theta_beta": [1.0, -0.5]}, r"theta_beta\[1\] must be a finite number > 0, got -0.5"),
        ({"theta_beta": []}, "theta_beta must hold at least one positive number"),
        ({"spacing": [1.0, 0.0]}, r"spacing\[1\] must be a finite number > 0, got 0.0"),
        ({"num_iterations": 0}, "num_iterations must be an integer >= 1, got 0"),
        ({"num_iterations_inference": 2.5}, "num_iterations_inference must be an integer"),
        ({"normalisation": "none"}, r"normalisation must be one of \('mean', 'symmetric'\)"),
        ({"bilateral_filter": "brute"}, "bilateral_filter must be one of"),
        ({"spatial_filter": "fft"}, "spatial_filter must be one of"),
        ({"bilateral_weight_init": float("inf")}, "bilateral_weight_init must be a finite"),
    ],
)
def test_bad_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        CrfRnn(**kwargs)


@pytest.mark.parametrize(
    "kwargs,u_shape,im_shape,message",
    [
        ({}, (1, 4, 4, 1), (1, 4, 4, 1), r"known number of classes K >= 2 .* got \(1, 4, 4, 1\)"),
        ({}, (1, 4, 4, 2), (1, 4, 5, 1), "must have the same batch and spatial shape"),
        ({}, (2, 4, 4, 2), (1, 4, 4, 1), "must have the same batch and spatial shape"),
        ({}, (1, 4, 4, 2), (1, 4, 4, 4, 1), "image must have the rank of the unaries"),
        ({}, (4, 2), (4, 1), r"rank >= 3\); got \(4, 2\)"),
        (
            {"spacing": [1.0, 1.0, 2.0]},
            (1, 4, 4, 2),
            (1, 4, 4, 1),
            r"spacing must have one entry per spatial axis \(2 for unaries .*got 3",
        ),
        (
            {"theta_beta": [1.0, 2.0]},
            (1, 4, 4, 2),
            (1, 4, 4, 3),
            r"theta_beta must hold one value or one per image channel \(3 for image",
        ),
    ],
)
def test_bad_inputs(kwargs, u_shape, im_shape, message) -> None:
    layer = CrfRnn(**kwargs)
    with pytest.raises(ValueError, match=message):
        layer([np.zeros(u_shape, np.float32), np.zeros(im_shape, np.float32)])


def test_bad_call_structure_and_exact_size_limit() -> None:
    with pytest.raises(ValueError, match=r"called on \[unaries, image\]"):
        CrfRnn()(np.zeros((1, 4, 4, 2), np.float32))
    layer = CrfRnn(bilateral_filter="exact")
    with pytest.raises(ValueError, match="allows at most 8192 voxels per image"):
        layer([np.zeros((1, 100, 100, 2), np.float32), np.zeros((1, 100, 100, 1), np.float32)])


def test_four_dimensional_volume_and_batch_independence() -> None:
    unaries, image = make_inputs((4, 3, 4, 3), 1, 2, 2, seed=30)
    u, im = unaries.astype(np.float32), image.astype(np.float32)
    layer = CrfRnn(num_iterations=2, theta_alpha=2.0)
    both = layer([u, im]).numpy()
    assert both.shape == u.shape and np.all(np.isfinite(both))
    for b in range(2):
        np.testing.assert_allclose(layer([u[b : b + 1], im[b : b + 1]]).numpy()[0], both[b])


@pytest.mark.parametrize("normalisation", ["mean", "symmetric"])
def test_fused_inference_matches_composed_path(normalisation) -> None:
    """fused_inference=True: inference calls run the compiled inference kernel and give the
    composed path's logits; training calls stay on the composed path (with gradients); a
    gradient through an inference call raises instead of being silently dropped."""
    unaries, image = make_inputs((6, 7, 5), 2, 3, 2, seed=11)
    u, im = tf.constant(unaries, tf.float32), tf.constant(image, tf.float32)
    kw = dict(
        theta_alpha=3.0,
        theta_beta=0.8,
        theta_gamma=2.0,
        spacing=[2.0, 1.0, 1.0],
        num_iterations=2,
        num_iterations_inference=4,
        normalisation=normalisation,
    )
    composed, fused = CrfRnn(**kw), CrfRnn(fused_inference=True, **kw)
    composed([u, im])
    fused([u, im])
    rng = np.random.default_rng(12)
    composed.set_weights([rng.uniform(0.5, 2.0, w.shape) for w in composed.get_weights()])
    fused.set_weights(composed.get_weights())
    expected = composed([u, im], training=False).numpy()
    np.testing.assert_allclose(fused([u, im], training=False).numpy(), expected, atol=2e-4)
    np.testing.assert_allclose(fused([u, im]).numpy(), expected, atol=2e-4)  # training=None
    assert np.abs(expected - unaries).max() > 0.1
    # inside tf.function with unknown spatial sizes, as in model.predict
    specs = [tf.TensorSpec([None, None, None, None, c], tf.float32) for c in (3, 2)]
    predict = tf.function(lambda a, b: fused([a, b], training=False), input_signature=specs)
    np.testing.assert_allclose(predict(u, im).numpy(), expected, atol=2e-4)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fused([u, im], training=True) ** 2)
    grads = tape.gradient(loss, fused.trainable_weights)
    assert all(g is not None for g in grads)
    with tf.GradientTape() as tape:
        tape.watch(u)
        loss = tf.reduce_sum(fused([u, im], training=False))
    with pytest.raises(LookupError, match="inference-only"):
        tape.gradient(loss, u)
    clone = CrfRnn.from_config(fused.get_config())
    assert clone.fused_inference and clone.get_config() == fused.get_config()


@pytest.mark.parametrize(
    "kwargs",
    [dict(learn_theta=True), dict(spatial_filter="lattice"), dict(bilateral_filter="exact")],
)
def test_fused_inference_needs_fixed_widths_and_default_filters(kwargs) -> None:
    with pytest.raises(ValueError, match="fused_inference needs fixed widths"):
        CrfRnn(fused_inference=True, **kwargs)
    with pytest.raises(ValueError, match="fused_inference must be True or False"):
        CrfRnn(fused_inference="yes")
