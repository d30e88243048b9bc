"""What both lattice backends share (the compiled op in lattice.py, the TensorFlow-ops path in
tf_lattice.py): the input checks with their messages, and the features' gradient, which each
backend evaluates with its own filter on its own lattice.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


def invalid(message: str) -> tf.errors.InvalidArgumentError:
    return tf.errors.InvalidArgumentError(None, None, message)


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
