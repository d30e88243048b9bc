"""Evaluate a trained (fold, variant) run on its held-out cases: ``python -m
crf_rnn_3d.experiments.evaluate [experiment=...] fold=0 variant=vnet``.

For each case of the fold's ``val`` list: predict with the model of the run's last checkpoint
(its best one by monitor Dice with ``train.validation.select=best``; inference mode, the CRF
head with ``num_iterations_inference``), take the arg-max and map class indices to label values
(``data.labels``). Every region of ``data.regions`` (PROMISE12: prostate = {1}; BraTS: whole =
{1, 2, 3, 4}, core = {1, 3, 4}, enhancing = {4}) is then scored with Dice, HD95, ASSD (mm) and
the normalised surface Dice at ``evaluate.nsd_tolerance_mm``
(:mod:`crf_rnn_3d.experiments.metrics`, its empty-mask convention) on two grids:

- ``resampled``: the prediction against the cached label, on the preprocessed (resampled,
  cropped) grid with its spacing, as the paper scored;
- ``original``: the prediction mapped back to the source case's grid
  (:func:`crf_rnn_3d.datasets.preprocess.to_original_grid`, the map ``evaluate.export`` writes)
  against the ORIGINAL label file with its own spacing, as the challenges score. The label file
  is found again under ``data.root`` and must be the one the cache was built from (same name,
  size and modification time as recorded in the manifest). When it cannot be had (no data
  under ``data.root``, the file changed, ``evaluate.original_grid: false``) the case's original
  numbers are NaN and the reason is recorded, logged and written in the table: never skipped
  silently.

The run folder gets ``predictions/<case>.npz`` (labels [Z, Y, X] uint8 on the preprocessed
grid), ``evaluation.json`` (``dice``: the resampled-grid Dice per case and region, as before;
``metrics``: case -> grid -> region -> metric; ``original_unavailable``: case -> reason;
``checkpoint``: which checkpoint was the model, ``{"select": "last" | "best", "step": ...}``) and
``per_case.csv`` (fold, case, variant, grid, region, dice, hd95, assd, nsd, note); with
``evaluate.export`` also ``export/<case><export_format>`` in the source case's geometry.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.errors import ConfigError, DataError, DatasetNotFoundError
from crf_rnn_3d.datasets.io import atomic_output, atomic_write_json, read_volume, write_sitk
from crf_rnn_3d.datasets.preprocess import (
    Geometry,
    PreprocessSettings,
    remap_labels,
    to_original_grid,
)
from crf_rnn_3d.datasets.readers import check_labels, find_cases
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.cli import hydra_app, run_stage
from crf_rnn_3d.experiments.metrics import dice as dice_score  # the one Dice of the package
from crf_rnn_3d.experiments.metrics import surface_metrics
from crf_rnn_3d.experiments.model_io import restore_selected

log = logging.getLogger(__name__)

METRICS = ("dice", "hd95", "assd", "nsd")
GRIDS = ("resampled", "original")
CSV_COLUMNS = ["fold", "case", "variant", "grid", "region", *METRICS, "note"]


@dataclass
class Evaluation:
    """One run's evaluation: ``dice[case][region]`` on the resampled grid (in [0, 1]);
    ``metrics[case][grid][region][metric]``; ``original_unavailable[case]``: why a case has no
    original-grid numbers."""

    run_dir: Path
    fold: int
    variant: str
    dice: dict[str, dict[str, float]]
    metrics: dict = field(default_factory=dict)
    original_unavailable: dict[str, str] = field(default_factory=dict)

    def mean_dice(self) -> dict[str, float]:
        """Mean over cases of each region's Dice (resampled grid)."""
        regions = next(iter(self.dice.values())).keys() if self.dice else []
        return {r: float(np.mean([d[r] for d in self.dice.values()])) for r in regions}


def region_dice(
    pred_labels: np.ndarray, true_labels: np.ndarray, regions: Mapping, empty: float = 1.0
) -> dict[str, float]:
    """Dice of each region (name -> label values counted as foreground) of two label maps."""
    return {
        str(name): dice_score(
            np.isin(pred_labels, list(values)), np.isin(true_labels, list(values)), empty
        )
        for name, values in regions.items()
    }


def region_metrics(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    regions: Mapping,
    spacing_mm: tuple[float, ...],
    tolerance_mm: float,
    empty: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Dice, HD95, ASSD and NSD of each region of two label maps on one grid of ``spacing_mm``
    (the axis order of the arrays): ``{region: {metric: value}}``."""
    out = {}
    for name, values in regions.items():
        pred = np.isin(pred_labels, list(values))
        true = np.isin(true_labels, list(values))
        out[str(name)] = {"dice": dice_score(pred, true, empty)}
        out[str(name)].update(surface_metrics(pred, true, spacing_mm, tolerance_mm))
    return out


def score_case(
    pred: np.ndarray,
    label: np.ndarray,
    geometry: Geometry,
    original: np.ndarray | None,
    regions: Mapping,
    tolerance_mm: float,
    empty: float = 1.0,
) -> tuple[dict, np.ndarray]:
    """The metrics of one case's prediction ``pred`` (label values [Z, Y, X] on the
    preprocessed grid): ``{"resampled": {region: {metric: v}}}`` against the cached ``label``
    with ``geometry.spacing``, plus ``"original"`` against ``original`` (the source label
    [z, y, x], None when unavailable) with ``geometry.original_spacing``, the prediction mapped
    back by :func:`~crf_rnn_3d.datasets.preprocess.to_original_grid`. Returns the metrics and
    that mapped-back prediction (uint8, what ``evaluate.export`` writes)."""
    on = {"resampled": region_metrics(pred, label, regions, geometry.spacing, tolerance_mm, empty)}
    back = to_original_grid(pred, geometry).astype(np.uint8)
    if original is not None:
        on["original"] = region_metrics(
            back, original, regions, geometry.original_spacing, tolerance_mm, empty
        )
    return on, back


def settings(cfg: Mapping) -> dict:
    """The checked ``evaluate`` settings: export, export_format, empty_dice, nsd_tolerance_mm,
    original_grid (ConfigError naming a bad one)."""
    ecfg = cfg["evaluate"]
    tol = common.real("evaluate.nsd_tolerance_mm", ecfg.get("nsd_tolerance_mm"))
    if tol < 0:
        raise ConfigError("evaluate.nsd_tolerance_mm", "a tolerance >= 0 in mm", tol)
    return {
        "export": bool(ecfg["export"]),
        "export_format": str(ecfg["export_format"]),
        "empty_dice": common.real("evaluate.empty_dice", ecfg["empty_dice"]),
        "nsd_tolerance_mm": tol,
        "original_grid": bool(ecfg.get("original_grid", True)),
    }


class OriginalLabels:
    """Finds each case's original label file under ``data.root`` (the data set's reader) and
    reads it as the cache's labels are made (checked values, ``label_map``); says why not."""

    def __init__(self, cfg: Mapping, enabled: bool = True) -> None:
        self.data = cfg["data"]
        self.files: dict[str, str | None] = {}
        self.reason = None if enabled else "evaluate.original_grid is false"
        if enabled:
            data = self.data if OmegaConf.is_config(self.data) else OmegaConf.create(self.data)
            try:
                self.files = {c.case_id: c.label for c in find_cases(data)}
            except DatasetNotFoundError:
                self.reason = f"no source data set under data.root={self.data['root']}"
            except (DataError, OSError) as exc:
                self.reason = f"the source data set is not readable ({exc})"
        label_map = PreprocessSettings.from_config(self.data["preprocess"]).label_map
        self.label_map = label_map

    def read(self, case: str, entry: Mapping, geometry: Geometry) -> tuple[np.ndarray | None, str]:
        """(label [z, y, x] on the original grid, its path) or (None, why it is unavailable)."""
        if self.reason is not None:
            return None, self.reason
        path = self.files.get(case)
        if path is None:
            return None, f"no label file for {case} under data.root={self.data['root']}"
        recorded = {
            (os.path.basename(s["path"]), s["size"], s["mtime_ns"])
            for s in entry.get("sources", [])
        }
        for s in cache.signature([path]):
            if (os.path.basename(s["path"]), s["size"], s["mtime_ns"]) not in recorded:
                return None, (
                    f"{s['path']} is not the file the cache was built from (changed or "
                    "not recorded in the manifest; run prepare again)"
                )
        volume = read_volume(path)
        if tuple(volume.array.shape) != tuple(geometry.original_shape) or not np.allclose(
            volume.spacing, geometry.original_spacing, rtol=float(self.data["spacing_tolerance"])
        ):
            raise DataError(
                path,
                f"the grid recorded in the cache, shape {tuple(geometry.original_shape)} "
                f"spacing {tuple(geometry.original_spacing)} (z, y, x)",
                f"shape {volume.array.shape} spacing {volume.spacing}",
            )
        label = check_labels(volume.array, [int(v) for v in self.data["labels"]], path)
        return remap_labels(label, self.label_map), path


def table_rows(evaluation: Evaluation, regions: list[str]) -> list[dict]:
    """The per-case table of one run: one row per case, grid and region (CSV_COLUMNS); a case
    without original-grid numbers gets rows with NaN metrics and the reason in ``note``."""
    rows = []
    for case, by_grid in evaluation.metrics.items():
        for grid in GRIDS:
            note = ""
            if grid not in by_grid:
                note = "original label unavailable: " + evaluation.original_unavailable.get(
                    case, "not evaluated"
                )
            for region in regions:
                values = by_grid.get(grid, {}).get(region, {})
                rows.append({"fold": evaluation.fold, "case": case,
                             "variant": evaluation.variant, "grid": grid, "region": region,
                             **{m: float(values.get(m, math.nan)) for m in METRICS},
                             "note": note})  # fmt: skip
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    """``rows`` (CSV_COLUMNS) as CSV, atomically; NaN is written as an empty cell."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                             for k, v in r.items()})  # fmt: skip


def evaluate(
    cfg: DictConfig | Mapping, fold: int | None = None, variant: str | None = None
) -> Evaluation:
    """Evaluates the (fold, variant) run (defaults ``cfg.fold``, ``cfg.variant``); returns an
    :class:`Evaluation` and writes predictions, ``evaluation.json`` and ``per_case.csv`` into
    the run folder (see the module docstring)."""
    fold = common.integer("fold", cfg["fold"] if fold is None else fold, minimum=0)
    variant = str(cfg["variant"] if variant is None else variant)
    ecfg = settings(cfg)
    out = common.run_dir(cfg, fold, variant)
    model, checkpoint = restore_selected(cfg, fold, variant)  # last, or best (select=best)
    labels = np.asarray(common.label_values(cfg), np.uint8)
    regions = common.plain(cfg["data"]["regions"])
    empty, tol = ecfg["empty_dice"], ecfg["nsd_tolerance_mm"]
    processed = common.processed_dir(cfg)
    manifest = cache.load_manifest(processed) or {"cases": {}}
    originals = OriginalLabels(cfg, ecfg["original_grid"])
    result = Evaluation(out, fold, variant, {})
    for case in common.fold_cases(cfg, fold)["val"]:
        entry = manifest["cases"][case]
        image, label, geometry = cache.read_case(processed / entry["file"])
        logits = model(image[None].astype(np.float32), training=False)
        pred = labels[np.argmax(np.asarray(logits)[0], axis=-1)]
        with atomic_output(out / "predictions" / f"{case}.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, label=pred)
        original, why = originals.read(case, entry, geometry)
        if original is None:
            result.original_unavailable[case] = why
            log.warning("%s: no original-grid metrics for %s: %s", out.name, case, why)
        on, back = score_case(pred, label, geometry, original, regions, tol, empty)
        if ecfg["export"]:
            write_sitk(back, geometry.original_spacing,
                       out / "export" / f"{case}{ecfg['export_format']}",
                       origin_zyx=geometry.original_origin,
                       direction_zyx=geometry.original_direction)  # fmt: skip
        result.metrics[case] = on
        result.dice[case] = {r: m["dice"] for r, m in on["resampled"].items()}
    atomic_write_json(out / "evaluation.json", {
        "fold": fold, "variant": variant, "dice": result.dice, "metrics": result.metrics,
        "original_unavailable": result.original_unavailable,
        "nsd_tolerance_mm": tol, "empty_dice": empty, "checkpoint": checkpoint,
    })  # fmt: skip
    write_table(table_rows(result, [str(r) for r in regions]), out / "per_case.csv")
    return result


@hydra_app("config")
def main(cfg: DictConfig) -> None:
    result = run_stage(evaluate, cfg)
    for case, grids in result.metrics.items():
        for grid, by_region in grids.items():
            print(case, grid, " ".join(f"{r}: " + " ".join(f"{k}={v:.3f}" for k, v in m.items())
                                       for r, m in by_region.items()))  # fmt: skip
        if case in result.original_unavailable:
            print(case, "original: unavailable:", result.original_unavailable[case])
    print("mean Dice (resampled grid)", result.mean_dice())


if __name__ == "__main__":
    main()
