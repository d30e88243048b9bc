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
    with pytest.raises(DataError, match=r"truncated") as info:
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
    with pytest.raises(DataError, match=r"truncated") as info:
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


# ---- MetaImage headers that do not describe their data, and geometry no scanner writes
# (each was read as garbage, as half a volume, or as an empty case, without a word)


def _mhd_with(tmp_path: Path, name: str, replace: dict[str, str]) -> Path:
    """Case.mhd/.raw (int16 [4, 6, 5], spacing (1, 1, 2)) with header lines replaced."""
    path = write_sitk_file(tmp_path / f"{name}.mhd", ramp((4, 6, 5), 0.01).astype(np.int16),
                           (1.0, 1.0, 2.0))  # fmt: skip
    lines = []
    for line in path.read_text().splitlines():
        key = line.split("=")[0].strip()
        lines.append(f"{key} = {replace[key]}" if key in replace else line)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_raw_longer_than_the_header_says(tmp_path: Path) -> None:
    path = _mhd_with(tmp_path, "Long", {"DimSize": "5 6 2"})  # half the slices
    with pytest.raises(DataError, match="longer than the header says") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_element_type_that_does_not_match_the_raw(tmp_path: Path) -> None:
    path = _mhd_with(tmp_path, "Type", {"ElementType": "MET_FLOAT"})  # the data are int16
    with pytest.raises(DataError, match=r"480 bytes .*MET_FLOAT.*found 240 bytes"):
        read_volume(path)


def test_zero_dimension_is_refused(tmp_path: Path) -> None:
    path = _mhd_with(tmp_path, "Zero", {"DimSize": "5 6 0"})
    with pytest.raises(DataError, match="at least 1 voxel") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_nan_offset_is_refused(tmp_path: Path) -> None:
    path = _mhd_with(tmp_path, "NanOffset", {"Offset": "nan 0 0"})
    with pytest.raises(DataError, match="finite numbers in Offset"):
        read_volume(path)


@pytest.mark.parametrize("spacing", ["1e-06 1 2", "1 1e6 2"])
def test_absurd_spacing_is_refused(tmp_path: Path, spacing: str) -> None:
    path = _mhd_with(tmp_path, "Spacing", {"ElementSpacing": spacing})
    with pytest.raises(DataError, match=r"spacing between 0.001 and 1000 mm") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_zero_spacing_and_singular_direction_are_refused(tmp_path: Path) -> None:
    """SimpleITK itself refuses these; the error still names the file."""
    for name, change in (("Zero", {"ElementSpacing": "0 1 2"}),
                         ("Dir", {"TransformMatrix": "1 0 0 1 0 0 0 0 1"})):  # fmt: skip
        path = _mhd_with(tmp_path, name, change)
        with pytest.raises(DataError) as info:
            read_volume(path)
        assert str(path) in str(info.value)


def test_sheared_direction_is_refused(tmp_path: Path) -> None:
    path = _mhd_with(tmp_path, "Shear", {"TransformMatrix": "1 0 0 0.5 1 0 0 0 1"})
    with pytest.raises(DataError, match="direction cosines") as info:
        read_volume(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad", ["nan", "zero"])
def test_nifti_affine_nan_or_zero_is_refused(tmp_path: Path, bad: str) -> None:
    path = tmp_path / f"{bad}.nii"
    image = nib.Nifti1Image(np.ones((5, 6, 4), np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    image.header.set_zooms((1.0, 1.0, 2.0))
    nib.save(image, str(path))
    # the sform rows written straight into the header (nibabel will not build such an affine)
    header = nib.Nifti1Header.from_fileobj(open(path, "rb"))
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = np.nan if bad == "nan" else 0.0
    header["sform_code"], header["qform_code"] = 1, 0
    data = path.read_bytes()
    path.write_bytes(header.binaryblock + data[len(header.binaryblock) :])
    with pytest.raises(DataError) as info:
        read_volume(path)
    assert str(path) in str(info.value)
    assert "origin" in str(info.value) or "direction" in str(info.value)


def test_nifti_nan_pixdim_is_refused(tmp_path: Path) -> None:
    path = write_nifti_file(tmp_path / "p.nii.gz", ramp((4, 6, 5)), (1, 1, 2))
    image = nib.load(str(path))
    header = image.header.copy()
    header["pixdim"][1] = np.nan
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, header), str(path))
    with pytest.raises(DataError, match="spacing") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_metaimage_header_checks_accept_real_layouts(tmp_path: Path) -> None:
    """The checks do not refuse good files: .mhd with a raw, inline .mha, compressed .mha,
    and a two-channel .mha (refused later, for its channels, by the 3D-scalar check)."""
    good = ramp((4, 6, 5), 0.01).astype(np.int16)
    for name, compress in (("a.mhd", False), ("b.mha", False), ("c.mha", True)):
        image = sitk.GetImageFromArray(good)
        image.SetSpacing((0.5, 0.7, 3.0))
        sitk.WriteImage(image, str(tmp_path / name), useCompression=compress)
        np.testing.assert_array_equal(read_volume(tmp_path / name).array, good)
    vector = sitk.GetImageFromArray(np.zeros((4, 6, 5, 2), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "v.mha"))
    with pytest.raises(DataError, match="single-component"):
        read_volume(tmp_path / "v.mha")
