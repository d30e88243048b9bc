"""Separable filtering of [B, *spatial, C] grids as a TensorFlow op (CPU kernel in
csrc/gaussian.cc): the CRF's smoothness kernel as an exact, truncated Gaussian.

    out = separable_filter(values, [gaussian_taps(sigma_a, 4.0, length_a) for each axis])

computes, per batch item and channel, sum over offsets o of prod_a taps_a[o_a + r_a] *
values[i + o], over the voxels i + o inside the grid (zero outside). One pass per axis, each a
multiply-add per tap, in C++ with TensorFlow's intra-op threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

from crf_rnn_3d.lattice_op import _library


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


def _flatten(taps: Sequence[Sequence[float]]) -> tuple[list[float], list[int]]:
    flat, radii = [], []
    for axis, axis_taps in enumerate(taps):
        values = [float(t) for t in axis_taps]
        if len(values) % 2 != 1:
            raise ValueError(
                f"separable_filter: axis {axis} has {len(values)} taps; an odd number "
                "(2 * radius + 1, centred on the voxel itself) is needed"
            )
        if not all(math.isfinite(t) for t in values):
            raise ValueError(f"separable_filter: axis {axis} has taps that are not finite")
        flat += values
        radii.append(len(values) // 2)
    return flat, radii


def separable_filter(values: tf.Tensor, taps: Sequence[Sequence[float]]) -> tf.Tensor:
    """Separable correlation of float32 values [B, *spatial, C] (zero outside the grid).

    Args:
      values: float32 [B, *spatial, C], at least one spatial axis.
      taps: one sequence of 2 r_a + 1 numbers per spatial axis; entry o + r_a weighs the value
        o voxels further along axis a.

    Returns:
      float32 [B, *spatial, C]. Differentiable with respect to the values (the adjoint is the
      same filter with each axis's taps reversed); the taps are constants.

    Raises:
      ValueError: taps of even length or not finite, or not one sequence per spatial axis.
      tf.errors.InvalidArgumentError: values of rank < 3 or with no channels.
    """
    flat, radii = _flatten(taps)
    values = tf.convert_to_tensor(values)
    if values.dtype != tf.float32:
        raise ValueError(f"separable_filter: values must be float32, got {values.dtype.name}")
    rank = values.shape.rank
    if rank is not None and rank - 2 != len(radii):
        raise ValueError(
            f"separable_filter: values of shape {values.shape} have {rank - 2} spatial axes "
            f"but {len(radii)} tap sequences were given"
        )
    return _library.load().crf3d_separable_filter(values, taps=flat, radii=radii)


@tf.RegisterGradient("Crf3dSeparableFilter")
def _separable_gradient(op: tf.Operation, grad: tf.Tensor) -> tf.Tensor:
    """The adjoint: the same filter with each axis's taps reversed."""
    flat, radii = op.get_attr("taps"), op.get_attr("radii")
    reversed_taps, at = [], 0
    for radius in radii:
        count = 2 * radius + 1
        reversed_taps += list(reversed(flat[at : at + count]))
        at += count
    return _library.load().crf3d_separable_filter(grad, taps=reversed_taps, radii=radii)
