"""The comparison report: ``python -m crf_rnn_3d.experiments.report [experiment=...]``.

This module is the orchestrator and the command line; the pieces are
:mod:`~crf_rnn_3d.experiments.report_stats` (the statistics),
:mod:`~crf_rnn_3d.experiments.report_figures` (matplotlib) and
:mod:`~crf_rnn_3d.experiments.report_markdown` (``report.md``).

:func:`report` collects ``evaluation.json`` of every (fold, variant) run of the config (each
case predicted by the model of the fold that did not see it), and writes a new folder
``<reports_dir>/<name>/<UTC timestamp>/`` (built in full under a temporary name, then renamed by
:func:`crf_rnn_3d.datasets.io.atomic_folder`; never overwritten) with:

- ``per_case.csv``: fold, case, variant, grid (resampled | original), region, dice, hd95,
  assd, nsd (mm for the distances), note (why a case has no original-grid numbers);
- ``summary.json``: :func:`~crf_rnn_3d.experiments.report_stats.summarise`: per grid, metric,
  region and variant n, mean, SD, median; per comparison with the first (baseline) variant the
  mean difference with its CI, the paired t-test and the Wilcoxon test with their
  Holm-adjusted p-values, Cohen's d_z with its CI and the cases needed for the target power;
  the Holm family; the cases without original-grid numbers and why;
- ``report.md``: the paper's table layout (method x region, Dice mean +- SD) with the paper's
  own numbers beside ours, every metric on both grids, the tests, the conventions, the plots;
- ``box_<metric>.png`` (one per metric: a box per variant with each case's paired values
  joined, a panel per grid and region) and ``example_<case>.png`` overlays (the slice with
  most foreground: image, label and each variant's prediction outlines);
- ``config.yaml``: the resolved config.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.datasets.io import atomic_folder
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.cli import hydra_app, run_stage
from crf_rnn_3d.experiments.evaluate import METRICS, Evaluation, table_rows, write_table
from crf_rnn_3d.experiments.report_figures import plot_examples, plot_metric
from crf_rnn_3d.experiments.report_markdown import markdown
from crf_rnn_3d.experiments.report_stats import paired_tests, summarise

__all__ = ["ReportResult", "collect", "new_report_folder", "paired_tests", "report", "summarise"]


@dataclass
class ReportResult:
    """Where the report went and what it says (``summary`` as in summary.json)."""

    folder: Path
    summary: dict


def collect(cfg: Mapping) -> tuple[list[dict], dict, dict]:
    """Rows of every run's per-case table (``evaluate.CSV_COLUMNS``: one per case, grid, region,
    NaN where a case has no original-grid numbers), {"fold k / variant / case": why} for those,
    and the conventions the runs were scored with ({nsd_tolerance_mm, empty_dice}).
    DataError listing the runs that have no ``evaluation.json`` (train and evaluate them first),
    naming one written before the surface metrics (evaluate it again) or one scored with other
    conventions than the rest."""
    rows, missing, unavailable, conventions = [], [], {}, {}
    splits = common.load_splits(cfg)
    regions = [str(r) for r in common.plain(cfg["data"]["regions"])]
    for fold in range(len(splits)):
        for variant in common.variant_names(cfg):
            path = common.run_dir(cfg, fold, variant) / "evaluation.json"
            if not path.is_file():
                missing.append(str(path))
                continue
            saved = json.loads(path.read_text())
            if "metrics" not in saved:
                raise DataError(
                    str(path), "per-case surface metrics (an evaluation of this version)",
                    f"Dice only; run python -m crf_rnn_3d.experiments.evaluate fold={fold} "
                    f"variant={variant} again",
                )  # fmt: skip
            used = {"nsd_tolerance_mm": saved.get("nsd_tolerance_mm"),
                    "empty_dice": saved.get("empty_dice")}  # fmt: skip
            if conventions and used != conventions:
                raise DataError(str(path), f"the conventions of the other runs, {conventions}",
                                f"{used}; evaluate every run with one setting")  # fmt: skip
            conventions = used
            for case in splits[fold]["val"]:
                if case not in saved["metrics"]:
                    raise DataError(str(path), f"metrics for held-out case {case}", "none")
            run = Evaluation(path.parent, fold, variant, saved["dice"],
                             {c: saved["metrics"][c] for c in splits[fold]["val"]},
                             saved.get("original_unavailable", {}))  # fmt: skip
            rows += table_rows(run, regions)
            for case, why in run.original_unavailable.items():
                unavailable[f"fold {fold} / {variant} / {case}"] = why
    if missing:
        raise DataError(
            missing[0], "evaluation.json of every (fold, variant) run (train them first)",
            f"{len(missing)} missing: {missing[:4]}",
        )  # fmt: skip
    return rows, unavailable, conventions


def new_report_folder(cfg: Mapping) -> Path:
    """``<reports_dir>/<name>/<UTC timestamp>`` that does not exist yet (suffix -2, -3, ...)."""
    root = Path(str(cfg["reports_dir"])) / str(cfg["name"])
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    folder, k = root / stamp, 1
    while folder.exists():
        k += 1
        folder = root / f"{stamp}-{k}"
    return folder


def report(cfg: DictConfig | Mapping) -> ReportResult:
    """Writes the report of the config's runs (see the module docstring); returns its folder
    and summary. Raises DataError when a run has not been evaluated."""
    rows, unavailable, conventions = collect(cfg)
    variants = common.variant_names(cfg)
    labels = {v: str(cfg["variants"][v].get("label", v)) for v in variants}
    rcfg = cfg["report"]
    alpha = common.real("report.alpha", rcfg["alpha"], positive=True)
    power = common.real("report.power", rcfg.get("power", 0.8), positive=True)
    for name, value in (("report.alpha", alpha), ("report.power", power)):
        if not value < 1:
            raise ConfigError(name, "a probability in (0, 1)", value)
    summary = summarise(rows, variants, alpha, power)
    summary["paper"] = common.plain(rcfg.get("paper"))
    summary["original_unavailable"] = unavailable
    summary["conventions"] = conventions
    folder = new_report_folder(cfg)
    with atomic_folder(folder) as tmp:
        write_table(rows, tmp / "per_case.csv")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        figures = {m: f"box_{m}.png" for m in METRICS}
        for metric, name in figures.items():
            plot_metric(rows, variants, labels, metric, tmp / name)
        images = plot_examples(cfg, rows, tmp)
        (tmp / "report.md").write_text(markdown(cfg, summary, figures, images))
        cfg_obj = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(dict(cfg))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg_obj, resolve=True))
    return ReportResult(folder, summary)


@hydra_app("config")
def main(cfg: DictConfig) -> None:
    result = run_stage(report, cfg)
    print((result.folder / "report.md").read_text())
    print(f"report: {result.folder}")


if __name__ == "__main__":
    main()
