"""The paper's preprocessing as pure array functions (no I/O), and its inverse.

Arrays are channels-last ``[z, y, x, c]`` (labels ``[z, y, x]``), spacings (z, y, x) in mm.
Configs give shapes and spacings in the paper's (x, y, z) order under keys ending in ``_xyz``;
:func:`xyz_to_zyx` turns them round.

One case goes through :func:`preprocess_case`:

1. Resample to ``target_spacing`` (skipped when None). The grids are centre-aligned: the
   physical centre of the old grid is the centre of the new one, and the new size along each
   axis is ``round(n * s / s_new)``. Images: trilinear (``linear``) or cubic B-spline
   (``bspline``) interpolation; labels: ``nearest`` or ``per_label_linear`` (each label's
   indicator interpolated linearly, then the arg-max: smoother borders than nearest, no new
   label values). Outside the old grid the nearest edge voxel is repeated.
2. Normalise intensities per channel: ``zscore`` (mean 0, standard deviation 1 over the whole
   resampled volume; PROMISE12), ``zscore_nonzero`` (statistics over the non-zero "brain" mask
   only, voxels outside it set to 0; BraTS) or ``none``.
3. Centre crop / zero-pad to ``target_shape`` (skipped when None): along an axis of size n and
   target t, output voxel j takes input voxel ``j + (n - t) // 2`` (padding, with 0, where that
   falls outside).

:class:`Geometry` keeps what the inverse needs; :func:`to_original_grid` maps a prediction on
the preprocessed grid back onto the original one (undo the crop/pad, resample back).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from crf_rnn_3d.datasets.errors import ConfigError

IMAGE_INTERPOLATION = {"linear": 1, "bspline": 3}
LABEL_INTERPOLATION = ("nearest", "per_label_linear")
NORMALISATIONS = ("zscore", "zscore_nonzero", "none")


def xyz_to_zyx(values: Sequence[float] | None) -> tuple | None:
    """(x, y, z) config order -> (z, y, x) array order; None stays None."""
    if values is None:
        return None
    values = tuple(values)
    if len(values) != 3:
        raise ConfigError("a *_xyz setting", "3 values (x, y, z)", list(values))
    return values[::-1]


# --------------------------------------------------------------------------- resampling


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Size of the grid covering the same extent at ``new_spacing``: round(n * s / s_new)."""
    return tuple(
        max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, new_spacing, strict=True)
    )


def _affine(
    in_shape: Sequence[int],
    in_spacing: Sequence[float],
    out_shape: Sequence[int],
    out_spacing: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal map from output index j to input index i, centres aligned:
    i = (j - (n_out - 1) / 2) * s_out / s_in + (n_in - 1) / 2."""
    r = np.array(out_spacing, float) / np.array(in_spacing, float)
    offset = (np.array(in_shape, float) - 1) / 2 - r * (np.array(out_shape, float) - 1) / 2
    return r, offset


def resample_image(
    image: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int = 1,
    out_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resamples each channel of ``image`` [z, y, x, c] from ``spacing`` to ``new_spacing`` (mm).

    ``order``: 0 nearest, 1 trilinear, 3 cubic B-spline. ``out_shape`` defaults to
    :func:`resampled_shape`. Returns float32 [z', y', x', c].
    """
    shape = image.shape[:3]
    out_shape = tuple(out_shape or resampled_shape(shape, spacing, new_spacing))
    r, offset = _affine(shape, spacing, out_shape, new_spacing)
    out = np.empty((*out_shape, image.shape[3]), np.float32)
    for c in range(image.shape[3]):
        out[..., c] = ndimage.affine_transform(
            image[..., c].astype(np.float32 if order <= 1 else np.float64),
            r,
            offset=offset,
            output_shape=out_shape,
            order=order,
            mode="nearest",
        )
    return out


def resample_labels(
    label: np.ndarray,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    method: str = "per_label_linear",
    out_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resamples a label map [z, y, x] from ``spacing`` to ``new_spacing`` (mm).

    ``method``: ``nearest``, or ``per_label_linear`` (linear interpolation of each label's
    indicator, then arg-max; ties go to the smaller label). Returns the input dtype.
    """
    if method not in LABEL_INTERPOLATION:
        raise ConfigError("preprocess.label_interpolation", f"one of {LABEL_INTERPOLATION}", method)
    shape = label.shape
    out_shape = tuple(out_shape or resampled_shape(shape, spacing, new_spacing))
    r, offset = _affine(shape, spacing, out_shape, new_spacing)
    if method == "nearest":
        return ndimage.affine_transform(
            label, r, offset=offset, output_shape=out_shape, order=0, mode="nearest"
        )
    values = np.unique(label)
    best = np.full(out_shape, -1.0, np.float32)
    out = np.zeros(out_shape, label.dtype)
    for v in values:
        p = ndimage.affine_transform(
            (label == v).astype(np.float32),
            r,
            offset=offset,
            output_shape=out_shape,
            order=1,
            mode="nearest",
        )
        better = p > best + 1e-6
        out[better] = v
        best = np.where(better, p, best)
    return out


# --------------------------------------------------------------------------- crop / pad


def centre_offsets(shape: Sequence[int], target: Sequence[int]) -> tuple[int, ...]:
    """Per axis (n - t) // 2: output voxel j of a centre crop/pad takes input voxel j + offset."""
    return tuple((int(n) - int(t)) // 2 for n, t in zip(shape, target, strict=True))


def crop_or_pad(
    array: np.ndarray, target: Sequence[int], offsets: Sequence[int], fill: float = 0
) -> np.ndarray:
    """out[j] = array[j + offsets] on the leading len(target) axes, ``fill`` outside the input.

    Trailing axes (channels) are kept. Negative offsets pad before, positive ones crop.
    """
    k = len(target)
    out = np.full((*target, *array.shape[k:]), fill, dtype=array.dtype)
    src, dst = [], []
    for n, t, o in zip(array.shape[:k], target, offsets, strict=True):
        lo, hi = max(0, -o), min(t, n - o)  # output range with a valid input
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo + o, hi + o))
    out[tuple(dst)] = array[tuple(src)]
    return out


# --------------------------------------------------------------------------- normalisation


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """[z, y, x] bool: voxels where any channel of ``image`` [z, y, x, c] is non-zero."""
    return np.any(image != 0, axis=-1)


def zscore(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-channel z-score of ``image`` [z, y, x, c] -> float32.

    Mean and (population) standard deviation come from the voxels in ``mask`` [z, y, x] (all
    voxels when None); voxels outside the mask are set to 0. A channel with zero deviation (or
    an empty mask) is only centred.
    """
    out = np.zeros(image.shape, np.float32)
    for c in range(image.shape[-1]):
        x = image[..., c].astype(np.float64)
        sel = x if mask is None else x[mask]
        if sel.size == 0:
            continue
        mean, std = sel.mean(), sel.std()
        z = (x - mean) / (std if std > 0 else 1.0)
        out[..., c] = z if mask is None else np.where(mask, z, 0.0)
    return out


# --------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class PreprocessSettings:
    """What :func:`preprocess_case` does; built from the config with :meth:`from_config`.

    Shapes and spacings here are (z, y, x); None skips that step.
    """

    target_spacing: tuple[float, float, float] | None
    target_shape: tuple[int, int, int] | None
    image_interpolation: str = "linear"
    label_interpolation: str = "per_label_linear"
    normalisation: str = "zscore"
    label_map: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def from_config(cls, cfg: Mapping) -> PreprocessSettings:
        """From the ``data.preprocess`` config (``target_spacing_xyz``, ``target_shape_xyz``,
        ``image_interpolation``, ``label_interpolation``, ``normalisation``, ``label_map``)."""
        img = str(cfg.get("image_interpolation", "linear"))
        if img not in IMAGE_INTERPOLATION:
            raise ConfigError(
                "data.preprocess.image_interpolation", f"one of {list(IMAGE_INTERPOLATION)}", img
            )
        lab = str(cfg.get("label_interpolation", "per_label_linear"))
        if lab not in LABEL_INTERPOLATION:
            raise ConfigError(
                "data.preprocess.label_interpolation", f"one of {LABEL_INTERPOLATION}", lab
            )
        norm = str(cfg.get("normalisation", "zscore"))
        if norm not in NORMALISATIONS:
            raise ConfigError("data.preprocess.normalisation", f"one of {NORMALISATIONS}", norm)
        spacing = xyz_to_zyx(cfg.get("target_spacing_xyz"))
        if spacing is not None and min(spacing) <= 0:
            raise ConfigError("data.preprocess.target_spacing_xyz", "positive mm", spacing)
        shape = xyz_to_zyx(cfg.get("target_shape_xyz"))
        if shape is not None and min(shape) < 1:
            raise ConfigError("data.preprocess.target_shape_xyz", "positive sizes", shape)
        label_map = cfg.get("label_map")
        return cls(
            target_spacing=None if spacing is None else tuple(float(s) for s in spacing),
            target_shape=None if shape is None else tuple(int(s) for s in shape),
            image_interpolation=img,
            label_interpolation=lab,
            normalisation=norm,
            label_map=None
            if not label_map
            else tuple(sorted((int(k), int(v)) for k, v in dict(label_map).items())),
        )

    def to_dict(self) -> dict:
        """JSON-ready form (stored in the manifest; a change invalidates the cache)."""
        return asdict(self)


@dataclass(frozen=True)
class Geometry:
    """What maps a prediction on the preprocessed grid back to the original one (z, y, x order).

    Attributes:
      original_shape, original_spacing (mm), original_origin (mm), original_direction: the
        source grid.
      resampled_shape: the grid after resampling, before the crop/pad.
      spacing: the preprocessed grid's spacing (mm).
      offsets: crop/pad offsets, see :func:`crop_or_pad`.
      shape: the preprocessed grid's shape.
    """

    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    original_origin: tuple[float, float, float]
    original_direction: tuple[tuple[float, ...], ...]
    resampled_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    offsets: tuple[int, int, int]
    shape: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {k: np.asarray(v).tolist() for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Geometry:
        def tup(v: object) -> object:
            return tuple(tup(x) for x in v) if isinstance(v, list | tuple) else v

        return cls(**{k: tup(v) for k, v in d.items()})


def remap_labels(label: np.ndarray, mapping: Sequence[tuple[int, int]] | None) -> np.ndarray:
    """Replaces label values: each (old, new) pair, applied at once (not in sequence)."""
    if not mapping:
        return label
    out = label.copy()
    for old, new in mapping:
        out[label == old] = new
    return out


def preprocess_case(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing: Sequence[float],
    settings: PreprocessSettings,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[Sequence[float]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Resample, normalise, crop/pad one case (see the module docstring for each step).

    Args:
      image: [z, y, x, c] intensities.
      label: [z, y, x] integer labels, or None.
      spacing: (z, y, x) mm.
    Returns:
      image [Z, Y, X, c] float32, label [Z, Y, X] uint8 (or None), and the Geometry.
    """
    spacing = tuple(float(s) for s in spacing)
    shape = tuple(image.shape[:3])
    mask = nonzero_mask(image) if settings.normalisation == "zscore_nonzero" else None
    if settings.target_spacing is not None:
        new_spacing = settings.target_spacing
        rshape = resampled_shape(shape, spacing, new_spacing)
        image = resample_image(
            image, spacing, new_spacing, IMAGE_INTERPOLATION[settings.image_interpolation], rshape
        )
        if label is not None:
            label = resample_labels(
                label, spacing, new_spacing, settings.label_interpolation, rshape
            )
        if mask is not None:
            mask = resample_labels(
                mask.astype(np.uint8), spacing, new_spacing, "nearest", rshape
            ).astype(bool)
    else:
        new_spacing, rshape = spacing, shape
    if settings.normalisation != "none":
        image = zscore(image, mask)
    else:
        image = image.astype(np.float32)
    target = settings.target_shape or rshape
    offsets = centre_offsets(rshape, target)
    image = crop_or_pad(image, target, offsets, 0.0)
    if label is not None:
        label = crop_or_pad(remap_labels(label, settings.label_map), target, offsets, 0)
        label = label.astype(np.uint8)
    geometry = Geometry(
        original_shape=shape,
        original_spacing=spacing,
        original_origin=tuple(float(o) for o in origin),
        original_direction=tuple(
            tuple(float(v) for v in row)
            for row in (direction if direction is not None else np.eye(3))
        ),
        resampled_shape=tuple(int(n) for n in rshape),
        spacing=tuple(float(s) for s in new_spacing),
        offsets=tuple(int(o) for o in offsets),
        shape=tuple(int(n) for n in target),
    )
    return image, label, geometry


def to_original_grid(
    prediction: np.ndarray, geometry: Geometry, method: str = "per_label_linear"
) -> np.ndarray:
    """Maps a prediction on the preprocessed grid back onto the original grid.

    Args:
      prediction: a label map [Z, Y, X] (integers; resampled with ``method``, ``nearest`` or
        ``per_label_linear``) or class probabilities [Z, Y, X, K] (float; resampled linearly).
        Voxels cropped away by the preprocessing become background (label 0, or probability 1
        for class 0).
      geometry: from :func:`preprocess_case`.
    Returns:
      [z, y, x] (or [z, y, x, K]) on ``geometry.original_shape``.
    """
    back = tuple(-o for o in geometry.offsets)
    if prediction.shape[:3] != tuple(geometry.shape):
        raise ValueError(
            f"prediction: expected spatial shape {geometry.shape} (z, y, x), "
            f"found {prediction.shape[:3]}"
        )
    same = tuple(geometry.resampled_shape) == tuple(geometry.original_shape) and np.allclose(
        geometry.spacing, geometry.original_spacing
    )
    if prediction.ndim == 3:
        x = crop_or_pad(prediction, geometry.resampled_shape, back, 0)
        if same:
            return x
        return resample_labels(
            x, geometry.spacing, geometry.original_spacing, method, geometry.original_shape
        )
    x = crop_or_pad(prediction.astype(np.float32), geometry.resampled_shape, back, 0.0)
    outside = crop_or_pad(np.zeros(geometry.shape, np.float32), geometry.resampled_shape, back, 1.0)
    x[..., 0] += outside
    if same:
        return x
    return resample_image(
        x, geometry.spacing, geometry.original_spacing, 1, geometry.original_shape
    )
