"""Permutohedral-lattice Gaussian filtering as TensorFlow ops (CPU kernel in csrc/).

A lattice is built once from a reference image's features and then filters any number of value
arrays: the CRF builds one per forward pass and reuses it for every mean-field iteration and for
the backward pass. The lattice is a handful of ordinary tensors (no hidden state), so it works
eagerly, inside ``tf.function`` and inside ``model.fit``.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from src.lattice_op import _library


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
        features, or a feature channel spread too widely to resolve in single precision.
      tf.errors.ResourceExhaustedError: the lattice would not fit in memory (the budget is the
        machine's memory, or CRF3D_LATTICE_MAX_BYTES when set).

    The features get no gradient through the lattice yet (the gradient w.r.t. features is a
    later piece of work); a tape asked for it returns None, never zeros.
    """

    def __init__(self, features: tf.Tensor) -> None:
        features = _as_float32(features, "features")
        _check_static_rank(features, "features")
        self.features_shape = features.shape
        self.tensors = LatticeTensors(*_ops().crf3d_lattice_build(features))

    @property
    def num_points(self) -> tf.Tensor:
        """Number of lattice points M over all batch items (int32 scalar tensor)."""
        return tf.shape(self.tensors.blur_neighbours)[1]

    def filter(self, values: tf.Tensor, reverse: bool = False) -> tf.Tensor:
        """Gaussian-filters `values` over the lattice.

        Args:
          values: float32 [B, *spatial, C], any C >= 1, with the batch and spatial shape of the
            features the lattice was built from.
          reverse: apply the adjoint K^T (the blur directions in reverse order) instead of K.

        Returns:
          float32 [B, *spatial, C]: out_i ~= s * sum_j exp(-|f_i - f_j|^2 / 2) v_j, the
          permutohedral approximation. The self term (j = i) is included. The global scale s is
          not 1: it holds 1 / (1 + 2^-F) and a factor that depends on how densely the features
          sample the lattice, so divide by the filter of ones (``filter(v) / filter(1)``) for a
          normalised Gaussian average. The gradient w.r.t. values is the adjoint filter; the
          lattice tensors get none.
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
        return _ops().crf3d_lattice_filter(values, *self.tensors, reverse=reverse)


def permutohedral_filter(
    values: tf.Tensor, features: tf.Tensor, reverse: bool = False
) -> tf.Tensor:
    """One-shot form: ``Lattice(features).filter(values, reverse)``; see both for shapes."""
    return Lattice(features).filter(values, reverse=reverse)


@tf.RegisterGradient("Crf3dLatticeFilter")
def _filter_gradient(op: tf.Operation, grad: tf.Tensor) -> list[tf.Tensor | None]:
    """The filter is linear in values: its gradient is the adjoint filter on the same lattice."""
    lattice = op.inputs[1:]
    d_values = _ops().crf3d_lattice_filter(grad, *lattice, reverse=not op.get_attr("reverse"))
    # vertex_index, blur_neighbours, splat_offsets and splat_voxels are integer structure
    # (piecewise constant in the features): no gradient. vertex_weight and splat_weights do
    # depend smoothly on the features, but their gradient (and so the features') is not
    # implemented yet: None, not zeros, so that nobody mistakes it for a computed zero.
    return [d_values] + [None] * len(LatticeTensors._fields)


# The build op's outputs are either integer structure or weights whose gradient is not
# implemented yet (see _filter_gradient), so the features receive None.
tf.no_gradient("Crf3dLatticeBuild")
