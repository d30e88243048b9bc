"""Small deterministic files in each real layout, written with SimpleITK and nibabel directly
(not with crf_rnn_3d.datasets' writers), so the readers are checked against independent writers.

Every volume has anisotropic spacing. Arrays are built in [z, y, x] order; the spacing given
to SimpleITK and nibabel is in their (x, y, z) order.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

# (x, y, z) mm, as the file formats store it
PROMISE_SPACING_XYZ = (0.625, 0.7, 3.6)
BRATS_SPACING_XYZ = (1.0, 1.2, 1.5)
BRATS2015_MODALITIES = ("T1", "T1c", "T2", "Flair")
NIFTI_SUFFIXES = {"T1": "t1", "T1c": "t1ce", "T2": "t2", "Flair": "flair"}


def ramp(shape_zyx: tuple[int, int, int], scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """A volume whose value tells its voxel: 10000 z + 100 y + x (times scale, plus offset)."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    return (10000.0 * z + 100.0 * y + x) * scale + offset


def box_label(shape_zyx: tuple[int, int, int], value: int = 1) -> np.ndarray:
    """uint8 [z, y, x]: ``value`` in the middle half of each axis, 0 elsewhere."""
    lab = np.zeros(shape_zyx, np.uint8)
    lab[tuple(slice(n // 4, n - n // 4) for n in shape_zyx)] = value
    return lab


def write_sitk_file(
    path: Path, array_zyx: np.ndarray, spacing_xyz: tuple[float, float, float]
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin((-10.0, 20.0, 5.0))
    sitk.WriteImage(image, str(path))
    return path


def write_nifti_file(
    path: Path, array_zyx: np.ndarray, spacing_xyz: tuple[float, float, float]
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(
        np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), np.diag([*spacing_xyz, 1])
    )
    image.header.set_zooms(spacing_xyz)
    nib.save(image, str(path))
    return path


def write_promise_case(
    folder: Path,
    case_id: str,
    shape_zyx: tuple[int, int, int] = (5, 12, 10),
    spacing_xyz: tuple[float, float, float] = PROMISE_SPACING_XYZ,
    label: np.ndarray | None = None,
) -> tuple[Path, Path]:
    """CaseNN.mhd/.raw (int16 ramp) and CaseNN_segmentation.mhd/.raw (uint8 box)."""
    image = ramp(shape_zyx, scale=0.01).astype(np.int16)  # fits int16 for small shapes
    lab = box_label(shape_zyx) if label is None else label
    img = write_sitk_file(folder / f"{case_id}.mhd", image, spacing_xyz)
    seg = write_sitk_file(folder / f"{case_id}_segmentation.mhd", lab, spacing_xyz)
    return img, seg


def brats2015_channel(shape_zyx: tuple[int, int, int], c: int) -> np.ndarray:
    """The image written for modality number c (T1, T1c, T2, Flair order) of a fixture case."""
    return (ramp(shape_zyx, scale=0.01) + 1000 * (c + 1)).astype(np.int16)


def write_brats2015_case(
    root: Path,
    case: str,
    shape_zyx: tuple[int, int, int] = (6, 8, 7),
    spacing_xyz: tuple[float, float, float] = BRATS_SPACING_XYZ,
    first_id: int = 100,
    skip: str | None = None,
    label: np.ndarray | None = None,
) -> dict[str, Path]:
    """HGG/<case>/VSD.Brain.XX.O.MR_<Mod>.<id>/VSD.Brain.XX.O.MR_<Mod>.<id>.mha and the OT label.

    Ids differ per file and per case, as in the download. ``skip`` leaves a modality out.
    """
    folder = root / "HGG" / case
    files = {}
    for c, mod in enumerate(BRATS2015_MODALITIES):
        if mod == skip:
            continue
        name = f"VSD.Brain.XX.O.MR_{mod}.{first_id + 7 * c}"
        files[mod] = write_sitk_file(
            folder / name / f"{name}.mha", brats2015_channel(shape_zyx, c), spacing_xyz
        )
    lab = np.zeros(shape_zyx, np.uint8) if label is None else label
    if label is None:
        lab[1:3, 2:5, 2:5] = 1
        lab[3, 2:6, 1:6] = 2
        lab[4, 3, 3] = 3
        lab[4, 4, 4] = 4
    name = f"VSD.Brain_3more.XX.O.OT.{first_id + 50}"
    files["label"] = write_sitk_file(folder / name / f"{name}.mha", lab, spacing_xyz)
    return files


def write_brats_nifti_case(
    root: Path,
    case: str,
    shape_zyx: tuple[int, int, int] = (6, 8, 7),
    spacing_xyz: tuple[float, float, float] = BRATS_SPACING_XYZ,
) -> dict[str, Path]:
    """<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz (BraTS 2018+), labels {0, 1, 2, 4}."""
    folder = root / case
    files = {}
    for c, (mod, suf) in enumerate(NIFTI_SUFFIXES.items()):
        files[mod] = write_nifti_file(
            folder / f"{case}_{suf}.nii.gz", brats2015_channel(shape_zyx, c), spacing_xyz
        )
    lab = np.zeros(shape_zyx, np.uint8)
    lab[1:3, 2:5, 2:5] = 2
    lab[2, 3, 3] = 1
    lab[2, 3, 4] = 4
    files["label"] = write_nifti_file(folder / f"{case}_seg.nii.gz", lab, spacing_xyz)
    return files


CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose_config(data: str, overrides: list[str] | None = None):
    """The real configs composed as the prepare app does, with overrides (a DictConfig)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"data={data}", *(overrides or [])])
