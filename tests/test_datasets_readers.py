"""Finding and reading cases in the real layouts; every error case names the file at fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets_fixtures import (
    BRATS2015_MODALITIES,
    NIFTI_SUFFIXES,
    box_label,
    brats2015_channel,
    ramp,
    write_brats2015_case,
    write_brats_nifti_case,
    write_nifti_file,
    write_promise_case,
    write_sitk_file,
)
from omegaconf import OmegaConf

from crf_rnn_3d.datasets.errors import ConfigError, DataError, DatasetNotFoundError
from crf_rnn_3d.datasets.readers import find_cases, read_case


def promise_cfg(root: Path):
    return OmegaConf.create({"format": "promise12", "root": str(root)})


def brats_cfg(root: Path):
    return OmegaConf.create(
        {
            "format": "brats2015",
            "root": str(root),
            "modalities": list(BRATS2015_MODALITIES),
            "subsets": ["HGG"],
        }
    )


def nifti_cfg(root: Path):
    return OmegaConf.create(
        {
            "format": "brats_nifti",
            "root": str(root),
            "modality_suffixes": NIFTI_SUFFIXES,
            "label_suffix": "seg",
        }
    )


# --------------------------------------------------------------------------- PROMISE12


def test_promise_parts_and_flat(tmp_path: Path) -> None:
    write_promise_case(tmp_path / "TrainingData_Part2", "Case11")
    write_promise_case(tmp_path / "TrainingData_Part1", "Case00")
    write_promise_case(tmp_path, "Case05")
    (tmp_path / "TrainingData_Part1" / "Case00_segmentation.raw").touch()  # not a case
    cases = find_cases(promise_cfg(tmp_path))
    assert [c.case_id for c in cases] == ["Case00", "Case05", "Case11"]
    assert cases[2].images == {"T2": str(tmp_path / "TrainingData_Part2" / "Case11.mhd")}
    assert cases[2].label == str(tmp_path / "TrainingData_Part2" / "Case11_segmentation.mhd")


def test_promise_read_case(tmp_path: Path) -> None:
    write_promise_case(tmp_path, "Case03", shape_zyx=(5, 12, 10))
    (case,) = find_cases(promise_cfg(tmp_path))
    raw = read_case(case, [0, 1], 1e-3)
    assert raw.image.shape == (5, 12, 10, 1)
    assert raw.image.dtype == np.float32
    np.testing.assert_array_equal(raw.image[..., 0], ramp((5, 12, 10), 0.01).astype(np.int16))
    np.testing.assert_array_equal(raw.label, box_label((5, 12, 10)))
    assert raw.label.dtype == np.uint8
    assert raw.spacing == pytest.approx((3.6, 0.7, 0.625))


def test_promise_duplicate_case(tmp_path: Path) -> None:
    write_promise_case(tmp_path / "TrainingData_Part1", "Case01")
    write_promise_case(tmp_path / "TrainingData_Part2", "Case01")
    with pytest.raises(DataError, match="each case once") as info:
        find_cases(promise_cfg(tmp_path))
    assert "TrainingData_Part2" in str(info.value)


def test_promise_missing_segmentation(tmp_path: Path) -> None:
    write_promise_case(tmp_path, "Case04")
    for f in tmp_path.glob("Case04_segmentation.*"):
        f.unlink()
    (case,) = find_cases(promise_cfg(tmp_path))
    with pytest.raises(DataError, match="segmentation file of Case04") as info:
        read_case(case, [0, 1], 1e-3)
    assert str(tmp_path) in str(info.value)


def test_promise_bad_label_value(tmp_path: Path) -> None:
    lab = box_label((5, 12, 10))
    lab[0, 0, 0] = 7
    _, seg = write_promise_case(tmp_path, "Case06", label=lab)
    (case,) = find_cases(promise_cfg(tmp_path))
    with pytest.raises(DataError, match=r"label values in \[0, 1\], found values \[7\]") as info:
        read_case(case, [0, 1], 1e-3)
    assert str(seg) in str(info.value)


def test_promise_non_integer_label(tmp_path: Path) -> None:
    lab = box_label((5, 12, 10)).astype(np.float32)
    lab[1, 1, 1] = 0.5
    _, seg = write_promise_case(tmp_path, "Case08", label=lab)
    (case,) = find_cases(promise_cfg(tmp_path))
    with pytest.raises(DataError, match="integer label values") as info:
        read_case(case, [0, 1], 1e-3)
    assert str(seg) in str(info.value)


def test_promise_shape_mismatch(tmp_path: Path) -> None:
    write_promise_case(tmp_path, "Case09", shape_zyx=(5, 12, 10))
    seg = write_sitk_file(
        tmp_path / "Case09_segmentation.mhd", box_label((5, 12, 11)), (0.625, 0.7, 3.6)
    )
    (case,) = find_cases(promise_cfg(tmp_path))
    with pytest.raises(DataError, match=r"shape \(5, 12, 11\)") as info:
        read_case(case, [0, 1], 1e-3)
    assert str(seg) in str(info.value)


def test_promise_spacing_mismatch(tmp_path: Path) -> None:
    write_promise_case(tmp_path, "Case10")
    seg = write_sitk_file(
        tmp_path / "Case10_segmentation.mhd", box_label((5, 12, 10)), (0.625, 0.7, 3.0)
    )
    (case,) = find_cases(promise_cfg(tmp_path))
    with pytest.raises(DataError, match="spacing") as info:
        read_case(case, [0, 1], 1e-3)
    assert str(seg) in str(info.value)
    # within the tolerance the same grid is accepted
    write_sitk_file(seg, box_label((5, 12, 10)), (0.625, 0.7, 3.6 * (1 + 1e-5)))
    read_case(case, [0, 1], 1e-3)


def test_promise_truncated_image(tmp_path: Path) -> None:
    img, _ = write_promise_case(tmp_path, "Case12")
    raw = tmp_path / "Case12.raw"
    raw.write_bytes(raw.read_bytes()[:50])
    (case,) = find_cases(promise_cfg(tmp_path))
    with pytest.raises(DataError, match=r"truncated") as info:
        read_case(case, [0, 1], 1e-3)
    assert str(img) in str(info.value)


def test_promise_root_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"does not exist.*promise12"):
        find_cases(promise_cfg(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=r"holds no CaseNN\.mhd") as info:
        find_cases(promise_cfg(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_unknown_format(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"format": "dicom", "root": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"data\.format"):
        find_cases(cfg)


# --------------------------------------------------------------------------- BraTS 2015


def test_brats2015_channels_in_config_order(tmp_path: Path) -> None:
    write_brats2015_case(tmp_path, "brats_2013_pat0001_1", first_id=54512)
    write_brats2015_case(tmp_path, "brats_tcia_pat105_0001", first_id=10)
    cases = find_cases(brats_cfg(tmp_path))
    assert [c.case_id for c in cases] == ["brats_2013_pat0001_1", "brats_tcia_pat105_0001"]
    assert cases[1].images["T1c"].endswith("VSD.Brain.XX.O.MR_T1c.17.mha")
    raw = read_case(cases[0], [0, 1, 2, 3, 4], 1e-3)
    assert raw.image.shape == (6, 8, 7, 4)
    for c in range(4):
        np.testing.assert_array_equal(raw.image[..., c], brats2015_channel((6, 8, 7), c))
    assert set(np.unique(raw.label)) == {0, 1, 2, 3, 4}
    assert raw.spacing == pytest.approx((1.5, 1.2, 1.0))


def test_brats2015_missing_modality(tmp_path: Path) -> None:
    write_brats2015_case(tmp_path, "pat1", skip="T2")
    (case,) = find_cases(brats_cfg(tmp_path))
    with pytest.raises(DataError, match=r"none for \['T2'\]") as info:
        read_case(case, [0, 1, 2, 3, 4], 1e-3)
    assert str(tmp_path / "HGG" / "pat1") in str(info.value)


def test_brats2015_two_files_for_one_modality(tmp_path: Path) -> None:
    files = write_brats2015_case(tmp_path, "pat1")
    extra = files["Flair"].parent.parent / "VSD.Brain.XX.O.MR_Flair.999"
    write_sitk_file(extra / "x.mha", np.zeros((6, 8, 7), np.int16), (1, 1.2, 1.5))
    with pytest.raises(DataError, match="one file matching") as info:
        find_cases(brats_cfg(tmp_path))
    assert "pat1" in str(info.value)


def test_brats2015_label_outside_set(tmp_path: Path) -> None:
    lab = np.zeros((6, 8, 7), np.uint8)
    lab[2, 2, 2] = 5
    files = write_brats2015_case(tmp_path, "pat2", label=lab)
    (case,) = find_cases(brats_cfg(tmp_path))
    with pytest.raises(DataError, match=r"found values \[5\]") as info:
        read_case(case, [0, 1, 2, 3, 4], 1e-3)
    assert str(files["label"]) in str(info.value)


def test_brats2015_modality_shape_mismatch(tmp_path: Path) -> None:
    files = write_brats2015_case(tmp_path, "pat3")
    write_sitk_file(files["T2"], np.zeros((6, 8, 8), np.int16), (1.0, 1.2, 1.5))
    (case,) = find_cases(brats_cfg(tmp_path))
    with pytest.raises(DataError, match="same grid") as info:
        read_case(case, [0, 1, 2, 3, 4], 1e-3)
    assert str(files["T2"]) in str(info.value)


def test_brats2015_no_cases(tmp_path: Path) -> None:
    (tmp_path / "LGG").mkdir()
    with pytest.raises(DatasetNotFoundError, match="HGG"):
        find_cases(brats_cfg(tmp_path))


# --------------------------------------------------------------------------- BraTS NIfTI


def test_brats_nifti(tmp_path: Path) -> None:
    write_brats_nifti_case(tmp_path / "Training", "BraTS19_X_2")
    write_brats_nifti_case(tmp_path / "Training", "BraTS19_X_1")
    cases = find_cases(nifti_cfg(tmp_path))
    assert [c.case_id for c in cases] == ["BraTS19_X_1", "BraTS19_X_2"]
    raw = read_case(cases[0], [0, 1, 2, 4], 1e-3)
    assert raw.image.shape == (6, 8, 7, 4)
    for c in range(4):
        np.testing.assert_array_equal(raw.image[..., c], brats2015_channel((6, 8, 7), c))
    assert set(np.unique(raw.label)) == {0, 1, 2, 4}
    assert raw.spacing == pytest.approx((1.5, 1.2, 1.0))


def test_brats_nifti_missing_label_and_modality(tmp_path: Path) -> None:
    files = write_brats_nifti_case(tmp_path, "C1")
    files["T1c"].unlink()
    (case,) = find_cases(nifti_cfg(tmp_path))
    with pytest.raises(DataError, match=r"none for \['T1c'\]") as info:
        read_case(case, [0, 1, 2, 4], 1e-3)
    assert str(tmp_path / "C1") in str(info.value)
    files["label"].unlink()
    write_brats_nifti_case(tmp_path, "C2")
    (tmp_path / "C2" / "C2_seg.nii.gz").unlink()
    c2 = find_cases(nifti_cfg(tmp_path))[1]
    with pytest.raises(DataError, match="segmentation file of C2"):
        read_case(c2, [0, 1, 2, 4], 1e-3)


def test_brats_nifti_label_3_rejected(tmp_path: Path) -> None:
    files = write_brats_nifti_case(tmp_path, "C3")
    lab = np.zeros((6, 8, 7), np.uint8)
    lab[0, 0, 0] = 3
    write_nifti_file(files["label"], lab, (1.0, 1.2, 1.5))
    (case,) = find_cases(nifti_cfg(tmp_path))
    with pytest.raises(DataError, match=r"found values \[3\]") as info:
        read_case(case, [0, 1, 2, 4], 1e-3)
    assert str(files["label"]) in str(info.value)


def test_brats_2023_names_with_a_dash(tmp_path: Path) -> None:
    suffixes = {"T1": "t1n", "T1c": "t1c", "T2": "t2w", "Flair": "t2f"}
    for c, suf in enumerate(suffixes.values()):
        write_nifti_file(
            tmp_path / "BraTS-GLI-00000-000" / f"BraTS-GLI-00000-000-{suf}.nii.gz",
            brats2015_channel((6, 8, 7), c),
            (1.0, 1.0, 1.0),
        )
    write_nifti_file(
        tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz",
        np.zeros((6, 8, 7), np.uint8),
        (1.0, 1.0, 1.0),
    )
    cfg = nifti_cfg(tmp_path)
    cfg.modality_suffixes = suffixes
    cfg.separator = "-"
    (case,) = find_cases(cfg)
    assert case.case_id == "BraTS-GLI-00000-000"
    raw = read_case(case, [0, 1, 2, 3], 1e-3)
    np.testing.assert_array_equal(raw.image[..., 3], brats2015_channel((6, 8, 7), 3))


# ---- geometry beyond shape and spacing: origin and direction (each failed silently before)


def _rewrite_sitk(path: Path, origin=None, direction=None) -> None:
    """Rewrites a SimpleITK-readable file with another origin or direction (x, y, z order)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def test_promise_label_shifted_50mm_is_refused(tmp_path: Path) -> None:
    _, seg = write_promise_case(tmp_path, "Case20")
    _rewrite_sitk(seg, origin=(40.0, 20.0, 5.0))  # the image's origin is (-10, 20, 5)
    (case,) = find_cases(promise_cfg(tmp_path))
    with pytest.raises(DataError, match=r"origin .*apart by \(0, 0, 50\) mm") as info:
        read_case(case, [0, 1], 1e-3)
    assert str(seg) in str(info.value)


def test_promise_label_flipped_in_x_is_refused(tmp_path: Path) -> None:
    _, seg = write_promise_case(tmp_path, "Case21")
    _rewrite_sitk(seg, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    (case,) = find_cases(promise_cfg(tmp_path))
    with pytest.raises(DataError, match="direction") as info:
        read_case(case, [0, 1], 1e-3)
    assert str(seg) in str(info.value)


def test_origin_within_a_tenth_of_a_voxel_is_the_same_grid(tmp_path: Path) -> None:
    """Rounding of a stored origin (float32 in NIfTI) must not reject a case: 0.05 of the
    smallest voxel (0.625 mm) is accepted, 0.2 of it is not."""
    _, seg = write_promise_case(tmp_path, "Case22")
    (case,) = find_cases(promise_cfg(tmp_path))
    _rewrite_sitk(seg, origin=(-10.0 + 0.05 * 0.625, 20.0, 5.0))
    read_case(case, [0, 1], 1e-3)
    _rewrite_sitk(seg, origin=(-10.0 + 0.2 * 0.625, 20.0, 5.0))
    with pytest.raises(DataError, match="origin"):
        read_case(case, [0, 1], 1e-3)


def test_brats_nifti_seg_affine_off_by_30mm_is_refused(tmp_path: Path) -> None:
    import nibabel as nib

    files = write_brats_nifti_case(tmp_path, "C7")
    seg = nib.load(str(files["label"]))
    affine = seg.affine.copy()
    affine[1, 3] += 30.0
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), affine), str(files["label"]))
    (case,) = find_cases(nifti_cfg(tmp_path))
    with pytest.raises(DataError, match=r"origin .*apart by \(0, 30, 0\) mm") as info:
        read_case(case, [0, 1, 2, 4], 1e-3)
    assert str(files["label"]) in str(info.value)


def test_brats2015_modality_flipped_is_refused(tmp_path: Path) -> None:
    files = write_brats2015_case(tmp_path, "brats_2013_pat0001_1")
    _rewrite_sitk(files["T2"], direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    (case,) = find_cases(brats_cfg(tmp_path))
    with pytest.raises(DataError, match="direction") as info:
        read_case(case, [0, 1, 2, 3, 4], 1e-3)
    assert str(files["T2"]) in str(info.value)
