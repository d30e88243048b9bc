"""Metrics against answers known without the code under test: spheres whose surface distances
follow from geometry (integrated with scipy), and hand-counted masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate

from crf_rnn_3d.experiments.metrics import dice, image_diagonal_mm, surface_metrics


def sphere(shape, spacing, centre_mm, radius_mm) -> np.ndarray:
    """Voxels whose centres lie inside the sphere, [z, y, x] with spacing (z, y, x) in mm."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    cz, cy, cx = centre_mm
    return (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius_mm**2


def offset_distance(u: np.ndarray, r: float, d: float) -> np.ndarray:
    """Distance from the point at cos(angle) = u on a sphere of radius r to the surface of the
    same sphere moved by d along that angle's axis (law of cosines)."""
    return np.abs(np.sqrt(r * r + d * d - 2 * r * d * u) - r)


def test_dice_hand_values() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 voxels
    b[0, 1:] = True  # 3 voxels, 2 shared
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a), empty=0.0) == 0.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_concentric_spheres_are_their_radii_apart() -> None:
    """Every point of one surface is |r1 - r2| = 3 mm from the other."""
    spacing = (0.5, 0.5, 0.5)
    shape = (64, 64, 64)
    centre = (16.0, 16.0, 16.0)
    inner, outer = sphere(shape, spacing, centre, 10.0), sphere(shape, spacing, centre, 13.0)
    m = surface_metrics(inner, outer, spacing, tolerance_mm=2.0)
    assert m["hd95"] == pytest.approx(3.0, abs=0.4)  # voxelisation: about one voxel
    assert m["assd"] == pytest.approx(3.0, abs=0.3)
    assert m["nsd"] < 0.05  # nothing within 2 mm
    assert surface_metrics(inner, outer, spacing, tolerance_mm=4.0)["nsd"] > 0.99


def _offset_case(spacing: tuple[float, float, float]) -> dict[str, float]:
    """Two spheres of radius 10 mm, 4 mm apart along x, on a grid of ``spacing`` (z, y, x)."""
    shape = tuple(round(32.0 / s) for s in spacing)
    a = sphere(shape, spacing, (16.0, 16.0, 14.0), R)
    b = sphere(shape, spacing, (16.0, 16.0, 14.0 + D), R)
    m = surface_metrics(a, b, spacing, tolerance_mm=1.0)
    assert surface_metrics(b, a, spacing, tolerance_mm=1.0) == pytest.approx(m)  # symmetric
    return m


R, D = 10.0, 4.0


def _continuum() -> dict[str, float]:
    """The same metrics of the two continuous spheres: the distances are a function of
    u = cos(angle) from the offset axis, and u is uniform over a sphere's area."""
    assd, _ = integrate.quad(lambda u: offset_distance(u, R, D) / 2.0, -1.0, 1.0)
    dist = offset_distance(np.linspace(-1.0, 1.0, 2_000_001), R, D)
    return {
        "assd": assd,
        "hd95": float(np.percentile(dist, 95.0)),
        "nsd": float(np.mean(dist <= 1.0)),
    }


def test_offset_spheres_converge_to_the_integrated_distances() -> None:
    """Voxelised surfaces lie up to half a voxel off the true ones, so each metric is within a
    bound proportional to the voxel size (ASSD 0.6 voxel, HD95 1 voxel, NSD 0.15 per mm of
    voxel) and the error shrinks when the voxels are halved."""
    exact = _continuum()
    assert exact["assd"] == pytest.approx(2.0, abs=1e-6)  # by hand: the mean of |f(u)| is 2
    assert exact["hd95"] == pytest.approx(3.8, abs=1e-4)
    errors = []
    for voxel in (0.5, 0.25):
        m = _offset_case((voxel, voxel, voxel))
        err = {k: abs(m[k] - exact[k]) for k in exact}
        assert err["assd"] <= 0.6 * voxel, (voxel, m, exact)
        assert err["hd95"] <= 1.0 * voxel, (voxel, m, exact)
        assert err["nsd"] <= 0.15 * voxel, (voxel, m, exact)
        errors.append(err)
    assert errors[1]["assd"] < errors[0]["assd"] and errors[1]["nsd"] < errors[0]["nsd"]


def test_anisotropic_voxels_count_by_their_size_in_mm() -> None:
    """On 1 x 0.5 x 0.5 mm voxels the metrics stay within the bounds of the largest voxel
    side (the distances are in mm along every axis)."""
    exact = _continuum()
    m = _offset_case((1.0, 0.5, 0.5))
    assert m["assd"] == pytest.approx(exact["assd"], abs=0.6)
    assert m["hd95"] == pytest.approx(exact["hd95"], abs=1.0)
    assert m["nsd"] == pytest.approx(exact["nsd"], abs=0.15)


def test_empty_masks_follow_the_stated_convention() -> None:
    spacing = (2.0, 1.0, 1.0)
    shape = (10, 20, 30)
    empty = np.zeros(shape, bool)
    full = sphere(shape, spacing, (10.0, 10.0, 15.0), 5.0)
    assert surface_metrics(empty, empty, spacing, 1.0) == {"hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    diagonal = float(np.sqrt((9 * 2.0) ** 2 + 19**2 + 29**2))
    assert image_diagonal_mm(shape, spacing) == pytest.approx(diagonal)
    for pred, ref in ((empty, full), (full, empty)):
        m = surface_metrics(pred, ref, spacing, 1.0)
        assert m == {"hd95": pytest.approx(diagonal), "assd": pytest.approx(diagonal), "nsd": 0.0}


def test_bad_arguments_are_named() -> None:
    a = np.zeros((4, 5, 6), bool)
    with pytest.raises(ValueError, match="shapes differ"):
        surface_metrics(a, np.zeros((4, 5, 7), bool), (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(a, a, (1, 1), 1.0)
    with pytest.raises(ValueError, match="tolerance_mm"):
        surface_metrics(a, a, (1, 1, 1), -1.0)
