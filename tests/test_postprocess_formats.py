"""crf3d-postprocess on other tools' probability maps, written by the tests in those formats:
nnU-Net v2's --save_probabilities .npz ([C, z, y, x]) and MONAI-style 4-D NIfTI (classes last,
as MONAI's SaveImage writes, or first)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from crf_rnn_3d.experiments import postprocess as cli

SPACING_XYZ = (0.8, 1.1, 2.5)
ORIGIN_XYZ = (-12.0, 30.5, 7.25)
SETTINGS = dict(
    theta_alpha=4.0,
    theta_beta=1.0,
    theta_gamma=2.0,
    bilateral_weight=4.0,
    spatial_weight=2.0,
    num_iterations=2,
    mode="default",
    clip=1e-5,
    standardise_image=True,
)
QUIET = dict(settings=dict(SETTINGS), log=lambda _: None)


def _probs(shape_zyx: tuple[int, ...], classes: int, seed: int = 0) -> np.ndarray:
    """Random probabilities [z, y, x, K], float32, a different value in every voxel and class
    (so a transposed or mirrored read is caught)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 1.0, (*shape_zyx, classes))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _image(tmp_path: Path, shape_zyx: tuple[int, ...], name: str = "t1.nii.gz") -> str:
    """A scalar image on a (z, y, x) grid with non-trivial spacing and origin (written by
    SimpleITK, which is how nnU-Net reads .nii.gz with its default SimpleITKIO)."""
    arr = np.random.default_rng(1).normal(size=shape_zyx).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    path = str(tmp_path / name)
    sitk.WriteImage(image, path)
    return path


def _expected_probs_via_sitk(tmp_path: Path, probs_zyx: np.ndarray) -> str:
    """The same probabilities as a K-component MetaImage (the reader that existed first)."""
    image = sitk.GetImageFromArray(probs_zyx, isVector=True)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    path = str(tmp_path / "probs_vector.mha")
    sitk.WriteImage(image, path)
    return path


def _image_affine(path: str) -> np.ndarray:
    """The NIfTI affine of the image file, as nibabel (and so MONAI's loader) reads it."""
    return np.asarray(nib.load(path).affine)


# ---------------------------------------------------------------------------------------------
# nnU-Net v2
# ---------------------------------------------------------------------------------------------


def test_nnunet_npz_is_read_as_classes_first_in_sitk_order(tmp_path) -> None:
    shape = (5, 6, 7)
    image = _image(tmp_path, shape)
    probs = _probs(shape, 3)
    npz = tmp_path / "case_001.npz"
    np.savez_compressed(npz, probabilities=np.moveaxis(probs, -1, 0))  # [C, z, y, x]
    # the .pkl nnU-Net writes beside it must never be opened: a file that fails if unpickled
    (tmp_path / "case_001.pkl").write_bytes(b"\x80\x04not a pickle")
    ref = sitk.ReadImage(image)
    got = cli.load_probabilities(str(npz), ref, image)
    np.testing.assert_array_equal(got, probs)
    # the whole run gives what the same map as a K-component image gives
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    cli.run([image], str(npz), str(a), **QUIET)
    cli.run([image], _expected_probs_via_sitk(tmp_path, probs), str(b), **QUIET)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(a)), sitk.GetArrayFromImage(sitk.ReadImage(b))
    )
    assert sitk.ReadImage(a).GetSpacing() == pytest.approx(SPACING_XYZ)


def test_nnunet_npz_errors_name_the_file_and_shapes(tmp_path) -> None:
    shape = (5, 6, 7)
    image = _image(tmp_path, shape)
    out = str(tmp_path / "labels.nii.gz")
    probs = np.moveaxis(_probs(shape, 2), -1, 0)
    # transposed spatial axes ([C, x, y, z], as a nibabel-based reader would give)
    transposed = tmp_path / "transposed.npz"
    np.savez(transposed, probabilities=probs.transpose(0, 3, 2, 1))
    with pytest.raises(cli.PostprocessError) as err:
        cli.run([image], str(transposed), out, **QUIET)
    message = str(err.value)
    assert str(transposed) in message and "(2, 7, 6, 5)" in message and "(5, 6, 7)" in message
    # channel-last
    last = tmp_path / "last.npz"
    np.savez(last, probabilities=np.moveaxis(probs, 0, -1))
    with pytest.raises(cli.PostprocessError, match=f"{last}: 'probabilities' has shape"):
        cli.run([image], str(last), out, **QUIET)
    # another key (nnU-Net v1 wrote "softmax")
    other = tmp_path / "v1.npz"
    np.savez(other, softmax=probs)
    with pytest.raises(cli.PostprocessError, match=r"no 'probabilities' array.*\['softmax'\]"):
        cli.run([image], str(other), out, **QUIET)
    # object arrays would need unpickling: refused, not loaded
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, probabilities=np.array([{"a": 1}], dtype=object))
    with pytest.raises(cli.PostprocessError, match=f"{pickled}: could not be read"):
        cli.run([image], str(pickled), out, **QUIET)
    # values that are logits, not probabilities
    logits = tmp_path / "logits.npz"
    np.savez(logits, probabilities=probs * 4 - 2)
    with pytest.raises(cli.PostprocessError, match=f"{logits}: values must lie in"):
        cli.run([image], str(logits), out, **QUIET)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK not a zip")
    with pytest.raises(cli.PostprocessError, match=f"probability map {broken}: could not be"):
        cli.run([image], str(broken), out, **QUIET)
    assert not Path(out).exists()


# ---------------------------------------------------------------------------------------------
# MONAI-style 4-D NIfTI
# ---------------------------------------------------------------------------------------------


def _monai_nifti(path: Path, probs_zyx: np.ndarray, affine: np.ndarray, first: bool) -> str:
    """Probabilities [z, y, x, K] as a 4-D NIfTI in file order [x, y, z, K] (MONAI's SaveImage)
    or [K, x, y, z], with the image's affine."""
    data = probs_zyx.transpose(2, 1, 0, 3)
    if first:
        data = np.moveaxis(data, -1, 0)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    return str(path)


@pytest.mark.parametrize("first", [False, True])
def test_monai_nifti_channel_last_and_first(tmp_path, first) -> None:
    shape = (5, 6, 7)
    image = _image(tmp_path, shape)
    probs = _probs(shape, 3)
    path = _monai_nifti(tmp_path / "p.nii.gz", probs, _image_affine(image), first)
    ref = sitk.ReadImage(image)
    np.testing.assert_array_equal(cli.load_probabilities(path, ref, image), probs)
    axis = "first" if first else "last"
    np.testing.assert_array_equal(cli.load_probabilities(path, ref, image, axis), probs)
    wrong = "last" if first else "first"
    with pytest.raises(cli.PostprocessError, match=f"channel_axis={wrong} does not hold"):
        cli.load_probabilities(path, ref, image, wrong)
    a, b = tmp_path / "a.mha", tmp_path / "b.mha"
    cli.run([image], path, str(a), **QUIET)
    cli.run([image], _expected_probs_via_sitk(tmp_path, probs), str(b), **QUIET)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(a)), sitk.GetArrayFromImage(sitk.ReadImage(b))
    )


def test_monai_nifti_ambiguous_layout_asks_for_channel_axis(tmp_path) -> None:
    """x = y = z = 4 and 4 classes: [x, y, z, K] and [K, x, y, z] both fit the grid."""
    shape = (4, 4, 4)
    image = _image(tmp_path, shape)
    probs = _probs(shape, 4)
    path = _monai_nifti(tmp_path / "p.nii.gz", probs, _image_affine(image), first=False)
    ref = sitk.ReadImage(image)
    with pytest.raises(cli.PostprocessError) as err:
        cli.load_probabilities(path, ref, image)
    assert path in str(err.value) and "channel_axis=first or channel_axis=last" in str(err.value)
    np.testing.assert_array_equal(cli.load_probabilities(path, ref, image, "last"), probs)
    # read the other way it is another (wrong) array: the choice matters
    assert not np.array_equal(cli.load_probabilities(path, ref, image, "first"), probs)


def test_monai_nifti_errors_name_the_file(tmp_path) -> None:
    shape = (5, 6, 7)
    image = _image(tmp_path, shape)
    out = str(tmp_path / "labels.nii.gz")
    probs = _probs(shape, 2)
    affine = _image_affine(image)
    # neither end of the shape is the image's grid (z and x swapped)
    swapped = tmp_path / "swapped.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(probs), affine), str(swapped))
    with pytest.raises(cli.PostprocessError, match=r"swapped.nii.gz: shape \(5, 6, 7, 2\)"):
        cli.run([image], str(swapped), out, **QUIET)
    # another voxel size in the affine
    moved = _monai_nifti(tmp_path / "moved.nii.gz", probs, np.diag([1.0, 1.0, 1.0, 1.0]), False)
    with pytest.raises(cli.PostprocessError, match=f"{moved}: spacing"):
        cli.run([image], moved, out, **QUIET)
    # another origin
    shifted = affine.copy()
    shifted[:3, 3] += 5.0
    off = _monai_nifti(tmp_path / "off.nii.gz", probs, shifted, False)
    with pytest.raises(cli.PostprocessError, match=f"{off}: origin"):
        cli.run([image], off, out, **QUIET)
    # logits
    logit = _monai_nifti(tmp_path / "logit.nii.gz", probs * 3, affine, False)
    with pytest.raises(cli.PostprocessError, match=f"{logit}: values must lie in"):
        cli.run([image], logit, out, **QUIET)
    assert not Path(out).exists()
