"""Permutohedral-lattice Gaussian filtering as TensorFlow ops: the compiled backend (CPU kernels
in tf_op/ over the framework-free core in csrc/) or the same lattice in TensorFlow's own ops
(tf_lattice.py, every device); ``backend=`` picks one (backend.py: "auto", "compiled", "tf").

A lattice is built once from a reference image's features and then filters any number of value
arrays: a caller that filters many arrays with the same features (iterations of one forward
pass, and its backward pass) builds it once. The lattice is a handful of ordinary tensors (no
hidden state), so it works eagerly, inside ``tf.function`` and inside ``model.fit``.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from crf_rnn_3d.lattice_op import _library, tf_lattice
from crf_rnn_3d.lattice_op._common import as_float32 as _as_float32
from crf_rnn_3d.lattice_op._common import (
    check_blur_passes,
    check_lattice_copies,
    checked_values,
    copy_rotation,
    feature_gradient,
    warn_untested_features,
)
from crf_rnn_3d.lattice_op._common import check_static_rank as _check_static_rank
from crf_rnn_3d.lattice_op.backend import resolve_backend

__all__ = ["Lattice", "LatticeTensors", "feature_gradient", "permutohedral_filter"]


def _ops():
    return _library.load()


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
    The three splat tensors are all empty ([0]) when the lattice is far smaller than its
    entries (32 (M+1) <= B N (F+1)): the filter then splats without lists (docs/lattice_op.md,
    "Two forms of the splat").
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
      backend: "auto" (default), "compiled" or "tf" (crf_rnn_3d.lattice_op.backend): the
        compiled CPU kernels, or the same lattice built and filtered with TensorFlow ops
        (tf_lattice.py; any device). "auto" is resolved here, once, from this call's device
        scope and the features (``resolve_backend``) and stored as ``self.backend``. Both build
        the same lattice points and filter to within float32 rounding (docs/lattice_op.md).
      lattice_copies: the accuracy setting (docs/lattice_op.md, "Accuracy setting"), 1..8.
        The filter averages this many lattices: this one and copies built from the features in
        fixed rotated frames (``_common.copy_rotation``). The Gaussian is the same; the
        lattice's error falls (measured in docs/benchmarks.md) and the cost of the build and of
        every filter grows in proportion. 1 (default): one lattice, results unchanged bit for bit.
        ``tensors`` are copy 0's lattice (the features' own frame); ``copies`` holds the others
        as Lattice objects; ``num_points`` counts all.
      blur_passes: a measurement setting, compiled backend only, 1..8: a lattice finer by
        sqrt((3k+1)/4) blurred k times, the same Gaussian. It lowers the error only for F <= 3
        and raises it above (docs/lattice_op.md); 1 (default) is Adams et al.'s lattice.

    Raises:
      tf.errors.InvalidArgumentError: wrong dtype or rank, no channels or voxels, NaN or Inf in
        features, or a feature channel spread too widely to resolve in single precision. (NaN
        or Inf in the values is refused by :meth:`filter`: docs/reliability.md, "NaN and Inf".)
      tf.errors.ResourceExhaustedError: the lattice would not fit in memory (the budget is the
        machine's memory, or CRF3D_LATTICE_MAX_BYTES when set; compiled backend only).
      ValueError: an unknown backend, a setting out of range, blur_passes > 1 with the TF
        backend, or lattice_copies > 1 with an unknown number of feature channels.

    Warns (RuntimeWarning) for more than 10 feature channels: the error is tested up to 10.

    Gradients: every filter output is differentiable with respect to the values (the adjoint
    filter) and to the features (see :func:`_filter_gradient`: the derivative of the Gaussian
    kernel, evaluated with further filters on the same lattice). The build itself is piecewise
    constant in the features and has no gradient of its own.
    """

    def __init__(
        self,
        features: tf.Tensor,
        backend: str = "auto",
        blur_passes: int = 1,
        lattice_copies: int = 1,
    ) -> None:
        features = _as_float32(features, "features")
        _check_static_rank(features, "features")
        self.blur_passes = check_blur_passes(blur_passes)
        self.lattice_copies = check_lattice_copies(lattice_copies)
        warn_untested_features(features.shape[-1], self.lattice_copies)
        self.backend = resolve_backend(backend, features)
        if self.backend == "tf" and self.blur_passes != 1:
            raise ValueError(
                "blur_passes > 1 (a measurement setting, docs/lattice_op.md) runs on the "
                "compiled backend only; use lattice_copies for the TF path"
            )
        self.features = features
        self.features_shape = features.shape
        self._tf_lattice = None
        # The accuracy setting: copies 1.. are lattices of the same features in rotated frames
        # (the exact Gaussian is rotation invariant, the lattice's error is not); filter
        # averages all copies. Copy 0 is this object's own lattice, so 1 copy is unchanged.
        self.copies: list[Lattice] = []
        if self.lattice_copies > 1:
            num_features = features.shape[-1]
            if num_features is None:
                raise ValueError("lattice_copies > 1 needs a static number of feature channels")
            for copy in range(1, self.lattice_copies):
                rotation = tf.constant(copy_rotation(num_features, copy))
                self.copies.append(
                    Lattice(
                        tf.linalg.matvec(rotation, features),
                        backend=self.backend,
                        blur_passes=self.blur_passes,
                    )
                )
        if self.backend == "tf":
            self._tf_lattice = tf_lattice.TfLattice(features)
            # TfLatticeTensors: vertex_index, vertex_weight, blur_neighbours
            self.tensors = self._tf_lattice.tensors
        else:
            self.tensors = LatticeTensors(
                *_ops().crf3d_lattice_build(features, blur_passes=self.blur_passes)
            )

    @property
    def num_points(self) -> tf.Tensor:
        """Number of lattice points M over all batch items (int32 scalar tensor), summed over
        the copies when lattice_copies > 1."""
        points = tf.shape(self.tensors.blur_neighbours)[1]
        for copy in self.copies:
            points += copy.num_points
        return points

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
        out = self._filter_one(values, reverse, check_finite)
        if not self.copies:
            return out
        for copy in self.copies:
            out += copy._filter_one(values, reverse, check_finite)
        return out * (1.0 / self.lattice_copies)

    def _filter_one(self, values: tf.Tensor, reverse: bool, check_finite: bool) -> tf.Tensor:
        """The filter of this object's own lattice (copy 0)."""
        if self._tf_lattice is not None:  # checks the values itself
            return self._tf_lattice.filter(values, reverse=reverse, check_finite=check_finite)
        values = checked_values(values, self.features_shape)
        return _ops().crf3d_lattice_filter(
            values,
            self.features,
            *self.tensors,
            reverse=reverse,
            check_finite=bool(check_finite),
            blur_passes=self.blur_passes,
        )


def permutohedral_filter(
    values: tf.Tensor,
    features: tf.Tensor,
    reverse: bool = False,
    check_finite: bool = True,
    backend: str = "auto",
    blur_passes: int = 1,
    lattice_copies: int = 1,
) -> tf.Tensor:
    """One-shot form: ``Lattice(features, backend, blur_passes, lattice_copies).filter(values,
    reverse, check_finite)``; see both."""
    return Lattice(
        features, backend=backend, blur_passes=blur_passes, lattice_copies=lattice_copies
    ).filter(values, reverse=reverse, check_finite=check_finite)


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
    passes = op.get_attr("blur_passes")
    skip = getattr(op, "skip_input_indices", None) or ()

    def filter_fn(x: tf.Tensor, adjoint: bool) -> tf.Tensor:
        return _ops().crf3d_lattice_filter(
            x,
            features,
            *lattice,
            reverse=reverse != adjoint,
            check_finite=False,
            blur_passes=passes,
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
