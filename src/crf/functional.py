"""Functional mean-field inference for the fully connected CRF (TensorFlow, any n-D).

The CRF-as-RNN layer (``crf_rnn_3d.crf.layer``) and the NumPy post-processing
(``crf_rnn_3d.crf.dense_crf``) both call :func:`mean_field`; nothing here holds state or weights.

Model (Krahenbuhl & Koltun 2011; Zheng et al. 2015; Monteiro et al. 2018). For unary logits U
[B, *spatial, K] (higher = more likely) and a reference image I [B, *spatial, M]:

    Q = softmax(U)
    repeat num_iterations times:
        m_l   = w1[l] * A(Q)_l + w2[l] * G(Q)_l          (message passing, per-class weighting)
        p_l   = sum_l' mu[l, l'] * m_l'                  (compatibility transform)
        L     = U - p                                    (add unaries)
        Q     = softmax(L)                               (normalise)
    return L                                             (refined logits)

A is the appearance (bilateral) kernel exp(-|p_i-p_j|^2/(2 theta_alpha^2)
- sum_c |I_ic-I_jc|^2/(2 theta_beta_c^2)), G the smoothness (spatial) kernel
exp(-|p_i-p_j|^2/(2 theta_gamma^2)); positions p are in millimetres (voxel index x spacing).
Both kernels include the self term j = i and are normalised:
  "mean":      A(Q) = K Q / K 1        (a Gaussian-weighted average; Zheng et al., Monteiro et al.)
  "symmetric": A(Q) = n * K (n * Q), n = (K 1)^(-1/2)   (pydensecrf's NORMALIZE_SYMMETRIC)
An unnormalised kernel is not offered: the permutohedral lattice's global scale is not 1 and
depends on how densely the features sample the lattice, so only normalised outputs are
comparable between the lattice and an exact filter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tensorflow as tf

# Private but stable: tf.recompute_grad uses the same two (no public way to run ops unrecorded by
# every active tape, or to ask whether a tape watches a tensor).
from tensorflow.python.eager import record as _record

from crf_rnn_3d.crf._ops import fused_mean_field
from crf_rnn_3d.lattice_op import (
    Lattice,
    LatticeTensors,
    gaussian_taps,
    resolve_backend,
    separable_filter,
)

NORMALISATIONS = ("mean", "symmetric")
BILATERAL_FILTERS = ("lattice", "exact")
SPATIAL_FILTERS = ("separable", "lattice")
# The exact bilateral filter keeps a dense [N, N] kernel per image: for tests and tiny inputs.
EXACT_BILATERAL_MAX_VOXELS = 8192
# The separable spatial kernel is cut at this many standard deviations (see
# separable_spatial_filter).
SPATIAL_TRUNCATE = 4.0

# A kernel width: a Python number (a fixed setting), a scalar tensor (a learnt one, e.g.
# exp of a trainable log-theta; gradients then reach it through the features or the taps) or a
# [B] tensor, one width per batch item (e.g. predicted per case by a network).
Width = float | tf.Tensor


def _per_item(theta: tf.Tensor | tf.Variable, rank: int) -> tf.Tensor:
    """A [B] width as [B, 1, ..., 1] of `rank` axes, to scale a [B, *spatial, C] tensor."""
    return tf.reshape(theta, [-1] + [1] * (rank - 1))


def positions(
    shape: tf.Tensor, spacing: Sequence[float], theta: Width, dtype: tf.DType
) -> tf.Tensor:
    """Voxel positions in millimetres divided by `theta` (mm).

    Args:
      shape: int32 [rank] dynamic shape of a [B, *spatial, C] tensor.
      spacing: voxel size in mm per spatial axis (len(spatial) entries).
      theta: kernel width in mm: a number, a scalar tensor (differentiable) or a [B] tensor
        (one width per batch item).
      dtype: output dtype.

    Returns:
      [B, *spatial, len(spatial)]: channel a is index_a * spacing[a] / theta.
    """
    ndim = len(spacing)
    channels = []
    for axis in range(ndim):
        view = [1] * (ndim + 2)
        view[axis + 1] = -1
        if isinstance(theta, tf.Tensor | tf.Variable) and theta.shape.rank == 1:
            scale = float(spacing[axis]) / _per_item(tf.cast(theta, dtype), ndim + 2)
            coord = tf.reshape(tf.range(shape[axis + 1], dtype=dtype), view) * scale
        else:
            if isinstance(theta, tf.Tensor | tf.Variable):
                scale = float(spacing[axis]) / tf.cast(theta, dtype)
            else:
                scale = float(spacing[axis]) / float(theta)
            coord = tf.reshape(tf.range(shape[axis + 1], dtype=dtype) * scale, view)
        channels.append(tf.broadcast_to(coord, tf.concat([shape[:-1], [1]], 0)))
    return tf.concat(channels, axis=-1)


def bilateral_features(
    image: tf.Tensor,
    spacing: Sequence[float],
    theta_alpha: Width,
    theta_beta: Sequence[float] | tf.Tensor,
) -> tf.Tensor:
    """Features of the appearance kernel: [B, *spatial, ndim + M] = (positions in mm / theta_alpha,
    image channel c / theta_beta[c]), in the image's dtype. theta_alpha (mm) is a number, a
    scalar tensor or a [B] tensor (per batch item); theta_beta (image units) M numbers, an [M]
    tensor or a [B, M] tensor (per batch item)."""
    pos = positions(tf.shape(image), spacing, theta_alpha, image.dtype)
    if isinstance(theta_beta, tf.Tensor | tf.Variable):
        scale = 1.0 / tf.cast(theta_beta, image.dtype)
        if theta_beta.shape.rank == 2:  # [B, M] -> [B, 1, ..., 1, M]
            for _ in range(len(spacing)):
                scale = tf.expand_dims(scale, 1)
    else:
        scale = tf.constant([1.0 / float(t) for t in theta_beta], dtype=image.dtype)
    return tf.concat([pos, image * scale], axis=-1)


def require_finite(tensor: tf.Tensor, name: str) -> tf.Tensor:
    """`tensor` unchanged, after checking that it holds no NaN or Inf.

    The CRF's rule for non-finite input (docs/reliability.md, "NaN and Inf"): an
    InvalidArgumentError whose message names the tensor, eagerly and inside ``tf.function``
    (the returned tensor depends on the check, so nothing downstream runs first). One
    multithreaded pass (is_finite, reduce_all) over the tensor. The gradient passes through
    unchecked: an upstream NaN or Inf gradient is not an input fault.

    Args:
      tensor: any float tensor; name: how the message calls it (e.g. "unaries").

    Returns:
      The same values (an identity of `tensor`).
    """
    finite = tf.reduce_all(tf.math.is_finite(tf.stop_gradient(tensor)))
    check = tf.debugging.Assert(
        finite,
        [f"{name} contains NaN or Inf; non-finite input is an error (docs/reliability.md)"],
        name=f"require_finite_{name}",
    )
    with tf.control_dependencies([check] if check is not None else []):
        return tf.identity(tensor)


class Filter:
    """A normalised Gaussian filter: call it on [B, *spatial, C] tensors.

    ``sources`` lists the float tensors the filter closes over that gradients can reach (the
    lattice's features, the taps of a learnt width, the normaliser): the recomputing mean field
    (:func:`mean_field` with ``recompute=True``) watches exactly these when it runs an
    iteration again in the backward pass, so their gradients are those of the plain loop.
    """

    def __init__(self, apply: Callable[[tf.Tensor], tf.Tensor], sources: Sequence) -> None:
        self._apply = apply
        self.sources = [s for s in sources if isinstance(s, tf.Tensor)]

    def __call__(self, values: tf.Tensor) -> tf.Tensor:
        return self._apply(values)


def _normalised(
    apply: Callable[[tf.Tensor], tf.Tensor],
    ones_filtered: tf.Tensor,
    normalisation: str,
    sources: Sequence,
) -> Filter:
    if normalisation == "mean":
        inv = 1.0 / ones_filtered
        return Filter(lambda q: apply(q) * inv, [*sources, inv])
    norm = tf.math.rsqrt(ones_filtered + 1e-20)
    return Filter(lambda q: apply(q * norm) * norm, [*sources, norm])


def lattice_filter(
    features: tf.Tensor, normalisation: str, backend: str = "auto", lattice_copies: int = 1
) -> Filter:
    """Normalised Gaussian filter over a permutohedral lattice built once from `features`
    [B, *spatial, F] (already divided by the kernel widths). The returned function filters
    [B, *spatial, C] tensors of any float dtype (computed in float32) and reuses the lattice.
    backend: "auto", "compiled" or "tf" (crf_rnn_3d.lattice_op.backend); lattice_copies: the
    lattice's accuracy setting (``Lattice``), 1 by default."""
    lattice = Lattice(tf.cast(features, tf.float32), backend=backend, lattice_copies=lattice_copies)
    dtype = features.dtype

    def apply(values: tf.Tensor) -> tf.Tensor:
        return tf.cast(lattice.filter(tf.cast(values, tf.float32)), dtype)

    ones = tf.ones_like(features[..., :1])
    # the filter ops read the lattice's features tensor (their feature gradient's input), and
    # those of its rotated copies (lattice_copies > 1), each computed from the features outside
    # the filter: all are sources of the recomputing mean field
    sources = [lattice.features, *(copy.features for copy in lattice.copies)]
    return _normalised(apply, apply(ones), normalisation, sources)


def exact_filter(features: tf.Tensor, normalisation: str) -> Filter:
    """Normalised Gaussian filter with the dense kernel exp(-|f_i - f_j|^2 / 2), O(N^2), in the
    features' dtype (float64 allowed). For tests and inputs of at most
    EXACT_BILATERAL_MAX_VOXELS voxels per image."""
    num_features = features.shape[-1]
    flat = tf.reshape(features, [tf.shape(features)[0], -1, num_features])
    sq = tf.reduce_sum(flat * flat, axis=-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * tf.matmul(flat, flat, transpose_b=True)
    kernel = tf.exp(-0.5 * tf.maximum(d2, 0.0))

    def apply(values: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(values)
        out = tf.matmul(kernel, tf.reshape(values, [shape[0], -1, shape[-1]]))
        return tf.reshape(out, shape)

    ones = tf.ones_like(features[..., :1])
    return _normalised(apply, apply(ones), normalisation, [kernel])


def spatial_taps(
    spacing: Sequence[float], theta: float, static_shape: Sequence[int | None] | None = None
) -> list[list[float]]:
    """Per-axis taps of the truncated spatial Gaussian of width theta (mm): sigma_a =
    theta / spacing_a voxels, +-ceil(SPATIAL_TRUNCATE * sigma_a) taps, capped by the axis length
    of a [B, *spatial, C] static shape where known."""
    taps = []
    for axis, step in enumerate(spacing):
        length = None if static_shape is None else static_shape[axis + 1]
        taps.append(gaussian_taps(float(theta) / float(step), SPATIAL_TRUNCATE, length))
    return taps


def separable_spatial_filter(
    shape: tf.Tensor,
    spacing: Sequence[float],
    theta: Width,
    normalisation: str,
    dtype: tf.DType,
    static_shape: Sequence[int | None] | None = None,
    theta_max: float | None = None,
    backend: str = "auto",
) -> Filter:
    """Spatial Gaussian exp(-|p_i - p_j|^2 / (2 theta^2)) as a separable convolution, one 1-D
    kernel per axis, zero outside the volume (so the sum runs over voxels inside it only).

    Each axis's kernel covers +-ceil(SPATIAL_TRUNCATE * sigma) voxels, sigma = theta / spacing,
    and at most the whole axis when its length is known: the result is then the exact Gaussian
    sum whenever the axis is shorter than the truncation radius, and otherwise misses the
    Gaussian's tails beyond 4 sigma (relative mass 6e-5 per axis), with the filter of ones
    computed with the same kernel so the normalisation stays exact for what is summed.

    Every dtype (float32, float64) and both fixed and learnt widths run on the compiled
    separable op (crf_rnn_3d.lattice_op.separable_filter, a multiply-add per tap in C++).

    A learnt width (`theta` a scalar tensor) needs a radius fixed before its value is known: it
    is taken from `theta_max` (mm), +-ceil(SPATIAL_TRUNCATE * theta_max / spacing) voxels, and
    the taps exp(-k^2 spacing^2 / (2 theta^2)) are computed in TensorFlow and passed to the op
    as tensors, so the filter is differentiable with respect to theta (the op's gradient with
    respect to its taps). For theta <= theta_max the cut lies at >= 4 sigma. A [B] tensor
    theta (one width per batch item) gives each item taps of its own, all of that radius: the
    op then runs once per item (tf.map_fn over the batch).

    Args:
      shape: int32 [rank] dynamic shape of the [B, *spatial, C] tensors to filter.
      spacing: mm per spatial axis; theta: kernel width in mm (number, scalar tensor or [B]
        tensor).
      normalisation: "mean" or "symmetric"; dtype: the values' dtype.
      static_shape: the tensors' static shape (None entries allowed), to cap the radius.
      theta_max: mm, sets the radius when theta is a tensor (required then, ignored otherwise).
      backend: "auto", "compiled" or "tf" for separable_filter (crf_rnn_3d.lattice_op.backend).
    """
    learnt = isinstance(theta, tf.Tensor | tf.Variable)
    if learnt and theta_max is None:
        raise ValueError("separable_spatial_filter: a tensor theta needs theta_max (mm), got None")
    per_item = learnt and theta.shape.rank == 1
    if learnt:
        taps = []
        width = tf.cast(theta, dtype)[:, None] if per_item else tf.cast(theta, dtype)
        for axis, step in enumerate(spacing):
            radius = math.ceil(SPATIAL_TRUNCATE * float(theta_max) / float(step))
            length = None if static_shape is None else static_shape[axis + 1]
            if length is not None:
                radius = min(radius, max(length - 1, 0))
            offsets_mm = tf.constant(
                [k * float(step) for k in range(-radius, radius + 1)], dtype=dtype
            )
            taps.append(tf.exp(-0.5 * tf.square(offsets_mm / width)))  # [2r+1] or [B, 2r+1]
    else:
        taps = spatial_taps(spacing, float(theta), static_shape)

    def filter_item(item: tuple[tf.Tensor, ...]) -> tf.Tensor:
        return separable_filter(item[0][None], list(item[1:]), backend=backend)[0]

    def apply(values: tf.Tensor) -> tf.Tensor:
        if per_item:
            return tf.map_fn(filter_item, (values, *taps), fn_output_signature=values.dtype)
        return separable_filter(values, taps, backend=backend)

    ones = tf.ones(tf.concat([shape[:-1], [1]], 0), dtype=dtype)
    return _normalised(apply, apply(ones), normalisation, taps if learnt else [])


def mean_field(
    unaries: tf.Tensor,
    image: tf.Tensor,
    *,
    spacing: Sequence[float],
    theta_alpha: Width,
    theta_beta: Sequence[float] | tf.Tensor,
    theta_gamma: Width,
    bilateral_weight: tf.Tensor,
    spatial_weight: tf.Tensor,
    compatibility: tf.Tensor,
    num_iterations: int,
    normalisation: str = "mean",
    bilateral_filter: str = "lattice",
    spatial_filter: str = "separable",
    theta_gamma_max: float | None = None,
    backend: str = "auto",
    recompute: bool = False,
    lattice_copies: int = 1,
    checkpoint_every: int = 1,
) -> tf.Tensor:
    """Mean-field inference of the fully connected CRF (see the module docstring).

    Args:
      unaries: [B, *spatial, K] unary logits (log-probabilities up to a constant per voxel).
      image: [B, *spatial, M] reference image, same batch and spatial shape, same dtype.
      spacing: voxel size in mm, one entry per spatial axis.
      theta_alpha, theta_gamma: kernel widths in mm (> 0); theta_beta: one width per image
        channel, in the image's units (> 0). Numbers, or tensors (scalars, [M] for theta_beta)
        to learn them: the refined logits are then differentiable with respect to each. Or
        one set per batch item: theta_alpha and theta_gamma [B] tensors, theta_beta [B, M]
        (each item's features and spatial taps then use its own widths; CrfRnn's per-case
        ``theta`` passes all three so).
      bilateral_weight, spatial_weight: [K] weights w1, w2 applied to the filtered class l.
      compatibility: [K, K] mu (used as given: zero its diagonal yourself for the paper's model).
      num_iterations: mean-field iterations (>= 1).
      normalisation: "mean" or "symmetric" (see module docstring).
      bilateral_filter: "lattice" (permutohedral, built once and reused for every iteration and
        the backward pass) or "exact" (dense O(N^2) kernel, for tests).
      spatial_filter: "separable" (exact, per-axis dense Gaussian) or "lattice" (a second,
        position-only lattice).
      theta_gamma_max: mm; with a tensor theta_gamma (scalar or [B]) and the separable kernel,
        sets its radius (see separable_spatial_filter).
      backend: "auto" (default), "compiled" or "tf": which implementation runs the lattice and
        separable filters (crf_rnn_3d.lattice_op.backend; "auto" is resolved once here, from
        the device scope and the unaries, so both kernels use the same one). Everything else
        here is TensorFlow ops already, so with "tf" no compiled op runs.
      recompute: for training (docs/crf.md, "Training memory"): keep only the logits entering
        each iteration for the backward pass and run each iteration again there, instead of
        keeping every intermediate of every iteration. Same logits (bit-identical), same
        gradients to float rounding; less memory, more time. Without a gradient tape it is
        the plain loop.
      lattice_copies: the lattices' accuracy setting (crf_rnn_3d.lattice_op.Lattice): each
        lattice filter averages this many lattices in rotated frames; 1 (default) is one.
      checkpoint_every: with recompute, k >= 1: keep only the logits entering iterations 0, k,
        2k, ...; the backward pass recomputes the others from the last kept ones (iteration i
        costs i mod k more iterations). Less memory, more time, the same results. 1 (default)
        keeps every iteration's; k >= num_iterations keeps only the unaries. Ignored without
        recompute.

    Returns:
      [B, *spatial, K] refined logits U - p after the last iteration (softmax them for Q).

    Raises:
      ValueError: an unknown option, or bilateral_filter="exact" on too many voxels.
      tf.errors.InvalidArgumentError: NaN or Inf in unaries or image (the message names which;
        see :func:`require_finite`), or a bad shape met by the filters.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if bilateral_filter not in BILATERAL_FILTERS:
        raise ValueError(
            f"bilateral_filter must be one of {BILATERAL_FILTERS}, got {bilateral_filter!r}"
        )
    if spatial_filter not in SPATIAL_FILTERS:
        raise ValueError(f"spatial_filter must be one of {SPATIAL_FILTERS}, got {spatial_filter!r}")
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    backend = resolve_backend(backend, unaries)
    unaries = require_finite(unaries, "unaries")
    image = require_finite(image, "image")
    features = bilateral_features(image, spacing, theta_alpha, theta_beta)
    if bilateral_filter == "lattice":
        appearance = lattice_filter(features, normalisation, backend, lattice_copies)
    else:
        voxels = math.prod(d for d in unaries.shape[1:-1] if d is not None)
        if voxels > EXACT_BILATERAL_MAX_VOXELS:
            raise ValueError(
                f"bilateral_filter='exact' keeps a dense N x N kernel and allows at most "
                f"{EXACT_BILATERAL_MAX_VOXELS} voxels per image; unaries have shape "
                f"{unaries.shape} ({voxels} voxels). Use bilateral_filter='lattice'."
            )
        appearance = exact_filter(features, normalisation)
    if spatial_filter == "separable":
        smoothness = separable_spatial_filter(
            tf.shape(unaries),
            spacing,
            theta_gamma,
            normalisation,
            unaries.dtype,
            unaries.shape,
            theta_max=theta_gamma_max,
            backend=backend,
        )
    else:
        smoothness = lattice_filter(
            positions(tf.shape(unaries), spacing, theta_gamma, unaries.dtype),
            normalisation,
            backend,
            lattice_copies,
        )
    weights = [bilateral_weight, spatial_weight, compatibility]
    if recompute:
        return _iterate_recomputed(
            unaries, weights, appearance, smoothness, num_iterations, checkpoint_every
        )
    logits = unaries
    for _ in range(num_iterations):
        logits = _iteration(logits, unaries, weights, appearance, smoothness)
    return logits


def _iteration(
    logits: tf.Tensor,
    unaries: tf.Tensor,
    weights: Sequence[tf.Tensor],
    appearance: Filter,
    smoothness: Filter,
) -> tf.Tensor:
    """One mean-field iteration: the logits after it from the logits before it."""
    bilateral_weight, spatial_weight, compatibility = weights
    # over [N, K]: TensorFlow's CPU softmax takes tensors of rank <= 5 only
    flat = tf.reshape(logits, [-1, unaries.shape[-1]])
    q = tf.reshape(tf.nn.softmax(flat), tf.shape(unaries))
    message = bilateral_weight * appearance(q) + spatial_weight * smoothness(q)
    pairwise = tf.einsum("...k,lk->...l", message, compatibility)
    return unaries - pairwise


def _compatibility_gradient(message: tf.Tensor, grad_logits: tf.Tensor) -> tf.Tensor:
    """d/d mu of sum(grad_logits * (unaries - einsum("...k,lk->...l", message, mu))), [K, K].

    The same values, bit for bit, as TensorFlow's einsum gradient in the plain loop (each
    entry (l, k) the product -grad_l * message_k at every voxel, summed over the voxels by the
    same reduction), without its two [K, K, B, *spatial] tensors (the outer product and its
    transpose; 32 MiB at the PROMISE12 size with K = 2): here one entry at a time, from one
    class of each ([B, *spatial] tensors), each waiting for the previous entry's sum.
    """
    classes = message.shape[-1]
    entries: list[tf.Tensor] = []
    for row in range(classes):
        for col in range(classes):
            with tf.control_dependencies(entries[-1:]):
                pairwise_grad = tf.negative(grad_logits[..., row])  # d/d pairwise, exact
                product = pairwise_grad * message[..., col]
            entries.append(tf.reduce_sum(product))
    return tf.reshape(tf.stack(entries), [classes, classes])


def _after(tensor: tf.Tensor, upstream: tf.Tensor) -> tf.Tensor:
    """`tensor` plus a zero computed from `upstream`'s first entry (NaN there keeps it zero).

    In a graph, the backward pass's recomputation of an iteration must not start before the
    gradient arriving at that iteration exists: without a data dependency on it the runtime
    is free to run the recomputation during the forward pass (holding its intermediates until
    the gradient comes, the memory this saves) and grappler to merge it with the forward ops.
    """
    first = tf.reduce_max(tf.reshape(upstream, [-1])[:1])
    flag = tf.cast(first, tf.bool)
    zero = tf.where(tf.equal(flag, flag), 0.0, float("nan"))
    return tensor + tf.cast(zero, tensor.dtype)


def _iteration_gradient(
    entering: tf.Tensor,
    grad_logits: tf.Tensor,
    unaries: tf.Tensor,
    weights: Sequence[tf.Tensor],
    appearance: Filter,
    smoothness: Filter,
    sources: Sequence[tf.Tensor],
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """One mean-field iteration run again from the logits `entering` it, and its gradient for
    the gradient `grad_logits` of the logits leaving it: (d/d entering, [d/d unaries, w1, w2,
    mu, *sources]), each a tensor (zeros where unconnected).

    The forward ops are :func:`_iteration`'s. The gradient is the one a single tape over it
    would give, bit for bit, computed in stages so that fewer [B, *spatial, K] tensors are
    alive at once: the weighted sum and compatibility transform (the compatibility's part by
    :func:`_compatibility_gradient`), then the appearance filter's backward pass, then the
    smoothness filter's (in a graph it waits for the appearance's), then the softmax's. Where
    one tape would add the two filters' gradients of q (or of a source they share) with one
    add_n of two terms, this adds the same two terms: the sum is the same.
    """
    bilateral_weight, spatial_weight, compatibility = weights
    # the filters' sources that get a gradient (eagerly: those a tape watches)
    app_sources = [s for s in appearance.sources if any(s is t for t in sources)]
    smooth_sources = [s for s in smoothness.sources if any(s is t for t in sources)]
    with tf.GradientTape() as softmax_tape:
        softmax_tape.watch(entering)
        flat = tf.reshape(entering, [-1, unaries.shape[-1]])
        q = tf.reshape(tf.nn.softmax(flat), tf.shape(unaries))
    with tf.GradientTape() as appearance_tape:
        appearance_tape.watch([q, *app_sources])
        filtered_a = appearance(q)
    with tf.control_dependencies([filtered_a]):  # one filter at a time (in a graph)
        q_smooth = tf.identity(q)
    with tf.GradientTape() as smoothness_tape:
        smoothness_tape.watch([q_smooth, *smooth_sources])
        filtered_g = smoothness(q_smooth)
    with tf.GradientTape() as tape:
        tape.watch([filtered_a, filtered_g, bilateral_weight, spatial_weight])
        message = bilateral_weight * filtered_a + spatial_weight * filtered_g
    # The logits leaving the iteration, unaries - einsum("...k,lk->...l", message, mu), are not
    # formed again (a tape over them would read their shapes, so compute them): their gradient
    # with respect to the unaries is grad_logits, to the message TensorFlow's einsum gradient
    # of the negated grad_logits (the same ops), to mu _compatibility_gradient's.
    d_mu = _compatibility_gradient(message, grad_logits)
    with tf.control_dependencies([d_mu]):  # the message is freed before the rest starts
        d_message = tf.einsum("...l,lk->...k", tf.negative(grad_logits), compatibility)
    zero = tf.UnconnectedGradients.ZERO
    d_a, d_g, d_w1, d_w2 = tape.gradient(
        message,
        [filtered_a, filtered_g, bilateral_weight, spatial_weight],
        output_gradients=d_message,
        unconnected_gradients=zero,
    )
    d_unaries = grad_logits
    del tape, message, d_message
    # the filters' backward passes start once the weights' gradients (the last readers of the
    # filters' outputs and of the message's gradient) are done
    with tf.control_dependencies([d_w1, d_w2, d_g]):
        d_a = tf.identity(d_a)
    dq_a, *d_app = appearance_tape.gradient(
        filtered_a, [q, *app_sources], output_gradients=d_a, unconnected_gradients=zero
    )
    with tf.control_dependencies([dq_a, *d_app]):  # the smoothness filter's after it
        d_g = tf.identity(d_g)
    dq_g, *d_smooth = smoothness_tape.gradient(
        filtered_g,
        [q_smooth, *smooth_sources],
        output_gradients=d_g,
        unconnected_gradients=zero,
    )
    d_entering = softmax_tape.gradient(
        q, entering, output_gradients=dq_a + dq_g, unconnected_gradients=zero
    )
    d_sources = []
    for source in sources:
        parts = [g for s, g in zip(app_sources, d_app, strict=True) if s is source]
        parts += [g for s, g in zip(smooth_sources, d_smooth, strict=True) if s is source]
        d_sources.append(parts[0] if len(parts) == 1 else tf.add_n(parts))
    return d_entering, [d_unaries, d_w1, d_w2, d_mu, *d_sources]


def _iterate_recomputed(
    unaries: tf.Tensor,
    weights: Sequence[tf.Tensor],
    appearance: Filter,
    smoothness: Filter,
    num_iterations: int,
    checkpoint_every: int = 1,
) -> tf.Tensor:
    """The mean-field loop with one gradient for all of it, keeping only the logits that enter
    each iteration (num_iterations [B, *spatial, K] tensors, the first being the unaries), or
    with checkpoint_every = k those entering iterations 0, k, 2k, ..., and running each
    iteration again, one at a time from the last, in the backward pass (from the last kept
    logits before it, i mod k iterations unrecorded first, when its own were not kept).
    Each input's gradient is summed as the iterations deliver it.

    The forward ops are the plain loop's, so the logits are bit-identical; the gradients are the
    plain loop's chain of the same derivatives, summed over iterations in another order (equal
    to rounding). Differentiable inputs: the unaries, the weights, and the filters' ``sources``
    (features, taps of learnt widths, normalisers), through which gradients reach the kernel
    widths and the image as in the plain loop. Eagerly, a source no tape watches gets no
    gradient (none is asked for); in a graph every source gets one (a tape there cannot tell
    what an enclosing gradient will ask for) and those nothing reads are left to the graph's
    pruning.
    """
    weights = [tf.identity(w) for w in weights]  # tensors, never variables read inside
    sources = []
    for tensor in appearance.sources + smoothness.sources:
        if all(tensor is not s for s in sources):
            sources.append(tensor)
    eager = tf.executing_eagerly()
    if eager:
        if not _record.should_record_backprop([unaries, *weights, *sources]):
            # no tape watches anything here: nothing to keep for a backward pass
            logits = unaries
            for _ in range(num_iterations):
                logits = _iteration(logits, unaries, weights, appearance, smoothness)
            return logits
        sources = [s for s in sources if _record.should_record_backprop([s])]
    inputs = [unaries, *weights, *sources]

    @tf.custom_gradient
    def loop(*args: tf.Tensor):
        checkpoints = {}  # iteration -> the logits entering it, every checkpoint_every-th
        with _record.stop_recording():
            logits = unaries
            for index in range(num_iterations):
                if index % checkpoint_every == 0:
                    checkpoints[index] = logits
                logits = _iteration(logits, unaries, weights, appearance, smoothness)

        def gradient(upstream: tf.Tensor) -> list[tf.Tensor]:
            # Each input's gradient is summed as the iterations deliver it, in the order the
            # iterations deliver it (the order tf.add_n over all of them would add in), so
            # that no iteration's [B, *spatial, K] gradient of the unaries (or [B, *spatial,
            # F] of the features) waits for the last one.
            totals: list[tf.Tensor | None] = [None for _ in inputs]

            def add(index: int, grad: tf.Tensor) -> None:
                total = totals[index]
                totals[index] = grad if total is None else total + grad

            grad_logits = upstream
            for index in reversed(range(num_iterations)):
                first = index - index % checkpoint_every
                # a tensor of its own (at the first iteration the unaries enter twice)
                entering = checkpoints[first]
                entering = tf.identity(entering) if eager else _after(entering, grad_logits)
                with _record.stop_recording():  # from the last checkpoint up to this iteration
                    for _ in range(index - first):
                        entering = _iteration(entering, unaries, weights, appearance, smoothness)
                grad_logits, grads = _iteration_gradient(
                    entering, grad_logits, unaries, weights, appearance, smoothness, sources
                )
                for position, grad in enumerate(grads):
                    add(position, grad)
            add(0, grad_logits)  # the first iteration's logits are the unaries
            return totals

        return logits, gradient

    return loop(*inputs)


def mean_field_inference(
    unaries: tf.Tensor,
    image: tf.Tensor,
    *,
    spacing: Sequence[float],
    theta_alpha: float,
    theta_beta: Sequence[float],
    theta_gamma: float,
    bilateral_weight: tf.Tensor,
    spatial_weight: tf.Tensor,
    compatibility: tf.Tensor,
    num_iterations: int,
    normalisation: str = "mean",
    return_logits: bool = True,
) -> tuple[tf.Tensor | None, tf.Tensor]:
    """The fast, inference-only form of :func:`mean_field` with a lattice bilateral kernel and
    the separable spatial kernel, for fixed widths in float32: after the lattice is built, all
    iterations run in one compiled kernel (src/crf/csrc/mean_field.cc, crf/_ops.py) that makes three
    passes over the voxels per iteration. Same arguments as :func:`mean_field` (widths as
    numbers); the spatial kernel's axes are capped by the static shape of `unaries`.

    Returns:
      (logits, probabilities): float32 [B, *spatial, K], the refined logits after the last
      iteration and their softmax; logits is None with ``return_logits=False`` (the kernel then
      never writes them). Not differentiable: use :func:`mean_field` to train. Compiled
      kernels only (CPU): the "tf" backend's equivalent is :func:`mean_field` with backend="tf".

    Raises:
      tf.errors.InvalidArgumentError: NaN or Inf in unaries ("unaries contain NaN or Inf",
        from the kernel) or in image ("image contains NaN or Inf").
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    unaries = tf.convert_to_tensor(unaries, dtype=tf.float32)
    # the kernel checks the unaries itself (on its first pass); the image only reaches the
    # lattice build, whose message would name the features
    image = require_finite(tf.convert_to_tensor(image, dtype=tf.float32), "image")
    features = bilateral_features(
        image, spacing, float(theta_alpha), [float(t) for t in theta_beta]
    )
    lattice = Lattice(features, backend="compiled").tensors
    del features  # not needed by the kernel: free it before the kernel's buffers are taken
    return mean_field_on_lattice(
        unaries,
        lattice,
        spacing=spacing,
        theta_gamma=theta_gamma,
        bilateral_weight=bilateral_weight,
        spatial_weight=spatial_weight,
        compatibility=compatibility,
        num_iterations=num_iterations,
        normalisation=normalisation,
        return_logits=return_logits,
    )


def mean_field_on_lattice(
    unaries: tf.Tensor,
    lattice: LatticeTensors,
    *,
    spacing: Sequence[float],
    theta_gamma: float,
    bilateral_weight: tf.Tensor,
    spatial_weight: tf.Tensor,
    compatibility: tf.Tensor,
    num_iterations: int,
    normalisation: str = "mean",
    return_logits: bool = True,
) -> tuple[tf.Tensor | None, tf.Tensor]:
    """:func:`mean_field_inference` from an already built bilateral lattice (the compiled
    build's ``Lattice(features).tensors``), for callers that build it themselves (dense_crf,
    which builds it before its unaries exist to lower its peak memory). Same arguments and
    result; the spatial kernel's axes are capped by the static shape of `unaries`."""
    taps = spatial_taps(spacing, float(theta_gamma), unaries.shape)
    logits, probabilities = fused_mean_field(
        unaries,
        lattice,
        bilateral_weight,
        spatial_weight,
        compatibility,
        taps,
        num_iterations=int(num_iterations),
        normalisation=normalisation,
        output_logits=bool(return_logits),
    )
    return (logits if return_logits else None), probabilities
