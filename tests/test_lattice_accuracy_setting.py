"""The lattice's accuracy settings (docs/lattice_op.md, "Accuracy setting").

lattice_copies = S averages S lattices built from the features in fixed rotated frames; the
Gaussian is rotation invariant, the lattice's error is not, so the average is closer to the
exact filter. Reference: the float64 brute-force normalised filter (src/lattice_op/reference.py).
Stated bound, F = 1..10, smooth and noise-like values: the relative L2 error
||approx - exact|| / ||exact - mean(exact)|| of S = 4 copies is at most 0.9 x the default's
(measured on this file's cases: 0.49-0.83 x, MEASURED below; with F = 1 the copies are the
features and their reflection, 0.54 and 0.72 x).

blur_passes = k (compiled only) keeps the same Gaussian on a finer lattice (its kernel width is
checked here and in tests/cpp/test_core.cc; its unnormalised scale grows with k, which the
normalisation by the filter of ones removes); it lowers the error for F <= 3 only, which
docs/lattice_op.md reports, so no bound on its error is stated here beyond the default's.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow as tf

from crf_rnn_3d.crf import CrfRnn
from crf_rnn_3d.crf import functional as mf
from crf_rnn_3d.crf.dense_crf import dense_crf
from crf_rnn_3d.datasets.phantoms import grid_features, grid_values
from crf_rnn_3d.lattice_op import Lattice
from crf_rnn_3d.lattice_op._common import copy_rotation
from crf_rnn_3d.lattice_op.reference import exact_normalised_filter

SHAPE_OF_F = {1: (300,), 2: (30, 30)}
DEFAULT_SHAPE = (11, 11, 11)
SPACING = 0.3
# The bound on error(S = 4) / error(default); MEASURED: the ratios this file's cases gave
# (min-max over F = 1..10 and both value kinds) when the bound was set.
RATIO_BOUND = 0.9
MEASURED = (0.49, 0.83)


def case(num_f: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([num_f, int(kind == "noise")])
    spatial = SHAPE_OF_F.get(num_f, DEFAULT_SHAPE)
    feats = grid_features(spatial, num_f, rng, spacing=SPACING)
    vals = grid_values(spatial, 2, "smooth" if kind == "smooth" else "random", rng)
    return feats, vals


def normalised(lattice: Lattice, vals: np.ndarray) -> np.ndarray:
    out = lattice.filter(vals[None]).numpy()[0]
    ones = lattice.filter(np.ones_like(vals[None, ..., :1])).numpy()[0]
    return (out / ones).reshape(-1, vals.shape[-1])


def relative_error(feats: np.ndarray, vals: np.ndarray, **settings) -> float:
    num_f, num_c = feats.shape[-1], vals.shape[-1]
    exact = exact_normalised_filter(vals.reshape(-1, num_c), feats.reshape(-1, num_f))
    approx = normalised(Lattice(feats[None], backend="compiled", **settings), vals)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact - exact.mean(0)))


@pytest.mark.parametrize("kind", ["smooth", "noise"])
@pytest.mark.parametrize("num_f", range(1, 11))
def test_copies_lower_the_error(num_f: int, kind: str) -> None:
    feats, vals = case(num_f, kind)
    default = relative_error(feats, vals)
    four = relative_error(feats, vals, lattice_copies=4)
    assert four <= RATIO_BOUND * default, f"copies=4 {four:.4f} vs default {default:.4f}"


@pytest.mark.parametrize("num_f", [2, 5, 7])
def test_more_copies_do_not_raise_the_error(num_f: int) -> None:
    """On noise-like values the error falls from 1 to 2 to 4 copies (each step at most what it
    was; measured decreases of 6-26% per step on these cases)."""
    feats, vals = case(num_f, "noise")
    errors = [relative_error(feats, vals, lattice_copies=s) for s in (1, 2, 4)]
    assert errors[1] <= errors[0] and errors[2] <= errors[1], errors


def test_default_is_unchanged_bit_for_bit() -> None:
    """The settings at their defaults run exactly the default lattice: the explicit settings give
    the same tensors and outputs bit for bit, and the compiled lattice equals the TF-op mirror
    (tf_lattice.py, which these settings do not touch) bit for bit, as before."""
    feats, vals = case(7, "noise")
    plain = Lattice(feats[None], backend="compiled")
    explicit = Lattice(feats[None], backend="compiled", lattice_copies=1, blur_passes=1)
    mirror = Lattice(feats[None], backend="tf")
    for a, b in zip(plain.tensors, explicit.tensors, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(plain.tensors[:3], mirror.tensors[:3], strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    out = plain.filter(vals[None]).numpy()
    np.testing.assert_array_equal(out, explicit.filter(vals[None]).numpy())
    np.testing.assert_array_equal(out, mirror.filter(vals[None]).numpy())
    assert plain.copies == [] and explicit.copies == []


@pytest.mark.parametrize("num_f", [3, 7, 10])
def test_tf_path_builds_the_same_copies(num_f: int) -> None:
    """With lattice_copies = 3 both backends build the same lattices (each copy's points,
    weights and neighbours equal bit for bit) and filter to float32 rounding, both directions."""
    feats, vals = case(num_f, "noise")
    compiled = Lattice(feats[None], backend="compiled", lattice_copies=3)
    mirrored = Lattice(feats[None], backend="tf", lattice_copies=3)
    for a, b in zip([compiled, *compiled.copies], [mirrored, *mirrored.copies], strict=True):
        for x, y in zip(a.tensors[:3], b.tensors[:3], strict=True):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert int(compiled.num_points) == int(mirrored.num_points)
    for reverse in (False, True):
        x = compiled.filter(vals[None], reverse=reverse).numpy()
        y = mirrored.filter(vals[None], reverse=reverse).numpy()
        assert np.abs(x - y).max() <= 1e-5 * np.abs(x).max()


def test_copies_average_the_rotated_lattices() -> None:
    """filter = the mean of the filters of the lattices of R_s f, R_0 = identity."""
    feats, vals = case(5, "noise")
    lattice = Lattice(feats[None], backend="compiled", lattice_copies=3)
    expected = sum(
        Lattice(feats[None] @ copy_rotation(5, s).T if s else feats[None], backend="compiled")
        .filter(vals[None])
        .numpy()
        for s in range(3)
    )
    np.testing.assert_allclose(lattice.filter(vals[None]).numpy(), expected / 3, rtol=1e-5)


def test_rotations_are_orthogonal_and_fixed() -> None:
    for num_f in (1, 2, 7, 10):
        for copy in (1, 2, 5):
            r = copy_rotation(num_f, copy).astype(np.float64)
            np.testing.assert_allclose(r @ r.T, np.eye(num_f), atol=1e-6)
            np.testing.assert_array_equal(r, copy_rotation(num_f, copy))
    assert not np.allclose(copy_rotation(7, 1), copy_rotation(7, 2))


GRAD_CASES = [((16, 15), 3), ((7, 8, 6), 5), ((7, 8, 6), 7)]


@pytest.mark.parametrize(("spatial", "num_f"), GRAD_CASES)
def test_gradient_with_copies_agrees_with_exact(spatial: tuple[int, ...], num_f: int) -> None:
    """The features' gradient through 3 copies against autodiff of the dense float64 kernel
    (tests/test_lattice_feature_grad.py's method and bounds), and the values' gradient equal to
    the adjoint filter."""
    rng = np.random.default_rng(num_f)
    feats = grid_features(spatial, num_f, rng, spacing=0.5)
    vals = grid_values(spatial, 3, "smooth", rng)
    weights = rng.normal(size=vals.shape)
    f64 = tf.Variable(feats.astype(np.float64))
    with tf.GradientTape() as tape:
        flat = tf.reshape(f64, [-1, num_f])
        sq = tf.reduce_sum(flat * flat, -1)
        k = tf.exp(
            -0.5 * tf.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ tf.transpose(flat), 0.0)
        )
        v = tf.constant(vals.reshape(-1, 3), tf.float64)
        loss = tf.reduce_sum((k @ v) / tf.reduce_sum(k, 1, keepdims=True) * weights.reshape(-1, 3))
    exact = tape.gradient(loss, f64).numpy().ravel()
    f32 = tf.Variable(feats[None])
    v32 = tf.Variable(vals[None])
    with tf.GradientTape() as tape:
        lattice = Lattice(f32, backend="compiled", lattice_copies=3)
        out = lattice.filter(v32) / lattice.filter(tf.ones_like(v32[..., :1]))
        loss = tf.reduce_sum(out * weights[None].astype(np.float32))
    ours, d_values = tape.gradient(loss, [f32, v32])
    ours = ours.numpy().ravel()
    cosine = exact @ ours / (np.linalg.norm(exact) * np.linalg.norm(ours))
    relative = np.linalg.norm(ours - exact) / np.linalg.norm(exact)
    min_cos, max_rel = (0.99, 0.15) if num_f <= 3 else (0.975, 0.25) if num_f <= 5 else (0.93, 0.45)
    assert cosine >= min_cos and relative <= max_rel, (cosine, relative)
    ones = lattice.filter(tf.ones_like(v32[..., :1]))
    adjoint = lattice.filter(weights[None].astype(np.float32) / ones, reverse=True)
    np.testing.assert_allclose(d_values.numpy(), adjoint.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("passes", [2, 3])
def test_blur_passes_keep_the_unit_gaussian(passes: int) -> None:
    """Impulse response on a dense 1-D sampling (as tests/test_lattice_accuracy.py's width test):
    a finer lattice with k sweeps keeps the standard deviation close to 1 feature unit, and the
    adjoint (reverse) is the transpose."""
    x = (np.arange(401) - 200) * 0.05
    features = np.zeros((1, 401, 2), np.float32)
    features[0, :, 0] = x
    impulse = np.zeros((1, 401, 1), np.float32)
    impulse[0, 200, 0] = 1.0
    lattice = Lattice(features, backend="compiled", blur_passes=passes)
    response = lattice.filter(impulse).numpy()[0, :, 0]
    weights = response / response.sum()
    assert abs(float(np.sum(weights * x))) <= 0.1
    assert 0.95 <= float(np.sqrt(np.sum(weights * x**2))) <= 1.10
    rng = np.random.default_rng(passes)
    a, b = (rng.normal(size=(1, 401, 2)).astype(np.float32) for _ in range(2))
    left = float(np.sum(lattice.filter(a).numpy() * b))
    right = float(np.sum(a * lattice.filter(b, reverse=True).numpy()))
    assert abs(left - right) <= 1e-4 * np.abs(left)


def test_blur_passes_are_compiled_only() -> None:
    feats, _ = case(3, "smooth")
    with pytest.raises(ValueError, match="blur_passes > 1"):
        Lattice(feats[None], backend="tf", blur_passes=2)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("lattice_copies", 0),
        ("lattice_copies", 9),
        ("lattice_copies", 2.0),
        ("lattice_copies", True),
        ("blur_passes", 0),
        ("blur_passes", "2"),
    ],
)
def test_bad_settings_are_refused(setting: str, value: object) -> None:
    feats, _ = case(3, "smooth")
    with pytest.raises(ValueError, match=setting):
        Lattice(feats[None], **{setting: value})


def test_unknown_feature_count_with_copies_is_refused() -> None:
    spec = tf.TensorSpec([1, None, None], tf.float32)
    traced = tf.function(lambda f: Lattice(f, backend="compiled", lattice_copies=2).num_points)
    with pytest.raises(ValueError, match="static number of feature channels"):
        traced.get_concrete_function(spec)


def test_warning_above_ten_features() -> None:
    rng = np.random.default_rng(0)
    with pytest.warns(RuntimeWarning, match="11 feature channels"):
        Lattice(grid_features((5, 5, 4), 11, rng)[None], backend="compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Lattice(grid_features((5, 5, 4), 10, rng)[None], backend="compiled")


# The CRF: the setting reaches the lattice, the fused kernel is bypassed for more than 1 copy.


def crf_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    unaries = rng.normal(size=(1, 6, 7, 5, 3)).astype(np.float32)
    image = rng.normal(size=(1, 6, 7, 5, 2)).astype(np.float32)
    return unaries, image


def test_crf_layer_falls_back_to_the_composed_path(monkeypatch) -> None:
    unaries, image = crf_inputs()
    settings = dict(spacing=[1.0, 1.0, 1.0], theta_alpha=3.0, backend="compiled")
    fused = CrfRnn(fused_inference=True, lattice_copies=2, **settings)
    composed = CrfRnn(lattice_copies=2, **settings)
    expected = composed([unaries, image], training=False).numpy()

    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel must not run with lattice_copies > 1")

    monkeypatch.setattr(mf, "mean_field_inference", refuse)
    got = fused([unaries, image], training=False).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    one = CrfRnn(**settings)([unaries, image], training=False).numpy()
    assert np.abs(one - expected).max() > 1e-4  # the copies do change the result
    assert fused.get_config()["lattice_copies"] == 2
    assert CrfRnn.from_config(fused.get_config()).lattice_copies == 2
    with pytest.raises(ValueError, match="lattice_copies"):
        CrfRnn(lattice_copies=0)


def test_dense_crf_with_copies_runs_the_composed_mean_field(monkeypatch) -> None:
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(3), size=(6, 7, 5)).astype(np.float32)
    image = rng.normal(size=(6, 7, 5)).astype(np.float32)
    calls = []
    original = mf.mean_field

    def recording(*args, **kwargs):
        calls.append(kwargs["lattice_copies"])
        return original(*args, **kwargs)

    monkeypatch.setattr(mf, "mean_field", recording)
    two = dense_crf(probs, image, theta_alpha=3.0, backend="compiled", lattice_copies=2)
    assert calls == [2]
    np.testing.assert_allclose(two.sum(-1), 1.0, atol=1e-5)
    one = dense_crf(probs, image, theta_alpha=3.0, backend="compiled")
    assert calls == [2]  # the default runs the fused kernel
    assert np.abs(two - one).max() > 1e-4
    with pytest.raises(ValueError, match="lattice_copies"):
        dense_crf(probs, image, lattice_copies=9)


def _bench_accuracy_module():
    """scripts/bench_accuracy.py, whose --explore mode measures ideas on a float64 numpy
    lattice (docs/lattice_op.md, "Ideas measured"); loaded by path (scripts/ is no package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_accuracy.py"
    spec = importlib.util.spec_from_file_location("bench_accuracy_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("num_f", range(1, 11))
def test_numpy_lattice_of_the_exploration_is_the_op(num_f: int) -> None:
    # The exploration's figures are only about the op if its numpy lattice is the op's lattice:
    # the same points (count) and the same filter up to the op's float32 rounding.
    bench = _bench_accuracy_module()
    rng = np.random.default_rng([num_f, 5])
    feats = rng.normal(size=(700, num_f)) * 1.5
    vals = rng.normal(size=(700, 2))
    mine = bench.np_lattice(feats)
    lattice = Lattice(feats[None].astype(np.float32), backend="compiled")
    theirs = lattice.filter(vals[None].astype(np.float32)).numpy()[0]
    assert mine["m"] == int(lattice.num_points)
    out = bench.np_filter(mine, vals)
    assert np.max(np.abs(out - theirs)) <= 1e-5 * np.max(np.abs(theirs))


def test_numpy_lattice_self_weight_is_the_filter_diagonal_when_no_point_is_missing() -> None:
    # np_self_weight assumes every blur path's points are stored; on a dense 2-D grid (every
    # neighbour present near the middle) it must equal the filter of a one-hot voxel there.
    bench = _bench_accuracy_module()
    grid = np.stack(np.meshgrid(np.arange(40), np.arange(40), indexing="ij"), -1)
    feats = grid.reshape(-1, 2) * 0.15
    lattice = bench.np_lattice(feats)
    weight = bench.np_self_weight(lattice)
    for voxel in (20 * 40 + 20, 21 * 40 + 17, 18 * 40 + 23):
        one_hot = np.zeros((feats.shape[0], 1))
        one_hot[voxel] = 1.0
        diagonal = bench.np_filter(lattice, one_hot)[voxel, 0]
        assert abs(diagonal - weight[voxel]) <= 1e-12
