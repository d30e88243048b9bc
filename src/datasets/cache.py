"""The preprocessed cache: one ``<case>.npz`` per case plus ``manifest.json``, under
``data/processed/<dataset>/``.

A case file holds ``image`` [Z, Y, X, C] float32, ``label`` [Z, Y, X] uint8 and ``geometry``
(the JSON of :class:`~crf_rnn_3d.datasets.preprocess.Geometry`, to map predictions back). It is a
plain (by default uncompressed) ``.npz``, so ``np.load`` reads it without this code.

``manifest.json`` records, for each case, its source files with size and modification time
(``mtime_ns``), the settings hash, the original and preprocessed shape and spacing, and the
label values present; cases that were skipped, with the reason. A case is up to date when its
file exists and its sources and settings hash are unchanged. Every file is written under a
temporary name in the same folder and renamed (:mod:`crf_rnn_3d.datasets.io`'s atomic writes), so
an interrupted run never leaves a half file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from crf_rnn_3d.datasets.io import atomic_output, write_sitk
from crf_rnn_3d.datasets.io import atomic_write_json as atomic_write_json  # re-export (old home)
from crf_rnn_3d.datasets.preprocess import Geometry, to_original_grid

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def write_case(
    path: str | os.PathLike,
    image: np.ndarray,
    label: np.ndarray | None,
    geometry: Geometry,
    compress: bool = False,
) -> int:
    """Writes one preprocessed case atomically; returns the file size in bytes.

    image [Z, Y, X, C] float32, label [Z, Y, X] uint8 (an all-zero one is stored when None).
    """
    path = Path(path)
    save = np.savez_compressed if compress else np.savez
    if label is None:
        label = np.zeros(image.shape[:3], np.uint8)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        save(
            f,
            image=image.astype(np.float32, copy=False),
            label=label.astype(np.uint8, copy=False),
            geometry=np.array(json.dumps(geometry.to_dict())),
        )
    return path.stat().st_size


def read_case(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Reads a cached case: image [Z, Y, X, C] float32, label [Z, Y, X] uint8, Geometry."""
    with np.load(path) as z:
        return z["image"], z["label"], Geometry.from_dict(json.loads(str(z["geometry"])))


def export_prediction(
    prediction: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike,
    method: str = "per_label_linear",
) -> None:
    """Writes a prediction on the preprocessed grid back in the source case's geometry.

    ``prediction``: labels [Z, Y, X] (written as uint8) or class probabilities [Z, Y, X, K]
    (the arg-max is written). It is mapped with
    :func:`~crf_rnn_3d.datasets.preprocess.to_original_grid` and written (format from the
    extension, e.g. ``.mhd``, ``.mha``, ``.nii.gz``) with the original spacing, origin and
    direction, atomically.
    """
    back = to_original_grid(prediction, geometry, method)
    if back.ndim == 4:
        back = np.argmax(back, axis=-1)
    write_sitk(
        back.astype(np.uint8),
        geometry.original_spacing,
        path,
        origin_zyx=geometry.original_origin,
        direction_zyx=geometry.original_direction,
    )


def source_files(paths: Iterable[str]) -> list[str]:
    """The given files plus, for a MetaImage header (.mhd), its data file(s) beside it with the
    same stem (CaseNN.raw / .zraw): a change to the pixel data then also shows."""
    out = []
    for p in paths:
        out.append(p)
        path = Path(p)
        if path.suffix.lower() == ".mhd":
            out.extend(
                str(q) for q in sorted(path.parent.glob(path.stem + ".*")) if q.suffix != ".mhd"
            )
    return out


def signature(paths: Iterable[str]) -> list[dict]:
    """[{path, size, mtime_ns}] of each source file (see :func:`source_files`)."""
    sig = []
    for p in source_files(paths):
        st = os.stat(p)
        sig.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return sig


def settings_hash(settings: dict) -> str:
    """Short SHA-256 of the settings' canonical JSON."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_manifest(processed_dir: str | os.PathLike) -> dict | None:
    """The manifest in ``processed_dir``, or None when there is none (or it is unreadable)."""
    path = Path(processed_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("version") != MANIFEST_VERSION:
        return None
    return manifest


def is_up_to_date(entry: dict | None, processed_dir: Path, sig: list[dict], shash: str) -> bool:
    """Whether a manifest entry still describes the case: same sources, settings and file."""
    return (
        entry is not None
        and entry.get("settings_hash") == shash
        and entry.get("sources") == sig
        and (processed_dir / entry["file"]).is_file()
        and (processed_dir / entry["file"]).stat().st_size == entry.get("bytes")
    )
