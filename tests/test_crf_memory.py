"""The recomputing mean field (``mean_field(recompute=True)``, ``CrfRnn(recompute=True)``):
its logits and gradients against the plain loop's, and its gradients against finite
differences of the float64 NumPy brute force (tests/crf_reference.py, no code shared with
src/crf).

What is compared, and how closely:
- logits: bit-identical (the forward ops are the plain loop's, in the same order);
- gradients, float32 (lattice, both backends): within 1e-6 of the largest component, relative.
  The backward pass runs the same derivatives, but sums each weight's and source's gradient
  over the iterations in its own order (as each iteration delivers it, from the last), so
  equal to rounding, not by construction; on these cases, eagerly, they came out
  bit-identical;
- the staged backward pass of one iteration (_iteration_gradient) against one tape over the
  iteration, the compatibility's gradient against einsum's, and checkpoint_every > 1 against
  checkpoint_every = 1: bit-identical (eagerly);
- gradients, float64 (exact bilateral filter): within 1e-12, and against central differences
  of the NumPy reference within 1e-6.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from crf_reference import mean_field_reference

from crf_rnn_3d.crf import CrfRnn
from crf_rnn_3d.crf import functional as mf

SPACING = (1.0, 1.2, 2.0)


def _inputs(batch: int, spatial, classes: int, channels: int, seed: int, dtype=np.float32):
    rng = np.random.default_rng(seed)
    unaries = (1.5 * rng.normal(size=(batch, *spatial, classes))).astype(dtype)
    image = rng.normal(size=(batch, *spatial, channels)).astype(dtype)
    upstream = rng.normal(size=(batch, *spatial, classes)).astype(dtype)
    return tf.constant(unaries), tf.constant(image), tf.constant(upstream)


def _layer(recompute: bool, weights=None, **settings) -> CrfRnn:
    settings = dict(theta_alpha=3.0, theta_beta=1.5, theta_gamma=2.0, spacing=SPACING) | settings
    return CrfRnn(recompute=recompute, num_iterations=4, **settings)


def _logits_and_gradients(layer: CrfRnn, unaries, image, upstream, weights):
    """(logits, [d/d unaries, d/d image, d/d each trainable weight]) of sum(upstream * logits),
    with the layer's weights set to `weights`."""
    layer([unaries, image])
    layer.set_weights(weights)
    with tf.GradientTape() as tape:
        tape.watch([unaries, image])
        logits = layer([unaries, image], training=True)
        loss = tf.reduce_sum(upstream * logits)
    grads = tape.gradient(loss, [unaries, image, *layer.trainable_weights])
    return logits.numpy(), [g.numpy() for g in grads]


def _traced_step(layer: CrfRnn, spec):
    """tf.function of (logits, [d/d unaries, d/d image, d/d each trainable weight]) of
    sum(upstream * logits), traced with input signature `spec` (unaries, image, upstream)."""

    @tf.function(input_signature=spec)
    def step(u, im, g):
        with tf.GradientTape() as tape:
            tape.watch([u, im])
            logits = layer([u, im], training=True)
            loss = tf.reduce_sum(g * logits)
        return logits, tape.gradient(loss, [u, im, *layer.trainable_weights])

    return step


def _weights(layer_settings, unaries, image, seed):
    """Random weights (not the Potts start), so that every gradient is generic."""
    probe = _layer(False, **layer_settings)
    probe([unaries, image])
    rng = np.random.default_rng(seed)
    dtype = np.float64 if layer_settings.get("dtype") == "float64" else np.float32
    return [
        (np.asarray(w) + 0.3 * rng.normal(size=np.shape(w))).astype(dtype)
        for w in probe.get_weights()
    ]


def _assert_close(got, want, rtol, what):
    scale = float(np.max(np.abs(want)))
    assert scale > 0, f"{what}: zero gradient, the comparison would be vacuous"
    error = float(np.max(np.abs(got - want))) / scale
    assert error <= rtol, f"{what}: relative error {error:.3e} > {rtol}"


@pytest.mark.parametrize("backend", ["compiled", "tf"])
@pytest.mark.parametrize("learn_theta", [False, True], ids=["fixed", "learn_theta"])
def test_recompute_gives_the_plain_loops_logits_and_gradients(backend, learn_theta) -> None:
    """Batch of 2, 3 classes, 2 image channels, lattice + separable filters (float32)."""
    unaries, image, upstream = _inputs(2, (6, 7, 5), 3, 2, seed=1)
    settings = dict(backend=backend, learn_theta=learn_theta)
    weights = _weights(settings, unaries, image, seed=2)
    plain = _logits_and_gradients(_layer(False, **settings), unaries, image, upstream, weights)
    layer = _layer(True, **settings)
    again = _logits_and_gradients(layer, unaries, image, upstream, weights)
    np.testing.assert_array_equal(again[0], plain[0])
    names = ["unaries", "image"] + [w.name for w in layer.trainable_weights]
    assert len(names) == (8 if learn_theta else 5)
    for name, got, want in zip(names, again[1], plain[1], strict=True):
        _assert_close(got, want, 1e-6, f"{backend}, d/d {name}")


def test_recompute_with_lattice_copies_keeps_every_gradient() -> None:
    """With lattice_copies > 1 the rotated copies' features are computed outside the filter:
    the recomputed iterations must still send the features' gradient through them (to the
    image and the learnt widths), as the plain loop does."""
    unaries, image, upstream = _inputs(2, (6, 7, 5), 3, 2, seed=5)
    settings = dict(backend="compiled", learn_theta=True, lattice_copies=3)
    weights = _weights(settings, unaries, image, seed=6)
    plain = _logits_and_gradients(_layer(False, **settings), unaries, image, upstream, weights)
    layer = _layer(True, **settings)
    again = _logits_and_gradients(layer, unaries, image, upstream, weights)
    np.testing.assert_array_equal(again[0], plain[0])
    names = ["unaries", "image"] + [w.name for w in layer.trainable_weights]
    for name, got, want in zip(names, again[1], plain[1], strict=True):
        _assert_close(got, want, 1e-6, f"copies, d/d {name}")


def test_recompute_float64_exact_against_plain_and_finite_differences() -> None:
    """Exact bilateral filter in float64, learnt widths, batch of 2: the recomputed gradients
    equal the plain loop's within 1e-12; those of the widths and of the compatibility match
    central differences (h = 1e-6) of the NumPy brute force within 1e-6 relative."""
    spatial, classes, channels = (4, 3, 3), 3, 2
    unaries, image, upstream = _inputs(2, spatial, classes, channels, seed=3, dtype=np.float64)
    settings = dict(bilateral_filter="exact", learn_theta=True, dtype="float64")
    weights = _weights(settings, unaries, image, seed=4)
    plain = _logits_and_gradients(_layer(False, **settings), unaries, image, upstream, weights)
    layer = _layer(True, **settings)
    again = _logits_and_gradients(layer, unaries, image, upstream, weights)
    np.testing.assert_array_equal(again[0], plain[0])
    for got, want in zip(again[1], plain[1], strict=True):
        _assert_close(got, want, 1e-12, "float64 exact")

    # the NumPy reference, item by item (it takes one image): loss = sum(upstream * logits)
    by_name = dict(zip([w.name for w in layer.trainable_weights], again[1][2:], strict=True))
    w1, w2, mu, log_alpha, log_beta, log_gamma = weights
    mu = mu * (1.0 - np.eye(classes))

    def loss(log_theta: np.ndarray, mu_: np.ndarray) -> float:
        t = np.exp(log_theta)
        total = 0.0
        for b in range(2):
            logits = mean_field_reference(
                unaries.numpy()[b : b + 1], image.numpy()[b : b + 1], SPACING, t[0],
                tuple(t[1:-1]), t[-1], w1, w2, mu_, 4,
            )  # fmt: skip
            total += float(np.sum(upstream.numpy()[b : b + 1] * logits))
        return total

    logs = np.concatenate([[log_alpha], log_beta, [log_gamma]])
    assert loss(logs, mu) == pytest.approx(float(np.sum(upstream.numpy() * again[0])), rel=1e-12)
    h = 1e-6
    numeric = [(loss(logs + h * e, mu) - loss(logs - h * e, mu)) / (2 * h) for e in np.eye(4)]
    got = np.concatenate(
        [np.ravel(by_name[n]) for n in ("log_theta_alpha", "log_theta_beta", "log_theta_gamma")]
    )
    np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-8)
    e01 = np.zeros((classes, classes))
    e01[0, 1] = 1.0
    d_mu = (loss(logs, mu + h * e01) - loss(logs, mu - h * e01)) / (2 * h)
    assert by_name["compatibility"][0, 1] == pytest.approx(d_mu, rel=1e-6)


@pytest.fixture
def grappler_off():
    """TensorFlow's graph optimizer off for the test (restored after)."""
    previous = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    yield
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": previous})


@pytest.mark.parametrize(
    "backend",
    ["compiled", pytest.param("tf", marks=pytest.mark.slow)],  # tf: 220 s here, grappler off
)
def test_recompute_under_tf_function_with_unknown_sizes(backend, grappler_off, monkeypatch):
    """Traced with every size but the channels unknown, both loops in graphs of their own:
    the backward pass really reruns the iterations (4 forward + 4 recomputed), and the logits
    and gradients (unaries, image through the features, learnt widths) agree within 1e-6.

    With TensorFlow's graph optimizer off: with it on (as in training) it fuses the forward ops
    differently when the plain loop's gradient also reads their intermediates, and the two
    differ by float32 rounding amplified by the cancellation in the widths' sums over voxels
    (2.7e-5 on d/d log_theta_alpha measured here; the plain loop alone differs by 4e-5 on it
    between eager and graph execution): docs/crf.md, "Training memory"."""
    rtol = 1e-6
    unaries, image, upstream = _inputs(2, (5, 6, 4), 2, 1, seed=5)
    settings = dict(backend=backend, learn_theta=True)
    weights = _weights(settings, unaries, image, seed=6)
    spec = [tf.TensorSpec([None, None, None, None, c]) for c in (2, 1, 2)]
    calls = []
    iteration, rerun = mf._iteration, mf._iteration_gradient

    def counted(*args, **kwargs):
        calls.append(1)
        return iteration(*args, **kwargs)

    def counted_rerun(*args, **kwargs):
        calls.append(1)
        return rerun(*args, **kwargs)

    monkeypatch.setattr(mf, "_iteration", counted)
    monkeypatch.setattr(mf, "_iteration_gradient", counted_rerun)
    results = []
    for recompute in (False, True):
        layer = _layer(recompute, **settings)
        layer([unaries, image])
        layer.set_weights(weights)

        step = _traced_step(layer, spec)

        calls.clear()
        logits, grads = step(unaries, image, upstream)
        # traced once: 4 iterations, and with recompute 4 again in the backward pass
        assert len(calls) == (8 if recompute else 4)
        results.append((logits.numpy(), [g.numpy() for g in grads]))
    (plain_logits, plain_grads), (logits, grads) = results
    _assert_close(logits, plain_logits, rtol, f"{backend} logits under tf.function")
    for got, want in zip(grads, plain_grads, strict=True):
        _assert_close(got, want, rtol, f"{backend} under tf.function")


def test_recompute_without_a_tape_is_the_plain_loop(monkeypatch) -> None:
    """Eagerly with no tape, or a tape that watches none of the layer's inputs or weights,
    the recomputing layer runs the plain loop (4 iterations, no custom gradient)."""
    unaries, image, _ = _inputs(1, (4, 5, 3), 2, 1, seed=7)
    layer, plain = _layer(True), _layer(False)
    layer([unaries, image])
    plain([unaries, image])
    plain.set_weights(layer.get_weights())
    want = plain([unaries, image], training=True).numpy()
    calls = []
    iteration = mf._iteration
    monkeypatch.setattr(mf, "_iteration", lambda *a: calls.append(1) or iteration(*a))
    np.testing.assert_array_equal(layer([unaries, image], training=True).numpy(), want)
    assert len(calls) == 4
    with tf.GradientTape() as tape:
        tape.watch(tf.constant(0.0))  # a tape, but the layer's inputs are not watched
        out = layer([unaries, image], training=True)
    np.testing.assert_array_equal(out.numpy(), want)
    assert len(calls) == 8


@pytest.mark.slow  # 30 s here
def test_recompute_trains_in_keras_fit_like_the_plain_loop() -> None:
    """One SGD step of model.fit (graph mode) on a tiny V-Net-free model (a Conv3D under the
    head): the weights after it agree within 1e-5 relative with and without recompute."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 6, 6, 4, 1)).astype(np.float32)
    y = rng.integers(0, 2, size=(2, 6, 6, 4)).astype(np.int32)
    results = []
    for recompute in (False, True):
        keras.utils.set_random_seed(0)
        image = keras.Input((None, None, None, 1))
        logits = keras.layers.Conv3D(2, 3, padding="same")(image)
        out = _layer(recompute, learn_theta=True)([logits, image])
        model = keras.Model(image, out)
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before = [w.copy() for w in model.get_weights()]
        model.fit(x, y, batch_size=2, epochs=1, verbose=0)
        results.append((before, model.get_weights()))
    (before0, after0), (before1, after1) = results
    for b0, b1 in zip(before0, before1, strict=True):
        np.testing.assert_array_equal(b0, b1)
    moved = 0
    for b, a0, a1 in zip(before0, after0, after1, strict=True):
        _assert_close(a1 - b, a0 - b, 1e-5, "one SGD step") if np.any(a0 != b) else None
        moved += int(np.any(a0 != b))
    assert moved >= 6  # the conv's kernel and bias and the head's weights all moved


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_recompute_under_a_mixed_policy(policy) -> None:
    """A head made under a mixed policy (its mean field in float32) with recompute gives the
    float32 plain head's logits and unaries' gradient (on the same half-rounded inputs),
    rounded to the half dtype: bit-identical."""
    unaries, image, upstream = _inputs(1, (5, 4, 3), 2, 1, seed=9)
    half_dtype = tf.float16 if policy == "mixed_float16" else tf.bfloat16
    # the reference sees the inputs and the upstream gradient rounded as the half layer does
    unaries, image, upstream = (
        tf.cast(tf.cast(t, half_dtype), tf.float32) for t in (unaries, image, upstream)
    )
    plain = _layer(False)
    plain([unaries, image])
    with tf.GradientTape() as tape:
        tape.watch(unaries)
        want = plain([unaries, image], training=True)
        loss = tf.reduce_sum(upstream * want)
    want_grad = tape.gradient(loss, unaries).numpy()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        layer = _layer(True)
        half, half_image = tf.cast(unaries, half_dtype), tf.cast(image, half_dtype)
        layer([half, half_image])
        layer.set_weights(plain.get_weights())
        with tf.GradientTape() as tape:
            tape.watch(half)
            got = layer([half, half_image], training=True)
            loss = tf.reduce_sum(tf.cast(upstream, half_dtype) * got)
        got_grad = tape.gradient(loss, half)
    finally:
        keras.config.set_dtype_policy(previous)
    assert got.dtype == half_dtype
    np.testing.assert_array_equal(got.numpy(), tf.cast(want, half_dtype).numpy())
    np.testing.assert_array_equal(got_grad.numpy(), tf.cast(want_grad, half_dtype).numpy())


def test_recompute_setting_in_config_and_checked() -> None:
    layer = CrfRnn(recompute=True)
    assert layer.get_config()["recompute"] is True
    assert CrfRnn.from_config(layer.get_config()).recompute is True
    with pytest.raises(ValueError, match="recompute must be True or False"):
        CrfRnn(recompute="yes")


def test_default_config_keeps_recompute_off() -> None:
    """configs/crf/default.yaml's recompute is the layer's default (docs/crf.md says why)."""
    from importlib.resources import files

    import yaml

    from crf_rnn_3d.crf.layer import RECOMPUTE_DEFAULT
    from crf_rnn_3d.models.vnet import CASE_THETA_DEFAULTS

    cfg = yaml.safe_load((files("crf_rnn_3d.configs") / "crf" / "default.yaml").read_text())
    assert cfg["recompute"] is RECOMPUTE_DEFAULT is False
    # the per-case widths' head's keys belong to the model, not to the layer
    layer_cfg = {k: v for k, v in cfg.items() if k not in CASE_THETA_DEFAULTS}
    assert CrfRnn(**layer_cfg).recompute is False


@pytest.mark.parametrize("learn_theta", [False, True], ids=["fixed", "learn_theta"])
def test_iteration_gradient_equals_one_tape_bit_for_bit(learn_theta) -> None:
    """The staged backward pass of one iteration (_iteration_gradient: no output logits
    formed, one filter at a time, the compatibility's gradient entry by entry) against one
    GradientTape over _iteration, eagerly: every gradient bit-identical (unaries, weights,
    compatibility, the features and normalisers; with learnt widths the spatial taps)."""
    unaries, image, upstream = _inputs(2, (6, 5, 4), 3, 2, seed=21)
    rng = np.random.default_rng(22)
    logits = tf.constant(unaries.numpy() + rng.normal(size=unaries.shape).astype(np.float32))
    w1, w2 = (tf.constant(rng.uniform(0.5, 1.5, 3).astype(np.float32)) for _ in range(2))
    mu = tf.constant(rng.normal(size=(3, 3)).astype(np.float32))
    theta = tf.constant(1.7) if learn_theta else 1.7
    with tf.GradientTape(persistent=True) as outer:
        if learn_theta:
            outer.watch(theta)
        features = mf.bilateral_features(image, SPACING, 3.0, [1.5, 1.5])
        appearance = mf.lattice_filter(features, "mean", "compiled")
        smoothness = mf.separable_spatial_filter(
            tf.shape(unaries), SPACING, theta, "mean", tf.float32, unaries.shape, theta_max=3.0
        )
    sources = appearance.sources + smoothness.sources
    inputs = [unaries, w1, w2, mu, *sources]
    with tf.GradientTape() as tape:
        tape.watch([logits, *inputs])
        out = mf._iteration(logits, unaries, [w1, w2, mu], appearance, smoothness)
    want = tape.gradient(
        out,
        [logits, *inputs],
        output_gradients=upstream,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    d_entering, got = mf._iteration_gradient(
        logits, upstream, unaries, [w1, w2, mu], appearance, smoothness, sources
    )
    assert len(got) == len(want) - 1 == 4 + len(sources)
    names = ["logits", "unaries", "w1", "w2", "mu"]
    for name, g, w in zip(names, [d_entering, *got[:4]], want[:5], strict=True):
        assert float(np.max(np.abs(w.numpy()))) > 0, name
        np.testing.assert_array_equal(g.numpy(), w.numpy(), err_msg=name)
    for i, (g, w) in enumerate(zip(got[4:], want[5:], strict=True)):
        np.testing.assert_array_equal(g.numpy(), w.numpy(), err_msg=f"source {i}")
    del outer


def test_compatibility_gradient_is_einsums_bit_for_bit() -> None:
    """_compatibility_gradient against TensorFlow's einsum gradient (bit-identical, eagerly
    and traced) and against a float64 NumPy sum (float32 rounding of a sum of 2 x 10^4 terms)."""
    rng = np.random.default_rng(23)
    message = tf.constant(rng.normal(size=(2, 20, 25, 20, 4)).astype(np.float32))
    grad = tf.constant(rng.normal(size=(2, 20, 25, 20, 4)).astype(np.float32))
    mu = tf.constant(rng.normal(size=(4, 4)).astype(np.float32))

    def einsum_gradient(m, g):
        with tf.GradientTape() as tape:
            tape.watch(mu)
            out = -tf.einsum("...k,lk->...l", m, mu)
        return tape.gradient(out, mu, output_gradients=g)

    want = einsum_gradient(message, grad).numpy()
    np.testing.assert_array_equal(mf._compatibility_gradient(message, grad).numpy(), want)
    traced = tf.function(mf._compatibility_gradient)(message, grad).numpy()
    np.testing.assert_array_equal(traced, tf.function(einsum_gradient)(message, grad).numpy())
    g64 = grad.numpy().reshape(-1, 4).astype(np.float64)
    m64 = message.numpy().reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(want, -g64.T @ m64, rtol=0, atol=1e-3)


@pytest.mark.parametrize("every", [2, 3, 4])
def test_checkpoint_every_gives_every_iterations_results_bit_for_bit(every, monkeypatch) -> None:
    """checkpoint_every = 2, 3, 4 (4 = num_iterations: only the unaries kept), eagerly, batch of
    2, learnt widths: logits and every gradient bit-identical to checkpoint_every = 1 (the
    logits not kept are recomputed by the same ops from the same inputs), and the backward pass
    reruns i mod k iterations before iteration i (counted)."""
    unaries, image, upstream = _inputs(2, (6, 7, 5), 3, 2, seed=31)
    settings = dict(backend="compiled", learn_theta=True)
    weights = _weights(settings, unaries, image, seed=32)
    want = _logits_and_gradients(_layer(True, **settings), unaries, image, upstream, weights)
    calls = []
    iteration = mf._iteration
    monkeypatch.setattr(mf, "_iteration", lambda *a: calls.append(1) or iteration(*a))
    layer = _layer(True, checkpoint_every=every, **settings)
    layer([unaries, image])
    calls.clear()
    got = _logits_and_gradients(layer, unaries, image, upstream, weights)
    # the helper's inference call (4), the training call's 4 forward iterations, then before
    # iteration i of the backward pass i mod every more
    assert len(calls) == 4 + 4 + sum(i % every for i in range(4))
    np.testing.assert_array_equal(got[0], want[0])
    assert len(got[1]) == 8
    for index, (g, w) in enumerate(zip(got[1], want[1], strict=True)):
        np.testing.assert_array_equal(g, w, err_msg=f"gradient {index}")


def test_checkpoint_every_under_tf_function_matches_the_plain_loop(grappler_off) -> None:
    """Traced with unknown sizes (grappler off, as the traced test above), checkpoint_every = 2:
    logits and gradients within 1e-6 of the plain loop's."""
    unaries, image, upstream = _inputs(1, (5, 6, 4), 2, 1, seed=33)
    settings = dict(backend="compiled", learn_theta=True)
    weights = _weights(settings, unaries, image, seed=34)
    spec = [tf.TensorSpec([None, None, None, None, c]) for c in (2, 1, 2)]
    results = []
    for layer in (_layer(False, **settings), _layer(True, checkpoint_every=2, **settings)):
        layer([unaries, image])
        layer.set_weights(weights)

        step = _traced_step(layer, spec)

        logits, grads = step(unaries, image, upstream)
        results.append((logits.numpy(), [g.numpy() for g in grads]))
    (plain_logits, plain_grads), (logits, grads) = results
    _assert_close(logits, plain_logits, 1e-6, "logits, checkpoint_every=2")
    for index, (got, want) in enumerate(zip(grads, plain_grads, strict=True)):
        _assert_close(got, want, 1e-6, f"checkpoint_every=2, gradient {index}")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_checkpoint_every_must_be_a_positive_integer(bad) -> None:
    unaries, image, _ = _inputs(1, (3, 3, 3), 2, 1, seed=35)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        CrfRnn(recompute=True, checkpoint_every=bad)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        mf.mean_field(
            unaries,
            image,
            spacing=SPACING,
            theta_alpha=3.0,
            theta_beta=[1.0],
            theta_gamma=2.0,
            bilateral_weight=tf.ones([2]),
            spatial_weight=tf.ones([2]),
            compatibility=1.0 - tf.eye(2),
            num_iterations=2,
            recompute=True,
            checkpoint_every=bad,
        )


def test_checkpoint_every_in_the_config() -> None:
    layer = _layer(True, checkpoint_every=3)
    assert layer.get_config()["checkpoint_every"] == 3
    assert CrfRnn.from_config(layer.get_config()).checkpoint_every == 3
