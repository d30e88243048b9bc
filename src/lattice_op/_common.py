"""What both lattice backends share (the compiled op in lattice.py, the TensorFlow-ops path in
tf_lattice.py): the input checks with their messages, and the features' gradient, which each
backend evaluates with its own filter on its own lattice.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf


def invalid(message: str) -> tf.errors.InvalidArgumentError:
    return tf.errors.InvalidArgumentError(None, None, message)


def _text(value: object) -> str:
    """A tensor or number as StringFormat would print it: a scalar plainly, a vector as
    [a b c]."""
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    if array.ndim == 0:
        return f"{array.item():g}" if array.dtype.kind == "f" else str(array.item())
    return "[" + " ".join(_text(x) for x in array) + "]"


Describe = Sequence[tf.Tensor] | Callable[[], Sequence[tf.Tensor]]


def require(ok: tf.Tensor, template: str, describe: Describe = ()) -> tf.Tensor | None:
    """An InvalidArgumentError carrying `template` unless `ok` (a scalar bool) holds; `describe`
    gives the small tensors (an index, a shape) that fill the template's {} fields, or a
    function computing them, called only when the check fails.

    Eagerly the error is raised at once, with the fields filled in. In a graph the check is an
    Assert that prints the template followed by the values ("[... at {} ...] [0 1 2 0]"); with
    a function for `describe` it sits in the false branch of a tf.cond, so that locating the
    fault costs nothing when there is none. No StringFormat op is made (it has no GPU kernel):
    the message is a constant string. Returns what to hold a control dependency on (None
    eagerly).
    """
    if tf.executing_eagerly():
        if not bool(ok):
            values = describe() if callable(describe) else describe
            raise invalid(template.format(*[_text(v) for v in values]))
        return None
    ok = tf.convert_to_tensor(ok, tf.bool)
    if not callable(describe):
        return tf.debugging.Assert(ok, [template, *describe], summarize=_SUMMARIZE)

    def failed() -> tf.Tensor:
        check = tf.debugging.Assert(ok, [template, *describe()], summarize=_SUMMARIZE)
        with tf.control_dependencies([check] if check is not None else []):
            return tf.identity(ok)

    return tf.cond(ok, lambda: tf.identity(ok), failed)


# entries of each tensor an Assert prints (indices and shapes have at most rank entries)
_SUMMARIZE = 16


def first_true(flags: tf.Tensor) -> tf.Tensor:
    """The lowest flat index (int64 scalar) of a true entry of `flags`, or its size if none:
    the first row of Where's int64 indices (in row-major order; Where has GPU kernels, while
    ArgMax does not promise the first of equal maxima and int64 Min has no GPU kernel).

    No tensor of the flags' size is formed from their shape alone: traced with static shapes,
    TensorFlow's graph constant folding evaluated such a tensor (an index range) for every
    check when a function was first run, even inside the error branch that never runs (a
    first step of the TF-op path's CrfRnn held gigabytes at the BraTS size)."""
    flat = tf.reshape(flags, [-1])
    size = tf.size(flat, out_type=tf.int64)
    hits = tf.reshape(tf.where(flat), [-1])  # int64, ascending
    return tf.concat([hits[:1], tf.reshape(size, [1])], 0)[0]


def unravel(flat_index: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """The multi-index (int64 [rank]) of a flat row-major index into `shape`, in int64
    arithmetic (UnravelIndex has no GPU kernel)."""
    shape = tf.cast(shape, tf.int64)
    strides = tf.math.cumprod(shape, exclusive=True, reverse=True)
    return tf.math.floormod(tf.math.floordiv(flat_index, strides), shape)


def require_finite_values(values: tf.Tensor) -> tf.Tensor | None:
    """require() that `values` holds no NaN or Inf; the message names the first bad index."""
    bad = tf.logical_not(tf.math.is_finite(values))
    return require(
        tf.logical_not(tf.reduce_any(bad)),
        "values contains NaN or Inf at {} (shape {}); non-finite input is an error "
        "(docs/reliability.md)",
        lambda: [unravel(first_true(bad), tf.shape(values)), tf.shape(values)],
    )


def as_float32(tensor: tf.Tensor | object, name: str) -> tf.Tensor:
    """Converts to a tensor that must be float32; anything else is an InvalidArgumentError."""
    try:
        converted = tf.convert_to_tensor(tensor)
    except (TypeError, ValueError) as err:
        raise invalid(f"{name} could not be converted to a float32 tensor: {err}") from err
    if converted.dtype != tf.float32:
        raise invalid(f"{name} must be float32, got {converted.dtype.name}")
    return converted


def check_static_rank(tensor: tf.Tensor, name: str) -> None:
    rank = tensor.shape.rank
    if rank is not None and rank < 3:
        raise invalid(
            f"{name} must have shape [batch, *spatial, channels] with at least one spatial "
            f"dimension (rank >= 3); got shape {tensor.shape}"
        )
    if rank is not None and tensor.shape[-1] == 0:
        raise invalid(f"{name} has 0 channels (shape {tensor.shape})")


# The accuracy setting (docs/lattice_op.md, "Accuracy setting"): k sweeps of blurs on a lattice
# finer by sqrt((3k + 1) / 4). Each pass costs a blur sweep and the finer lattice has more points,
# so k stays small; 1 is Adams et al.'s lattice (the default, unchanged).
MAX_BLUR_PASSES = 8
# Above this many feature channels the lattice's error is not covered by the tests
# (tests/test_lattice_accuracy.py goes up to 10): Lattice warns.
MAX_TESTED_FEATURES = 10


def check_blur_passes(blur_passes: object) -> int:
    """The accuracy setting as a plain int in 1..MAX_BLUR_PASSES; anything else is a ValueError
    that names it."""
    if isinstance(blur_passes, bool) or not isinstance(blur_passes, (int, np.integer)):
        raise ValueError(f"blur_passes must be an integer, got {blur_passes!r}")
    if not 1 <= int(blur_passes) <= MAX_BLUR_PASSES:
        raise ValueError(f"blur_passes must be in 1..{MAX_BLUR_PASSES}, got {int(blur_passes)}")
    return int(blur_passes)


# The accuracy setting that helps (docs/lattice_op.md, "Accuracy setting"): the filter averages
# this many lattices, each built from the features in a rotated frame. Cost grows linearly.
MAX_LATTICE_COPIES = 8


def check_lattice_copies(lattice_copies: object) -> int:
    """The number of averaged lattices as a plain int in 1..MAX_LATTICE_COPIES; anything else
    is a ValueError that names it."""
    if isinstance(lattice_copies, bool) or not isinstance(lattice_copies, (int, np.integer)):
        raise ValueError(f"lattice_copies must be an integer, got {lattice_copies!r}")
    if not 1 <= int(lattice_copies) <= MAX_LATTICE_COPIES:
        raise ValueError(
            f"lattice_copies must be in 1..{MAX_LATTICE_COPIES}, got {int(lattice_copies)}"
        )
    return int(lattice_copies)


def copy_rotation(num_features: int, copy: int) -> np.ndarray:
    """float32 [F, F] orthogonal matrix of lattice copy `copy` >= 1, fixed for (F, copy) so that
    both backends and every call build the same copies: drawn from the Haar measure on O(F)
    (QR of a Gaussian matrix, the signs of R's diagonal moved into Q); for F = 1, where the only
    choices are +-1, the reflection -1 for odd copies (the lattice then sits at another offset
    from the data: the build subtracts each channel's minimum)."""
    if num_features == 1:
        return np.array([[-1.0 if copy % 2 else 1.0]], np.float32)
    rng = np.random.default_rng([0x1A77, num_features, copy])
    q, r = np.linalg.qr(rng.normal(size=(num_features, num_features)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def warn_untested_features(num_features: int | None, lattice_copies: int) -> None:
    """Warns once per call site when a lattice has more feature channels than the accuracy
    tests cover: its error against the exact Gaussian grows with F (docs/benchmarks.md)."""
    if num_features is not None and num_features > MAX_TESTED_FEATURES:
        warnings.warn(
            f"lattice with {num_features} feature channels (lattice_copies={lattice_copies}): the "
            f"permutohedral approximation's error grows with the feature count and is tested "
            f"only up to {MAX_TESTED_FEATURES} (docs/benchmarks.md, accuracy setting); more "
            f"lattice_copies lower it at a proportional cost",
            RuntimeWarning,
            stacklevel=3,
        )


def checked_values(values: tf.Tensor | object, features_shape: tf.TensorShape) -> tf.Tensor:
    """The values a lattice built from features of ``features_shape`` filters: float32, rank
    >= 3, channels >= 1, batch and spatial shape matching the features' where known."""
    values = as_float32(values, "values")
    check_static_rank(values, "values")
    spatial = features_shape[:-1]
    if values.shape.rank is not None and spatial.rank is not None:
        if not values.shape[:-1].is_compatible_with(spatial):
            raise invalid(
                f"values of shape {values.shape} do not match the lattice's batch and "
                f"spatial shape {spatial} (features had shape {features_shape})"
            )
    return values


def outer(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """[..., C] x [..., F] -> [..., C * F] (channel c * F + k is a_c * b_k)."""
    product = a[..., :, None] * b[..., None, :]
    shape = tf.shape(a)
    return tf.reshape(product, tf.concat([shape[:-1], [shape[-1] * tf.shape(b)[-1]]], 0))


def feature_gradient(
    filter_fn: Callable[[tf.Tensor, bool], tf.Tensor],
    values: tf.Tensor,
    features: tf.Tensor,
    grad: tf.Tensor,
    out: tf.Tensor,
    adjoint_grad: tf.Tensor,
) -> tf.Tensor:
    """Gradient of sum(grad * A v) with respect to the features, for a Gaussian filter A.

    With k_ij = exp(-|f_i - f_j|^2 / 2), dk_ij / df_i = k_ij (f_j - f_i), so for out = A v the
    gradient at voxel a is

        sum_c  g_ac [A (v_c f)]_a - f_a g_ac [A v_c]_a          (a as the output voxel)
             + v_ac [A^T (g_c f)]_a - f_a v_ac [A^T g_c]_a      (a as an input voxel)

    i.e. two more filters, of C * F channels each, on the same lattice (Adams et al.'s lattice
    stands in for the exact kernel, as in the forward pass). The features are centred per batch
    item first: the expression is invariant to a common shift, and centring keeps the
    differences of large products out of single precision's way.

    Args:
      filter_fn: filter_fn(x, adjoint) applies A (adjoint=False) or A^T to [B, *spatial, n].
      values: [B, *spatial, C]; features: [B, *spatial, F]; grad: [B, *spatial, C], the
        gradient of the loss w.r.t. out; out: A values; adjoint_grad: A^T grad.

    Returns:
      [B, *spatial, F], float32.
    """
    spatial_axes = tf.range(1, tf.rank(features) - 1)
    f = features - tf.reduce_mean(features, axis=spatial_axes, keepdims=True)
    num_f = tf.shape(f)[-1]
    num_c = tf.shape(values)[-1]
    ext_shape = tf.concat([tf.shape(values)[:-1], [num_c, num_f]], 0)
    a_vf = tf.reshape(filter_fn(outer(values, f), False), ext_shape)
    at_gf = tf.reshape(filter_fn(outer(grad, f), True), ext_shape)
    as_output = tf.reduce_sum(grad[..., None] * a_vf, axis=-2) - f * tf.reduce_sum(
        grad * out, axis=-1, keepdims=True
    )
    as_input = tf.reduce_sum(values[..., None] * at_gf, axis=-2) - f * tf.reduce_sum(
        values * adjoint_grad, axis=-1, keepdims=True
    )
    return as_output + as_input
