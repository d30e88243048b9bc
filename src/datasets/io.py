"""Reading and writing medical volumes: the one place where file axis order meets array order.

Every volume leaves this module as a :class:`Volume`: a numpy array indexed ``[z, y, x]``
(slowest to fastest on disk) with its spacing, origin and direction also given in (z, y, x)
order, in millimetres. SimpleITK and nibabel report geometry in (x, y, z) order; the reversal
happens in :func:`_volume_from_xyz_geometry` and :func:`_xyz_geometry` and nowhere else.

Formats: MetaImage (``.mhd`` + ``.raw``, ``.mha``) and anything else SimpleITK reads through
:func:`read_sitk`; NIfTI (``.nii``, ``.nii.gz``) through :func:`read_nifti` (nibabel). No format
is parsed by hand. Read failures (missing, unreadable or truncated files) raise
:class:`~crf_rnn_3d.datasets.errors.DataError` naming the file.

It also owns the package's atomic writes (:func:`atomic_output` for a file,
:func:`atomic_write_json`, :func:`atomic_folder` for a folder built in full before it appears):
every file the package writes goes through them.
"""

from __future__ import annotations

import io as io_module
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from crf_rnn_3d.datasets.errors import DataError


@dataclass(frozen=True)
class Volume:
    """A volume as an array with its physical geometry.

    Attributes:
      array: [z, y, x] voxel values, as stored in the file (dtype kept).
      spacing: (z, y, x) voxel size in mm.
      origin: (z, y, x) physical position of voxel [0, 0, 0] in mm (file's world frame).
      direction: 3 x 3 direction cosines, rows and columns in (z, y, x) order.
      path: the file it came from.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    path: str


# Geometry every volume must have (checked for every format in _volume_from_xyz_geometry):
# a voxel size within this range in mm (1 micrometre to 1 metre), finite origin, and direction
# cosines that form a rotation: columns of unit length and at right angles within this tolerance.
SPACING_RANGE_MM = (1e-3, 1e3)
DIRECTION_TOL = 1e-3


def _check_geometry(
    shape: tuple[int, ...],
    spacing: np.ndarray,
    origin: np.ndarray,
    direction: np.ndarray,
    path: str,
) -> None:
    """DataError naming ``path`` for an empty grid or a spacing, origin or direction that no
    scanner writes (zero, NaN, absurd sizes, a singular direction matrix)."""
    if any(int(n) < 1 for n in shape):
        raise DataError(path, "at least one voxel along every axis", f"a grid of shape {shape}")
    low, high = SPACING_RANGE_MM
    if not np.all(np.isfinite(spacing)) or np.any(spacing < low) or np.any(spacing > high):
        raise DataError(
            path, f"a voxel spacing between {low:g} and {high:g} mm", f"{tuple(spacing)} mm"
        )
    if not np.all(np.isfinite(origin)):
        raise DataError(path, "a finite origin", f"{tuple(origin)}")
    if not np.all(np.isfinite(direction)) or not np.allclose(
        direction.T @ direction, np.eye(len(direction)), atol=DIRECTION_TOL
    ):
        raise DataError(
            path,
            "direction cosines that form a rotation (orthonormal columns)",
            f"{np.round(direction, 4).tolist()}",
        )


def _volume_from_xyz_geometry(
    array_zyx: np.ndarray,
    spacing_xyz: tuple[float, ...],
    origin_xyz: tuple[float, ...],
    direction_xyz: np.ndarray,
    path: str,
) -> Volume:
    """The axis reversal: geometry given in (x, y, z) order -> a (z, y, x) Volume, after
    :func:`_check_geometry`."""
    d = np.asarray(direction_xyz, dtype=float).reshape(3, 3)[::-1, ::-1]
    _check_geometry(
        array_zyx.shape,
        np.asarray(spacing_xyz, dtype=float),
        np.asarray(origin_xyz, dtype=float),
        d,
        path,
    )
    return Volume(
        array=array_zyx,
        spacing=tuple(float(s) for s in spacing_xyz[::-1]),
        origin=tuple(float(o) for o in origin_xyz[::-1]),
        direction=tuple(tuple(float(v) for v in row) for row in d),
        path=path,
    )


def _xyz_geometry(
    spacing_zyx: tuple[float, ...],
    origin_zyx: tuple[float, ...] | None,
    direction_zyx: tuple[tuple[float, ...], ...] | np.ndarray | None,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """The reverse of :func:`_volume_from_xyz_geometry`, for writers: (z, y, x) -> (x, y, z)."""
    origin_zyx = (0.0, 0.0, 0.0) if origin_zyx is None else origin_zyx
    d = np.eye(3) if direction_zyx is None else np.asarray(direction_zyx, dtype=float)
    return (
        tuple(float(s) for s in spacing_zyx[::-1]),
        tuple(float(o) for o in origin_zyx[::-1]),
        tuple(float(v) for v in d.reshape(3, 3)[::-1, ::-1].ravel()),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # SimpleITK puts the useful sentence last; keep the message short.
    return (lines[-1] if lines else type(exc).__name__)[:300]


# Bytes per element of the MetaImage element types (MET_*); others are left to SimpleITK.
METAIMAGE_ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}  # fmt: skip


def _metaimage_header(path: str) -> tuple[dict[str, str], int]:
    """The ``key = value`` lines of a MetaImage header up to ElementDataFile, and the header's
    length in bytes (where an .mha's inline data starts)."""
    fields: dict[str, str] = {}
    length = 0
    with open(path, "rb") as f:
        for raw in f:
            length += len(raw)
            key, sep, value = raw.decode("latin-1").partition("=")
            if not sep:
                continue
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
            if length > 1 << 16:  # no header is that long: not a MetaImage, SimpleITK will say
                break
    return fields, length


def _check_metaimage_header(path: str) -> None:
    """DataError naming the file when a MetaImage header does not describe its data: a zero or
    negative size, a position that is not a finite number, or uncompressed pixel data whose
    byte count differs from DimSize x channels x the size of ElementType (SimpleITK would read
    a truncated file's missing part, or a longer file's first part, without a word)."""
    try:
        fields, header_bytes = _metaimage_header(path)
    except OSError as exc:
        raise DataError(path, "a readable MetaImage header", f"read failed: {exc}") from exc
    if "DimSize" not in fields:
        return  # not a MetaImage header SimpleITK understands either: it will say so
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
    except ValueError:
        raise DataError(path, "whole numbers in DimSize", fields["DimSize"]) from None
    if not dims or any(n < 1 for n in dims):
        raise DataError(path, "DimSize of at least 1 voxel along every axis", fields["DimSize"])
    for key in ("Offset", "Position", "Origin", "ElementSpacing", "TransformMatrix"):
        if key in fields:
            try:
                values = [float(v) for v in fields[key].split()]
            except ValueError:
                values = [float("nan")]
            if not np.all(np.isfinite(values)):
                raise DataError(path, f"finite numbers in {key}", fields[key])
    element = fields.get("ElementType", "")
    data_file = fields.get("ElementDataFile", "")
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if compressed or element not in METAIMAGE_ELEMENT_BYTES or not data_file:
        return
    if data_file.upper() == "LOCAL":
        data_path, offset = path, header_bytes
    elif data_file.upper().startswith("LIST") or "%" in data_file:
        return  # slice lists and file patterns: SimpleITK checks those
    else:
        data_path = os.path.join(os.path.dirname(path), data_file)
        offset = int(fields.get("HeaderSize", "0") or 0)
        if offset < 0:
            return  # HeaderSize = -1: the data are the file's last bytes, any header before
    if not os.path.isfile(data_path):
        raise DataError(path, f"its pixel data file {data_path}", "no such file")
    channels = int(fields.get("ElementNumberOfChannels", "1") or 1)
    expected = int(np.prod(dims)) * channels * METAIMAGE_ELEMENT_BYTES[element]
    found = os.path.getsize(data_path) - offset
    if found != expected:
        what = "truncated" if found < expected else "longer than the header says"
        raise DataError(
            path,
            f"{expected} bytes of pixel data (DimSize {fields['DimSize']} x {channels} channel(s)"
            f" x {METAIMAGE_ELEMENT_BYTES[element]} bytes of {element})",
            f"{found} bytes in {data_path}: {what}",
        )


def read_sitk(path: str | os.PathLike) -> Volume:
    """Reads a 3D image with SimpleITK (MetaImage .mhd/.mha, NRRD, ...).

    Returns a :class:`Volume` with array [z, y, x] in the file's pixel type.
    Raises DataError if the file is missing, unreadable, truncated or not 3D scalar.
    """
    path = str(path)
    if os.path.isdir(path):
        raise DataError(path, "an image file", "a folder")
    if not os.path.isfile(path):
        raise DataError(path, "an image file", "no such file")
    if path.lower().endswith((".mhd", ".mha")):
        _check_metaimage_header(path)
    try:
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)  # SimpleITK already returns [z, y, x]
    except Exception as exc:  # SimpleITK raises RuntimeError with a long ITK trace
        raise DataError(path, "a readable image", f"read failed: {_first_line(exc)}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            path,
            "a 3D single-component image",
            f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} components",
        )
    return _volume_from_xyz_geometry(
        array, image.GetSpacing(), image.GetOrigin(), np.array(image.GetDirection()), path
    )


def read_nifti(path: str | os.PathLike) -> Volume:
    """Reads a 3D NIfTI image (.nii or .nii.gz) with nibabel (see :func:`nifti_to_volume`).

    Returns a :class:`Volume` with array [z, y, x].
    Raises DataError if the file is missing, unreadable, truncated or not 3D.
    """
    path = str(path)
    if os.path.isdir(path):
        raise DataError(path, "a NIfTI file", "a folder")
    if not os.path.isfile(path):
        raise DataError(path, "a NIfTI file", "no such file")
    _check_nifti_zooms(path)
    try:
        image = nib.load(path)
        return nifti_to_volume(image, path)
    except DataError:
        raise
    except Exception as exc:  # nibabel raises several kinds (ImageFileError, EOFError, ...)
        raise DataError(path, "a readable NIfTI image", f"read failed: {_first_line(exc)}") from exc


def nifti_to_volume(image: nib.Nifti1Image, path: str) -> Volume:
    """A loaded nibabel image (e.g. one of nilearn's templates) as a [z, y, x] Volume.

    The voxel array is taken as stored (no reorientation). Origin and direction are turned
    from NIfTI's RAS world frame into ITK's LPS one (x and y negated), so a NIfTI file gives
    the same Volume geometry whether nibabel or SimpleITK reads it, and a prediction written
    back with :func:`write_sitk` lands where the source was. ``path`` names the image in errors.
    """
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, "a 3D image", f"array of shape {data.shape}")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    affine = image.affine
    rotation = ras_to_lps @ affine[:3, :3] / np.where(np.array(zooms) > 0, np.array(zooms), 1.0)
    origin = ras_to_lps @ affine[:3, 3]
    # nibabel indexes [i, j, k] = [x, y, z]: transpose to [z, y, x].
    return _volume_from_xyz_geometry(
        np.ascontiguousarray(data.transpose(2, 1, 0)), zooms, tuple(origin), rotation, path
    )


def read_volume(path: str | os.PathLike) -> Volume:
    """Reads a 3D volume, choosing nibabel for NIfTI and SimpleITK for everything else."""
    name = str(path).lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return read_nifti(path)
    return read_sitk(path)


# ----------------------------------------------------------------------------- atomic writes
# The one place that writes files and folders atomically: a temporary name beside the target
# (``.tmp-<pid>-<name>``, the real extension(s) last), renamed over it on success, removed on
# failure. Every writer of the package (cache, splits, runs, reports) goes through these.


def _temporary_path(path: Path) -> Path:
    """``.tmp-<pid>-<name>`` beside ``path``."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had this number: not ours now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files and folders (``.tmp-<pid>-*``) that a killed process left in
    ``folder`` (not below it), i.e. those whose process no longer runs; returns what it removed.
    Called when a writer opens a folder again (the cache, a run), so a kill -9 leaves nothing
    behind for long."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        pid = entry.name[len(".tmp-") :].split("-", 1)[0]
        if not entry.name.startswith(".tmp-") or not pid.isdigit() or _process_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is renamed to ``path``.

    The temporary name keeps the real extension(s) last (``.tmp-<pid>-<name>``) so writers that
    pick the format from the name still do. If the body raises, the temporary file is removed
    and ``path`` is left as it was: an interrupted write never leaves a half file under the
    final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    """Writes ``obj`` as indented JSON (indent 1, sorted keys, final newline) to ``path`` via
    :func:`atomic_output`."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


@contextmanager
def staging_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a new empty temporary folder beside ``path`` and removes it (with whatever is
    left in it) at the end, success or not. For writers that must move several files into
    place themselves (:func:`write_sitk`'s header and data file); see :func:`atomic_folder`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed process with this pid
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside ``path``; on success it is renamed to ``path``.

    ``path`` must not exist yet (FileExistsError otherwise, before the body runs): a finished
    folder is never overwritten or merged into. If the body raises, the temporary folder and
    everything in it are removed, so a half-written folder never appears under the final name.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: exists already; an atomic folder is never overwritten")
    with staging_folder(path) as tmp:
        yield tmp
        os.replace(tmp, path)


def write_sitk(
    array_zyx: np.ndarray,
    spacing_zyx: tuple[float, ...],
    path: str | os.PathLike,
    origin_zyx: tuple[float, ...] | None = None,
    direction_zyx: tuple[tuple[float, ...], ...] | None = None,
    compress: bool = False,
) -> None:
    """Writes a [z, y, x] array with SimpleITK (format from the extension), atomically.

    For ``.mhd`` the pixel data goes to a ``.raw`` beside it (``.zraw`` when compressed). Both
    are written under temporary names and renamed, data file first.
    """
    path = Path(path)
    spacing, origin, direction = _xyz_geometry(spacing_zyx, origin_zyx, direction_zyx)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mhd":
        # The header names its data file: write into a temp folder, then move both files.
        with staging_folder(path.parent / path.stem) as tmp_dir:
            sitk.WriteImage(image, str(tmp_dir / path.name), compress)
            for f in sorted(tmp_dir.iterdir(), key=lambda p: p.suffix.lower() == ".mhd"):
                os.replace(f, path.parent / f.name)
        return
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def write_nifti(
    array_zyx: np.ndarray, spacing_zyx: tuple[float, ...], path: str | os.PathLike
) -> None:
    """Writes a [z, y, x] array as NIfTI (axis-aligned affine from the spacing), atomically."""
    path = Path(path)
    spacing_xyz = [float(s) for s in spacing_zyx[::-1]]
    image = nib.Nifti1Image(
        np.ascontiguousarray(np.asarray(array_zyx).transpose(2, 1, 0)), np.diag([*spacing_xyz, 1.0])
    )
    image.header.set_zooms(spacing_xyz)
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))


# ---------------------------------------------------------------------------------------------
# Images of any dimension and probability maps of other tools (crf3d-postprocess). Arrays come
# out in SimpleITK's order: the file's (x, y, z) axes reversed, [z, y, x], with a trailing
# component / class axis where there is one.
# ---------------------------------------------------------------------------------------------

NNUNET_PROBABILITIES_KEY = "probabilities"
CHANNEL_AXES = ("first", "last")


class InputFileError(DataError):
    """An input or output file (or a setting) that cannot be used. The message is one line,
    ``<role> <path>: <what is wrong>``, e.g. ``probability map p.nii.gz: no such file``."""

    def __init__(self, message: str, path: str = "") -> None:
        ValueError.__init__(self, message)
        self.path, self.expected, self.found = str(path), "", message


def read_image(path: str | os.PathLike, role: str) -> sitk.Image:
    """Reads ``path`` with SimpleITK (any dimension, any number of components).

    Raises InputFileError ``<role> <path>: no such file`` / ``could not be read (...)``.
    """
    path = str(path)
    if os.path.isdir(path):
        raise InputFileError(f"{role} {path}: a folder, not an image file", path)
    if not os.path.isfile(path):
        raise InputFileError(f"{role} {path}: no such file", path)
    name = path.lower()
    try:
        if name.endswith((".mhd", ".mha")):
            _check_metaimage_header(path)
        if name.endswith((".nii", ".nii.gz")):
            _check_nifti_zooms(path)
    except DataError as err:
        raise InputFileError(
            f"{role} {path}: expected {err.expected}, found {err.found}", path
        ) from err
    try:
        image = sitk.ReadImage(path)
    except Exception as err:  # SimpleITK raises RuntimeError with a long ITK trace
        raise InputFileError(
            f"{role} {path}: could not be read ({_first_line(err)})", path
        ) from err
    n = image.GetDimension()
    try:
        _check_geometry(
            tuple(image.GetSize()),
            np.array(image.GetSpacing(), dtype=float),
            np.array(image.GetOrigin(), dtype=float),
            np.array(image.GetDirection(), dtype=float).reshape(n, n),
            path,
        )
    except DataError as err:
        raise InputFileError(
            f"{role} {path}: expected {err.expected}, found {err.found}", path
        ) from err
    return image


def _check_nifti_zooms(path: str) -> None:
    """What SimpleITK would read from a NIfTI header without a word: a voxel size (pixdim) of 0
    or NaN is read as 1 mm, and NaN in the sform or qform falls back to the other one. The
    header's spatial pixdim must be finite and > 0, and the transforms its codes say to use
    must hold finite numbers (DataError otherwise)."""
    try:  # the header as stored: nibabel's load would already have "fixed" a zero pixdim
        from nibabel.openers import ImageOpener

        with ImageOpener(path) as f:
            raw = f.read(540)
        kind = (
            nib.Nifti2Header
            if len(raw) >= 540 and raw[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")
            else nib.Nifti1Header
        )
        header = kind.from_fileobj(io_module.BytesIO(raw), check=False)
        pixdim = np.array(header["pixdim"][1:4], dtype=float)
    except Exception:
        return  # an unreadable header: SimpleITK will name the file
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise DataError(
            path,
            "a voxel spacing (pixdim) > 0 along every spatial axis",
            f"{tuple(float(v) for v in pixdim)}",
        )
    fields = []
    if int(header["sform_code"]) > 0:
        fields += ["srow_x", "srow_y", "srow_z"]
    if int(header["qform_code"]) > 0:
        fields += ["quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"]
    for field in fields:
        values = np.array(header[field], dtype=float)
        if not np.all(np.isfinite(values)):
            raise DataError(
                path,
                f"finite numbers in the header's {field} (the origin and direction)",
                f"{values.tolist()}",
            )


def image_array(image: sitk.Image) -> np.ndarray:
    """The voxels as [*spatial reversed (z, y, x)], plus a component axis for multi-component
    images (SimpleITK's array order)."""
    return sitk.GetArrayFromImage(image)


def image_spacing_zyx(image: sitk.Image) -> tuple[float, ...]:
    """The voxel size in mm in array axis order (the reverse of SimpleITK's x, y, z)."""
    return tuple(float(s) for s in reversed(image.GetSpacing()))


def image_shape_zyx(image: sitk.Image) -> tuple[int, ...]:
    """The voxel grid in array axis order, [z, y, x] (components left out)."""
    return tuple(int(s) for s in reversed(image.GetSize()))


def check_same_grid(
    ref: sitk.Image, ref_path: str, other: sitk.Image, path: str, role: str
) -> None:
    """Same size and (to 1e-4) spacing, origin and direction as the reference image; ``other``
    may have more dimensions (a 4D probability map), whose first ones are compared.

    Raises InputFileError naming ``path``, what differs and the reference's value."""
    ndim = ref.GetDimension()
    size, ref_size = other.GetSize()[:ndim], ref.GetSize()
    if size != ref_size:
        raise InputFileError(
            f"{role} {path}: voxel grid {size} (x, y, z) differs from the image {ref_path}: "
            f"{ref_size}",
            path,
        )
    for name in ("Spacing", "Origin"):
        a = np.array(getattr(other, f"Get{name}")()[:ndim])
        b = np.array(getattr(ref, f"Get{name}")())
        if not np.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise InputFileError(
                f"{role} {path}: {name.lower()} {tuple(a)} differs from the image {ref_path}: "
                f"{tuple(b)}",
                path,
            )
    full = np.array(other.GetDirection()).reshape(other.GetDimension(), -1)[:ndim, :ndim]
    if not np.allclose(full, np.array(ref.GetDirection()).reshape(ndim, ndim), atol=1e-4):
        raise InputFileError(f"{role} {path}: direction differs from the image {ref_path}", path)


def read_nnunet_probabilities(
    path: str | os.PathLike, ref: sitk.Image, ref_path: str
) -> np.ndarray:
    """nnU-Net v2's ``--save_probabilities`` output: an ``.npz`` whose ``probabilities`` array is
    [C, *spatial] with the spatial axes in the order nnU-Net read the image in (SimpleITK's:
    [z, y, x]). The geometry is the reference image's (the ``.pkl`` beside the file is never
    unpickled: ``allow_pickle=False``).

    Returns [*spatial, C] (z, y, x order), dtype as stored. Raises InputFileError naming the
    file when it is missing or unreadable, has no ``probabilities`` array, or its spatial shape
    differs from the image's (a channel-last or transposed layout shows up as that).
    """
    path = str(path)
    role = "probability map"
    if not os.path.isfile(path):
        raise InputFileError(f"{role} {path}: no such file", path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if NNUNET_PROBABILITIES_KEY not in archive.files:
                raise InputFileError(
                    f"{role} {path}: no '{NNUNET_PROBABILITIES_KEY}' array (nnU-Net v2's "
                    f"--save_probabilities output); found {sorted(archive.files)}",
                    path,
                )
            probs = archive[NNUNET_PROBABILITIES_KEY]
    except InputFileError:
        raise
    except Exception as err:  # zipfile.BadZipFile, ValueError (object arrays), EOFError, ...
        raise InputFileError(
            f"{role} {path}: could not be read ({_first_line(err)})", path
        ) from err
    spatial = image_shape_zyx(ref)
    if probs.ndim != len(spatial) + 1 or tuple(probs.shape[1:]) != spatial:
        raise InputFileError(
            f"{role} {path}: '{NNUNET_PROBABILITIES_KEY}' has shape {tuple(probs.shape)}; "
            f"expected [classes, *spatial] with spatial {spatial} (z, y, x) of the image "
            f"{ref_path} (nnU-Net's layout with SimpleITK's axis order)",
            path,
        )
    return np.moveaxis(probs, 0, -1)


def _nifti_channel_axis(
    shape: tuple[int, ...], spatial_xyz: tuple[int, ...], channel_axis: str | None, path: str
) -> str:
    """Which end of a 4-D NIfTI's shape (file order) holds the classes: "first" or "last"."""
    readings = {"first": tuple(shape[1:]) == spatial_xyz, "last": tuple(shape[:3]) == spatial_xyz}
    role = "probability map"
    if channel_axis is not None:
        if channel_axis not in CHANNEL_AXES:
            raise InputFileError(
                f"setting channel_axis: expected one of {CHANNEL_AXES} or null, found "
                f"{channel_axis!r}"
            )
        if not readings[channel_axis]:
            raise InputFileError(
                f"{role} {path}: shape {shape} (file order) with channel_axis={channel_axis} "
                f"does not hold the image's grid {spatial_xyz} (x, y, z)",
                path,
            )
        return channel_axis
    if readings["first"] and readings["last"]:
        raise InputFileError(
            f"{role} {path}: shape {shape} (file order) reads as classes first or last against "
            f"the image's grid {spatial_xyz} (x, y, z); pass channel_axis=first or "
            "channel_axis=last",
            path,
        )
    if not (readings["first"] or readings["last"]):
        raise InputFileError(
            f"{role} {path}: shape {shape} (file order) has neither its first three nor its "
            f"last three axes equal to the image's grid {spatial_xyz} (x, y, z)",
            path,
        )
    return "first" if readings["first"] else "last"


def read_nifti_probabilities(
    path: str | os.PathLike, ref: sitk.Image, ref_path: str, channel_axis: str | None = None
) -> np.ndarray:
    """A 4-D NIfTI probability map (MONAI style) on a 3D image's grid, classes along the file's
    last axis ([x, y, z, C], what MONAI's SaveImage writes) or its first ([C, x, y, z]).

    The class axis is found by comparing the file's shape with the image's grid; when both
    readings fit (e.g. as many classes as voxels along x and z) ``channel_axis`` ("first" or
    "last") must say which, otherwise InputFileError asks for it. The file's affine must place
    the grid where the image is (spacing, origin, direction to 1e-4). Returns [z, y, x, C].
    """
    path = str(path)
    role = "probability map"
    if not os.path.isfile(path):
        raise InputFileError(f"{role} {path}: no such file", path)
    try:
        image = nib.load(path)
        shape = tuple(int(n) for n in image.shape)
    except Exception as err:
        raise InputFileError(
            f"{role} {path}: could not be read ({_first_line(err)})", path
        ) from err
    spatial_xyz = tuple(int(s) for s in ref.GetSize())
    if len(shape) != 4 or len(spatial_xyz) != 3:
        raise InputFileError(
            f"{role} {path}: expected a 4-D NIfTI on the 3D image {ref_path}; found shape "
            f"{shape} against an image of size {spatial_xyz}",
            path,
        )
    axis = _nifti_channel_axis(shape, spatial_xyz, channel_axis, path)
    # The affine against the image's geometry, in ITK's LPS frame (as nifti_to_volume does).
    affine = np.asarray(image.affine, dtype=float)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    columns = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / np.where(spacing > 0, spacing, 1.0)
    origin = ras_to_lps @ affine[:3, 3]
    for name, found, want in (
        ("spacing", spacing, np.array(ref.GetSpacing())),
        ("origin", origin, np.array(ref.GetOrigin())),
        ("direction", direction.ravel(), np.array(ref.GetDirection())),
    ):
        if not np.allclose(found, want, rtol=1e-4, atol=1e-4):
            raise InputFileError(
                f"{role} {path}: {name} {tuple(np.round(found, 6))} differs from the image "
                f"{ref_path}: {tuple(np.round(want, 6))}",
                path,
            )
    try:
        data = np.asarray(image.dataobj)
    except Exception as err:
        raise InputFileError(
            f"{role} {path}: could not be read ({_first_line(err)})", path
        ) from err
    if axis == "first":
        data = np.moveaxis(data, 0, -1)  # [x, y, z, C]
    return np.ascontiguousarray(data.transpose(2, 1, 0, 3))  # [z, y, x, C]


def write_image_like(
    array: np.ndarray,
    ref: sitk.Image,
    path: str | os.PathLike,
    is_vector: bool = False,
    role: str = "output",
) -> None:
    """Writes ``array`` ([z, y, x] or [z, y, x, C] with ``is_vector``) with the reference image's
    spacing, origin and direction, so that ``path`` only ever appears whole: through
    :func:`atomic_output` for one-file formats; for ``.mhd`` (header + data file) through a
    temporary folder beside it, data file first and the header last.

    Raises InputFileError ``output <path>: ...`` if the folder is missing or the write fails.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise InputFileError(f"{role} {path}: folder {target.parent} does not exist", str(path))
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=is_vector)
    image.CopyInformation(ref)

    def write(name: Path) -> None:
        try:
            sitk.WriteImage(image, str(name))
        except Exception as err:
            raise InputFileError(
                f"{role} {path}: could not be written ({_first_line(err)})", str(path)
            ) from err

    if target.suffix.lower() != ".mhd":
        with atomic_output(target) as tmp:
            write(tmp)
        return
    tmp_dir = target.parent / f".tmp-{os.getpid()}-{target.name}.d"
    try:
        tmp_dir.mkdir()
        write(tmp_dir / target.name)
        for item in sorted(tmp_dir.iterdir(), key=lambda p: p.name == target.name):
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
