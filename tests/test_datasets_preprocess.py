"""The paper's preprocessing as pure array functions, against SimpleITK, numpy and hand values."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from crf_rnn_3d.datasets.errors import ConfigError
from crf_rnn_3d.datasets.preprocess import (
    Geometry,
    PreprocessSettings,
    centre_offsets,
    crop_or_pad,
    preprocess_case,
    remap_labels,
    resample_image,
    resample_labels,
    resampled_shape,
    to_original_grid,
    xyz_to_zyx,
    zscore,
)


def ball(shape, spacing, radius_mm, centre_mm=None) -> np.ndarray:
    """uint8 [z, y, x]: 1 inside a ball of radius_mm around the grid centre (or centre_mm)."""
    idx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = [(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)]
    if centre_mm is not None:
        centre = centre_mm
    r2 = sum((i * s - c) ** 2 for i, s, c in zip(idx, spacing, centre, strict=True))
    return (r2 <= radius_mm**2).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_xyz_to_zyx() -> None:
    assert xyz_to_zyx([200, 200, 63]) == (63, 200, 200)
    assert xyz_to_zyx(None) is None
    with pytest.raises(ConfigError, match="_xyz"):
        xyz_to_zyx([1, 2])


def test_resampled_shape_hand_values() -> None:
    # PROMISE12-like: 24 slices of 3.6 mm -> 86.4 mm / 2 mm = 43.2 -> 43; 320 * 0.625 = 200
    assert resampled_shape((24, 320, 320), (3.6, 0.625, 0.625), (2, 1, 1)) == (43, 200, 200)
    assert resampled_shape((1, 3, 5), (1, 1, 1), (4, 4, 4)) == (1, 1, 1)


def sitk_centre_aligned(
    vol: np.ndarray, spacing, new_spacing, out_shape, interpolator
) -> np.ndarray:
    """The same resampling done by SimpleITK: grids share their physical centre."""
    img = sitk.GetImageFromArray(vol.astype(np.float64))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    centre = [(n - 1) / 2 * s for n, s in zip(vol.shape, spacing, strict=True)]
    origin = [c - (m - 1) / 2 * t for c, m, t in zip(centre, out_shape, new_spacing, strict=True)]
    out = sitk.Resample(
        img,
        [int(n) for n in out_shape[::-1]],
        sitk.Transform(),
        interpolator,
        origin[::-1],
        tuple(float(s) for s in new_spacing[::-1]),
        img.GetDirection(),
        0.0,
        sitk.sitkFloat64,
    )
    return sitk.GetArrayFromImage(out)


def test_resample_linear_matches_simpleitk() -> None:
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(7, 16, 13))
    spacing, new = (3.6, 0.625, 0.7), (2.0, 1.0, 1.0)
    out_shape = resampled_shape(vol.shape, spacing, new)
    ours = resample_image(vol[..., None], spacing, new, order=1)[..., 0]
    ref = sitk_centre_aligned(vol, spacing, new, out_shape, sitk.sitkLinear)
    assert ours.shape == out_shape == ref.shape
    # compare where the output voxel lies inside the input grid (the edges are padded
    # differently: ours repeats the edge voxel, SimpleITK writes the default 0)
    r = np.array(new) / np.array(spacing)
    off = (np.array(vol.shape) - 1) / 2 - r * (np.array(out_shape) - 1) / 2
    inside = [
        (off[a] + r[a] * np.arange(out_shape[a]) >= 0)
        & (off[a] + r[a] * np.arange(out_shape[a]) <= vol.shape[a] - 1)
        for a in range(3)
    ]
    sel = np.ix_(*inside)
    assert min(len(np.flatnonzero(i)) for i in inside) >= 5
    np.testing.assert_allclose(ours[sel], ref[sel], atol=1e-4)


def test_resample_reproduces_a_linear_function() -> None:
    # trilinear (and B-spline) interpolation reproduce a linear function of position exactly
    spacing, new = (3.0, 0.5, 0.8), (2.0, 1.0, 1.0)
    shape = (16, 40, 30)
    idx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    f = sum(
        c * (i - (n - 1) / 2) * s
        for c, i, n, s in zip((1, -2, 3), idx, shape, spacing, strict=True)
    )
    out_shape = resampled_shape(shape, spacing, new)
    jdx = np.meshgrid(*(np.arange(n) for n in out_shape), indexing="ij")
    g = sum(
        c * (j - (m - 1) / 2) * t
        for c, j, m, t in zip((1, -2, 3), jdx, out_shape, new, strict=True)
    )
    # linear: exact wherever the output voxel has input neighbours on both sides; B-spline: the
    # boundary condition of its prefilter reaches a few voxels in, so look further inside
    for order, margin in ((1, 2), (3, 8)):
        interior = tuple(slice(margin, n - margin) for n in out_shape)
        out = resample_image(f[..., None], spacing, new, order=order)[..., 0]
        np.testing.assert_allclose(out[interior], g[interior], atol=1e-3)


def test_resample_labels_keeps_volume_and_values() -> None:
    spacing, new = (3.6, 0.625, 0.625), (2.0, 1.0, 1.0)
    lab = ball((20, 96, 96), spacing, 22.0)
    lab[lab == 1] = 3  # label value other than 1
    out_shape = resampled_shape(lab.shape, spacing, new)
    ref = ball(out_shape, new, 22.0) * 3  # the same ball drawn directly on the new grid
    for method in ("nearest", "per_label_linear"):
        out = resample_labels(lab, spacing, new, method)
        assert out.dtype == lab.dtype
        assert set(np.unique(out)) == {0, 3}
        assert dice(out == 3, ref == 3) > 0.93
    with pytest.raises(ConfigError, match="label_interpolation"):
        resample_labels(lab, spacing, new, "cubic")


def test_per_label_linear_hand_case() -> None:
    # 1D along x: labels [0, 0, 2, 2] at 1 mm -> 2 mm; centres aligned, new voxel centres at
    # input positions 0.5 and 2.5: indicator of 2 there is 0 and 1 -> [0, 2]
    lab = np.array([0, 0, 2, 2], np.uint8).reshape(1, 1, 4)
    out = resample_labels(lab, (1, 1, 1), (1, 1, 2), "per_label_linear")
    np.testing.assert_array_equal(out.ravel(), [0, 2])
    # 1 mm -> 4 mm: one voxel centred at input position 1.5, where both indicators are 0.5;
    # the tie goes to the smaller label
    out = resample_labels(lab, (1, 1, 1), (1, 1, 4), "per_label_linear")
    np.testing.assert_array_equal(out.ravel(), [0])


def test_centre_crop_pad_hand_values() -> None:
    a = np.arange(6).reshape(1, 1, 6)
    assert centre_offsets((1, 1, 6), (1, 1, 4)) == (0, 0, 1)
    np.testing.assert_array_equal(crop_or_pad(a, (1, 1, 4), (0, 0, 1)).ravel(), [1, 2, 3, 4])
    assert centre_offsets((1, 1, 6), (1, 1, 9)) == (0, 0, -2)
    np.testing.assert_array_equal(
        crop_or_pad(a, (1, 1, 9), (0, 0, -2), fill=-1).ravel(), [-1, -1, 0, 1, 2, 3, 4, 5, -1]
    )
    # channels are kept, other axes cropped and padded at once
    b = np.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)
    out = crop_or_pad(b, (4, 1, 4), centre_offsets((2, 3, 4), (4, 1, 4)))
    assert out.shape == (4, 1, 4, 2)
    np.testing.assert_array_equal(out[1:3, 0], b[:, 1])
    assert not out[0].any() and not out[3].any()


def test_zscore_against_numpy() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(5, 3, size=(4, 5, 6, 2))
    out = zscore(img)
    for c in range(2):
        ref = (img[..., c] - img[..., c].mean()) / img[..., c].std()
        np.testing.assert_allclose(out[..., c], ref, rtol=1e-5, atol=1e-5)
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3] = True
    out = zscore(img, mask)
    assert not out[~mask].any()
    inside = img[..., 1][mask]
    np.testing.assert_allclose(
        out[..., 1][mask], (inside - inside.mean()) / inside.std(), atol=1e-5
    )
    const = zscore(np.full((2, 2, 2, 1), 7.0))
    assert not const.any()


def test_remap_labels_is_simultaneous() -> None:
    lab = np.array([0, 1, 2, 4], np.uint8)
    np.testing.assert_array_equal(remap_labels(lab, ((1, 2), (2, 1))), [0, 2, 1, 4])
    assert remap_labels(lab, None) is lab


def test_settings_from_config_and_errors() -> None:
    s = PreprocessSettings.from_config(
        {
            "target_spacing_xyz": [1, 1, 2],
            "target_shape_xyz": [200, 200, 63],
            "image_interpolation": "bspline",
            "label_map": {4: 3},
        }
    )
    assert s.target_spacing == (2.0, 1.0, 1.0)
    assert s.target_shape == (63, 200, 200)
    assert s.label_map == ((4, 3),)
    for key, value in [
        ("image_interpolation", "cubic"),
        ("label_interpolation", "linear"),
        ("normalisation", "minmax"),
        ("target_spacing_xyz", [1, 0, 2]),
        ("target_shape_xyz", [0, 1, 1]),
    ]:
        with pytest.raises(ConfigError, match=f"data.preprocess.{key}"):
            PreprocessSettings.from_config({key: value})


def promise_like_case(shape=(20, 96, 80), spacing=(3.6, 0.625, 0.7)):
    rng = np.random.default_rng(1)
    lab = ball(shape, spacing, 18.0)
    img = 300.0 + 200.0 * lab + rng.normal(0, 10, size=shape)
    return img[..., None].astype(np.float32), lab, spacing


def test_preprocess_case_promise_like() -> None:
    img, lab, spacing = promise_like_case()
    s = PreprocessSettings.from_config(
        {"target_spacing_xyz": [1, 1, 2], "target_shape_xyz": [48, 64, 40]}
    )
    out, olab, geo = preprocess_case(img, lab, spacing, s, origin=(1.0, 2.0, 3.0))
    assert out.shape == (40, 64, 48, 1) and out.dtype == np.float32
    assert olab.shape == (40, 64, 48) and olab.dtype == np.uint8
    assert geo.resampled_shape == (36, 60, 56)  # 72/2, 60/1, 56/1 mm
    assert geo.offsets == (-2, -2, 4)  # pad z and y, crop x
    assert geo.spacing == (2.0, 1.0, 1.0)
    assert geo.original_spacing == spacing and geo.original_origin == (1.0, 2.0, 3.0)
    # the ball (radius 18 mm) sits in the middle of the new grid with its volume kept
    ref = ball((40, 64, 48), (2.0, 1.0, 1.0), 18.0)
    assert dice(olab, ref) > 0.93
    # z-score over the resampled volume (all of it along z and y), zero padding outside it
    inner = out[2:38, 2:62, :, 0]
    assert abs(float(inner.mean())) < 0.1
    assert not out[:2].any() and not out[38:].any() and not out[:, :2].any()
    assert not out[:, 62:].any()
    # the organ is brighter than its surroundings after normalisation
    inner_lab = olab[2:38, 2:62]
    assert inner[inner_lab == 1].mean() > inner[inner_lab == 0].mean() + 1


def test_preprocess_zscore_nonzero_brain_mask() -> None:
    rng = np.random.default_rng(2)
    img = np.zeros((6, 10, 10, 2), np.float32)
    img[1:5, 2:8, 2:8] = rng.normal(100, 20, size=(4, 6, 6, 2))
    s = PreprocessSettings.from_config({"normalisation": "zscore_nonzero"})
    out, _, geo = preprocess_case(img, None, (1.5, 1.2, 1.0), s)
    assert geo.shape == (6, 10, 10) and geo.offsets == (0, 0, 0)
    brain = out[1:5, 2:8, 2:8]
    np.testing.assert_allclose(brain.reshape(-1, 2).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(brain.reshape(-1, 2).std(0), 1, atol=1e-4)
    outside = np.ones((6, 10, 10), bool)
    outside[1:5, 2:8, 2:8] = False
    assert not out[outside].any()


def test_to_original_grid_label_round_trip() -> None:
    img, lab, spacing = promise_like_case()
    s = PreprocessSettings.from_config(
        {"target_spacing_xyz": [1, 1, 2], "target_shape_xyz": [64, 48, 40]}
    )
    _, olab, geo = preprocess_case(img, lab, spacing, s)
    geo = Geometry.from_dict(geo.to_dict())  # as stored in the cache
    back = to_original_grid(olab, geo)
    assert back.shape == lab.shape
    assert dice(back, lab) > 0.93
    probs = np.stack([1.0 - olab, olab], axis=-1).astype(np.float32)
    pback = to_original_grid(probs, geo)
    assert pback.shape == (*lab.shape, 2)
    np.testing.assert_allclose(pback.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="expected spatial shape"):
        to_original_grid(olab[:-1], geo)


def test_to_original_grid_crop_only_is_exact_inside() -> None:
    lab = np.zeros((5, 9, 11), np.uint8)
    lab[1:4, 2:7, 3:9] = 1
    lab[2, 4, 5] = 2
    s = PreprocessSettings.from_config({"target_shape_xyz": [7, 7, 7]})
    img = np.ones((*lab.shape, 1), np.float32)
    _, olab, geo = preprocess_case(img, lab, (2.0, 1.0, 0.5), s)
    back = to_original_grid(olab, geo)
    # crop offsets (z, y, x) = (-1, 1, 2): kept region is y 1..7, x 2..8, all z
    expected = np.zeros_like(lab)
    expected[:, 1:8, 2:9] = lab[:, 1:8, 2:9]
    np.testing.assert_array_equal(back, expected)
