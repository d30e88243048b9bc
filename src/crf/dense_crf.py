"""Dense-CRF post-processing of a probability map on NumPy arrays (no Keras model, no training).

    refined = dense_crf(probabilities, image, spacing=(2.0, 1.0, 1.0))

Runs the same mean-field inference as the CrfRnn layer (src/crf/functional.py) with fixed
weights and a Potts compatibility, on one image at a time: the bilateral lattice is built once,
then every iteration runs in one compiled kernel (``mean_field_inference``; the appearance
kernel on the lattice, the smoothness kernel as an exact separable Gaussian cut at 4 sigma).

``mode="pydensecrf"`` reproduces pydensecrf's usual recipe, so that users moving from it get
the same labels: ``unary_from_softmax`` (unaries -log(max(p, 1e-5))), ``addPairwiseGaussian``
and ``addPairwiseBilateral`` with ``compat=w`` (a Potts model: mu = w (1 - I), equivalent to
pydensecrf's -w I because the normalised messages of all classes sum to the same value) and
``NORMALIZE_SYMMETRIC``, positions in voxels when no spacing is given (pydensecrf's ``sxy`` /
``sdims``) and the image taken as it is (``srgb`` / ``schan`` in image units). pydensecrf
approximates the smoothness kernel on a lattice too; the exact one here changes at most a few
voxels in 100,000 of its labels (docs/crf.md). The default mode uses the "mean" normalisation
of the CrfRnn layer.

``backend="tf"`` (or "auto" on a GPU) runs the same inference with TensorFlow ops only (the
composed mean field of functional.py over the TensorFlow-ops lattice and separable filter)
instead of the compiled kernels, which have CPU kernels only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from crf_rnn_3d.crf import functional as mf
from crf_rnn_3d.lattice_op import BACKENDS, Lattice, check_lattice_copies, resolve_backend

MODES = ("default", "pydensecrf")


def _positive(name: str, value: float) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array whose data start on a 64-byte boundary (TensorFlow's
    alignment for tensors it does not own)."""
    count = math.prod(shape)
    raw = np.empty(count * 4 + 64, dtype=np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + count * 4].view(np.float32).reshape(shape)


def _as_tensor(array: np.ndarray) -> tf.Tensor:
    """A tensor over the same memory as an array from _aligned_empty (DLPack, no copy)."""
    assert array.ctypes.data % 64 == 0 and array.flags.c_contiguous
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def _bilateral_features(
    image: np.ndarray, spacing: Sequence[float], theta_alpha: float, betas: Sequence[float]
) -> np.ndarray:
    """The appearance kernel's features [1, *spatial, ndim + M] of a float32 [*spatial, M] image,
    written channel by channel into one aligned buffer: the same float32 arithmetic as
    functional.bilateral_features (index * float32(spacing / theta_alpha), image *
    float32(1 / theta_beta)), so the same lattice, without its temporaries (a third of a
    BraTS volume's features, docs/benchmarks.md)."""
    spatial, channels = image.shape[:-1], image.shape[-1]
    ndim = len(spatial)
    features = _aligned_empty((1, *spatial, ndim + channels))
    for axis in range(ndim):
        scale = np.float32(float(spacing[axis]) / float(theta_alpha))
        view = [1] * ndim
        view[axis] = -1
        features[0, ..., axis] = (np.arange(spatial[axis], dtype=np.float32) * scale).reshape(view)
    for c in range(channels):
        np.multiply(
            image[..., c], np.float32(1.0 / float(betas[c])), out=features[0, ..., ndim + c]
        )
    return features


def dense_crf(
    probabilities: np.ndarray,
    image: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    theta_alpha: float = 10.0,
    theta_beta: float | Sequence[float] = 1.0,
    theta_gamma: float = 3.0,
    bilateral_weight: float = 5.0,
    spatial_weight: float = 3.0,
    num_iterations: int = 5,
    mode: str = "default",
    clip: float = 1e-5,
    exact: bool = False,
    backend: str = "auto",
    lattice_copies: int = 1,
) -> np.ndarray:
    """Refines class probabilities with a fully connected CRF.

    Args:
      probabilities: [*spatial, K] class probabilities (K >= 2, values in [0, 1]; rows need not
        sum to 1 exactly: unaries are log(max(p, clip)), and the first Q is their softmax).
      image: [*spatial] or [*spatial, M] reference image (M channels, e.g. modalities).
      spacing: voxel size in mm per spatial axis (default: 1 per axis, i.e. thetas in voxels).
      theta_alpha: appearance kernel's spatial width in mm; theta_beta: its width in image
        units, one number or one per channel; theta_gamma: smoothness kernel's width in mm.
      bilateral_weight, spatial_weight: Potts weights w1, w2 (pydensecrf's ``compat``).
      num_iterations: mean-field iterations (>= 1).
      mode: "default" (mean normalisation) or "pydensecrf" (symmetric normalisation; see the
        module docstring).
      clip: smallest probability used for the unaries (pydensecrf's default 1e-5).
      exact: replace the lattice by a dense N x N appearance kernel and the exact separable
        spatial kernel (at most 8192 voxels; for checks on small inputs).
      backend: "auto" (default), "compiled" or "tf" (crf_rnn_3d.lattice_op.backend). The inputs
        are NumPy arrays, so "auto" looks at the device scope only: the compiled kernels unless
        a GPU is visible and the call is not inside a CPU ``tf.device`` scope. "tf" computes
        with TensorFlow ops only (same result to float32 rounding; more memory, as every
        iteration is separate ops).
      lattice_copies: the lattice's accuracy setting (crf_rnn_3d.lattice_op.Lattice, 1..8):
        the appearance filter averages this many lattices built in rotated frames (smaller
        error, proportional cost; docs/lattice_op.md). Default 1 runs the fused compiled kernel
        as before; more than 1 runs the composed mean field (the fused kernel runs one lattice).

    Returns:
      float32 [*spatial, K] refined probabilities (rows sum to 1).

    Raises:
      ValueError: naming the argument, for mismatched shapes, K < 2, probabilities outside
        [0, 1] or not finite, a non-finite image, non-positive widths, a spacing or theta_beta
        of the wrong length, an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    lattice_copies = check_lattice_copies(lattice_copies)
    probs = np.asarray(probabilities)
    img = np.asarray(image)
    if probs.ndim < 2:
        raise ValueError(
            f"probabilities must have shape [*spatial, K] (at least 2 axes); got {probs.shape}"
        )
    num_classes = probs.shape[-1]
    spatial = probs.shape[:-1]
    if num_classes < 2:
        raise ValueError(
            f"probabilities must have K >= 2 classes in the last axis; got {probs.shape}"
        )
    if img.shape == spatial:
        img = img[..., None]
    if img.ndim != probs.ndim or img.shape[:-1] != spatial:
        raise ValueError(
            f"image must have shape {spatial} or {(*spatial, 'M')} to match probabilities of "
            f"shape {probs.shape}; got {img.shape}"
        )
    if not np.issubdtype(probs.dtype, np.number) or not np.all(np.isfinite(probs)):
        raise ValueError("probabilities must be finite numbers")
    low, high = float(probs.min()), float(probs.max())
    if low < 0.0 or high > 1.0 + 1e-3:
        raise ValueError(f"probabilities must lie in [0, 1]; found values in [{low}, {high}]")
    if not np.issubdtype(img.dtype, np.number) or not np.all(np.isfinite(img)):
        raise ValueError("image must hold finite numbers (found NaN, Inf or a non-numeric type)")
    ndim = len(spatial)
    spacing = [1.0] * ndim if spacing is None else list(spacing)
    if len(spacing) != ndim:
        raise ValueError(
            f"spacing must have one entry per spatial axis ({ndim} for probabilities of shape "
            f"{probs.shape}); got {len(spacing)}: {spacing}"
        )
    spacing = [_positive(f"spacing[{i}]", s) for i, s in enumerate(spacing)]
    betas = list(theta_beta) if isinstance(theta_beta, Sequence | np.ndarray) else [theta_beta]
    if len(betas) == 1:
        betas = betas * img.shape[-1]
    if len(betas) != img.shape[-1]:
        raise ValueError(
            f"theta_beta must hold one value or one per image channel ({img.shape[-1]}); got "
            f"{len(betas)}: {betas}"
        )
    betas = [_positive(f"theta_beta[{i}]", b) for i, b in enumerate(betas)]
    if isinstance(num_iterations, bool) or int(num_iterations) != num_iterations:
        raise ValueError(f"num_iterations must be an integer >= 1, got {num_iterations!r}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be an integer >= 1, got {num_iterations!r}")
    for name, value in (("bilateral_weight", bilateral_weight), ("spatial_weight", spatial_weight)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    clip = _positive("clip", clip)

    potts = 1.0 - np.eye(num_classes, dtype=np.float32)
    settings = dict(
        spacing=spacing,
        theta_alpha=_positive("theta_alpha", theta_alpha),
        theta_beta=betas,
        theta_gamma=_positive("theta_gamma", theta_gamma),
        bilateral_weight=tf.fill([num_classes], float(bilateral_weight)),
        spatial_weight=tf.fill([num_classes], float(spatial_weight)),
        compatibility=tf.constant(potts),
        num_iterations=int(num_iterations),
        normalisation="symmetric" if mode == "pydensecrf" else "mean",
    )

    # The arrays TensorFlow reads are written once into 64-byte aligned buffers that it then
    # uses without a copy (tf.constant would copy each one, twice over at its peak), each only
    # when it is needed, so that the features' memory is free again before the unaries'.
    def unaries_tensor() -> tf.Tensor:
        unaries = _aligned_empty((1, *probs.shape))
        np.clip(probs, clip, None, out=unaries[0])
        np.log(unaries, out=unaries)
        return _as_tensor(unaries)

    backend = resolve_backend(backend)
    if not exact and backend == "compiled" and lattice_copies == 1:
        with np.errstate(over="ignore"):  # an overflow is the error raised just below
            img32 = img.astype(np.float32, copy=False)
        if not np.all(np.isfinite(img32)):
            raise ValueError("image holds values beyond float32's range (found Inf after casting)")
        features = _as_tensor(_bilateral_features(img32, spacing, settings["theta_alpha"], betas))
        del img32
        lattice = Lattice(features, backend="compiled").tensors
        del features  # the kernel needs the lattice only
        fused = {k: v for k, v in settings.items() if k not in ("theta_alpha", "theta_beta")}
        _, refined = mf.mean_field_on_lattice(
            unaries_tensor(), lattice, return_logits=False, **fused
        )
        return refined.numpy()[0]
    reference = _aligned_empty((1, *img.shape))
    reference[0] = img
    unaries_t, image_t = unaries_tensor(), _as_tensor(reference)
    del reference  # the tensor holds it now
    logits = mf.mean_field(
        unaries_t,
        image_t,
        bilateral_filter="exact" if exact else "lattice",
        spatial_filter="separable",
        backend=backend,
        lattice_copies=lattice_copies,
        **settings,
    )
    flat = tf.reshape(logits, [-1, num_classes])
    return tf.reshape(tf.nn.softmax(flat), probs.shape).numpy()
