"""The comparison report: ``python -m crf_rnn_3d.experiments.report [experiment=...]``.

This module is the orchestrator and the command line; the pieces are
:mod:`~crf_rnn_3d.experiments.report_stats` (the statistics),
:mod:`~crf_rnn_3d.experiments.report_figures` (matplotlib) and
:mod:`~crf_rnn_3d.experiments.report_markdown` (``report.md``).

:func:`report` collects ``evaluation.json`` of every (fold, variant) run of the config (each
case predicted by the model of the fold that did not see it), and writes a new folder
``<reports_dir>/<name>/<UTC timestamp>/`` (built in full under a temporary name, then renamed by
:func:`crf_rnn_3d.datasets.io.atomic_folder`; never overwritten) with:

- ``per_case.csv``: fold, case, variant, region, dice;
- ``summary.json``: per region and variant n, mean, sample SD (ddof 1), median; per region and
  variant against the first (baseline) variant the paired tests: mean difference, its
  (1 - alpha) confidence interval (t distribution, n - 1 degrees of freedom),
  ``scipy.stats.ttest_rel`` t and p, ``scipy.stats.wilcoxon`` statistic and p (two-sided);
- ``report.md``: the paper's table layout (method x region, Dice mean +- SD) with the paper's
  own numbers beside ours, the tests, the plots;
- ``dice.png`` (box plot with each case's paired dots joined by a line, per region) and
  ``example_<case>.png`` overlays (the slice with most foreground: image, label and each
  variant's prediction outlines);
- ``config.yaml``: the resolved config.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from crf_rnn_3d.datasets.errors import DataError
from crf_rnn_3d.datasets.io import atomic_folder
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.cli import hydra_app, run_stage
from crf_rnn_3d.experiments.report_figures import plot_dice, plot_examples
from crf_rnn_3d.experiments.report_markdown import markdown
from crf_rnn_3d.experiments.report_stats import paired_tests, summarise

__all__ = ["ReportResult", "collect", "new_report_folder", "paired_tests", "report", "summarise"]


@dataclass
class ReportResult:
    """Where the report went and what it says (``summary`` as in summary.json)."""

    folder: Path
    summary: dict


def collect(cfg: Mapping) -> list[dict]:
    """Rows {fold, case, variant, region, dice} of every run's ``evaluation.json``; DataError
    listing the runs that have none (train and evaluate them first)."""
    rows, missing = [], []
    splits = common.load_splits(cfg)
    for fold in range(len(splits)):
        for variant in common.variant_names(cfg):
            path = common.run_dir(cfg, fold, variant) / "evaluation.json"
            if not path.is_file():
                missing.append(str(path))
                continue
            dice = json.loads(path.read_text())["dice"]
            for case in splits[fold]["val"]:
                if case not in dice:
                    raise DataError(str(path), f"a Dice for held-out case {case}", "none")
                for region, value in dice[case].items():
                    rows.append({"fold": fold, "case": case, "variant": variant,
                                 "region": region, "dice": float(value)})  # fmt: skip
    if missing:
        raise DataError(
            missing[0], "evaluation.json of every (fold, variant) run (train them first)",
            f"{len(missing)} missing: {missing[:4]}",
        )  # fmt: skip
    return rows


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
    rows = collect(cfg)
    variants = common.variant_names(cfg)
    labels = {v: str(cfg["variants"][v].get("label", v)) for v in variants}
    summary = summarise(rows, variants, float(cfg["report"]["alpha"]))
    summary["paper"] = common.plain(cfg["report"].get("paper"))
    folder = new_report_folder(cfg)
    with atomic_folder(folder) as tmp:
        with open(tmp / "per_case.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["fold", "case", "variant", "region", "dice"])
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        plot_dice(rows, variants, labels, tmp / "dice.png")
        images = plot_examples(cfg, rows, tmp)
        (tmp / "report.md").write_text(markdown(cfg, summary, images))
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
