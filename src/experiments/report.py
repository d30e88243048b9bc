"""The comparison report: ``python -m crf_rnn_3d.experiments.report [experiment=...]``.

:func:`report` collects ``evaluation.json`` of every (fold, variant) run of the config (each
case predicted by the model of the fold that did not see it), and writes a new folder
``<results_dir>/<name>/<UTC timestamp>/`` (built under a temporary name, then renamed; never
overwritten) with:

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
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from crf_rnn_3d import CONFIG_PATH
from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.errors import DataError
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.cli import run_stage


@dataclass
class ReportResult:
    """Where the report went and what it says (``summary`` as in summary.json)."""

    folder: Path
    summary: dict


def paired_tests(baseline: np.ndarray, other: np.ndarray, alpha: float = 0.05) -> dict:
    """Paired comparison of ``other`` against ``baseline`` (same cases, same order), [n] each.

    Returns n, mean_difference (other - baseline), ci_low / ci_high (the 1 - alpha interval of
    the mean difference, t with n - 1 dof), t and p_ttest (scipy.stats.ttest_rel, two-sided),
    w and p_wilcoxon (scipy.stats.wilcoxon, two-sided; NaN when every difference is zero or
    n < 2). Statistics that are undefined (n < 2, zero variance) are NaN.
    """
    a = np.asarray(baseline, float)
    b = np.asarray(other, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired_tests needs two [n] arrays of one shape; got {a.shape}, {b.shape}"
        )
    d = b - a
    n = int(d.size)
    out = {"n": n, "mean_difference": float(d.mean()) if n else math.nan}
    nan = math.nan
    if n >= 2 and np.std(d) > 0:
        half = stats.t.ppf(1 - alpha / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
        t, p = stats.ttest_rel(b, a)
        out.update(ci_low=float(d.mean() - half), ci_high=float(d.mean() + half),
                   t=float(t), p_ttest=float(p))  # fmt: skip
    else:
        out.update(ci_low=nan, ci_high=nan, t=nan, p_ttest=nan)
    if n >= 2 and np.any(d != 0):
        w = stats.wilcoxon(b, a)
        out.update(w=float(w.statistic), p_wilcoxon=float(w.pvalue))
    else:
        out.update(w=nan, p_wilcoxon=nan)
    return out


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


def summarise(rows: list[dict], variants: list[str], alpha: float) -> dict:
    """Per region: per variant statistics and the paired tests against ``variants[0]``."""
    out: dict = {"baseline": variants[0], "alpha": alpha, "regions": {}}
    regions = list(dict.fromkeys(r["region"] for r in rows))
    for region in regions:
        per_variant = {}
        for v in variants:
            by_case = {
                r["case"]: r["dice"] for r in rows if r["region"] == region and r["variant"] == v
            }
            per_variant[v] = by_case
        cases = sorted(per_variant[variants[0]])
        entry: dict = {"variants": {}, "tests": {}}
        for v in variants:
            x = np.array([per_variant[v][c] for c in cases])
            entry["variants"][v] = {
                "n": len(x), "mean": float(x.mean()),
                "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
                "median": float(np.median(x)),
            }  # fmt: skip
        base = np.array([per_variant[variants[0]][c] for c in cases])
        for v in variants[1:]:
            entry["tests"][v] = paired_tests(
                base, np.array([per_variant[v][c] for c in cases]), alpha
            )
        out["regions"][region] = entry
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.3f}"


def markdown(cfg: Mapping, summary: dict, images: list[str]) -> str:
    """report.md: the paper's table layout with its numbers, the tests, the figures."""
    variants = common.variant_names(cfg)
    labels = {v: str(cfg["variants"][v].get("label", v)) for v in variants}
    paper = common.plain(cfg["report"].get("paper")) or {}
    regions = list(summary["regions"])
    level = round(100 * (1 - summary["alpha"]))
    n = summary["regions"][regions[0]]["variants"][variants[0]]["n"] if regions else 0
    lines = [
        f"# {cfg['name']}: {' vs '.join(labels.values())} on {cfg['data']['name']}",
        "",
        f"{n} held-out cases ({len(common.load_splits(cfg))} fold(s) of "
        f"{cfg['data']['split']['scheme']}), {cfg['train']['steps']} steps per run. "
        "Dice, mean ± SD over cases (SD with ddof 1).",
        "",
        "| Method | " + " | ".join(f"{r} (this run) | {r} (paper)" for r in regions) + " |",
        "|---|" + "---|---|" * len(regions),
    ]
    for v in variants:
        cells = []
        for r in regions:
            s = summary["regions"][r]["variants"][v]
            ours = f"{_fmt(s['mean'])} ± {_fmt(s['std'])}"
            ref = paper.get(r, {}).get(v)
            theirs = "–"
            if ref and ref.get("mean") is not None:
                std = ref.get("std")
                theirs = f"{ref['mean']:.3f}" + ("" if std is None else f" ± {std:.3f}")
            cells += [ours, theirs]
        lines.append(f"| {labels[v]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Paired comparison against {labels[variants[0]]} (difference = other − baseline):",
        "",
        f"| Region | Method | mean difference | {level}% CI | t | p (paired t-test) | "
        "W | p (Wilcoxon) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in regions:
        for v, t in summary["regions"][r]["tests"].items():
            lines.append(
                f"| {r} | {labels[v]} | {_fmt(t['mean_difference'], 4)} | "
                f"[{_fmt(t['ci_low'], 4)}, {_fmt(t['ci_high'], 4)}] | {_fmt(t['t'], 3)} | "
                f"{_p(t['p_ttest'])} | {_fmt(t['w'], 1)} | {_p(t['p_wilcoxon'])} |"
            )
    alpha = summary["alpha"]
    for r in regions:
        for v, t in summary["regions"][r]["tests"].items():
            p = t["p_ttest"]
            verdict = (
                "not computable" if math.isnan(p)
                else f"significant at alpha = {alpha}" if p < alpha
                else f"not significant at alpha = {alpha}"
            )  # fmt: skip
            lines.append(f"\n{r}, {labels[v]}: the paired t-test difference is {verdict}.")
    if paper:
        lines.append(
            "\nThe paper's numbers (Monteiro et al. 2018) are on the real data at full size; "
            "they are printed for comparison of the layout and magnitude only."
        )
    lines += ["", "![Dice per case](dice.png)", ""]
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _plot_dice(rows: list[dict], variants: list[str], labels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = list(dict.fromkeys(r["region"] for r in rows))
    fig, axes = plt.subplots(1, len(regions), figsize=(2.2 + 1.6 * len(variants) * len(regions), 4))
    axes = np.atleast_1d(axes)
    for ax, region in zip(axes, regions, strict=True):
        cases = sorted({r["case"] for r in rows if r["region"] == region})
        data = []
        for v in variants:
            by_case = {
                r["case"]: r["dice"] for r in rows if r["region"] == region and r["variant"] == v
            }
            data.append([by_case[c] for c in cases])
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(variants) + 1), [labels[v] for v in variants])
        arr = np.array(data)
        for j in range(arr.shape[1]):
            ax.plot(range(1, len(variants) + 1), arr[:, j], "-o", color="0.4", alpha=0.5, ms=3)
        ax.set_title(region)
        ax.set_ylabel("Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_examples(cfg: Mapping, rows: list[dict], folder: Path) -> list[str]:
    """Overlay PNGs of the lowest, median and highest baseline-Dice cases (example_cases)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = common.variant_names(cfg)
    labels = {v: str(cfg["variants"][v].get("label", v)) for v in variants}
    region = rows[0]["region"]
    base = sorted(
        (r["dice"], r["case"], r["fold"]) for r in rows
        if r["variant"] == variants[0] and r["region"] == region
    )  # fmt: skip
    count = min(int(cfg["report"]["example_cases"]), len(base))
    picks = [base[round(i * (len(base) - 1) / max(1, count - 1))] for i in range(count)]
    processed = common.processed_dir(cfg)
    manifest = cache.load_manifest(processed) or {"cases": {}}
    names = []
    colours = ["tab:red", "tab:blue", "tab:orange", "tab:purple"]
    for _, case, fold in dict.fromkeys(picks):
        image, label, _ = cache.read_case(processed / manifest["cases"][case]["file"])
        z = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(1)))
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(image[z, :, :, 0], cmap="gray")
        ax.contour(label[z] > 0, levels=[0.5], colors="lime", linewidths=1.5)
        handles = [plt.Line2D([], [], color="lime", label="label")]
        for v, colour in zip(variants, colours, strict=False):
            with np.load(common.run_dir(cfg, fold, v) / "predictions" / f"{case}.npz") as f:
                pred = f["label"]
            if np.any(pred[z] > 0):
                ax.contour(pred[z] > 0, levels=[0.5], colors=colour, linewidths=1.0)
            d = next(r["dice"] for r in rows if r["case"] == case and r["variant"] == v
                     and r["region"] == region)  # fmt: skip
            handles.append(plt.Line2D([], [], color=colour, label=f"{labels[v]} ({d:.3f})"))
        ax.legend(handles=handles, loc="lower right", fontsize=8)
        ax.set_title(f"{case} (fold {fold}), slice z={z}")
        ax.axis("off")
        name = f"example_{case}.png"
        fig.savefig(folder / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    return names


def new_report_folder(cfg: Mapping) -> Path:
    """``<results_dir>/<name>/<UTC timestamp>`` that does not exist yet (suffix -2, -3, ...)."""
    root = Path(str(cfg["results_dir"])) / str(cfg["name"])
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
    tmp = folder.with_name(f".tmp-{os.getpid()}-{folder.name}")
    tmp.mkdir(parents=True)
    try:
        with open(tmp / "per_case.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["fold", "case", "variant", "region", "dice"])
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        _plot_dice(rows, variants, labels, tmp / "dice.png")
        images = _plot_examples(cfg, rows, tmp)
        (tmp / "report.md").write_text(markdown(cfg, summary, images))
        cfg_obj = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(dict(cfg))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg_obj, resolve=True))
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return ReportResult(folder, summary)


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = run_stage(report, cfg)
    print((result.folder / "report.md").read_text())
    print(f"report: {result.folder}")


if __name__ == "__main__":
    main()
