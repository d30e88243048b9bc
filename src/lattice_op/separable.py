"""Separable filtering of [B, *spatial, C] grids as a TensorFlow op (CPU kernel in
csrc/gaussian.cc): e.g. an exact, truncated Gaussian, one 1-D kernel per axis.

    out = separable_filter(values, [gaussian_taps(sigma_a, 4.0, length_a) for each axis])

computes, per batch item and channel, sum over offsets o of prod_a taps_a[o_a + r_a] *
values[i + o], over the voxels i + o inside the grid (zero outside). One pass per axis, each a
multiply-add per tap, in C++ with TensorFlow's intra-op threads, in float32 or float64. The taps
may be tensors (a learnt width): the op then also differentiates with respect to them.

``backend="tf"`` computes the same correlation with TensorFlow's own ops (every device): per axis,
zero padding and one multiply-add of a shifted slice per tap, summed in the compiled kernel's
order (tap -r first), one term after another; its gradients are its own, as the compiled op's:
the values get the correlation with the taps reversed, tensor taps the lagged inner products
of the gradient with the values (TensorFlow's derivative of the slices would add all 2r + 1
padded volumes at once; docs/lattice_op.md, "Memory of the TF filter"). "auto" picks as
crf_rnn_3d.lattice_op.backend.resolve_backend says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tensorflow as tf

from crf_rnn_3d.lattice_op import _library
from crf_rnn_3d.lattice_op._common import invalid, require, require_finite_values
from crf_rnn_3d.lattice_op.backend import resolve_backend


def gaussian_taps(sigma: float, truncate: float, length: int | None = None) -> list[float]:
    """Taps exp(-k^2 / (2 sigma^2)) for k = -r..r, r = ceil(truncate * sigma), capped at
    length - 1 when the axis length is known (taps further out never meet a voxel).

    Raises:
      ValueError: sigma or truncate not a finite number > 0.
    """
    for name, value in (("sigma", sigma), ("truncate", truncate)):
        if not math.isfinite(float(value)) or float(value) <= 0:
            raise ValueError(f"gaussian_taps: {name} must be a finite number > 0, got {value!r}")
    radius = math.ceil(truncate * sigma)
    if length is not None:
        radius = min(radius, max(int(length) - 1, 0))
    return [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]


Taps = Sequence[Sequence[float] | tf.Tensor]


def _flatten(taps: Taps, dtype: tf.DType) -> tuple[tf.Tensor, list[int], list[tf.Tensor]]:
    """One taps tensor [sum_a 2 r_a + 1] of `dtype`, the radii r_a and the per-axis tap tensors,
    from one sequence of numbers or one 1-D tensor (of static length) per axis."""
    parts, radii = [], []
    for axis, axis_taps in enumerate(taps):
        if isinstance(axis_taps, tf.Tensor | tf.Variable):
            part = tf.cast(tf.reshape(axis_taps, [-1]), dtype)
            length = part.shape[0]
            if length is None:
                raise ValueError(
                    f"separable_filter: axis {axis} has taps of unknown length; their number "
                    "(2 * radius + 1) must be known when the graph is built"
                )
        else:
            numbers = [float(t) for t in axis_taps]
            if not all(math.isfinite(t) for t in numbers):
                raise ValueError(f"separable_filter: axis {axis} has taps that are not finite")
            part, length = tf.constant(numbers, dtype, shape=[len(numbers)]), len(numbers)
        if length % 2 != 1:
            raise ValueError(
                f"separable_filter: axis {axis} has {length} taps; an odd number "
                "(2 * radius + 1, centred on the voxel itself) is needed"
            )
        parts.append(part)
        radii.append(length // 2)
    flat = tf.concat(parts, 0) if parts else tf.zeros([0], dtype)
    return flat, radii, parts


def separable_filter(
    values: tf.Tensor, taps: Taps, check_finite: bool = True, backend: str = "auto"
) -> tf.Tensor:
    """Separable correlation of values [B, *spatial, C] (zero outside the grid).

    Args:
      values: float32 or float64 [B, *spatial, C], at least one spatial axis.
      taps: one entry per spatial axis: a sequence of 2 r_a + 1 numbers (fixed taps) or a 1-D
        tensor of static length 2 r_a + 1 (e.g. computed from a trainable width); entry o + r_a
        weighs the value o voxels further along axis a. Cast to the values' dtype.
      check_finite: values holding NaN or Inf raise InvalidArgumentError ("values contains NaN
        or Inf at [b, ..., c]"); the check reads back the last pass's output while it is in
        cache (docs/reliability.md measures its cost). False lets them through (each NaN then
        spreads over its taps' reach).
      backend: "auto" (default), "compiled" (the C++ op) or "tf" (TensorFlow ops, any device);
        see crf_rnn_3d.lattice_op.backend. Same result to float rounding, same errors.

    Returns:
      [B, *spatial, C] in the values' dtype. Differentiable with respect to the values (the
      adjoint: the same filter with each axis's taps reversed) and to tensor taps (a lagged
      inner product of the gradient with the values filtered along the other axes).

    Raises:
      ValueError: values neither float32 nor float64, taps of even or unknown length or not
        finite, or not one entry per spatial axis.
      tf.errors.InvalidArgumentError: values of rank < 3 or with no channels, or (with
        check_finite) holding NaN or Inf; tensor taps that are not finite.
    """
    values = tf.convert_to_tensor(values)
    if values.dtype not in (tf.float32, tf.float64):
        raise ValueError(
            f"separable_filter: values must be float32 or float64, got {values.dtype.name}"
        )
    flat, radii, parts = _flatten(taps, values.dtype)
    rank = values.shape.rank
    if rank is not None and rank - 2 != len(radii):
        raise ValueError(
            f"separable_filter: values of shape {values.shape} have {rank - 2} spatial axes "
            f"but {len(radii)} tap sequences were given"
        )
    if resolve_backend(backend, values) == "tf":
        learnt = [isinstance(t, tf.Tensor | tf.Variable) for t in taps]
        return _separable_tf(values, parts, radii, learnt, bool(check_finite))
    radii_t = tf.constant(radii, tf.int32, shape=[len(radii)])
    return _library.load().crf3d_separable_filter(
        values, flat, radii_t, check_finite=bool(check_finite)
    )


def _shifted(x: tf.Tensor, radius: int, axis: int) -> Callable[[int], tf.Tensor]:
    """shift(o): x moved by o voxels along axis (entry i holds x[i + o e_axis], zero outside),
    for |o| <= radius; all shifts are slices of one zero-padded copy."""
    rank = x.shape.rank
    paddings = [[0, 0]] * rank
    paddings[axis] = [radius, radius]
    padded = tf.pad(x, paddings)
    size = tf.tensor_scatter_nd_update(-tf.ones([rank], tf.int32), [[axis]], [tf.shape(x)[axis]])

    def shift(o: int) -> tf.Tensor:
        begin = [0] * rank
        begin[axis] = radius + o
        return tf.slice(padded, begin, size)

    return shift


def _correlate(x: tf.Tensor, taps: tf.Tensor, radius: int, axis: int) -> tf.Tensor:
    """out[i] = sum_{o=-r..r} taps[o + r] * x[i + o e_axis] (zero outside), summed from o = -r
    up, one multiply-add per tap (the compiled kernel's order)."""
    if radius == 0:
        return taps[0] * x
    shift = _shifted(x, radius, axis)
    out = None
    for o in range(-radius, radius + 1):
        # each term after the sum so far: traced, the runtime would otherwise compute all
        # 2r + 1 shifted terms at once (as many volumes alive together instead of two)
        with tf.control_dependencies([] if out is None else [out]):
            term = taps[o + radius] * shift(o)
        out = term if out is None else out + term
    return out


def _correlate_axis(
    x: tf.Tensor, taps: tf.Tensor, radius: int, axis: int, taps_gradient: bool
) -> tf.Tensor:
    """:func:`_correlate` with its own gradient: the values get the correlation with the taps
    reversed (the adjoint, as the compiled op's gradient); the taps (when taps_gradient)
    d/d taps[o + r] = sum_i g[i] x[i + o e_axis]. TensorFlow's derivative of the slices
    instead sums 2r + 1 padded volumes at once and, eagerly, keeps every shifted term."""

    @tf.custom_gradient
    def run(x: tf.Tensor, taps: tf.Tensor):
        def gradient(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
            d_x = _correlate(upstream, tf.reverse(taps, [0]), radius, axis)
            if not taps_gradient:
                return d_x, None
            shift = _shifted(x, radius, axis)
            d_taps = []
            for o in range(-radius, radius + 1):
                with tf.control_dependencies(d_taps[-1:]):  # one product at a time
                    d_taps.append(tf.reduce_sum(upstream * shift(o)))
            return d_x, tf.stack(d_taps)

        # stop_gradient: eagerly, a tape would otherwise also record (and keep) the ops inside
        return _correlate(tf.stop_gradient(x), tf.stop_gradient(taps), radius, axis), gradient

    return run(x, taps)


def _separable_tf(
    values: tf.Tensor,
    parts: list[tf.Tensor],
    radii: list[int],
    learnt: list[bool],
    check_finite: bool,
) -> tf.Tensor:
    """The "tf" backend of separable_filter: one zero-padded correlation per spatial axis, in
    TensorFlow ops; checks and errors as the compiled op's."""
    rank = values.shape.rank
    if rank is not None and rank < 3:
        raise invalid(
            "values must have shape [batch, *spatial, channels] with at least one spatial "
            f"dimension (rank >= 3); got shape {values.shape}"
        )
    if rank is not None and values.shape[-1] == 0:
        raise invalid(f"values has 0 channels (shape {values.shape})")
    checks = [
        require(tf.shape(values)[-1] >= 1, "values has 0 channels (shape {})", [tf.shape(values)])
    ]
    for axis, part in enumerate(parts):
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all(tf.math.is_finite(part)),
                [f"separable filter: axis {axis} has a tap that is not finite"],
            )
        )
    if check_finite:
        checks.append(require_finite_values(values))
    with tf.control_dependencies([c for c in checks if c is not None]):
        out = tf.identity(values)
    for axis, (part, radius, grad) in enumerate(zip(parts, radii, learnt, strict=True)):
        out = _correlate_axis(out, part, radius, axis + 1, grad)
    return out


@tf.RegisterGradient("Crf3dSeparableFilter")
def _separable_gradient(op: tf.Operation, grad: tf.Tensor) -> list[tf.Tensor | None]:
    """Values: the adjoint (each axis's taps reversed). Taps: for the forward filter C,
    d sum(g * C x) / d taps is Crf3dSeparableFilterTapsGrad(x, g); for the adjoint op,
    sum(g * C^T x) = sum(x * C g), the same with x and g swapped. Inputs a tape does not need
    (skip_input_indices; constant taps) are not computed. An upstream gradient holding NaN or
    Inf passes through unchecked (as in the lattice filter's gradient; docs/reliability.md)."""
    values, taps, radii = op.inputs
    adjoint = op.get_attr("adjoint")
    skip = getattr(op, "skip_input_indices", None) or ()
    ops = _library.load()
    d_values = None
    if 0 not in skip:
        d_values = ops.crf3d_separable_filter(
            grad, taps, radii, adjoint=not adjoint, check_finite=False
        )
    d_taps = None
    if 1 not in skip:
        first, second = (grad, values) if adjoint else (values, grad)
        d_taps = ops.crf3d_separable_filter_taps_grad(first, second, taps, radii)
    return [d_values, d_taps, None]


# Second derivatives through the taps' gradient are not offered: first-order training only.
tf.no_gradient("Crf3dSeparableFilterTapsGrad")
