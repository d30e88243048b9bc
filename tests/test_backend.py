"""The backend switch ("auto" | "compiled" | "tf"): the rule for "auto" (with the GPU check
monkeypatched, as this machine has none), that backend="tf" reaches no compiled op anywhere
(a traced CrfRnn train step holds no op whose type starts with "Crf3d"), and that CrfRnn and
dense_crf give the compiled backend's results.

Tolerances: CrfRnn's composed path with either backend is the same TensorFlow graph around
filters that agree to float32 rounding, so logits and gradients must agree to rel 1e-5
(norm-wise: max|a - b| / max|b|). dense_crf's compiled backend is the fused mean-field kernel
(the same operations, fused, in another order), so its probabilities (in [0, 1]) are held to
the "tf" backend's within 1e-5 absolute, float32 rounding accumulated over five iterations.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from crf_rnn_3d.crf import CrfRnn
from crf_rnn_3d.crf import functional as mf
from crf_rnn_3d.crf.dense_crf import dense_crf
from crf_rnn_3d.lattice_op import BACKENDS, Lattice, permutohedral_filter, separable_filter
from crf_rnn_3d.lattice_op import backend as backend_module
from crf_rnn_3d.lattice_op.backend import resolve_backend

REL = 1e-5


def rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def op_types(function: tf.types.experimental.ConcreteFunction) -> set[str]:
    """Every op type in a traced function: its graph and every function in its library (loop
    and branch bodies, gradient functions)."""
    graph_def = function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for library_function in graph_def.library.function:
        types |= {node.op for node in library_function.node_def}
    return types


def compiled_ops(types: set[str]) -> set[str]:
    return {t for t in types if t.startswith("Crf3d")}


@pytest.fixture
def fake_gpu(monkeypatch):
    """resolve_backend sees a GPU (the machine has none; only the check is replaced)."""
    monkeypatch.setattr(backend_module, "gpu_visible", lambda: True)


# ------------------------------------------------------------------------ the rule for auto


def test_auto_without_gpu_is_compiled_everywhere():
    assert BACKENDS == ("auto", "compiled", "tf")
    assert not backend_module.gpu_visible()
    assert resolve_backend("auto") == "compiled"
    assert resolve_backend("auto", tf.zeros([1])) == "compiled"
    seen = []
    tf.function(lambda: seen.append(resolve_backend("auto")) or tf.zeros([]))()
    assert seen == ["compiled"]
    assert resolve_backend("tf") == "tf" and resolve_backend("compiled") == "compiled"


def test_auto_with_gpu_follows_scope_then_tensor(fake_gpu, monkeypatch):
    # 4. a graph with no device scope: the placer's default, the GPU
    seen = []

    @tf.function
    def traced():
        seen.append(resolve_backend("auto"))
        with tf.device("/CPU:0"):
            seen.append(resolve_backend("auto"))  # 2. a CPU scope
        with tf.device("/GPU:0"):
            seen.append(resolve_backend("auto"))  # 2. a GPU scope
        return tf.zeros([])

    traced()
    assert seen == ["tf", "compiled", "tf"]
    # eagerly: 2. the scope first, 3. then the tensor's device, 4. no tensor: the GPU
    with tf.device("/CPU:0"):
        assert resolve_backend("auto", tf.zeros([1])) == "compiled"
    assert resolve_backend("auto", tf.zeros([1])) == "compiled"  # lives on this CPU
    assert resolve_backend("auto") == "tf"
    monkeypatch.setattr(backend_module, "tensor_device_type", lambda t: "GPU")
    assert resolve_backend("auto", tf.zeros([1])) == "tf"


def test_unknown_backend_is_refused_everywhere():
    f = np.zeros((1, 4, 2), np.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        Lattice(f, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        permutohedral_filter(f, f, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        separable_filter(f, [[1.0]], backend="TF")
    with pytest.raises(ValueError, match="backend must be one of"):
        CrfRnn(backend="gpu")
    probs = np.full((4, 5, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        dense_crf(probs, np.zeros((4, 5), np.float32), backend="fast")


def test_auto_lattice_on_gpu_uses_no_compiled_op(fake_gpu):
    """With a GPU, a traced filter with backend="auto" is TensorFlow ops only; the same trace
    under a CPU scope uses the compiled ops (so the op walk can see them)."""
    spec = tf.TensorSpec([None, None, None], tf.float32)

    def step(f, v):
        with tf.GradientTape() as tape:
            tape.watch([f, v])
            out = permutohedral_filter(v, f) + separable_filter(v, [[0.5, 1.0, 0.5]])
        return tape.gradient(out, [f, v])

    on_gpu = tf.function(step).get_concrete_function(spec, spec)
    assert not compiled_ops(op_types(on_gpu))

    def on_cpu(f, v):
        with tf.device("/CPU:0"):
            return step(f, v)

    assert {"Crf3dLatticeBuild", "Crf3dLatticeFilter", "Crf3dSeparableFilter"} <= compiled_ops(
        op_types(tf.function(on_cpu).get_concrete_function(spec, spec))
    )


# ------------------------------------------------------------------------------------ CrfRnn


def crf_inputs(seed: int, spatial=(6, 7, 5), classes=3, channels=2, batch=2):
    rng = np.random.default_rng(seed)
    unaries = rng.normal(0.0, 1.5, (batch, *spatial, classes)).astype(np.float32)
    image = rng.normal(0.0, 1.0, (batch, *spatial, channels)).astype(np.float32)
    target = rng.integers(0, classes, (batch, *spatial))
    return unaries, image, tf.one_hot(target, classes)


def train_step(layer: CrfRnn):
    def step(u, im, target):
        with tf.GradientTape() as tape:
            tape.watch(u)
            logits = layer([u, im], training=True)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(target, logits))
        return logits, tape.gradient(loss, [u, *layer.trainable_weights])

    return tf.function(step)


CRF_SETTINGS = [
    dict(),
    dict(learn_theta=True, normalisation="symmetric"),
    dict(spatial_filter="lattice"),
]


@pytest.mark.parametrize("settings", CRF_SETTINGS, ids=["default", "learn_theta", "lattice"])
def test_crf_rnn_tf_backend_equals_compiled_and_uses_no_compiled_op(settings):
    unaries, image, target = crf_inputs(seed=len(settings))
    kw = dict(theta_alpha=3.0, theta_beta=0.8, theta_gamma=2.0, spacing=[2.0, 1.0, 1.0])
    kw.update(num_iterations=2, **settings)
    results, layers = {}, {}
    for backend in ("compiled", "tf"):
        layer = CrfRnn(backend=backend, **kw)
        layer([unaries, image])
        if layers:  # the same weights in both
            layer.set_weights(layers["compiled"].get_weights())
        else:
            rng = np.random.default_rng(7)
            layer.set_weights([w + rng.uniform(-0.3, 0.3, w.shape) for w in layer.get_weights()])
        layers[backend] = layer
        step = train_step(layer)
        logits, grads = step(unaries, image, target)
        results[backend] = [logits.numpy(), *[g.numpy() for g in grads]]
        types = op_types(step.get_concrete_function(unaries, image, target))
        if backend == "tf":
            assert not compiled_ops(types), compiled_ops(types)
        else:
            assert "Crf3dLatticeFilter" in types
    assert np.abs(results["tf"][0] - unaries).max() > 0.05  # the CRF did something
    for got, want in zip(results["tf"], results["compiled"], strict=True):
        assert rel(got, want) <= REL


def test_crf_rnn_backend_setting(fake_gpu):
    """get_config carries the backend; fused_inference conflicts with "tf"; with "auto" on a
    GPU, even fused_inference=True never reaches the fused kernel (nor any compiled op)."""
    layer = CrfRnn(backend="tf", num_iterations=2)
    assert layer.get_config()["backend"] == "tf"
    assert CrfRnn.from_config(layer.get_config()).backend == "tf"
    assert CrfRnn().backend == "auto"
    with pytest.raises(ValueError, match="fused_inference runs the compiled kernel"):
        CrfRnn(backend="tf", fused_inference=True)
    unaries, image, _ = crf_inputs(seed=3, spatial=(5, 6))
    fused = CrfRnn(num_iterations=2, fused_inference=True)
    fused([unaries, image])
    predict = tf.function(lambda u, im: fused([u, im], training=False))
    types = op_types(predict.get_concrete_function(unaries, image))
    assert not compiled_ops(types)


def test_default_config_has_backend_auto():
    from importlib.resources import files

    import yaml

    cfg = yaml.safe_load((files("crf_rnn_3d.configs") / "crf" / "default.yaml").read_text())
    assert cfg["backend"] == "auto"
    # the per-case widths' keys configure the model's head (models.vnet), not the layer
    from crf_rnn_3d.models.vnet import CASE_THETA_DEFAULTS

    layer_cfg = {k: v for k, v in cfg.items() if k not in CASE_THETA_DEFAULTS}
    assert CrfRnn(**layer_cfg).backend == "auto"


# --------------------------------------------------------------------------------- dense_crf


@pytest.mark.parametrize("mode", ["default", "pydensecrf"])
def test_dense_crf_tf_backend_equals_compiled(mode, monkeypatch):
    rng = np.random.default_rng(5)
    shape = (7, 8, 6)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    logits = rng.normal(0.0, 1.5, (*shape, 3))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    kw = dict(theta_alpha=3.0, theta_beta=0.7, theta_gamma=1.5, spacing=(2.0, 1.0, 1.0), mode=mode)
    compiled = dense_crf(probs, image, backend="compiled", **kw)

    def no_fused(*args, **kwargs):
        raise AssertionError("the fused kernel ran with backend='tf'")

    monkeypatch.setattr(mf, "mean_field_inference", no_fused)
    got = dense_crf(probs, image, backend="tf", **kw)
    assert np.abs(compiled - probs).max() > 0.05
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, compiled, rtol=0, atol=1e-5)
