"""Segmentation metrics the challenges score: Dice, and surface distances in millimetres.

    dice(pred, ref)                                  overlap in [0, 1]
    surface_metrics(pred, ref, spacing_mm, tol_mm)   HD95, ASSD (mm), normalised surface Dice

The surface distances come from DeepMind's ``surface-distance`` library
(``surface_distance.compute_surface_distances``): it finds the surface elements of each mask
(surfels, weighted by their area in mm^2, so that anisotropic voxels count by their true size)
and the distance of each to the other surface. This module turns them into:

- **HD95**: the larger of the two directed 95th percentiles (area-weighted), in mm;
- **ASSD**: the average symmetric surface distance, the area-weighted mean of the distances
  from both surfaces to the other, in mm;
- **NSD**: the normalised surface Dice at ``tolerance_mm``, the share of both surfaces that
  lies within the tolerance of the other, in [0, 1].

Empty masks are handled explicitly (a convention, stated in every report that uses it):

| prediction | reference | Dice | HD95, ASSD | NSD |
|---|---|---|---|---|
| empty | empty | ``empty_dice`` (1) | 0 | 1 |
| empty | not empty, or the reverse | 0 | the image's diagonal in mm | 0 |

(The diagonal is the largest distance two points of the image can have: a missing structure
scores worse than any misplaced one, and the mean over cases stays finite.)

Masks are boolean arrays of one case, [z, y, x] (or 2-D), with ``spacing_mm`` in the same axis
order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from surface_distance import compute_robust_hausdorff, compute_surface_distances

HD_PERCENT = 95.0


def dice(pred: np.ndarray, ref: np.ndarray, empty: float = 1.0) -> float:
    """2 |P and R| / (|P| + |R|) of two masks; ``empty`` when both are empty."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return float(empty)
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def image_diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    """The largest distance between two voxel centres of a grid, in mm."""
    return float(np.linalg.norm((np.asarray(shape) - 1) * np.asarray(spacing_mm, float)))


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float
) -> dict[str, float]:
    """HD95 and ASSD in mm and the normalised surface Dice at ``tolerance_mm`` of two masks of
    the same shape (see the module docstring for the definitions and the empty-mask rule).

    Raises:
      ValueError: shapes differ, or ``spacing_mm`` does not give one positive size per axis,
        or the tolerance is negative.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    spacing = tuple(float(s) for s in spacing_mm)
    if pred.shape != ref.shape:
        raise ValueError(f"surface_metrics: shapes differ, {pred.shape} and {ref.shape}")
    if pred.ndim not in (2, 3) or len(spacing) != pred.ndim or min(spacing) <= 0:
        raise ValueError(
            f"surface_metrics: masks of 2 or 3 axes with one positive spacing each, got shape "
            f"{pred.shape} and spacing {spacing}"
        )
    if not tolerance_mm >= 0:
        raise ValueError(f"surface_metrics: tolerance_mm must be >= 0, got {tolerance_mm}")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return {"hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    if not has_pred or not has_ref:
        worst = image_diagonal_mm(pred.shape, spacing)
        return {"hd95": worst, "assd": worst, "nsd": 0.0}
    found = compute_surface_distances(ref, pred, spacing)
    to_pred, to_ref = found["distances_gt_to_pred"], found["distances_pred_to_gt"]
    area_ref, area_pred = found["surfel_areas_gt"], found["surfel_areas_pred"]
    total = float(area_ref.sum() + area_pred.sum())
    assd = float((to_pred * area_ref).sum() + (to_ref * area_pred).sum()) / total
    within = float(
        area_ref[to_pred <= tolerance_mm].sum() + area_pred[to_ref <= tolerance_mm].sum()
    )
    return {
        "hd95": float(compute_robust_hausdorff(found, HD_PERCENT)),
        "assd": assd,
        "nsd": within / total,
    }
