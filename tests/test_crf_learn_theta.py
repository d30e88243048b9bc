"""CrfRnn(learn_theta=True): gradients w.r.t. log-theta against finite differences of the float64
NumPy brute-force mean field, positivity and the theta_gamma bound, config and .keras round trip,
the logging callback, and a short training run whose theta moves toward a better value."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from crf_reference import mean_field_reference

from crf_rnn_3d.crf import CrfRnn
from crf_rnn_3d.crf.callbacks import ThetaLogger, log_theta_summaries, theta_scalars

# (spatial shape, spacing in mm, image channels, classes)
CASES = [((5, 4), (1.0, 1.5), 2, 3), ((3, 4, 3), (2.0, 1.0, 0.8), 1, 2)]


def _inputs(spatial, channels, classes, seed):
    rng = np.random.default_rng(seed)
    unaries = 1.5 * rng.normal(size=(1, *spatial, classes))
    image = rng.normal(size=(1, *spatial, channels))
    target = rng.integers(0, classes, size=(1, *spatial))
    return unaries, image, target


def _reference_loss(unaries, image, target, spacing, theta, w1, w2, mu, iterations) -> float:
    """Mean cross-entropy of the float64 NumPy mean field's refined logits."""
    logits = mean_field_reference(
        unaries, image, spacing, theta[0], tuple(theta[1]), theta[2], w1, w2, mu, iterations
    )
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, target[..., None], axis=-1)
    return float(-picked.mean())


def _cross_entropy(target: np.ndarray, logits: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy in the logits' dtype (Keras' loss would round through float32)."""
    per_voxel = tf.nn.sparse_softmax_cross_entropy_with_logits(target, logits)
    return tf.reduce_mean(per_voxel)


@pytest.mark.parametrize("case", CASES, ids=["2d", "3d"])
def test_log_theta_gradient_matches_finite_differences_of_reference(case) -> None:
    """Exact bilateral path in float64: d loss / d log-theta from TensorFlow against central
    differences (h = 1e-5) of the NumPy reference, which shares no code with src/crf. The axes
    are shorter than the separable kernel's radius, so its taps are the untruncated Gaussian."""
    spatial, spacing, channels, classes = case
    unaries, image, target = _inputs(spatial, channels, classes, seed=len(spatial))
    theta0 = (2.2, [0.6 + 0.5 * c for c in range(channels)], 1.4)
    layer = CrfRnn(
        theta_alpha=theta0[0],
        theta_beta=theta0[1],
        theta_gamma=theta0[2],
        spacing=spacing,
        num_iterations=3,
        bilateral_weight_init=1.7,
        spatial_weight_init=0.8,
        compatibility_init=1.3,
        bilateral_filter="exact",
        learn_theta=True,
        dtype="float64",
    )
    layer.build([unaries.shape, image.shape])
    w1 = layer.bilateral_weight.numpy()
    w2 = layer.spatial_weight.numpy()
    mu = layer.compatibility.numpy() * (1.0 - np.eye(classes))
    with tf.GradientTape() as tape:
        loss = _cross_entropy(target, layer([unaries, image], training=True))
    variables = [layer.log_theta_alpha, layer.log_theta_beta, layer.log_theta_gamma]
    grads = tape.gradient(loss, variables)
    got = np.concatenate([np.ravel(g.numpy()) for g in grads])

    logs = np.log(np.concatenate([[theta0[0]], theta0[1], [theta0[2]]]))

    def ref(log_theta: np.ndarray) -> float:
        t = np.exp(log_theta)
        theta = (t[0], list(t[1:-1]), t[-1])
        return _reference_loss(unaries, image, target, spacing, theta, w1, w2, mu, 3)

    assert float(loss) == pytest.approx(ref(logs), abs=1e-12)
    h = 1e-5
    numeric = np.array(
        [(ref(logs + h * e) - ref(logs - h * e)) / (2 * h) for e in np.eye(len(logs))]
    )
    assert np.max(np.abs(numeric)) > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-9)


def test_lattice_path_gradient_agrees_with_exact_path() -> None:
    """The production path (lattice, float32) gives log-theta gradients close to the exact
    float64 ones: cosine >= 0.95 over the 4 components and each sign right where the exact
    component is not tiny (measured on this case: see the assertion message)."""
    spatial, channels, classes = (12, 10), 2, 2
    unaries, image, target = _inputs(spatial, channels, classes, seed=5)
    image[..., 0] += 2.0 * (np.arange(10) >= 5)  # an edge, so theta_beta matters
    grads = {}
    for path, dtype in (("exact", "float64"), ("lattice", "float32")):
        layer = CrfRnn(
            theta_alpha=3.0,
            theta_beta=[1.0, 1.5],
            theta_gamma=1.5,
            num_iterations=3,
            bilateral_weight_init=2.0,
            bilateral_filter=path,
            learn_theta=True,
            dtype=dtype,
        )
        u, im = tf.constant(unaries, dtype), tf.constant(image, dtype)
        with tf.GradientTape() as tape:
            loss = _cross_entropy(target, layer([u, im], training=True))
        variables = [layer.log_theta_alpha, layer.log_theta_beta, layer.log_theta_gamma]
        g = tape.gradient(loss, variables)
        grads[path] = np.concatenate([np.ravel(x.numpy()).astype(np.float64) for x in g])
    exact, lattice = grads["exact"], grads["lattice"]
    cosine = exact @ lattice / (np.linalg.norm(exact) * np.linalg.norm(lattice))
    message = f"exact {exact}, lattice {lattice}, cosine {cosine:.4f}"
    assert cosine >= 0.95, message
    big = np.abs(exact) > 0.1 * np.abs(exact).max()
    assert np.all(np.sign(exact[big]) == np.sign(lattice[big])), message


def test_theta_stays_positive_and_theta_gamma_bounded() -> None:
    """Adam with a huge step pushing every width down, then up: the widths stay > 0 and finite,
    and theta_gamma stops at theta_gamma_max (the separable kernel's radius is set from it)."""
    layer = CrfRnn(theta_alpha=2.0, theta_beta=0.5, theta_gamma=1.0, learn_theta=True)
    layer.build([(1, 6, 6, 2), (1, 6, 6, 1)])
    thetas = [layer.log_theta_alpha, layer.log_theta_beta, layer.log_theta_gamma]
    optimizer = keras.optimizers.SGD(5.0)
    for sign, steps in ((1.0, 3), (-1.0, 6)):  # log-widths -15, then +30
        for _ in range(steps):
            optimizer.apply_gradients([(tf.ones_like(v) * sign, v) for v in thetas])
        values = layer.theta_values()
        flat = [values["theta_alpha"], *values["theta_beta"], values["theta_gamma"]]
        assert all(math.isfinite(v) and v > 0 for v in flat), values
        if sign > 0:
            assert values["theta_alpha"] == pytest.approx(2.0 * math.exp(-15.0), rel=1e-5)
    assert values["theta_alpha"] == pytest.approx(2.0 * math.exp(15.0), rel=1e-5)
    assert values["theta_gamma"] == pytest.approx(2.0, rel=1e-6)  # default max: 2 x theta_gamma
    # the layer still runs with the widths it learnt
    out = layer([tf.zeros((1, 6, 6, 2)), tf.zeros((1, 6, 6, 1))])
    assert np.all(np.isfinite(out.numpy()))


def test_default_has_no_theta_weights() -> None:
    layer = CrfRnn()
    layer.build([(1, 4, 4, 2), (1, 4, 4, 1)])
    names = sorted(v.name for v in layer.trainable_variables)
    assert names == ["bilateral_weight", "compatibility", "spatial_weight"]
    assert layer.theta_values() == {"theta_alpha": 10.0, "theta_beta": [1.0], "theta_gamma": 3.0}
    assert layer.get_config()["learn_theta"] is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learn_theta": "yes"}, "learn_theta must be True or False, got 'yes'"),
        ({"theta_gamma_max": 2.0}, "theta_gamma_max must be >= theta_gamma (3.0 mm), got 2.0"),
        ({"theta_gamma_max": -1.0}, "theta_gamma_max must be a finite number > 0, got -1.0"),
    ],
)
def test_bad_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CrfRnn(**kwargs)


def _model(spatial, classes, channels, **kwargs) -> keras.Model:
    u_in = keras.Input(shape=(*spatial, classes))
    im_in = keras.Input(shape=(*spatial, channels))
    out = CrfRnn(name="crf", **kwargs)([u_in, im_in])
    return keras.Model([u_in, im_in], out)


def test_config_and_keras_file_round_trip(tmp_path) -> None:
    kwargs = dict(theta_alpha=3.0, theta_beta=0.8, theta_gamma=1.5, theta_gamma_max=4.0)
    model = _model((8, 7), 2, 2, learn_theta=True, **kwargs)
    layer = model.get_layer("crf")
    config = layer.get_config()
    assert config["learn_theta"] is True and config["theta_gamma_max"] == 4.0
    clone = CrfRnn.from_config(config)
    assert clone.learn_theta and clone.theta_gamma_max == 4.0 and clone.theta_beta == [0.8]
    # widths other than the initial ones must survive save / load
    layer.log_theta_alpha.assign(math.log(5.0))
    layer.log_theta_beta.assign(np.log([0.3, 2.0]))
    layer.log_theta_gamma.assign(math.log(2.5))
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(1, 8, 7, 2)).astype("float32") for _ in range(2)]
    path = tmp_path / "crf.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    got = loaded.get_layer("crf").theta_values()
    assert got["theta_alpha"] == pytest.approx(5.0, rel=1e-6)
    assert got["theta_beta"] == pytest.approx([0.3, 2.0], rel=1e-6)
    assert got["theta_gamma"] == pytest.approx(2.5, rel=1e-6)
    np.testing.assert_array_equal(
        loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0)
    )


def test_theta_logger_and_summaries(tmp_path) -> None:
    """ThetaLogger puts the learnt widths into fit's logs and writes summaries; the values are
    exp of the log-width weights."""
    model = _model((8, 8), 2, 1, learn_theta=True, theta_alpha=4.0, theta_beta=2.0)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(2, 8, 8, 2)).astype("float32"), rng.normal(size=(2, 8, 8, 1))]
    y = rng.integers(0, 2, size=(2, 8, 8))
    history = model.fit(
        x, y, epochs=2, batch_size=1, verbose=0, callbacks=[ThetaLogger(str(tmp_path / "tb"))]
    )
    layer = model.get_layer("crf")
    logged = history.history["crf/crf/theta_alpha"]
    assert len(logged) == 2
    assert logged[-1] == pytest.approx(math.exp(float(layer.log_theta_alpha.numpy())), rel=1e-6)
    assert logged[-1] != pytest.approx(4.0, rel=1e-4)  # it was learnt
    assert set(theta_scalars(model)) == {
        "crf/crf/theta_alpha",
        "crf/crf/theta_beta_0",
        "crf/crf/theta_gamma",
    }
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    with tf.summary.create_file_writer(str(tmp_path / "loop")).as_default():
        written = log_theta_summaries(model, step=3)
    assert written == theta_scalars(model)
    with pytest.raises(ValueError, match="every_n_batches needs log_dir"):
        ThetaLogger(every_n_batches=2)


def _edge_case():
    """A 20 x 20 image with a vertical step edge of height 1 plus noise (sd 0.1), the labels the
    step, unaries of a poor network: the labels blurred across the edge (+-1 logits), shifted by
    2 pixels."""
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[:, 10:] = 1
    image = labels.astype(np.float64) + 0.1 * rng.normal(size=labels.shape)
    soft = np.clip((np.arange(20) - 11.0) / 4.0 + 0.5, 0.0, 1.0)  # centred 2 px right of the edge
    fg = np.broadcast_to(soft, labels.shape)
    unaries = np.stack([1.0 - 2.0 * fg, 2.0 * fg - 1.0], -1)
    return unaries[None], image[None, ..., None], labels[None]


def test_training_lowers_loss_and_moves_theta_toward_a_better_value() -> None:
    """Train the lattice layer with theta_beta started 4x too wide (2.0 for an edge of height 1):
    the loss falls, and theta_beta moves toward the best value of a grid searched with the
    float64 reference at the initial weights (the grid minimum is asserted to be well below
    2.0, so 'toward' means 'down')."""
    unaries, image, labels = _edge_case()
    w1, w2, mu = np.full(2, 1.0), np.full(2, 1.0), 1.0 - np.eye(2)
    grid = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0]
    grid_loss = [
        _reference_loss(unaries, image, labels, (1.0, 1.0), (4.0, [b], 1.0), w1, w2, mu, 3)
        for b in grid
    ]
    best = grid[int(np.argmin(grid_loss))]
    assert best <= 0.5, dict(zip(grid, grid_loss, strict=True))
    layer = CrfRnn(theta_alpha=4.0, theta_beta=2.0, theta_gamma=1.0, num_iterations=3)
    layer = CrfRnn(**{**layer.get_config(), "learn_theta": True})
    u, im = tf.constant(unaries, tf.float32), tf.constant(image, tf.float32)
    optimizer = keras.optimizers.Adam(0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses, betas = [], []
    for _ in range(25):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, layer([u, im], training=True))
        grads = tape.gradient(loss, layer.trainable_variables)
        optimizer.apply_gradients(zip(grads, layer.trainable_variables, strict=True))
        losses.append(float(loss))
        betas.append(layer.theta_values()["theta_beta"][0])
    assert losses[-1] < 0.7 * losses[0], losses
    start, end = math.log(2.0), math.log(betas[-1])
    assert abs(end - math.log(best)) < 0.5 * abs(start - math.log(best)), (betas, best)


def _sanity_theta():
    from crf_rnn_3d.experiments import sanity

    return sanity


def test_sanity_theta_settings_hand_checked() -> None:
    """The sanity experiment's theta search (src/experiments/sanity.py): widths scaled as
    documented, 2D pixel settings divided by the extra downsampling, theta_beta summarised by its
    geometric mean."""
    from omegaconf import OmegaConf

    st = _sanity_theta()
    cfg = OmegaConf.create(
        {
            "downsample": 1,
            "distortion": {"shift": [6.0, -8.0], "blur_sigma": 5.0},
            "crf": {"theta_alpha": 30.0, "theta_beta": [20.0, 40.0], "theta_gamma": 3.0},
            "theta_search": {"downsample": 2},
        }
    )
    crf = st.scaled_crf(cfg, 4.0)
    assert (crf["theta_alpha"], crf["theta_beta"], crf["theta_gamma"]) == (
        120.0,
        [80.0, 160.0],
        12.0,
    )
    crf = st.scaled_crf(cfg, 1.0, alpha=2.0, beta=0.25)
    assert (crf["theta_alpha"], crf["theta_beta"], crf["theta_gamma"]) == (60.0, [5.0, 10.0], 3.0)
    small = st.pixels_downsampled(cfg)
    assert small.downsample == 2 and list(small.distortion.shift) == [3.0, -4.0]
    assert (small.distortion.blur_sigma, small.crf.theta_alpha, small.crf.theta_gamma) == (
        2.5,
        15.0,
        1.5,
    )
    assert list(small.crf.theta_beta) == [20.0, 40.0]  # colour units: unchanged
    assert st.geomean([2.0, 8.0]) == pytest.approx(4.0) and st.geomean(3.0) == pytest.approx(3.0)


@pytest.mark.slow
def test_sanity_theta_runs_end_to_end(tmp_path) -> None:
    """The 3D script on its config with 3 steps and one grid cell each: writes the run folder
    and its widths per step (steps + 1 entries, starting at 4x the config's)."""
    from omegaconf import OmegaConf

    st = _sanity_theta()
    cfg = OmegaConf.load(st.config_file(3))
    cfg.train.steps = 3
    cfg.theta_search.learn_steps = 3
    cfg.theta_search.scales = [1.0]
    cfg.theta_search.alpha_beta_scales = {"alpha": [1.0], "beta": [1.0]}
    metrics = st.run_theta(3, cfg, str(tmp_path), log=lambda *_: None)
    trace = metrics["learnt"]["theta_trace"]
    assert len(trace) == 4
    assert trace[0]["theta_alpha"] == pytest.approx(4 * cfg.crf.theta_alpha, rel=1e-6)
    assert metrics["grid"][0]["dice"] == pytest.approx(metrics["grid_alpha_beta"][0]["dice"])
    assert {p.name for p in Path(metrics["run_dir"]).iterdir()} == {
        "metrics.json",
        "config.yaml",
        "figure.png",
    }
