"""Readers and writers of single volumes: axis order, spacing, errors naming the file."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from datasets_fixtures import PROMISE_SPACING_XYZ, ramp, write_nifti_file, write_sitk_file

from crf_rnn_3d.datasets.errors import DataError
from crf_rnn_3d.datasets.io import (
    atomic_output,
    read_nifti,
    read_sitk,
    read_volume,
    write_nifti,
    write_sitk,
)


def test_sitk_pixel_lands_at_z_y_x(tmp_path: Path) -> None:
    # Built voxel by voxel with SimpleITK's own (x, y, z) index: no array conversion involved.
    image = sitk.Image([5, 4, 3], sitk.sitkInt16)  # size x=5, y=4, z=3
    image.SetSpacing((0.5, 0.75, 3.0))
    image.SetPixel((4, 1, 2), 77)
    path = tmp_path / "one.mha"
    sitk.WriteImage(image, str(path))
    vol = read_sitk(path)
    assert vol.array.shape == (3, 4, 5)
    assert vol.array[2, 1, 4] == 77
    assert vol.array.sum() == 77
    assert vol.spacing == (3.0, 0.75, 0.5)


def test_mhd_ramp_spacing_origin(tmp_path: Path) -> None:
    array = ramp((4, 6, 5), scale=0.01).astype(np.int16)
    path = write_sitk_file(tmp_path / "Case07.mhd", array, PROMISE_SPACING_XYZ)
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, array)
    assert vol.array.dtype == np.int16
    assert vol.spacing == pytest.approx((3.6, 0.7, 0.625))
    assert vol.origin == pytest.approx((5.0, 20.0, -10.0))
    np.testing.assert_allclose(vol.direction, np.eye(3))
    assert vol.path == str(path)


def test_direction_is_reversed_with_the_axes(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.float32))
    # x axis points along world -y, y along world +x, z along z (a 90 degree turn)
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    path = tmp_path / "turned.mha"
    sitk.WriteImage(image, str(path))
    d = np.array(read_sitk(path).direction)
    # rows and columns in (z, y, x): world-z of index-z is 1, world-y of index-x is -1, ...
    np.testing.assert_allclose(d, [[1, 0, 0], [0, 0, -1], [0, 1, 0]])


def test_nifti_matches_simpleitk_reading_the_same_file(tmp_path: Path) -> None:
    array = ramp((4, 6, 5)).astype(np.float32)
    path = write_nifti_file(tmp_path / "c_t1.nii.gz", array, (0.9, 1.1, 2.5))
    vol = read_nifti(path)
    np.testing.assert_array_equal(vol.array, array)
    assert vol.spacing == pytest.approx((2.5, 1.1, 0.9))
    # independent reader: SimpleITK on the same NIfTI file
    ref = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))
    assert vol.spacing == pytest.approx(ref.GetSpacing()[::-1])


def test_nifti_geometry_is_simpleitks(tmp_path: Path) -> None:
    # an oblique, shifted affine: nibabel's reading must give SimpleITK's (LPS) geometry
    theta = 0.3
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [12.0, -30.0, 7.5]
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3), np.float32), affine), str(path))
    vol = read_nifti(path)
    ref = sitk.ReadImage(str(path))
    assert vol.origin == pytest.approx(ref.GetOrigin()[::-1])
    np.testing.assert_allclose(
        vol.direction, np.array(ref.GetDirection()).reshape(3, 3)[::-1, ::-1], atol=1e-6
    )
    assert vol.spacing == pytest.approx(ref.GetSpacing()[::-1])


def test_write_sitk_read_back_by_simpleitk(tmp_path: Path) -> None:
    array = ramp((3, 4, 5)).astype(np.float32)
    for name in ("a.mhd", "b.mha", "c.nii.gz"):
        path = tmp_path / "out" / name
        write_sitk(array, (2.0, 0.5, 0.25), path, origin_zyx=(1.0, 2.0, 3.0))
        ref = sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), array)
        assert ref.GetSpacing() == pytest.approx((0.25, 0.5, 2.0))
        assert ref.GetOrigin() == pytest.approx((3.0, 2.0, 1.0))
    assert sorted(os.listdir(tmp_path / "out")) == ["a.mhd", "a.raw", "b.mha", "c.nii.gz"]


def test_write_nifti_read_back_by_nibabel(tmp_path: Path) -> None:
    array = ramp((3, 4, 5)).astype(np.float32)
    path = tmp_path / "x.nii.gz"
    write_nifti(array, (2.0, 0.5, 0.25), path)
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj)[4, 3, 2], array[2, 3, 4])
    assert img.header.get_zooms() == pytest.approx((0.25, 0.5, 2.0))
    assert os.listdir(tmp_path) == ["x.nii.gz"]


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "case.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["case.npz"]


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "Case01.mhd"
    with pytest.raises(DataError, match="no such file") as info:
        read_volume(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="no such file"):
        read_volume(tmp_path / "x_t1.nii.gz")


def test_truncated_raw(tmp_path: Path) -> None:
    path = write_sitk_file(
        tmp_path / "Case02.mhd", ramp((4, 6, 5), 0.01).astype(np.int16), PROMISE_SPACING_XYZ
    )
    raw = tmp_path / "Case02.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(DataError, match="read failed") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_missing_raw(tmp_path: Path) -> None:
    path = write_sitk_file(tmp_path / "Case03.mhd", np.zeros((2, 3, 4), np.int16), (1, 1, 2))
    (tmp_path / "Case03.raw").unlink()
    with pytest.raises(DataError) as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_truncated_mha(tmp_path: Path) -> None:
    path = write_sitk_file(tmp_path / "x.mha", np.ones((4, 5, 6), np.float32), (1, 1, 2))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="read failed") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_truncated_nifti(tmp_path: Path) -> None:
    path = write_nifti_file(tmp_path / "c_flair.nii.gz", ramp((4, 6, 5)), (1, 1, 2))
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(DataError, match="read failed") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.mha"
    path.write_bytes(b"not an image at all\n" * 10)
    with pytest.raises(DataError, match="read failed") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_2d_image_rejected(tmp_path: Path) -> None:
    path = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.Image([4, 5], sitk.sitkUInt8), str(path))
    with pytest.raises(DataError, match="3D single-component") as info:
        read_volume(path)
    assert str(path) in str(info.value)
