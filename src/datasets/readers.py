"""Finding and reading the cases of each data set in its real, as-downloaded layout.

Layouts (``root`` is the unpacked download, set by ``data.root``):

- ``promise12``: ``CaseNN.mhd`` (+ ``.raw``) and ``CaseNN_segmentation.mhd``, flat in ``root``
  or inside ``root/TrainingData_Part1..3/``. One channel (T2), labels {0, 1}.
- ``brats2015``: ``root/<subset>/<case>/VSD.Brain.XX.O.MR_<Modality>.<id>/*.mha`` for the
  modalities Flair, T1, T1c, T2, and the label in ``VSD.Brain_3more.XX.O.OT.<id>/*.mha``; the
  ids differ from case to case, so files are found by modality name. Labels {0..4}.
- ``brats_nifti`` (BraTS 2018 and later): ``<case>/<case>_<suffix>.nii.gz`` with suffixes t1,
  t1ce, t2, flair and seg, anywhere below ``root``. Labels {0, 1, 2, 4}.

:func:`find_cases` lists the cases (raising :class:`DatasetNotFoundError` with download
instructions when there are none); :func:`read_case` reads one case into channels-last arrays
and checks it, raising :class:`DataError` naming the file at fault.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crf_rnn_3d.datasets.errors import ConfigError, DataError, DatasetNotFoundError
from crf_rnn_3d.datasets.io import Volume, read_volume

FORMATS = ("promise12", "brats2015", "brats_nifti")

DOWNLOAD_HELP = {
    "promise12": (
        "Download the PROMISE12 training data (TrainingData_Part1.zip, _Part2.zip, _Part3.zip) "
        "from the challenge site https://promise12.grand-challenge.org/ (free registration), "
        "and unzip them into {root}/ so that {root}/TrainingData_Part1/Case00.mhd exists "
        "(a flat {root}/Case00.mhd works too). Or point data.root at your copy."
    ),
    "brats2015": (
        "Download BRATS2015_Training from the SMIR portal (https://www.smir.ch/BRATS/Start2015, "
        "free registration), and unpack it so that {root}/HGG/<case>/VSD.Brain.XX.O.MR_T1.<id>/"
        " exists. Or point data.root at your copy."
    ),
    "brats_nifti": (
        "Download a BraTS training release in NIfTI (2018-2020 from CBICA, "
        "https://www.med.upenn.edu/cbica/brats/ ; 2021 and later through the Synapse portal, "
        "https://www.synapse.org/) and unpack it below {root}/ so that each case is a folder "
        "<case>/ holding <case>_t1.nii.gz, _t1ce, _t2, _flair and _seg. "
        "Or point data.root at your copy."
    ),
}


@dataclass
class CaseFiles:
    """The files of one case.

    Attributes:
      case_id: the case's name (unique within the data set).
      images: modality -> file, in channel order; a modality whose file was not found maps to
        None (read_case then raises DataError naming the folder searched).
      label: the segmentation file, or None when not found.
      folder: where the case's files were looked for (named in errors).
    """

    case_id: str
    images: dict[str, str | None]
    label: str | None
    folder: str
    extra: dict[str, str] = field(default_factory=dict)

    def sources(self) -> list[str]:
        """Every file found for this case (images in channel order, then the label)."""
        files = [p for p in self.images.values() if p is not None]
        return files + ([self.label] if self.label is not None else [])


@dataclass
class RawCase:
    """One case as read from disk, before preprocessing.

    Attributes:
      case_id: the case's name.
      image: [z, y, x, c] float32, channels in the configured modality order.
      label: [z, y, x] uint8 label map, or None.
      spacing: (z, y, x) voxel size in mm.
      origin: (z, y, x) position of voxel [0, 0, 0] in mm.
      direction: 3 x 3 direction cosines in (z, y, x) order.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]


# --------------------------------------------------------------------------- discovery


def _not_found(fmt: str, root: Path, what: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"data set not found: {root} {what}. " + DOWNLOAD_HELP[fmt].format(root=root)
    )


def find_promise12(root: Path) -> list[CaseFiles]:
    """PROMISE12 training cases (CaseNN.mhd with CaseNN_segmentation.mhd), sorted by name."""
    folders = [root, *sorted(p for p in root.glob("TrainingData_Part*") if p.is_dir())]
    pattern = re.compile(r"^(Case\d+)\.mhd$")
    cases: dict[str, CaseFiles] = {}
    for folder in folders:
        for entry in sorted(os.listdir(folder)):
            m = pattern.match(entry)
            if not m:
                continue
            case_id = m.group(1)
            if case_id in cases:
                raise DataError(
                    str(folder / entry),
                    "each case once",
                    f"{case_id} also in {cases[case_id].folder}",
                )
            seg = folder / f"{case_id}_segmentation.mhd"
            cases[case_id] = CaseFiles(
                case_id=case_id,
                images={"T2": str(folder / entry)},
                label=str(seg) if seg.exists() else None,  # a folder there: read_case says so
                folder=str(folder),
            )
    if not cases:
        raise _not_found(
            "promise12", root, "holds no CaseNN.mhd file (nor TrainingData_Part1..3/ with one)"
        )
    return [cases[k] for k in sorted(cases)]


def _find_one(folder: Path, regex: re.Pattern[str]) -> str | None:
    """The .mha file inside the sub-folder of ``folder`` whose name matches ``regex``."""
    hits = []
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and regex.search(sub.name):
            hits.extend(sorted(str(f) for f in sub.glob("*.mha")))
        elif sub.is_file() and sub.suffix.lower() == ".mha" and regex.search(sub.name):
            hits.append(str(sub))
    if len(hits) > 1:
        raise DataError(str(folder), f"one file matching {regex.pattern}", f"{len(hits)}: {hits}")
    return hits[0] if hits else None


def find_brats2015(
    root: Path, modalities: Sequence[str], subsets: Sequence[str]
) -> list[CaseFiles]:
    """BraTS 2015 cases under root/<subset>/<case>/, files found by modality name."""
    cases = []
    for subset in subsets:
        base = root / subset
        if not base.is_dir():
            continue
        for case_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            images = {
                m: _find_one(case_dir, re.compile(rf"\.MR_{re.escape(m)}\.", re.IGNORECASE))
                for m in modalities
            }
            label = _find_one(case_dir, re.compile(r"\.OT\.", re.IGNORECASE))
            cases.append(CaseFiles(case_dir.name, images, label, str(case_dir)))
    if not cases:
        raise _not_found("brats2015", root, f"holds no case folder in {list(subsets)}")
    return cases


def _pick_nifti(
    folder: str, names: set[str], case_id: str, suffix: str, separator: str = "_"
) -> str | None:
    """``folder/<case_id><separator><suffix>.nii.gz`` (or ``.nii``) if ``names`` lists it."""
    for ext in (".nii.gz", ".nii"):
        name = f"{case_id}{separator}{suffix}{ext}"
        if name in names:
            return os.path.join(folder, name)
    return None


def find_brats_nifti(
    root: Path, modality_suffixes: dict[str, str], label_suffix: str, separator: str = "_"
) -> list[CaseFiles]:
    """BraTS NIfTI cases: folders below root holding <case><separator><suffix>.nii(.gz) files
    (separator ``_`` for BraTS 2018-2021, ``-`` for 2023's ``<case>-t1n.nii.gz``)."""
    first = next(iter(modality_suffixes.values()))
    pattern = re.compile(rf"^(.+){re.escape(separator)}{re.escape(first)}\.nii(\.gz)?$")
    cases = []
    for folder, dirs, files in sorted(os.walk(root)):
        names = set(files) | set(dirs)  # a folder under a file's name: read_case names it
        for name in sorted(files):
            m = pattern.match(name)
            if not m:
                continue
            case_id = m.group(1)
            images = {
                mod: _pick_nifti(folder, names, case_id, suf, separator)
                for mod, suf in modality_suffixes.items()
            }
            label = _pick_nifti(folder, names, case_id, label_suffix, separator)
            cases.append(CaseFiles(case_id, images, label, folder))
    if not cases:
        raise _not_found("brats_nifti", root, f"holds no <case>{separator}{first}.nii.gz file")
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(str(root), "unique case names", f"repeated: {dup}")
    return sorted(cases, key=lambda c: c.case_id)


def find_cases(data_cfg: Mapping) -> list[CaseFiles]:
    """Lists the cases of the data set described by ``data_cfg`` (the ``data`` config group).

    Raises DatasetNotFoundError, with where to download the data and where to put it, when the
    root is missing or holds no case.
    """
    fmt = data_cfg.format
    if fmt not in FORMATS:
        raise ConfigError("data.format", f"one of {FORMATS}", fmt)
    root = Path(str(data_cfg.root))
    if not root.is_dir():
        raise _not_found(fmt, root, "does not exist")
    if fmt == "promise12":
        return find_promise12(root)
    if fmt == "brats2015":
        return find_brats2015(root, list(data_cfg.modalities), list(data_cfg.subsets))
    return find_brats_nifti(
        root,
        dict(data_cfg["modality_suffixes"]),
        str(data_cfg["label_suffix"]),
        str(data_cfg.get("separator", "_")),
    )


# --------------------------------------------------------------------------- reading


# The files of one case must share their grid: shape equal, spacing within the caller's relative
# tolerance, origins within this fraction of the smallest voxel size, and direction cosines
# within DIRECTION_TOL of each other (a label shifted, flipped or rotated against its image is
# refused, not trained on).
ORIGIN_TOL_VOXELS = 0.1
DIRECTION_TOL = 1e-3


def _same_geometry(ref: Volume, other: Volume, tol: float) -> str | None:
    """None if other matches ref in shape, spacing (relative tol), origin (ORIGIN_TOL_VOXELS of
    the smallest voxel size) and direction (DIRECTION_TOL), else what differs."""
    if ref.array.shape != other.array.shape:
        return f"shape {other.array.shape} (z, y, x) where {ref.path} has {ref.array.shape}"
    a, b = np.array(ref.spacing), np.array(other.spacing)
    if np.any(np.abs(a - b) > tol * np.maximum(np.abs(a), 1e-12)):
        return f"spacing {other.spacing} mm (z, y, x) where {ref.path} has {ref.spacing}"
    origin_tol = ORIGIN_TOL_VOXELS * float(np.min(a))
    shift = np.abs(np.array(ref.origin) - np.array(other.origin))
    if np.any(shift > origin_tol):
        return (
            f"origin {_mm(other.origin)} mm (z, y, x) where {ref.path} has {_mm(ref.origin)} "
            f"(apart by {_mm(shift)} mm; tolerance {origin_tol:.3g} mm)"
        )
    turn = np.abs(np.array(ref.direction) - np.array(other.direction))
    if np.any(turn > DIRECTION_TOL):
        return (
            f"direction {_mm(np.ravel(other.direction))} (z, y, x) where {ref.path} has "
            f"{_mm(np.ravel(ref.direction))} (tolerance {DIRECTION_TOL:g} per cosine)"
        )
    return None


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def check_labels(label: np.ndarray, allowed: Sequence[int], path: str) -> np.ndarray:
    """Returns the label map as uint8 after checking its values.

    Raises DataError naming ``path`` if a value is not an integer or not in ``allowed``.
    """
    values = np.unique(label)
    if not np.all(np.equal(np.mod(values, 1), 0)):
        bad = [float(v) for v in values if v % 1 != 0][:5]
        raise DataError(path, "integer label values", f"non-integer values {bad}")
    extra = sorted(set(int(v) for v in values) - set(int(a) for a in allowed))
    if extra:
        raise DataError(
            path, f"label values in {sorted(int(a) for a in allowed)}", f"values {extra}"
        )
    return label.astype(np.uint8)


def read_case(case: CaseFiles, allowed_labels: Sequence[int], spacing_tol: float) -> RawCase:
    """Reads and checks one case.

    Returns a RawCase with image [z, y, x, c] float32 (channels in ``case.images`` order) and
    label [z, y, x] uint8. Raises DataError naming the file when a modality or the label is
    missing, a file cannot be read, the case's files are not on one grid (shape; spacing within
    the relative tolerance ``spacing_tol``; origin and direction, see
    :func:`_same_geometry`), or a label value is outside ``allowed_labels``.
    """
    missing = [m for m, p in case.images.items() if p is None]
    if missing:
        raise DataError(
            case.folder, f"a file for each modality {list(case.images)}", f"none for {missing}"
        )
    if case.label is None:
        raise DataError(case.folder, f"the segmentation file of {case.case_id}", "none")
    volumes = [read_volume(p) for p in case.images.values()]
    label_vol = read_volume(case.label)
    ref = volumes[0]
    for vol in [*volumes[1:], label_vol]:
        diff = _same_geometry(ref, vol, spacing_tol)
        if diff is not None:
            raise DataError(vol.path, "the same grid as the case's other files", diff)
    for vol in volumes:
        if not np.issubdtype(vol.array.dtype, np.number) or not np.all(np.isfinite(vol.array)):
            raise DataError(vol.path, "finite numeric intensities", "NaN/inf or non-numeric")
    image = np.stack([v.array.astype(np.float32) for v in volumes], axis=-1)
    label = check_labels(label_vol.array, allowed_labels, label_vol.path)
    return RawCase(case.case_id, image, label, ref.spacing, ref.origin, ref.direction)
