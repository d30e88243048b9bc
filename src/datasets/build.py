"""The preprocessing loop: raw cases -> the cache under ``data.processed`` (with progress bar).

:func:`build_cache` is a plain function of the ``data`` config. For each case it compares the
source files (size, mtime) and the settings hash with the manifest and skips the case when both
are unchanged; otherwise it reads, checks and preprocesses it and writes ``<case>.npz``. The
manifest is rewritten (atomically) after every case, so an interrupted run keeps the cases it
finished. A case that fails to read raises :class:`DataError` naming the file, or, with
``data.on_error: skip``, is listed under ``skipped`` in the manifest with the reason. Cases that
are no longer in the source folder are dropped from the cache. Finally the splits file is
created (or reused, see :mod:`crf_rnn_3d.datasets.splits`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.datasets.io import atomic_write_json, remove_stale_temporaries
from crf_rnn_3d.datasets.phantoms import write_phantoms
from crf_rnn_3d.datasets.preprocess import PreprocessSettings, preprocess_case
from crf_rnn_3d.datasets.readers import find_cases, read_case
from crf_rnn_3d.datasets.splits import load_or_create_splits

ON_ERROR = ("raise", "skip")


@dataclass
class BuildReport:
    """What :func:`build_cache` did.

    Attributes:
      processed_dir: the cache folder.
      cases: ids of the cases in the cache, sorted.
      written: ids preprocessed in this run; ``up_to_date``: ids left as they were.
      skipped: id -> reason, for cases that could not be read (``on_error: skip``).
      removed: ids dropped because their sources are gone.
      phantoms_written: whether synthetic source files were (re)generated.
      seconds: wall time of the run.
    """

    processed_dir: Path
    cases: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    phantoms_written: bool = False
    seconds: float = 0.0


def _plain(cfg: object) -> object:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def cache_settings(data_cfg: Mapping) -> dict:
    """Everything that changes a cached case: format, channel order, allowed labels, tolerance
    and the preprocessing settings. Its hash is stored per case in the manifest."""
    settings = PreprocessSettings.from_config(data_cfg["preprocess"])
    return {
        "format": str(data_cfg["format"]),
        "modalities": list(_channel_names(data_cfg)),
        "labels": [int(v) for v in data_cfg["labels"]],
        "spacing_tolerance": float(data_cfg["spacing_tolerance"]),
        "preprocess": settings.to_dict(),
        "compress": bool(data_cfg["cache"]["compress"]),
        "manifest_version": cache.MANIFEST_VERSION,
    }


def _channel_names(data_cfg: Mapping) -> list[str]:
    if data_cfg["format"] == "brats_nifti":
        return list(data_cfg["modality_suffixes"])
    return list(data_cfg["modalities"])


def build_cache(data_cfg: Mapping, progress: bool = True) -> BuildReport:
    """Fills ``data.processed`` from ``data.root`` as the ``data`` config says (see the module
    docstring). Writes synthetic sources first when ``data.phantom`` is set.

    Returns a :class:`BuildReport`. Raises DatasetNotFoundError (with download help) when the
    source folder holds no case, DataError naming the file for a bad case (unless
    ``on_error: skip``), ConfigError for an unusable setting.
    """
    start = time.perf_counter()
    on_error = str(data_cfg.get("on_error", "raise"))
    if on_error not in ON_ERROR:
        raise ConfigError("data.on_error", f"one of {ON_ERROR}", on_error)
    processed = Path(str(data_cfg["processed"]))
    remove_stale_temporaries(processed)  # what a killed earlier build left
    report = BuildReport(processed_dir=processed)
    if data_cfg.get("phantom") is not None:
        _, report.phantoms_written = write_phantoms(
            str(data_cfg["format"]), _plain(data_cfg["phantom"]), str(data_cfg["root"]), progress
        )
    cases = find_cases(data_cfg)
    settings = PreprocessSettings.from_config(data_cfg["preprocess"])
    described = cache_settings(data_cfg)
    shash = cache.settings_hash(described)
    compress = described["compress"]
    labels = described["labels"]
    tol = described["spacing_tolerance"]

    old = cache.load_manifest(processed) or {}
    old_cases = old.get("cases", {})
    manifest = {
        "version": cache.MANIFEST_VERSION,
        "dataset": str(data_cfg["name"]),
        "source_root": str(data_cfg["root"]),
        "channels": described["modalities"],
        "settings": described,
        "settings_hash": shash,
        "cases": {},
        "skipped": {},
    }
    processed.mkdir(parents=True, exist_ok=True)
    current = {c.case_id for c in cases}
    for case_id in sorted(set(old_cases) - current):
        stale = processed / old_cases[case_id]["file"]
        if stale.is_file():
            stale.unlink()
        report.removed.append(case_id)

    for case in tqdm(cases, desc=f"prepare {data_cfg['name']}", disable=not progress):
        sig = cache.signature(case.sources())
        entry = old_cases.get(case.case_id)
        if cache.is_up_to_date(entry, processed, sig, shash):
            manifest["cases"][case.case_id] = entry
            report.up_to_date.append(case.case_id)
            continue
        try:
            raw = read_case(case, labels, tol)
        except DataError as exc:
            if on_error == "raise":
                raise
            manifest["skipped"][case.case_id] = str(exc)
            report.skipped[case.case_id] = str(exc)
            stale = processed / f"{case.case_id}.npz"
            if stale.is_file():
                stale.unlink()
            atomic_write_json(processed / cache.MANIFEST, manifest)
            continue
        image, label, geometry = preprocess_case(
            raw.image, raw.label, raw.spacing, settings, raw.origin, raw.direction
        )
        name = f"{case.case_id}.npz"
        size = cache.write_case(processed / name, image, label, geometry, compress)
        manifest["cases"][case.case_id] = {
            "file": name,
            "bytes": size,
            "sources": sig,
            "settings_hash": shash,
            "original_shape": list(geometry.original_shape),
            "original_spacing": list(geometry.original_spacing),
            "shape": list(image.shape),
            "spacing": list(geometry.spacing),
            "label_values": [int(v) for v in np.unique(label)],
        }
        report.written.append(case.case_id)
        atomic_write_json(processed / cache.MANIFEST, manifest)

    atomic_write_json(processed / cache.MANIFEST, manifest)
    report.cases = sorted(manifest["cases"])
    if report.cases:
        load_or_create_splits(processed, report.cases, data_cfg["split"])
    report.seconds = time.perf_counter() - start
    return report
