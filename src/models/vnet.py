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

``precision`` is the Keras dtype policy of the network's layers: ``float32``, or
``mixed_float16`` / ``mixed_bfloat16`` (variables in float32, computations in half precision).
Under a mixed policy the logits are cast back to float32 (layer ``logits_float32``) and the CRF
head is built with ``dtype="float32"``: its variables and its mean field stay in float32 (the
lattice op and the positions it filters have float32 kernels only), as does the output.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import keras

from crf_rnn_3d.crf import CrfRnn

ACTIVATIONS = ("prelu", "relu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


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
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    prior = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(prior)


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
        image units, theta_gamma in mm, iterations, initial weights, filters) for the CRF head.
      spacing: voxel size (z, y, x) in mm, passed to the CRF head (required with ``crf``).
      precision: the layers' dtype policy, float32 | mixed_float16 | mixed_bfloat16 (see the
        module docstring; the CRF head is float32 under all three).
    Returns a model mapping image [B, Z, Y, X, C] float32 to logits [B, Z, Y, X, K] float32.
    Raises VNetConfigError for a bad setting or shape, ValueError for an unknown precision.
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

    image = keras.Input(shape=shape, name="image")
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
    if precision != "float32":  # half-precision logits back to float32 for the loss and head
        logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(logits)
    if crf is not None:
        if spacing is None or len(spacing) != 3:
            raise VNetConfigError("spacing", "(z, y, x) voxel size in mm for the CRF head", spacing)
        settings = {k: v for k, v in dict(crf).items()}
        theta_beta = settings.get("theta_beta")
        if isinstance(theta_beta, Sequence) and not isinstance(theta_beta, str):
            settings["theta_beta"] = [float(t) for t in theta_beta]
        # the head in float32 under every policy: its inputs are cast to float32 on the way in
        head = CrfRnn(spacing=[float(s) for s in spacing], name="crf", dtype="float32", **settings)
        logits = head([logits, image])
    return keras.Model(image, logits, name=name)
