"""The lattice and separable filter in TensorFlow ops (backend "tf", lattice_op/tf_lattice.py)
against the compiled ops and against the float64 brute-force Gaussian.

Relative error here is norm-wise: rel(x, ref) = max|x - ref| / max|ref| over the whole tensor
(per-element ratios are meaningless where a filtered value or a gradient crosses zero). Against
the compiled op the bound is 1e-5 for outputs and for both gradients; the TF path mirrors the
compiled arithmetic, so on the CPU the measured difference is usually exactly 0, but the test
states only what is promised (float32 rounding). The lattice itself is compared exactly: the same
number of points, the same vertex numbers and weights, the same blur neighbours (the compiled
build numbers points in one chunk below 2 x 16384 voxels per item, as every case here is).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf

from crf_rnn_3d.datasets.phantoms import grid_features, grid_values
from crf_rnn_3d.lattice_op import Lattice, separable_filter
from crf_rnn_3d.lattice_op.reference import exact_normalised_filter
from crf_rnn_3d.lattice_op.separable import gaussian_taps
from crf_rnn_3d.lattice_op.tf_lattice import TfLattice, dense_ids

InvalidArg = tf.errors.InvalidArgumentError
REL = 1e-5


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max())
    assert scale > 0.0
    return float(np.abs(np.asarray(x, np.float64) - ref).max()) / scale


def batch_of(spatial: tuple[int, ...], num_f: int, channels: int, batch: int, seed: int):
    """Features and values of `batch` items with different content each."""
    rng = np.random.default_rng(seed)
    f = np.stack([grid_features(spatial, num_f, rng) for _ in range(batch)]).astype(np.float32)
    v = np.stack([grid_values(spatial, channels, "random", rng) for _ in range(batch)])
    return f, v.astype(np.float32), rng.normal(size=v.shape).astype(np.float32)


def filter_and_gradients(lattice_of, f, v, g, reverse=False):
    ft, vt = tf.constant(f), tf.constant(v)
    with tf.GradientTape() as tape:
        tape.watch([ft, vt])
        lattice = lattice_of(ft)
        out = lattice.filter(vt, reverse=reverse)
        loss = tf.reduce_sum(out * g)
    dv, df = tape.gradient(loss, [vt, ft])
    return lattice, out.numpy(), dv.numpy(), df.numpy()


def assert_same_lattice(compiled: Lattice, other) -> None:
    a, b = compiled.tensors, other.tensors
    assert int(compiled.num_points) == int(other.num_points)
    np.testing.assert_array_equal(a.vertex_index.numpy(), b.vertex_index.numpy())
    np.testing.assert_array_equal(a.vertex_weight.numpy(), b.vertex_weight.numpy())
    np.testing.assert_array_equal(a.blur_neighbours.numpy(), b.blur_neighbours.numpy())


# (spatial, F, C, batch): 1-D to 4-D, F = 1..10, C up to 20, batch > 1
CASES = [
    ((200,), 1, 1, 2),
    ((64,), 2, 20, 3),
    ((12, 11), 3, 4, 2),
    ((9, 10), 6, 2, 2),
    ((6, 5, 7), 5, 3, 2),
    ((5, 6, 4), 8, 7, 2),
    ((4, 3, 4, 5), 4, 5, 2),
    ((3, 4, 3, 4), 10, 20, 2),
]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("spatial", "num_f", "channels", "batch"), CASES)
def test_same_lattice_outputs_and_gradients_as_compiled(spatial, num_f, channels, batch, reverse):
    f, v, g = batch_of(spatial, num_f, channels, batch, seed=len(spatial) * 100 + num_f)
    compiled, *want = filter_and_gradients(lambda x: Lattice(x, "compiled"), f, v, g, reverse)
    tf_path, *got = filter_and_gradients(lambda x: Lattice(x, "tf"), f, v, g, reverse)
    assert tf_path.backend == "tf" and compiled.backend == "compiled"
    assert_same_lattice(compiled, tf_path)
    for name, x, ref in zip(("output", "d values", "d features"), got, want, strict=True):
        assert rel(x, ref) <= REL, name


@pytest.mark.parametrize(("spatial", "num_f", "channels"), [((40,), 2, 3), ((5, 4, 6, 3), 7, 2)])
def test_inside_tf_function_with_unknown_sizes(spatial, num_f, channels):
    """Every dimension unknown at trace time (the feature count too); forward and both
    gradients equal the compiled op's."""
    f, v, g = batch_of(spatial, num_f, channels, 2, seed=5)
    spec = tf.TensorSpec([None] * f.ndim, tf.float32)

    def traced(backend):
        @tf.function(input_signature=[spec, spec, spec])
        def step(f, v, g):
            with tf.GradientTape() as tape:
                tape.watch([f, v])
                lattice = Lattice(f, backend)
                out = lattice.filter(v) + 0.5 * lattice.filter(v, reverse=True)
                loss = tf.reduce_sum(out * g)
            return (out, *tape.gradient(loss, [v, f]), lattice.num_points)

        return [x.numpy() for x in step(f, v, g)]

    *want, m_compiled = traced("compiled")
    *got, m_tf = traced("tf")
    assert m_tf == m_compiled
    for x, ref in zip(got, want, strict=True):
        assert rel(x, ref) <= REL


def test_against_float64_brute_force():
    """The normalised TF-path filter against the exact Gaussian, to the bounds the compiled op's
    accuracy tests state for F <= 3 (tests/test_lattice_accuracy.py, in units of the range 2)."""
    rng = np.random.default_rng(11)
    spatial = (12, 11)
    f = grid_features(spatial, 3, rng)
    v = grid_values(spatial, 4, "random", rng)
    lattice = Lattice(f[None].astype(np.float32), backend="tf")
    out = lattice.filter(v[None].astype(np.float32)).numpy()[0]
    ones = lattice.filter(np.ones((1, *spatial, 1), np.float32)).numpy()[0]
    approx = (out / ones).reshape(-1, 4)
    exact = exact_normalised_filter(v.reshape(-1, 4), f.reshape(-1, 3))
    err = np.abs(approx - exact)
    untouched = float(np.sqrt(np.mean((v.reshape(-1, 4) - exact) ** 2)))
    assert err.max() <= 0.12 * 2.0
    assert np.percentile(err, 99) <= 0.08 * 2.0
    assert np.sqrt(np.mean(err**2)) <= 0.025 * 2.0
    assert np.sqrt(np.mean(err**2)) <= 0.2 * untouched


def reference_ids(table: np.ndarray) -> np.ndarray:
    """Ids of the rows of table in order of first occurrence, from numpy's row-wise unique."""
    _, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # rank of each distinct row by its first occurrence
    return order[inverse.reshape(-1)]


@pytest.mark.parametrize("key_bits", [62, 8, 0])
def test_dense_ids_are_exact(key_bits):
    """Rows that agree on the low bits of every column (what a packing with too few bits would
    merge) and columns spanning the whole int32 range (which cannot be packed): ids equal
    numpy's first-occurrence numbering whichever path runs."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 4, size=(300, 3)).astype(np.int64)
    high = rng.integers(0, 3, size=(300, 3)) << 20
    table = (base + high).astype(np.int32)
    ids, count = dense_ids(table, key_bits)
    np.testing.assert_array_equal(ids.numpy(), reference_ids(table))
    assert int(count) == len(np.unique(table, axis=0))
    wide = np.array([[-(2**31), 5], [2**31 - 1, 5], [-(2**31), 5], [0, -(2**31)]], np.int32)
    ids, count = dense_ids(wide, key_bits)
    np.testing.assert_array_equal(ids.numpy(), [0, 1, 0, 2])
    assert int(count) == 3


@pytest.mark.parametrize("key_bits", [0, 20])
def test_forced_fallback_keys_build_the_compiled_lattice(key_bits):
    """The folded (no packing) path forced through the private bit budget: the lattice and the
    filter still equal the compiled op's."""
    f, v, g = batch_of((6, 7, 5), 4, 3, 2, seed=21)
    compiled, *want = filter_and_gradients(lambda x: Lattice(x, "compiled"), f, v, g)
    forced, *got = filter_and_gradients(lambda x: TfLattice(x, _key_bits=key_bits), f, v, g)
    assert_same_lattice(compiled, forced)
    for x, ref in zip(got, want, strict=True):
        assert rel(x, ref) <= REL


def test_every_key_budget_builds_the_compiled_lattice():
    """The build packs its keys (and finds blur neighbours by code arithmetic) when the widened
    coordinate ranges fit the bit budget, else folds them: for every budget from 0 bits (always
    folded) through the exact fit to 62 (packed), the lattice equals the compiled op's. The
    features are spread so that the ranges are wide (many bits per field) and the batch items
    differ (the batch item's field is not empty). These keys need 26 bits (worked out with
    NumPy from the remainder-0 points: coordinate spans 208, 220 and 156, widened by 2F = 6 on
    each side, 8 bits each, and 2 bits for the batch items 0..2), so 25 folds and 26 packs."""
    rng = np.random.default_rng(8)
    f = rng.uniform(0.0, 60.0, size=(3, 7, 6, 3)).astype(np.float32)
    f[1] *= 0.25
    compiled = Lattice(f, "compiled")
    for key_bits in (0, 10, 20, 24, 25, 26, 27, 40, 62):
        assert_same_lattice(compiled, TfLattice(f, _key_bits=key_bits))


def test_batch_items_never_share_points():
    f, v, _ = batch_of((10, 9), 3, 2, 1, seed=4)
    single = TfLattice(f)
    double = TfLattice(np.concatenate([f, f]))
    m = int(single.num_points)
    assert int(double.num_points) == 2 * m
    index = double.tensors.vertex_index.numpy()
    assert index[0].max() < m and index[1].min() >= m
    out = double.filter(np.concatenate([v, v])).numpy()
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], single.filter(v).numpy()[0])


def bad_cases():
    f = np.zeros((1, 4, 5, 3), np.float32)
    f[..., 0] = np.arange(4)[:, None]
    nan_f = f.copy()
    nan_f[0, 1, 4, 2] = np.nan
    wide = f.copy()
    wide[0, 0, 0, 1] = 1e9
    v = np.ones((1, 4, 5, 2), np.float32)
    nan_v = v.copy()
    nan_v[0, 2, 3, 1] = np.inf
    return [
        ("float64", lambda b: Lattice(f.astype(np.float64), b), "features must be float32"),
        ("rank", lambda b: Lattice(np.zeros((4, 3), np.float32), b), "rank >= 3"),
        ("nan features", lambda b: Lattice(nan_f, b), "features contains NaN or Inf"),
        ("wide", lambda b: Lattice(wide, b), "features channel 1 spans"),
        ("nan values", lambda b: Lattice(f, b).filter(nan_v), "values contains NaN or Inf"),
        ("values dtype", lambda b: Lattice(f, b).filter(v.astype(np.int32)), "values must be"),
        ("values shape", lambda b: Lattice(f, b).filter(v[:, :3]), "do not match"),
    ]


@pytest.mark.parametrize(("name", "call", "message"), bad_cases(), ids=[c[0] for c in bad_cases()])
def test_bad_inputs_same_errors_as_compiled(name, call, message):
    for backend in ("compiled", "tf"):
        with pytest.raises(InvalidArg, match=message):
            call(backend)


def test_run_time_errors_inside_tf_function():
    """With unknown shapes the checks run in the graph: NaN in features or values, a rank the
    trace could not see, and a values grid that differs from the lattice's."""
    spec = tf.TensorSpec(None, tf.float32)

    @tf.function(input_signature=[spec, spec])
    def run(f, v):
        return TfLattice(f).filter(v)

    f = np.zeros((1, 4, 5, 2), np.float32)
    f[..., 0] = np.arange(4)[:, None]
    v = np.ones((1, 4, 5, 1), np.float32)
    assert run(f, v).shape == v.shape
    nan_f = f.copy()
    nan_f[0, 3, 2, 1] = np.nan
    # in a graph the message is a constant template followed by its values (no StringFormat,
    # which has no GPU kernel)
    fields = r"\(voxel \{\}, channel \{\} of the batch item \{\}\)\] \[17\] \[1\] \[0\]"
    with pytest.raises(InvalidArg, match=r"features contains NaN or Inf " + fields):
        run(nan_f, v)
    nan_v = v.copy()
    nan_v[0, 1, 2, 0] = np.nan
    with pytest.raises(InvalidArg, match=r"values contains NaN or Inf at \{\}.*\] \[0 1 2 0\]"):
        run(f, nan_v)
    with pytest.raises(InvalidArg, match="rank >= 3"):
        run(f[0, 0], v)
    with pytest.raises(InvalidArg, match="do not match the lattice"):
        run(f, v[:, :2])


def first_bad(x: np.ndarray) -> list[int]:
    """The multi-index of the first non-finite entry in row-major order (numpy's argwhere)."""
    return [int(i) for i in np.argwhere(~np.isfinite(x))[0]]


@pytest.mark.parametrize("traced", [False, True])
def test_errors_name_the_first_of_several_bad_entries(traced):
    """With several NaN/Inf entries the message names the first in row-major order, as the
    compiled op's scan does (the TF path locates it with int64 arithmetic, not ArgMax, whose
    choice among equal maxima is not promised), eagerly and in a graph; likewise the first
    channel of several that span too widely."""
    f = np.zeros((2, 4, 5, 3), np.float32)
    f[..., 0] = np.arange(4)[:, None]
    v = np.ones((2, 4, 5, 2), np.float32)

    def run(features, values):
        if traced:
            return tf.function(lambda a, b: TfLattice(a).filter(b))(features, values)
        return TfLattice(features).filter(values)

    def sep(values):
        call = lambda x: separable_filter(x, [[1.0], [1.0]], backend="tf")  # noqa: E731
        return tf.function(call)(values) if traced else call(values)

    bad_f = f.copy()
    for index in [(1, 3, 4, 2), (1, 0, 2, 1), (1, 2, 0, 0)]:
        bad_f[index] = np.inf
    voxel = 0 * 5 + 2  # batch item 1, voxel (0, 2), channel 1: the first in row-major order
    want = rf"\(voxel {voxel}, channel 1 of the batch item 1\)"
    if traced:
        want = rf"\] \[{voxel}\] \[1\] \[1\]"
    with pytest.raises(InvalidArg, match=want):
        run(bad_f, v)
    bad_v = v.copy()
    for index in [(1, 3, 0, 1), (0, 2, 4, 1), (1, 0, 0, 0), (0, 3, 1, 0)]:
        bad_v[index] = np.nan
    assert first_bad(bad_v) == [0, 2, 4, 1]
    want = "at [0 2 4 1] (shape [2 4 5 2])" if not traced else "] [0 2 4 1] [2 4 5 2]"
    for call in (lambda x: run(f, x), sep):
        with pytest.raises(InvalidArg, match=re.escape(want)):
            call(bad_v)
    wide = f.copy()
    wide[1, 0, 0, 2] = 2e9  # the wider span, but in the later channel
    wide[1, 3, 3, 1] = -1e9
    want = "features channel 1 spans 1e+09" if not traced else "] [1] [1000000000]"
    with pytest.raises(InvalidArg, match=re.escape(want)):
        run(wide, v)


def test_first_true_and_unravel_against_numpy():
    from crf_rnn_3d.lattice_op._common import first_true, unravel

    rng = np.random.default_rng(5)
    for shape in [(7,), (3, 4, 5), (2, 1, 6, 3)]:
        for density in (0.0, 0.02, 0.5, 1.0):
            flags = rng.random(shape) < density
            got = int(first_true(tf.constant(flags)))
            want = int(np.flatnonzero(flags)[0]) if flags.any() else flags.size
            assert got == want
            if flags.any():
                index = unravel(tf.constant(got, tf.int64), tf.constant(shape))
                assert index.numpy().tolist() == first_bad(np.where(flags, np.nan, 0.0))


def test_check_finite_false_lets_nan_through():
    f, v, _ = batch_of((8, 7), 2, 2, 1, seed=9)
    v[0, 3, 3, 0] = np.nan
    out = TfLattice(f).filter(v, check_finite=False).numpy()
    assert np.isnan(out[..., 0]).any() and np.isfinite(out[..., 1]).all()


# ------------------------------------------------------------------- the separable filter


def separable_run(backend, v, taps, g):
    vt = tf.constant(v)
    taps = [tf.constant(t, v.dtype) for t in taps]
    with tf.GradientTape() as tape:
        tape.watch([vt, taps])
        out = separable_filter(vt, taps, backend=backend)
        loss = tf.reduce_sum(out * g)
    dv, dtaps = tape.gradient(loss, [vt, taps])
    return out.numpy(), dv.numpy(), np.concatenate([t.numpy() for t in dtaps])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 40, 3), (2, 9, 8, 2), (1, 7, 6, 5, 4), (2, 4, 5, 3, 6, 2)])
def test_separable_equals_compiled(shape, dtype):
    """Output, values gradient and taps gradient; taps of different radii per axis, one radius
    reaching past the axis (the zero outside), asymmetric taps (so a flipped kernel fails)."""
    rng = np.random.default_rng(len(shape))
    v = rng.normal(size=shape).astype(dtype)
    g = rng.normal(size=shape).astype(dtype)
    taps = [gaussian_taps(0.7 + 0.8 * a, 4.0) for a in range(len(shape) - 2)]
    taps[0] = [t * (1.0 + 0.1 * k) for k, t in enumerate(taps[0])]
    want = separable_run("compiled", v, taps, g)
    got = separable_run("tf", v, taps, g)
    tol = REL if dtype == np.float32 else 1e-12
    for name, x, ref in zip(("output", "d values", "d taps"), got, want, strict=True):
        assert rel(x, ref) <= tol, name


def test_separable_against_direct_sum():
    """A 1-D case worked out directly in float64: out[i] = sum_o t[o + r] v[i + o], zero
    outside."""
    v = np.arange(1.0, 8.0).reshape(1, 7, 1)
    t = [0.25, 1.0, 0.5]
    want = np.array(
        [
            t[1] * v[0, i, 0]
            + t[0] * (v[0, i - 1, 0] if i else 0.0)
            + t[2] * (v[0, i + 1, 0] if i < 6 else 0.0)
            for i in range(7)
        ]
    )
    got = separable_filter(tf.constant(v), [t], backend="tf").numpy()[0, :, 0]
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_separable_errors_match_compiled():
    v = np.ones((1, 5, 4, 2), np.float32)
    nan_v = v.copy()
    nan_v[0, 2, 1, 1] = np.nan
    bad_taps = [tf.constant([1.0, np.inf, 1.0]), tf.constant([1.0])]
    for backend in ("compiled", "tf"):
        with pytest.raises(InvalidArg, match="values contains NaN or Inf"):
            separable_filter(nan_v, [[1.0], [0.5, 1.0, 0.5]], backend=backend)
        with pytest.raises(InvalidArg, match="not finite"):
            separable_filter(v, bad_taps, backend=backend)
        with pytest.raises(ValueError, match="odd number"):
            separable_filter(v, [[1.0, 1.0], [1.0]], backend=backend)
        with pytest.raises(ValueError, match="spatial axes"):
            separable_filter(v, [[1.0]], backend=backend)
        with pytest.raises(InvalidArg, match="0 channels"):
            separable_filter(np.ones((1, 5, 0), np.float32), [[1.0]], backend=backend)
    out = separable_filter(nan_v, [[1.0], [1.0]], check_finite=False, backend="tf").numpy()
    assert np.isnan(out).sum() == 1
