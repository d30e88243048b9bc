"""One rule for NaN and Inf on every path (docs/reliability.md, "NaN and Inf"): a non-finite
input is an error whose message names the tensor, never a silently NaN-flooded output.

Paths: the lattice filter op, the separable filter op, CrfRnn's composed (training) path (with
the lattice and with the exact bilateral kernel), CrfRnn's fused inference path and
mean_field_inference, dense_crf. Each x {NaN, +Inf, -Inf} x {values / unaries, features /
image}, eagerly and inside tf.function. Finite inputs: output bit-identical to the unchecked
op; gradients finite; a non-finite upstream gradient passes through without an error.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from crf_rnn_3d.crf import functional as mf
from crf_rnn_3d.crf.dense_crf import dense_crf
from crf_rnn_3d.crf.layer import CrfRnn
from crf_rnn_3d.lattice_op import Lattice, gaussian_taps, separable_filter

InvalidArg = tf.errors.InvalidArgumentError
BAD = [np.nan, np.inf, -np.inf]
BAD_IDS = ["nan", "+inf", "-inf"]
SPATIAL = (6, 5, 4)
# where the bad value goes: batch item 1, voxel (3, 2, 1), channel 1 (flat index given below)
AT = (1, 3, 2, 1, 1)


def rng() -> np.random.Generator:
    return np.random.default_rng(5)


def features() -> np.ndarray:
    return rng().normal(size=(2, *SPATIAL, 3)).astype(np.float32)


def values(dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(6).normal(size=(2, *SPATIAL, 2)).astype(dtype)


def with_bad(array: np.ndarray, bad: float, at: tuple[int, ...] = AT) -> np.ndarray:
    out = array.copy()
    out[at] = bad
    return out


def taps() -> list[list[float]]:
    return [gaussian_taps(1.0, 4.0, n) for n in SPATIAL]


def eager(fn):
    return fn


def graph(fn):
    return tf.function(fn)


MODES = [eager, graph]
INDEX = r"at \[1, 3, 2, 1, 1\] \(shape \[2,6,5,4,2\]\)"


# --- the lattice filter op ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
class TestLatticeFilter:
    def test_values(self, mode, bad) -> None:
        lattice = Lattice(features())
        with pytest.raises(InvalidArg, match="values contains NaN or Inf " + INDEX):
            mode(lambda v: lattice.filter(v))(with_bad(values(), bad))

    def test_values_reverse(self, mode, bad) -> None:
        lattice = Lattice(features())
        with pytest.raises(InvalidArg, match="values contains NaN or Inf " + INDEX):
            mode(lambda v: lattice.filter(v, reverse=True))(with_bad(values(), bad))

    def test_features(self, mode, bad) -> None:
        with pytest.raises(InvalidArg, match=r"features contains NaN or Inf \(voxel"):
            mode(lambda f: Lattice(f).filter(values()))(with_bad(features(), bad, (0, 1, 1, 1, 2)))


def test_lattice_unchecked_lets_nan_through() -> None:
    """check_finite=False is the old behaviour: the NaN spreads over much of the output (what
    the check exists to prevent), and no error."""
    out = Lattice(features()).filter(with_bad(values(), np.nan), check_finite=False).numpy()
    assert np.isnan(out).mean() > 0.05


def test_lattice_finite_values_bit_identical_to_unchecked() -> None:
    lattice = Lattice(features())
    for reverse in (False, True):
        checked = lattice.filter(values(), reverse=reverse).numpy()
        unchecked = lattice.filter(values(), reverse=reverse, check_finite=False).numpy()
        assert np.array_equal(checked, unchecked)
        assert np.all(np.isfinite(checked))


def test_lattice_bad_value_in_first_and_last_entry() -> None:
    lattice = Lattice(features())
    with pytest.raises(InvalidArg, match=r"at \[0, 0, 0, 0, 0\]"):
        lattice.filter(with_bad(values(), np.nan, (0, 0, 0, 0, 0)))
    with pytest.raises(InvalidArg, match=r"at \[1, 5, 4, 3, 1\]"):
        lattice.filter(with_bad(values(), -np.inf, (1, 5, 4, 3, 1)))


# --- the separable filter op ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_separable_values(mode, bad, dtype) -> None:
    with pytest.raises(InvalidArg, match="values contains NaN or Inf " + INDEX):
        mode(lambda v: separable_filter(v, taps()))(with_bad(values(dtype), bad))


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
def test_separable_values_identity_taps(bad) -> None:
    """Taps [1] on every axis: the op copies the values (no pass to ride on) and still checks."""
    with pytest.raises(InvalidArg, match="values contains NaN or Inf " + INDEX):
        separable_filter(with_bad(values(), bad), [[1.0]] * 3)


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
def test_separable_tensor_taps(bad) -> None:
    """The separable filter's other input: tensor taps that are not finite."""
    bad_taps = [tf.constant([0.5, bad, 0.5]), tf.constant([1.0]), tf.constant([1.0])]
    with pytest.raises(InvalidArg, match="tap that is not finite"):
        separable_filter(values(), bad_taps)


def test_separable_unchecked_lets_nan_through() -> None:
    out = separable_filter(with_bad(values(), np.nan), taps(), check_finite=False).numpy()
    assert np.isnan(out).sum() > 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_separable_finite_values_bit_identical_to_unchecked(dtype) -> None:
    checked = separable_filter(values(dtype), taps()).numpy()
    unchecked = separable_filter(values(dtype), taps(), check_finite=False).numpy()
    assert np.array_equal(checked, unchecked)


def test_separable_long_rows_last_pass() -> None:
    """Only axis 0 filtered: its pass (the last) cuts rows of 5 x 4 x 40 = 800 > 64 values into
    column strips; the check reads those back too."""
    v = np.random.default_rng(2).normal(size=(1, 6, 5, 4, 40)).astype(np.float32)
    v[0, 4, 3, 2, 17] = np.inf
    with pytest.raises(InvalidArg, match=r"at \[0, 4, 3, 2, 17\]"):
        separable_filter(v, [[0.5, 1.0, 0.5], [1.0], [1.0]])


# --- the CRF ----------------------------------------------------------------------------------


def crf_inputs(dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(8)
    unaries = r.normal(size=(2, *SPATIAL, 3)).astype(dtype)
    image = r.normal(size=(2, *SPATIAL, 1)).astype(dtype)
    return unaries, image


def inputs_with_bad(which: str, bad: float, dtype: type = np.float32):
    unaries, image = crf_inputs(dtype)
    if which == "unaries":
        return with_bad(unaries, bad, (1, 3, 2, 1, 2)), image
    return unaries, with_bad(image, bad, (0, 2, 2, 2, 0))


COMPOSED = {
    "lattice": dict(dtype=np.float32, layer=dict(num_iterations=2)),
    "exact-float64": dict(
        dtype=np.float64, layer=dict(num_iterations=2, bilateral_filter="exact", dtype="float64")
    ),
    "lattice-learn-theta": dict(dtype=np.float32, layer=dict(num_iterations=2, learn_theta=True)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
@pytest.mark.parametrize("which", ["unaries", "image"])
@pytest.mark.parametrize("variant", list(COMPOSED))
def test_crf_composed_path(mode, bad, which, variant) -> None:
    """CrfRnn when training (the composed, differentiable ops): the error names the tensor.
    Before the policy, NaN and +Inf flooded the output with NaN and -Inf left -Inf logits."""
    case = COMPOSED[variant]
    layer = CrfRnn(**case["layer"])
    unaries, image = inputs_with_bad(which, bad, case["dtype"])
    layer([*crf_inputs(case["dtype"])])
    with pytest.raises(InvalidArg, match=f"{which} contains NaN or Inf"):
        mode(lambda u, i: layer([u, i], training=True))(unaries, image)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
@pytest.mark.parametrize("which", ["unaries", "image"])
def test_crf_fused_path(mode, bad, which) -> None:
    layer = CrfRnn(num_iterations=2, fused_inference=True)
    layer([*crf_inputs()])
    unaries, image = inputs_with_bad(which, bad)
    # the fused kernel's own message for the unaries ("contain"), require_finite's for the image
    with pytest.raises(InvalidArg, match=f"{which} contains? NaN or Inf"):
        mode(lambda u, i: layer([u, i], training=False))(unaries, image)


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
@pytest.mark.parametrize("which", ["unaries", "image"])
def test_mean_field_inference(bad, which) -> None:
    unaries, image = inputs_with_bad(which, bad)
    k = unaries.shape[-1]
    with pytest.raises(InvalidArg, match=f"{which} contains? NaN or Inf"):
        mf.mean_field_inference(
            unaries,
            image,
            spacing=[1.0] * 3,
            theta_alpha=3.0,
            theta_beta=[1.0],
            theta_gamma=2.0,
            bilateral_weight=tf.ones([k]),
            spatial_weight=tf.ones([k]),
            compatibility=1.0 - tf.eye(k),
            num_iterations=2,
        )


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
def test_fused_kernel_names_the_voxel(bad) -> None:
    """The fused kernel's message places the bad unary: (1, 3, 2, 1) in a 6 x 5 x 4 grid is
    voxel 3 * 20 + 2 * 4 + 1 = 69 of batch item 1, class 2."""
    layer = CrfRnn(num_iterations=2, fused_inference=True)
    unaries, image = inputs_with_bad("unaries", bad)
    with pytest.raises(InvalidArg, match=r"\(batch item 1, voxel 69 of it .*, class 2\)"):
        layer([unaries, image], training=False)


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
@pytest.mark.parametrize("which", ["probabilities", "image"])
@pytest.mark.parametrize("exact", [False, True])
def test_dense_crf(bad, which, exact) -> None:
    """dense_crf is a NumPy interface: ValueError naming the array (checked before TF)."""
    r = np.random.default_rng(3)
    probs = r.dirichlet([1.0, 1.0], size=SPATIAL).astype(np.float32)
    image = r.normal(size=SPATIAL).astype(np.float32)
    if which == "probabilities":
        probs[2, 2, 2, 0] = bad
    else:
        image[1, 1, 1] = bad
    with pytest.raises(ValueError, match=f"{which} must .*finite"):
        dense_crf(probs, image, exact=exact)


def test_crf_composed_finite_output_unchanged_by_the_check(monkeypatch) -> None:
    """The check is an identity on finite input: bit-identical to a run without it."""
    unaries, image = crf_inputs()
    layer = CrfRnn(num_iterations=3)
    checked = layer([unaries, image], training=True).numpy()
    monkeypatch.setattr(mf, "require_finite", lambda tensor, name: tensor)
    unchecked = layer([unaries, image], training=True).numpy()
    assert np.array_equal(checked, unchecked)
    assert np.all(np.isfinite(checked))


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(COMPOSED))
def test_crf_finite_input_finite_gradients(variant) -> None:
    """Finite inputs give finite gradients for the unaries and every weight (with learn_theta:
    the widths, through the lattice's feature gradient and the separable taps' gradient)."""
    case = COMPOSED[variant]
    unaries, image = (tf.constant(a) for a in crf_inputs(case["dtype"]))
    layer = CrfRnn(**case["layer"])
    layer([unaries, image])
    with tf.GradientTape() as tape:
        tape.watch(unaries)
        out = layer([unaries, image], training=True)
        loss = tf.reduce_sum(tf.square(out))
    grads = tape.gradient(loss, [unaries, *layer.trainable_weights])
    assert len(grads) >= 4
    for g in grads:
        assert g is not None and np.all(np.isfinite(g.numpy()))


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
def test_crf_nonfinite_upstream_gradient_passes_through(bad) -> None:
    """An upstream NaN or Inf gradient is not an input fault: no error, and the non-finite
    value reaches the unaries' gradient (for the optimizer's loss scaling or TerminateOnNaN to
    see), instead of being hidden."""
    unaries, image = (tf.constant(a) for a in crf_inputs())
    layer = CrfRnn(num_iterations=2, learn_theta=True)
    layer([unaries, image])
    upstream = np.ones((2, *SPATIAL, 3), np.float32)
    upstream[0, 1, 1, 1, 0] = bad
    with tf.GradientTape() as tape:
        tape.watch(unaries)
        out = layer([unaries, image], training=True)
    grads = tape.gradient(out, [unaries, *layer.trainable_weights], output_gradients=upstream)
    assert all(g is not None for g in grads)
    assert not np.all(np.isfinite(grads[0].numpy()))


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
def test_filter_ops_nonfinite_upstream_gradient_no_error(bad) -> None:
    lattice_features = tf.constant(features())
    v = tf.constant(values())
    upstream = with_bad(np.ones_like(values()), bad)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([v, lattice_features])
        lat_out = Lattice(lattice_features).filter(v)
        sep_out = separable_filter(v, taps())
    d_v, d_f = tape.gradient(lat_out, [v, lattice_features], output_gradients=upstream)
    d_sep = tape.gradient(sep_out, v, output_gradients=upstream)
    for g in (d_v, d_f, d_sep):
        assert not np.all(np.isfinite(g.numpy()))
