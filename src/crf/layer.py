"""CRF-as-RNN: the fully connected CRF's mean-field inference as a trainable Keras 3 layer.

The layer needs Keras' TensorFlow backend. Its message passing runs on the compiled lattice ops
(CPU) or on the same lattice in TensorFlow ops (any device): the ``backend`` setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from crf_rnn_3d.crf import functional as mf
from crf_rnn_3d.lattice_op import BACKENDS, check_lattice_copies, resolve_backend

# The default of CrfRnn's `recompute` (docs/crf.md, "Training memory").
RECOMPUTE_DEFAULT = False


def _positive(name: str, value: Any) -> float:
    """A finite float > 0, else ValueError naming the setting."""
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a positive number, got {value!r}") from err
    if not math.isfinite(number) or number <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _positive_list(name: str, value: Any) -> list[float]:
    values = list(value) if isinstance(value, Sequence | np.ndarray) else [value]
    if not values:
        raise ValueError(f"{name} must hold at least one positive number, got {value!r}")
    return [_positive(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _finite(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a finite number, got {value!r}") from err
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _iterations(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _exact_constant(value: np.ndarray) -> Any:
    """Initializer giving `value` in the variable's own dtype (keras' Constant rounds through
    float32, which would make a float64 layer start from 0.699999988 instead of 0.7)."""

    def initializer(shape: Any, dtype: Any = None) -> tf.Tensor:
        return tf.reshape(tf.constant(value, dtype=dtype), shape)

    return initializer


@keras.saving.register_keras_serializable(package="crf_rnn_3d")
class CrfRnn(keras.layers.Layer):
    """Fully connected CRF with Gaussian kernels, mean field unrolled as an RNN.

    Call it on ``[unaries, image]``:
      unaries: [B, *spatial, K] unary logits from the network beneath (K >= 2 classes).
      image:   [B, *spatial, M] reference image (M >= 1 channels, e.g. MRI modalities), same
               batch and spatial shape; any number of spatial dimensions >= 1, B >= 1.
    Returns [B, *spatial, K] refined logits (apply softmax for probabilities).

    Optionally with widths per batch item, ``layer([unaries, image], theta=widths)``, widths a
    dict of tensors ``{"theta_alpha": [B] mm, "theta_beta": [B, M] image units, "theta_gamma":
    [B] mm}`` (e.g. predicted per case by a network, src/models/vnet.py): each item is then
    filtered with its own widths instead of the settings below, and the output is
    differentiable with respect to them. Not with learn_theta; the composed mean field runs
    (never the fused kernel). Each theta_gamma must be <= theta_gamma_max (default
    2 x theta_gamma), which fixes the separable kernel's radius. Without ``theta`` the layer is
    exactly as before.

    Each iteration (Zheng et al. 2015; see src/crf/functional.py for the equations):
    Q = softmax(L); message m_l = w1[l] A(Q)_l + w2[l] G(Q)_l; pairwise p = mu m;
    L = unaries - p. A is the appearance (bilateral) kernel
    exp(-|p_i-p_j|^2 / 2 theta_alpha^2 - sum_c (I_ic-I_jc)^2 / 2 theta_beta_c^2), G the
    smoothness (spatial) kernel exp(-|p_i-p_j|^2 / 2 theta_gamma^2), p in mm.

    Args:
      theta_alpha: appearance kernel's spatial width in mm (default 10.0).
      theta_beta: appearance kernel's width(s) in image units: one number for every channel, or
        one per channel (default 1.0, i.e. suited to images normalised to unit variance).
      theta_gamma: smoothness kernel's width in mm (default 3.0).
      spacing: voxel size in mm per spatial axis, in the tensors' axis order (default: 1 mm on
        every axis). Its length must equal the number of spatial axes.
      num_iterations: mean-field iterations when training (default 5).
      num_iterations_inference: iterations at inference (default: num_iterations).
      bilateral_weight_init: initial w1 for every class (default 1.0).
      spatial_weight_init: initial w2 for every class (default 1.0).
      compatibility_init: initial off-diagonal value of mu; mu starts as the Potts model
        compatibility_init * (1 - I) (default 1.0).
      normalisation: how both kernels are normalised (self term included in both):
        "mean" (default; A(Q) = K Q / K 1, a Gaussian-weighted average of Q, as in Zheng et al.
        and Monteiro et al.) or "symmetric" (n K(n Q) with n = (K 1)^(-1/2), pydensecrf's
        default). No unnormalised option: the lattice's global scale is not 1.
      bilateral_filter: "lattice" (default; one permutohedral lattice per forward pass, reused
        by every iteration and the backward pass) or "exact" (dense O(N^2) kernel, at most
        8192 voxels per image; for tests and float64 gradient checks).
      spatial_filter: "separable" (default; Gaussian cut at 4 sigma, see docs/crf.md for the
        measurement that chose it) or "lattice" (a second, position-only lattice).
      learn_theta: make the kernel widths trainable (default False). theta_alpha, theta_beta
        (then one per image channel, each starting at the value given) and theta_gamma become
        weights ``log_theta_alpha`` [], ``log_theta_beta`` [M], ``log_theta_gamma`` [], the
        natural logarithms of the widths (so the widths stay > 0), starting at log of the
        settings above. The settings stay the initial values in get_config; the learnt values
        are weights (saved with the model) and :meth:`theta_values` reads them.
      theta_gamma_max: mm, with learn_theta or a per-case ``theta``: the largest theta_gamma
        allowed (default 2 x theta_gamma). The separable spatial kernel's radius is fixed from
        it, +-ceil(4 theta_gamma_max / spacing) voxels per axis (at most the axis), so the cut
        lies at >= 4 sigma; log_theta_gamma is clipped to log(theta_gamma_max) after each
        update, and a per-case theta_gamma above it is an InvalidArgumentError.
      fused_inference: at inference (``training`` false or None) with float32 inputs, run every
        iteration in the compiled inference kernel (``functional.mean_field_inference``, the
        kernel dense_crf uses) instead of composed TF ops: same result to float32 rounding,
        1.2-1.5x faster on the benchmark phantoms (docs/crf.md), but with no gradient, so a
        gradient taken through such a call raises LookupError. Default False. Needs the
        default filters (lattice, separable) and fixed widths (not learn_theta), and runs only
        where the backend resolves to "compiled" (with "auto" on a GPU the composed path runs).
      backend: which implementation runs the lattice and separable filters (docs/crf.md):
        "auto" (default: the compiled kernels on the CPU, TensorFlow ops when the call runs on
        a GPU; crf_rnn_3d.lattice_op.backend.resolve_backend, resolved at each call),
        "compiled" (the C++ ops, CPU kernels only) or "tf" (TensorFlow ops only, any device:
        the composed mean field of functional.py, never the fused kernel nor any compiled op).
        The two agree to float32 rounding (tests/test_backend.py).
      recompute: when training, keep only the logits entering each mean-field iteration for
        the backward pass and run each iteration again there (``functional.mean_field``'s
        ``recompute``): the same logits, the same gradients to float rounding, less memory for
        more time (docs/crf.md, "Training memory", has the measurement behind the default).
      checkpoint_every: with recompute, keep the logits entering every k-th iteration only
        (``functional.mean_field``'s ``checkpoint_every``): the others are recomputed from the
        last kept ones in the backward pass. Default 1 (every iteration's kept); larger: less
        memory for more time, the same results.
      lattice_copies: the lattice's accuracy setting (crf_rnn_3d.lattice_op.Lattice, 1..8):
        each lattice filter averages this many lattices built in rotated frames, a smaller
        error at a proportional cost (docs/lattice_op.md, "Accuracy setting"). Default 1 (one
        lattice, unchanged). With more than 1, fused_inference falls back to the composed path
        (the fused kernel runs one lattice).

    Weights (trainable): ``bilateral_weight`` w1 [K], ``spatial_weight`` w2 [K],
    ``compatibility`` mu [K, K], whose diagonal is held at zero (masked in call, so the stored
    diagonal has no effect and receives a zero gradient); with learn_theta also the log-widths
    above (their gradients come through the lattice's feature gradient, see
    docs/lattice_op.md, or exactly with bilateral_filter="exact").

    Raises:
      ValueError: a bad setting (non-positive or non-finite theta, spacing, iteration count,
        unknown option) in the constructor; at build time inputs that are not two tensors of the
        same rank >= 3, K < 2, mismatched batch/spatial shapes, spacing or theta_beta of the
        wrong length.
      tf.errors.InvalidArgumentError: at call time, batch/spatial shapes that differ when they
        were unknown at build time; NaN or Inf in the unaries or the image, on every path
        ("unaries contains NaN or Inf" / "image contains NaN or Inf"; the fused kernel says
        "unaries contain"; docs/reliability.md, "NaN and Inf"); per-case widths that are not
        finite and > 0, theta_gamma above theta_gamma_max, or not one per batch item.
    """

    def __init__(
        self,
        theta_alpha: float = 10.0,
        theta_beta: float | Sequence[float] = 1.0,
        theta_gamma: float = 3.0,
        spacing: Sequence[float] | None = None,
        num_iterations: int = 5,
        num_iterations_inference: int | None = None,
        bilateral_weight_init: float = 1.0,
        spatial_weight_init: float = 1.0,
        compatibility_init: float = 1.0,
        normalisation: str = "mean",
        bilateral_filter: str = "lattice",
        spatial_filter: str = "separable",
        learn_theta: bool = False,
        theta_gamma_max: float | None = None,
        fused_inference: bool = False,
        backend: str = "auto",
        recompute: bool = RECOMPUTE_DEFAULT,
        lattice_copies: int = 1,
        checkpoint_every: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.theta_alpha = _positive("theta_alpha", theta_alpha)
        self.theta_beta = _positive_list("theta_beta", theta_beta)
        self.theta_gamma = _positive("theta_gamma", theta_gamma)
        self.spacing = None if spacing is None else _positive_list("spacing", spacing)
        self.num_iterations = _iterations("num_iterations", num_iterations)
        self.num_iterations_inference = (
            self.num_iterations
            if num_iterations_inference is None
            else _iterations("num_iterations_inference", num_iterations_inference)
        )
        self.bilateral_weight_init = _finite("bilateral_weight_init", bilateral_weight_init)
        self.spatial_weight_init = _finite("spatial_weight_init", spatial_weight_init)
        self.compatibility_init = _finite("compatibility_init", compatibility_init)
        self.normalisation = _choice("normalisation", normalisation, mf.NORMALISATIONS)
        self.bilateral_filter = _choice("bilateral_filter", bilateral_filter, mf.BILATERAL_FILTERS)
        self.spatial_filter = _choice("spatial_filter", spatial_filter, mf.SPATIAL_FILTERS)
        if not isinstance(learn_theta, bool | np.bool_):
            raise ValueError(f"learn_theta must be True or False, got {learn_theta!r}")
        self.learn_theta = bool(learn_theta)
        if theta_gamma_max is None:
            self.theta_gamma_max = None
        else:
            self.theta_gamma_max = _positive("theta_gamma_max", theta_gamma_max)
            if self.theta_gamma_max < self.theta_gamma:
                raise ValueError(
                    f"theta_gamma_max must be >= theta_gamma ({self.theta_gamma} mm), got "
                    f"{self.theta_gamma_max}"
                )
        if not isinstance(fused_inference, bool | np.bool_):
            raise ValueError(f"fused_inference must be True or False, got {fused_inference!r}")
        self.fused_inference = bool(fused_inference)
        self.backend = _choice("backend", backend, BACKENDS)
        if not isinstance(recompute, bool | np.bool_):
            raise ValueError(f"recompute must be True or False, got {recompute!r}")
        self.recompute = bool(recompute)
        self.checkpoint_every = _iterations("checkpoint_every", checkpoint_every)
        self.lattice_copies = check_lattice_copies(lattice_copies)
        if self.fused_inference and self.backend == "tf":
            raise ValueError(
                "fused_inference runs the compiled kernel, which backend='tf' never uses; set "
                "fused_inference=False or backend='auto' / 'compiled'"
            )
        if self.fused_inference and (
            self.learn_theta
            or self.bilateral_filter != "lattice"
            or self.spatial_filter != "separable"
        ):
            raise ValueError(
                "fused_inference needs fixed widths (learn_theta=False) and the default filters "
                "(bilateral_filter='lattice', spatial_filter='separable'); got learn_theta="
                f"{self.learn_theta}, bilateral_filter={self.bilateral_filter!r}, "
                f"spatial_filter={self.spatial_filter!r}"
            )

    def _check_shapes(self, unaries_shape: Any, image_shape: Any) -> None:
        u = tf.TensorShape(unaries_shape)
        im = tf.TensorShape(image_shape)
        if u.rank is None or im.rank is None:
            raise ValueError(f"CrfRnn needs inputs of known rank; got unaries {u} and image {im}")
        if u.rank < 3:
            raise ValueError(
                f"unaries must have shape [batch, *spatial, classes] (rank >= 3); got {u}"
            )
        if im.rank != u.rank:
            raise ValueError(
                f"image must have the rank of the unaries ([batch, *spatial, channels], rank "
                f"{u.rank}); got image {im} for unaries {u}"
            )
        if u[-1] is None or u[-1] < 2:
            raise ValueError(
                f"unaries must have a known number of classes K >= 2 in the last axis; got {u}"
            )
        if im[-1] is None or im[-1] < 1:
            raise ValueError(f"image must have a known number of channels >= 1; got {im}")
        if not u[:-1].is_compatible_with(im[:-1]):
            raise ValueError(
                f"unaries {u} and image {im} must have the same batch and spatial shape"
            )
        ndim = u.rank - 2
        if self.spacing is not None and len(self.spacing) != ndim:
            raise ValueError(
                f"spacing must have one entry per spatial axis ({ndim} for unaries {u}); got "
                f"{len(self.spacing)}: {self.spacing}"
            )
        if len(self.theta_beta) not in (1, im[-1]):
            raise ValueError(
                f"theta_beta must hold one value or one per image channel ({im[-1]} for image "
                f"{im}); got {len(self.theta_beta)}: {self.theta_beta}"
            )

    def build(self, input_shape: Any) -> None:
        if not isinstance(input_shape, list | tuple) or len(input_shape) != 2:
            raise ValueError(f"CrfRnn is called on [unaries, image]; got input shape {input_shape}")
        unaries_shape, image_shape = input_shape
        self._check_shapes(unaries_shape, image_shape)
        num_classes = int(unaries_shape[-1])
        self.num_classes = num_classes
        self.bilateral_weight = self.add_weight(
            name="bilateral_weight",
            shape=(num_classes,),
            initializer=_exact_constant(np.full(num_classes, self.bilateral_weight_init)),
        )
        self.spatial_weight = self.add_weight(
            name="spatial_weight",
            shape=(num_classes,),
            initializer=_exact_constant(np.full(num_classes, self.spatial_weight_init)),
        )
        potts = self.compatibility_init * (1.0 - np.eye(num_classes))
        self.compatibility = self.add_weight(
            name="compatibility",
            shape=(num_classes, num_classes),
            initializer=_exact_constant(potts),
        )
        if self.learn_theta:
            channels = int(image_shape[-1])
            beta = self.theta_beta * channels if len(self.theta_beta) == 1 else self.theta_beta
            self.log_theta_alpha = self.add_weight(
                name="log_theta_alpha",
                shape=(),
                initializer=_exact_constant(np.log(self.theta_alpha)),
            )
            self.log_theta_beta = self.add_weight(
                name="log_theta_beta",
                shape=(channels,),
                initializer=_exact_constant(np.log(np.asarray(beta, dtype=np.float64))),
            )
            log_max = math.log(self._gamma_max())
            self.log_theta_gamma = self.add_weight(
                name="log_theta_gamma",
                shape=(),
                initializer=_exact_constant(np.log(self.theta_gamma)),
                constraint=lambda v: tf.minimum(v, tf.cast(log_max, v.dtype)),
            )

    def _gamma_max(self) -> float:
        """The largest learnt theta_gamma in mm (theta_gamma_max, default 2 x theta_gamma)."""
        return self.theta_gamma_max if self.theta_gamma_max is not None else 2.0 * self.theta_gamma

    def theta_values(self) -> dict[str, Any]:
        """The kernel widths now in use: {"theta_alpha": mm, "theta_beta": [image units per
        channel], "theta_gamma": mm}, plain floats (the learnt values when learn_theta and
        built; otherwise the settings, theta_beta as given)."""
        if self.learn_theta and self.built:
            return {
                "theta_alpha": float(np.exp(np.asarray(self.log_theta_alpha))),
                "theta_beta": np.exp(np.asarray(self.log_theta_beta)).astype(float).tolist(),
                "theta_gamma": float(np.exp(np.asarray(self.log_theta_gamma))),
            }
        return {
            "theta_alpha": self.theta_alpha,
            "theta_beta": list(self.theta_beta),
            "theta_gamma": self.theta_gamma,
        }

    THETA_KEYS = ("theta_alpha", "theta_beta", "theta_gamma")

    def _case_theta(
        self, theta: Any, unaries: tf.Tensor, image: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The per-case widths of a call, in the unaries' dtype, after their checks (static:
        ValueError; values: InvalidArgumentError)."""
        if self.learn_theta:
            raise ValueError(
                "CrfRnn: per-case theta and learn_theta=True exclude each other (the per-case "
                "widths replace the learnt ones); build the layer with learn_theta=False"
            )
        if not isinstance(theta, Mapping) or sorted(theta) != sorted(self.THETA_KEYS):
            got = sorted(theta) if isinstance(theta, Mapping) else type(theta).__name__
            raise ValueError(f"CrfRnn: theta must be a dict with keys {self.THETA_KEYS}; got {got}")
        dtype = unaries.dtype
        alpha, beta, gamma = (tf.cast(theta[k], dtype) for k in self.THETA_KEYS)
        channels = image.shape[-1]
        for name, value, rank in (("theta_alpha", alpha, 1), ("theta_beta", beta, 2),
                                  ("theta_gamma", gamma, 1)):  # fmt: skip
            if value.shape.rank != rank:
                want = "[batch]" if rank == 1 else f"[batch, {channels}] (one per image channel)"
                raise ValueError(
                    f"CrfRnn: theta['{name}'] must have shape {want}; got {value.shape}"
                )
        if beta.shape[-1] is not None and beta.shape[-1] != channels:
            raise ValueError(
                f"CrfRnn: theta['theta_beta'] must hold one width per image channel ({channels}); "
                f"got shape {beta.shape}"
            )
        batch = tf.shape(unaries)[0]
        limit = tf.cast(self._gamma_max(), dtype)
        checks = []
        for name, value in (("theta_alpha", alpha), ("theta_beta", beta), ("theta_gamma", gamma)):
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(value)[0],
                    batch,
                    message=f"CrfRnn: theta['{name}'] must hold one entry per batch item",
                )
            )
            ok = tf.reduce_all(tf.math.is_finite(value) & (value > 0))
            checks.append(
                tf.debugging.Assert(
                    ok, [f"CrfRnn: theta['{name}'] must be finite and > 0; got", value]
                )
            )
        checks.append(tf.debugging.Assert(
            tf.reduce_all(gamma <= limit),
            [f"CrfRnn: theta['theta_gamma'] must be <= theta_gamma_max ({self._gamma_max()} mm); "
             "got", gamma]))  # fmt: skip
        with tf.control_dependencies([c for c in checks if c is not None]):
            return tf.identity(alpha), tf.identity(beta), tf.identity(gamma)

    def call(
        self,
        inputs: Sequence[tf.Tensor],
        training: bool | None = None,
        theta: Mapping[str, tf.Tensor] | None = None,
    ) -> tf.Tensor:
        unaries, image = inputs
        if unaries.dtype in (tf.float16, tf.bfloat16):  # a mixed policy: mean field in float32
            full = [tf.cast(unaries, tf.float32), tf.cast(image, tf.float32)]
            if theta is not None:
                theta = {k: tf.cast(v, tf.float32) for k, v in theta.items()}
            return tf.cast(self.call(full, training=training, theta=theta), unaries.dtype)
        self._check_shapes(unaries.shape, image.shape)
        unaries = tf.convert_to_tensor(unaries)
        image = tf.cast(image, unaries.dtype)
        check = tf.debugging.assert_equal(
            tf.shape(unaries)[:-1],
            tf.shape(image)[:-1],
            message="CrfRnn: unaries and image must have the same batch and spatial shape",
        )
        # Inside tf.function the check must run before the lattice ops see the tensors, or
        # their own (less specific) shape errors may win the race.
        with tf.control_dependencies([check] if check is not None else []):
            unaries, image = tf.identity(unaries), tf.identity(image)
        ndim = unaries.shape.rank - 2
        spacing = self.spacing if self.spacing is not None else [1.0] * ndim
        theta_alpha, theta_gamma = self.theta_alpha, self.theta_gamma
        theta_beta = self.theta_beta
        if len(theta_beta) == 1:
            theta_beta = theta_beta * image.shape[-1]
        gamma_max = None
        if self.learn_theta:
            theta_alpha = tf.exp(tf.cast(self.log_theta_alpha, unaries.dtype))
            theta_beta = tf.exp(tf.cast(self.log_theta_beta, unaries.dtype))
            theta_gamma = tf.exp(tf.cast(self.log_theta_gamma, unaries.dtype))
            gamma_max = self._gamma_max()
        if theta is not None:
            theta_alpha, theta_beta, theta_gamma = self._case_theta(theta, unaries, image)
            gamma_max = self._gamma_max()
        mask = 1.0 - tf.eye(self.num_classes, dtype=unaries.dtype)
        iterations = self.num_iterations if training else self.num_iterations_inference
        settings = dict(
            spacing=spacing,
            theta_alpha=theta_alpha,
            theta_beta=theta_beta,
            theta_gamma=theta_gamma,
            bilateral_weight=tf.cast(self.bilateral_weight, unaries.dtype),
            spatial_weight=tf.cast(self.spatial_weight, unaries.dtype),
            compatibility=tf.cast(self.compatibility, unaries.dtype) * mask,
            num_iterations=iterations,
            normalisation=self.normalisation,
        )
        backend = resolve_backend(self.backend, unaries)
        if (
            self.fused_inference
            and theta is None
            and backend == "compiled"
            and not training
            and unaries.dtype == tf.float32
            and self.lattice_copies == 1
        ):
            return mf.mean_field_inference(unaries, image, **settings)[0]
        return mf.mean_field(
            unaries,
            image,
            bilateral_filter=self.bilateral_filter,
            spatial_filter=self.spatial_filter,
            theta_gamma_max=gamma_max,
            backend=backend,
            recompute=self.recompute,
            checkpoint_every=self.checkpoint_every,
            lattice_copies=self.lattice_copies,
            **settings,
        )

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            theta_alpha=self.theta_alpha,
            theta_beta=list(self.theta_beta),
            theta_gamma=self.theta_gamma,
            spacing=None if self.spacing is None else list(self.spacing),
            num_iterations=self.num_iterations,
            num_iterations_inference=self.num_iterations_inference,
            bilateral_weight_init=self.bilateral_weight_init,
            spatial_weight_init=self.spatial_weight_init,
            compatibility_init=self.compatibility_init,
            normalisation=self.normalisation,
            bilateral_filter=self.bilateral_filter,
            spatial_filter=self.spatial_filter,
            learn_theta=self.learn_theta,
            theta_gamma_max=self.theta_gamma_max,
            fused_inference=self.fused_inference,
            backend=self.backend,
            recompute=self.recompute,
            checkpoint_every=self.checkpoint_every,
            lattice_copies=self.lattice_copies,
        )
        return config
