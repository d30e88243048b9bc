"""V-Net (Milletari, Navab, Ahmadi 2016) for 3D segmentation, with an optional CRF-as-RNN head.

Layout (channels-last, input [B, Z, Y, X, C], output logits [B, Z, Y, X, K]):

```
input -> [pad to a multiple of 2**levels]
level l = 0..levels-1:  n_l convs k^3 (c_l = base * 2**l channels) + residual  -> skip_l
                        strided 2x2x2 conv -> c_{l+1} channels (+ dropout)
bottom:                 n_bottom convs k^3 + residual
level l = levels-1..0:  transposed 2x2x2 conv -> c_l channels, concat skip_l (+ dropout),
                        n_l convs k^3 -> c_l channels + residual (the up-sampled tensor)
1x1x1 conv -> K logits -> [crop the padding] -> [CrfRnn([logits, input image])]
```
The residual of the first stage adds the input projected to c_0 channels by a 1x1x1
convolution (the paper repeats its single channel; a projection also serves 4 modalities).
Spatial sizes that are not multiples of ``2**levels`` (PROMISE12's 63 slices) are zero-padded
symmetrically before the network and cropped after the output convolution, so the output has
the input's size. The CRF head (``crf`` settings, see src/crf/layer.py) refines the logits with
the input image as the reference; its widths are in mm, converted with ``spacing``.

Widths per case (``crf`` with ``theta_per_case: true``): a small head, :class:`CaseTheta`
(layer ``case_theta``), reads the deepest features (the bottom stage's output, layer
``bottom_out``): their global average over space, a dense layer of ``theta_case_hidden`` ReLU
units and a dense layer with one output z per width (theta_alpha, theta_beta per image channel,
theta_gamma). Each width is w = w0 * f^(2 sigmoid(z) - 1), i.e. sigmoid(z) mapped linearly onto
[log(w0 / f), log(w0 * f)] in log space, w0 the configured width and f = ``theta_case_factor``.
The last layer starts with a zero kernel and zero bias (z = 0, the midpoint), so at step 0 every
case gets exactly w0 and the model starts where the fixed-width head starts. The widths go to
the CRF head's per-case ``theta`` input; its theta_gamma_max is w0_gamma * f, the separable
kernel's radius. The head's layers are made after every V-Net layer, so a seed gives the V-Net
the same weights with and without it.

``precision`` is the Keras dtype policy of the network's layers: ``float32``, or
``mixed_float16`` / ``mixed_bfloat16`` (variables in float32, computations in half precision).
Under a mixed policy the logits are cast back to float32 (layer ``logits_float32``) and the CRF
head is built with ``dtype="float32"``: its variables and its mean field stay in float32 (the
lattice op and the positions it filters have float32 kernels only), as does the output, and so
is the per-case widths' head. ``float64`` (build_vnet only, not a training setting) builds every
layer in float64, for gradient checks against finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import keras
import tensorflow as tf

from crf_rnn_3d.crf import CrfRnn

ACTIVATIONS = ("prelu", "relu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# what build_vnet accepts: the training precisions, and float64 for gradient checks
BUILD_PRECISIONS = (*PRECISIONS, "float64")
DEEPEST = "bottom_out"  # the layer whose output the per-case widths' head reads
# crf settings that belong to the per-case widths' head, not to CrfRnn, and their defaults
CASE_THETA_DEFAULTS = {"theta_per_case": False, "theta_case_factor": 2.0, "theta_case_hidden": 16}


class VNetConfigError(ValueError):
    """A model setting the V-Net cannot use; names the setting, expected and found value."""

    def __init__(self, setting: str, expected: str, found: object) -> None:
        super().__init__(f"setting model.{setting}: expected {expected}, found {found!r}")


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise VNetConfigError(name, f"an integer >= {low}", value)
    return int(value)


def _activation(kind: str, name: str) -> keras.layers.Layer:
    if kind == "prelu":
        return keras.layers.PReLU(shared_axes=[1, 2, 3], name=name)
    return keras.layers.ReLU(name=name)


def _stage(x: Any, residual: Any, n_convs: int, channels: int, cfg: Mapping, name: str) -> Any:
    """n_convs k^3 convolutions with activations, the last activation after the residual add."""
    k = int(cfg["kernel_size"])
    for i in range(n_convs):
        x = keras.layers.Conv3D(channels, k, padding="same", name=f"{name}_conv{i}")(x)
        if i < n_convs - 1:
            x = _activation(cfg["activation"], f"{name}_act{i}")(x)
    x = keras.layers.Add(name=f"{name}_add")([x, residual])
    return _activation(cfg["activation"], f"{name}_out")(x)


@contextmanager
def _dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``name`` while the layers are made (each layer keeps
    the policy it was made with), and restored afterwards."""
    if name not in BUILD_PRECISIONS:
        raise ValueError(f"precision must be one of {BUILD_PRECISIONS}, got {name!r}")
    prior = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(prior)


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@keras.saving.register_keras_serializable(package="crf_rnn_3d")
class CaseTheta(keras.layers.Layer):
    """Per-case CRF kernel widths from a feature map (see the module docstring).

    Called on features [B, *spatial, C]; returns ``{"theta_alpha": [B] mm, "theta_beta":
    [B, M] image units, "theta_gamma": [B] mm}``, CrfRnn's per-case ``theta``. Each width lies in
    [w0 / factor, w0 * factor] (clipped there, so float rounding cannot leave it) and equals w0
    while the last layer's kernel and bias are zero (as built).

    Args:
      theta_alpha, theta_gamma: the centre widths w0 in mm; theta_beta: one per image channel.
      factor: f > 1, the bounds' ratio to w0 on either side.
      hidden: units of the hidden dense layer (>= 1).

    Raises:
      ValueError: a width that is not a finite number > 0, factor <= 1, hidden < 1.

    ``batch_mean`` (a non-trainable weight [2 + M]: alpha, beta_1..M, gamma) holds the mean over
    the batch of the widths of the last call with ``training=True``, for logging.
    """

    def __init__(
        self,
        theta_alpha: float,
        theta_beta: Sequence[float],
        theta_gamma: float,
        factor: float = 2.0,
        hidden: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        widths = {"theta_alpha": [theta_alpha], "theta_beta": list(theta_beta),
                  "theta_gamma": [theta_gamma]}  # fmt: skip
        for name, values in widths.items():
            if not values or not all(_positive_number(v) for v in values):
                raise ValueError(f"{name} must be finite widths > 0 (at least one), got {values}")
        if not _positive_number(factor) or factor <= 1.0:
            raise ValueError(f"factor must be a finite number > 1, got {factor!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {hidden!r}")
        self.theta_alpha = float(theta_alpha)
        self.theta_beta = [float(b) for b in theta_beta]
        self.theta_gamma = float(theta_gamma)
        self.factor = float(factor)
        self.hidden = int(hidden)
        self.centre = [self.theta_alpha, *self.theta_beta, self.theta_gamma]
        self.dense_hidden = keras.layers.Dense(
            self.hidden, activation="relu", name="hidden", dtype=self.dtype_policy
        )
        self.dense_out = keras.layers.Dense(
            len(self.centre), kernel_initializer="zeros", bias_initializer="zeros",
            name="out", dtype=self.dtype_policy,
        )  # fmt: skip

    def bounds(self) -> tuple[list[float], list[float]]:
        """([w0 / f], [w0 * f]) in the order alpha, beta_1..M, gamma."""
        return [w / self.factor for w in self.centre], [w * self.factor for w in self.centre]

    def build(self, input_shape: Any) -> None:
        channels = int(input_shape[-1])
        self.dense_hidden.build((None, channels))
        self.dense_out.build((None, self.hidden))
        self.batch_mean = self.add_weight(
            name="batch_mean",
            shape=(len(self.centre),),
            initializer=keras.initializers.Constant(self.centre),
            trainable=False,
            aggregation="mean",
        )

    def widths(self, z: tf.Tensor) -> tf.Tensor:
        """[B, 2 + M] widths of head outputs z [B, 2 + M]: w0 * f^(2 sigmoid(z) - 1), clipped
        to [w0 / f, w0 * f]."""
        low, high = self.bounds()
        centre = tf.constant(self.centre, z.dtype)
        width = centre * tf.exp((2.0 * tf.sigmoid(z) - 1.0) * math.log(self.factor))
        return tf.clip_by_value(width, tf.constant(low, z.dtype), tf.constant(high, z.dtype))

    def call(self, features: tf.Tensor, training: bool | None = None) -> dict[str, tf.Tensor]:
        pooled = tf.reduce_mean(features, axis=list(range(1, features.shape.rank - 1)))
        width = self.widths(self.dense_out(self.dense_hidden(pooled)))
        if training:
            self.batch_mean.assign(tf.cast(tf.reduce_mean(width, 0), self.batch_mean.dtype))
        return {
            "theta_alpha": width[:, 0],
            "theta_beta": width[:, 1:-1],
            "theta_gamma": width[:, -1],
        }

    def compute_output_shape(self, input_shape: Any) -> dict[str, tuple]:
        batch = input_shape[0]
        return {
            "theta_alpha": (batch,),
            "theta_beta": (batch, len(self.theta_beta)),
            "theta_gamma": (batch,),
        }

    def mean_values(self) -> dict[str, Any]:
        """``batch_mean`` as {"theta_alpha": mm, "theta_beta": [per channel], "theta_gamma": mm}."""
        mean = [float(v) for v in keras.ops.convert_to_numpy(self.batch_mean)]
        return {"theta_alpha": mean[0], "theta_beta": mean[1:-1], "theta_gamma": mean[-1]}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            theta_alpha=self.theta_alpha,
            theta_beta=list(self.theta_beta),
            theta_gamma=self.theta_gamma,
            factor=self.factor,
            hidden=self.hidden,
        )
        return config


def case_theta_scalars(model: keras.Model, prefix: str = "crf") -> dict[str, float]:
    """The batch means of the per-case widths of `model`'s :class:`CaseTheta` layers (from the
    last training call), as ``{"<prefix>/<layer>/theta_alpha": mm, .../theta_beta_<c>,
    .../theta_gamma}``; empty for a model without one."""
    scalars: dict[str, float] = {}
    for layer in model.layers:
        if isinstance(layer, CaseTheta):
            values = layer.mean_values()
            base = f"{prefix}/{layer.name}"
            scalars[f"{base}/theta_alpha"] = values["theta_alpha"]
            for c, beta in enumerate(values["theta_beta"]):
                scalars[f"{base}/theta_beta_{c}"] = beta
            scalars[f"{base}/theta_gamma"] = values["theta_gamma"]
    return scalars


def padding_for(shape: Sequence[int], multiple: int) -> list[tuple[int, int]]:
    """Symmetric (before, after) zero padding that makes each size a multiple of ``multiple``."""
    pads = []
    for n in shape:
        extra = -int(n) % multiple
        pads.append((extra // 2, extra - extra // 2))
    return pads


def check_config(cfg: Mapping) -> dict:
    """Validates the ``model`` settings; returns them as a plain dict (raises VNetConfigError)."""
    out = dict(cfg)
    levels = _int_at_least("levels", out.get("levels"), 1)
    _int_at_least("base_channels", out.get("base_channels"), 1)
    _int_at_least("bottom_convs", out.get("bottom_convs"), 1)
    k = _int_at_least("kernel_size", out.get("kernel_size"), 1)
    if k % 2 == 0:
        raise VNetConfigError("kernel_size", "an odd integer (same padding)", k)
    convs = out.get("convs_per_level")
    if not isinstance(convs, Sequence) or len(convs) != levels:
        raise VNetConfigError("convs_per_level", f"a list of {levels} integers (levels)", convs)
    out["convs_per_level"] = [
        _int_at_least(f"convs_per_level[{i}]", c, 1) for i, c in enumerate(convs)
    ]
    if out.get("activation") not in ACTIVATIONS:
        raise VNetConfigError("activation", f"one of {ACTIVATIONS}", out.get("activation"))
    rate = out.get("dropout", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise VNetConfigError("dropout", "a rate in [0, 1)", rate)
    out["dropout"] = float(rate)
    return out


def build_vnet(
    input_shape: Sequence[int],
    num_classes: int,
    cfg: Mapping,
    crf: Mapping | None = None,
    spacing: Sequence[float] | None = None,
    name: str = "vnet",
    precision: str = "float32",
) -> keras.Model:
    """The V-Net as a functional Keras model.

    Args:
      input_shape: (Z, Y, X, C) of one case, all known (the padding is fixed at build time).
      num_classes: K >= 2 output classes (logits).
      cfg: the ``model`` settings: levels, base_channels, convs_per_level (one per level),
        bottom_convs, kernel_size (odd), activation (prelu | relu), dropout (rate in [0, 1)).
      crf: None for the plain V-Net, or CrfRnn keyword settings (theta_alpha in mm, theta_beta in
        image units, theta_gamma in mm, iterations, initial weights, filters) for the CRF head,
        plus optionally the per-case widths' settings (CASE_THETA_DEFAULTS: theta_per_case,
        theta_case_factor, theta_case_hidden; see the module docstring).
      spacing: voxel size (z, y, x) in mm, passed to the CRF head (required with ``crf``).
      precision: the layers' dtype policy, float32 | mixed_float16 | mixed_bfloat16 (see the
        module docstring; the CRF head is float32 under all three), or float64 (every layer,
        the input and the CRF head in float64: for gradient checks).
    Returns a model mapping image [B, Z, Y, X, C] float32 to logits [B, Z, Y, X, K] float32.
    Raises VNetConfigError for a bad setting or shape, ValueError for an unknown precision or a
    bad CRF setting (the message starts with the setting's name, e.g. "theta_case_factor must").
    """
    with _dtype_policy(precision):
        return _build(input_shape, num_classes, cfg, crf, spacing, name, precision)


def _build(
    input_shape: Sequence[int],
    num_classes: int,
    cfg: Mapping,
    crf: Mapping | None,
    spacing: Sequence[float] | None,
    name: str,
    precision: str,
) -> keras.Model:
    """build_vnet under its dtype policy."""
    cfg = check_config(cfg)
    shape = tuple(input_shape)
    if len(shape) != 4 or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape
    ):
        raise VNetConfigError("input_shape", "(Z, Y, X, C), four positive integers", shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise VNetConfigError("num_classes", "an integer >= 2", num_classes)
    levels = cfg["levels"]
    base = cfg["base_channels"]
    rate = cfg["dropout"]

    image = keras.Input(shape=shape, name="image", dtype=_input_dtype(precision))
    pads = padding_for(shape[:3], 2**levels)
    x = keras.layers.ZeroPadding3D(pads, name="pad")(image) if any(sum(p) for p in pads) else image

    skips = []
    residual = keras.layers.Conv3D(base, 1, name="input_projection")(x)
    for level in range(levels):
        channels = base * 2**level
        x = _stage(x, residual, cfg["convs_per_level"][level], channels, cfg, f"down{level}")
        skips.append(x)
        x = keras.layers.Conv3D(2 * channels, 2, strides=2, name=f"down{level}_stride")(x)
        x = _activation(cfg["activation"], f"down{level}_stride_act")(x)
        if rate > 0:
            x = keras.layers.Dropout(rate, name=f"down{level}_dropout")(x)
        residual = x
    x = _stage(x, residual, cfg["bottom_convs"], base * 2**levels, cfg, "bottom")
    deepest = x  # layer DEEPEST: what the per-case widths' head reads

    for level in reversed(range(levels)):
        channels = base * 2**level
        up = keras.layers.Conv3DTranspose(channels, 2, strides=2, name=f"up{level}_transpose")(x)
        up = _activation(cfg["activation"], f"up{level}_transpose_act")(up)
        x = keras.layers.Concatenate(name=f"up{level}_concat")([up, skips[level]])
        if rate > 0:
            x = keras.layers.Dropout(rate, name=f"up{level}_dropout")(x)
        x = _stage(x, up, cfg["convs_per_level"][level], channels, cfg, f"up{level}")

    logits = keras.layers.Conv3D(num_classes, 1, name="logits")(x)
    if any(sum(p) for p in pads):
        logits = keras.layers.Cropping3D(pads, name="crop")(logits)
    if precision.startswith("mixed"):  # half-precision logits back to float32 for the loss, head
        logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(logits)
    if crf is not None:
        if spacing is None or len(spacing) != 3:
            raise VNetConfigError("spacing", "(z, y, x) voxel size in mm for the CRF head", spacing)
        settings = {k: v for k, v in dict(crf).items()}
        case = {k: settings.pop(k, default) for k, default in CASE_THETA_DEFAULTS.items()}
        theta_beta = settings.get("theta_beta")
        if isinstance(theta_beta, Sequence) and not isinstance(theta_beta, str):
            settings["theta_beta"] = [float(t) for t in theta_beta]
        # the heads in float32 under every policy (float64 for gradient checks): their inputs
        # are cast on the way in
        dtype = "float64" if precision == "float64" else "float32"
        theta = None
        if case["theta_per_case"] is not False:
            if case["theta_per_case"] is not True:
                raise ValueError(
                    f"theta_per_case must be true or false, got {case['theta_per_case']!r}"
                )
            head_theta = _case_theta_head(settings, case, shape[-1], dtype)
            theta = head_theta(deepest)
            settings["theta_gamma_max"] = _gamma_max(settings, head_theta)
        head = CrfRnn(spacing=[float(s) for s in spacing], name="crf", dtype=dtype, **settings)
        logits = head([logits, image]) if theta is None else head([logits, image], theta=theta)
    return keras.Model(image, logits, name=name)


def _input_dtype(precision: str) -> str:
    return "float64" if precision == "float64" else "float32"


def _case_theta_head(settings: dict, case: dict, channels: int, dtype: str) -> CaseTheta:
    """The per-case widths' head for the CRF settings (CrfRnn's defaults where unset)."""
    if settings.get("learn_theta"):
        raise ValueError("learn_theta must be false with theta_per_case (one or the other)")
    factor, hidden = case["theta_case_factor"], case["theta_case_hidden"]
    if not _positive_number(factor) or factor <= 1.0:
        raise ValueError(f"theta_case_factor must be a finite number > 1, got {factor!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"theta_case_hidden must be an integer >= 1, got {hidden!r}")
    defaults = CrfRnn()
    beta = settings.get("theta_beta", defaults.theta_beta)
    beta = list(beta) if isinstance(beta, Sequence) and not isinstance(beta, str) else [beta]
    if len(beta) == 1:
        beta = beta * channels
    return CaseTheta(
        settings.get("theta_alpha", defaults.theta_alpha),
        beta,
        settings.get("theta_gamma", defaults.theta_gamma),
        factor=factor,
        hidden=hidden,
        name="case_theta",
        dtype=dtype,
    )


def _gamma_max(settings: dict, head: CaseTheta) -> float:
    """The CRF head's theta_gamma_max with per-case widths: the widths head's upper bound
    (a configured theta_gamma_max must not be below it)."""
    upper = head.bounds()[1][-1]
    given = settings.get("theta_gamma_max")
    if given is None:
        return upper
    if not _positive_number(given) or given < upper:
        raise ValueError(
            f"theta_gamma_max must be null or >= theta_gamma x theta_case_factor ({upper} mm) "
            f"with theta_per_case, got {given!r}"
        )
    return float(given)
