"""Permutohedral-lattice Gaussian filtering as TensorFlow ops (CPU kernels in tf_op/ over the
framework-free core in csrc/).

A lattice is built once from a reference image's features and then filters any number of value
arrays: a caller that filters many arrays with the same features (iterations of one forward
pass, and its backward pass) builds it once. The lattice is a handful of ordinary tensors (no
hidden state), so it works eagerly, inside ``tf.function`` and inside ``model.fit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from crf_rnn_3d.lattice_op import _library


def _ops():
    return _library.load()


def _invalid(message: str) -> tf.errors.InvalidArgumentError:
    return tf.errors.InvalidArgumentError(None, None, message)


def _as_float32(tensor: tf.Tensor | object, name: str) -> tf.Tensor:
    """Converts to a tensor that must be float32; anything else is an InvalidArgumentError."""
    try:
        converted = tf.convert_to_tensor(tensor)
    except (TypeError, ValueError) as err:
        raise _invalid(f"{name} could not be converted to a float32 tensor: {err}") from err
    if converted.dtype != tf.float32:
        raise _invalid(f"{name} must be float32, got {converted.dtype.name}")
    return converted


def _check_static_rank(tensor: tf.Tensor, name: str) -> None:
    rank = tensor.shape.rank
    if rank is not None and rank < 3:
        raise _invalid(
            f"{name} must have shape [batch, *spatial, channels] with at least one spatial "
            f"dimension (rank >= 3); got shape {tensor.shape}"
        )
    if rank is not None and tensor.shape[-1] == 0:
        raise _invalid(f"{name} has 0 channels (shape {tensor.shape})")


class LatticeTensors(NamedTuple):
    """The lattice of a batch of feature maps, as the build op returns it.

    vertex_index:    int32 [B, *spatial, F+1]  lattice point of each simplex vertex of each voxel
    vertex_weight:   float32 [B, *spatial, F+1]  barycentric weight of that vertex
    blur_neighbours: int32 [F+1, M, 2]  the two neighbours of each lattice point per direction
                     (M, one past the last point, marks an absent neighbour)
    splat_offsets:   int32 [M+1]  CSR row pointers into splat_voxels / splat_weights
    splat_voxels:    int32 [B*N*(F+1)]  per lattice point, the flat voxel index of each entry
                     that touches it (in increasing order of voxel * (F+1) + k)
    splat_weights:   float32 [B*N*(F+1)]  the barycentric weight of that entry
    """

    vertex_index: tf.Tensor
    vertex_weight: tf.Tensor
    blur_neighbours: tf.Tensor
    splat_offsets: tf.Tensor
    splat_voxels: tf.Tensor
    splat_weights: tf.Tensor


class Lattice:
    """A permutohedral lattice built once from reference features, applied many times.

    Args:
      features: float32 [B, *spatial, F], B >= 1, at least one spatial dimension, F >= 1.
        Each channel is already divided by its kernel width (e.g. position in mm / theta_alpha,
        intensity / theta_beta), so the kernel is k(f_i, f_j) = exp(-|f_i - f_j|^2 / 2).
        Batch items get lattices of their own and never mix.

    Raises:
      tf.errors.InvalidArgumentError: wrong dtype or rank, no channels or voxels, NaN or Inf in
        features, or a feature channel spread too widely to resolve in single precision. (NaN
        or Inf in the values is refused by :meth:`filter`: docs/reliability.md, "NaN and Inf".)
      tf.errors.ResourceExhaustedError: the lattice would not fit in memory (the budget is the
        machine's memory, or CRF3D_LATTICE_MAX_BYTES when set).

    Gradients: every filter output is differentiable with respect to the values (the adjoint
    filter) and to the features (see :func:`_filter_gradient`: the derivative of the Gaussian
    kernel, evaluated with further filters on the same lattice). The build itself is piecewise
    constant in the features and has no gradient of its own.
    """

    def __init__(self, features: tf.Tensor) -> None:
        features = _as_float32(features, "features")
        _check_static_rank(features, "features")
        self.features = features
        self.features_shape = features.shape
        self.tensors = LatticeTensors(*_ops().crf3d_lattice_build(features))

    @property
    def num_points(self) -> tf.Tensor:
        """Number of lattice points M over all batch items (int32 scalar tensor)."""
        return tf.shape(self.tensors.blur_neighbours)[1]

    def filter(
        self, values: tf.Tensor, reverse: bool = False, check_finite: bool = True
    ) -> tf.Tensor:
        """Gaussian-filters `values` over the lattice.

        Args:
          values: float32 [B, *spatial, C], any C >= 1, with the batch and spatial shape of the
            features the lattice was built from.
          reverse: apply the adjoint K^T (the blur directions in reverse order) instead of K.
          check_finite: values holding NaN or Inf raise InvalidArgumentError ("values contains
            NaN or Inf at [b, ..., c]"); the check rides on the splat, which reads every value,
            and costs nothing measurable (docs/reliability.md). False lets them through (their
            NaN then spreads over much of the output).

        Returns:
          float32 [B, *spatial, C]: out_i ~= s * sum_j exp(-|f_i - f_j|^2 / 2) v_j, the
          permutohedral approximation. The self term (j = i) is included. The global scale s is
          not 1: it holds 1 / (1 + 2^-F) and a factor that depends on how densely the features
          sample the lattice, so divide by the filter of ones (``filter(v) / filter(1)``) for a
          normalised Gaussian average. The gradient w.r.t. values is the adjoint filter; the
          features get the gradient of the Gaussian kernel (see :func:`_filter_gradient`).

        Raises:
          tf.errors.InvalidArgumentError: values of the wrong dtype, rank or shape, or (with
            check_finite) holding NaN or Inf.
        """
        values = _as_float32(values, "values")
        _check_static_rank(values, "values")
        spatial = self.features_shape[:-1]
        if values.shape.rank is not None and spatial.rank is not None:
            if not values.shape[:-1].is_compatible_with(spatial):
                raise _invalid(
                    f"values of shape {values.shape} do not match the lattice's batch and "
                    f"spatial shape {spatial} (features had shape {self.features_shape})"
                )
        return _ops().crf3d_lattice_filter(
            values, self.features, *self.tensors, reverse=reverse, check_finite=bool(check_finite)
        )


def permutohedral_filter(
    values: tf.Tensor, features: tf.Tensor, reverse: bool = False, check_finite: bool = True
) -> tf.Tensor:
    """One-shot form: ``Lattice(features).filter(values, reverse, check_finite)``; see both."""
    return Lattice(features).filter(values, reverse=reverse, check_finite=check_finite)


def _outer(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
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
    a_vf = tf.reshape(filter_fn(_outer(values, f), False), ext_shape)
    at_gf = tf.reshape(filter_fn(_outer(grad, f), True), ext_shape)
    as_output = tf.reduce_sum(grad[..., None] * a_vf, axis=-2) - f * tf.reduce_sum(
        grad * out, axis=-1, keepdims=True
    )
    as_input = tf.reduce_sum(values[..., None] * at_gf, axis=-2) - f * tf.reduce_sum(
        values * adjoint_grad, axis=-1, keepdims=True
    )
    return as_output + as_input


@tf.RegisterGradient("Crf3dLatticeFilter")
def _filter_gradient(op: tf.Operation, grad: tf.Tensor) -> list[tf.Tensor | None]:
    """Gradients of the filter: values get the adjoint filter (exact: the filter is linear in
    them); features get :func:`feature_gradient`, the derivative of the Gaussian kernel
    evaluated on the same lattice (an approximation of the same quality as the forward pass;
    docs/lattice_op.md states its measured agreement with the exact derivative).

    The lattice tensors get None: vertex_index, blur_neighbours, splat_offsets and splat_voxels
    are integer structure, and the barycentric weights (vertex_weight, splat_weights) are the
    lattice's own interpolation, whose derivative is not the kernel's; the features' gradient
    comes through the features input instead. Inputs a tape does not need (skip_input_indices)
    are not computed.

    Non-finite gradients: the forward op has already refused non-finite values, and the
    features are finite (the build refuses them), so a finite upstream gradient gives finite
    gradients here. An upstream gradient that holds NaN or Inf (a fault downstream of the
    filter, or a loss-scaling overflow that the optimizer is meant to see and skip) is passed
    through, filtered without the check, like any TensorFlow op would: no error from here.
    """
    values, features = op.inputs[0], op.inputs[1]
    lattice = list(op.inputs[2:])
    reverse = op.get_attr("reverse")
    skip = getattr(op, "skip_input_indices", None) or ()

    def filter_fn(x: tf.Tensor, adjoint: bool) -> tf.Tensor:
        return _ops().crf3d_lattice_filter(
            x, features, *lattice, reverse=reverse != adjoint, check_finite=False
        )

    adjoint_grad = filter_fn(grad, True)
    d_values = None if 0 in skip else adjoint_grad
    d_features = None
    if 1 not in skip:
        d_features = feature_gradient(
            filter_fn, values, features, grad, op.outputs[0], adjoint_grad
        )
    return [d_values, d_features] + [None] * len(LatticeTensors._fields)


# The build op's outputs are integer structure or barycentric weights; the features' gradient
# reaches them through the filter op's features input (see _filter_gradient).
tf.no_gradient("Crf3dLatticeBuild")
