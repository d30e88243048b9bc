"""The report's ``report.md``: the paper's table layout (method x region, Dice mean ± SD on the
resampled grid) with the paper's own numbers beside ours, every metric on both grids, the
paired tests with their Holm-adjusted p-values, effect sizes and the cases needed for the
target power, the conventions, and the figures.

With ``report.paper_table`` set (``{title, regions, note}``), a section in the layout of one of
the paper's tables takes the place of the first table: one row per variant, for each listed
region our Dice (mean ± SD on the resampled grid) beside the paper's; a number the paper does
not give is "n/a" (:func:`paper_table_section`; cross_validate prints it again at the end)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from crf_rnn_3d.datasets.errors import ConfigError
from crf_rnn_3d.experiments import common

METRIC_NAMES = {"dice": "Dice", "hd95": "HD95 (mm)", "assd": "ASSD (mm)", "nsd": "NSD"}
GRID_NAMES = {
    "resampled": "resampled grid (the preprocessed, cropped volume the network sees; as the paper)",
    "original": "original grid (the prediction mapped back to the source scan, against the "
    "original label file; as the challenges)",
}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.3f}"


def _paper_table(summary: dict, variants: list[str], labels: dict, paper: dict) -> list[str]:
    dice = summary["grids"]["resampled"]["dice"]
    regions = list(dice)
    lines = [
        "| Method | " + " | ".join(f"{r} (this run) | {r} (paper)" for r in regions) + " |",
        "|---|" + "---|---|" * len(regions),
    ]
    return lines + _dice_rows(dice, regions, variants, labels, paper, sd_shown=False)


def _paper_number(ref: Mapping | None, sd_shown: bool = True) -> str:
    """The paper's "mean ± SD" of one cell; "n/a" for what it does not give (an absent SD is
    left out instead when not sd_shown)."""
    mean = None if not ref else ref.get("mean")
    if mean is None:
        return "n/a"
    std = None if ref.get("std") is None else float(ref["std"])
    if std is None and not sd_shown:
        return _fmt(float(mean))
    return f"{_fmt(float(mean))} ± {_fmt(std)}"


def _dice_rows(
    dice: dict, regions: list, variants: list, labels: dict, paper: Mapping, sd_shown: bool
) -> list[str]:
    """One table row per variant: for each region this run's Dice mean ± SD beside the paper's
    (:func:`_paper_number`)."""
    rows = []
    for v in variants:
        cells = []
        for r in regions:
            ours = dice[r]["variants"][v]
            cells += [f"{_fmt(ours['mean'])} ± {_fmt(ours['std'])}",
                      _paper_number(paper.get(r, {}).get(v), sd_shown)]  # fmt: skip
        rows.append(f"| {labels[v]} | " + " | ".join(cells) + " |")
    return rows


def paper_table_section(cfg: Mapping, summary: dict) -> list[str]:
    """The lines of the ``report.paper_table`` section (none when it is not set): a title, one
    row per variant, for each region of ``regions`` (in that order) this run's Dice mean ± SD
    (resampled grid, as the paper scored) beside the paper's (``report.paper``; "n/a" where the
    paper gives no mean or no SD), then ``note``. ConfigError naming the setting when it is not
    a mapping with a non-empty ``regions`` list of the report's regions."""
    spec = common.plain(cfg["report"].get("paper_table"))
    if spec is None:
        return []
    if not isinstance(spec, Mapping):
        raise ConfigError("report.paper_table", "a mapping {title, regions, note}", spec)
    dice = summary["grids"]["resampled"]["dice"]
    regions = spec.get("regions")
    if (
        not isinstance(regions, list)
        or not regions
        or any(not isinstance(r, str) or r not in dice for r in regions)
    ):
        expected = f"a non-empty list of the report's regions {list(dice)}"
        raise ConfigError("report.paper_table.regions", expected, regions)
    variants = common.variant_names(cfg)
    labels = {v: str(cfg["variants"][v].get("label", v)) for v in variants}
    paper = common.plain(cfg["report"].get("paper")) or {}
    n = dice[regions[0]]["variants"][variants[0]]["n"]
    title = spec.get("title") or "The paper's table"
    lines = [
        f"## {title}",
        "",
        f"Dice, mean ± SD (ddof 1) over this run's {n} held-out cases on the resampled grid, "
        "beside the paper's; n/a: the paper gives no such number.",
        "",
        "| Method | " + " | ".join(f"{r}: this run | {r}: paper" for r in regions) + " |",
        "|---|" + "---|---|" * len(regions),
    ]
    lines += _dice_rows(dice, regions, variants, labels, paper, sd_shown=True)
    if spec.get("note"):
        lines += ["", str(spec["note"])]
    return lines


def _metric_tables(summary: dict, variants: list[str], labels: dict) -> list[str]:
    lines = []
    for grid, by_metric in summary["grids"].items():
        lines += ["", f"**{GRID_NAMES.get(grid, grid)}**: mean ± SD (median), n cases", ""]
        lines += ["| Metric | Region | n | " + " | ".join(labels[v] for v in variants) + " |",
                  "|---|---|---|" + "---|" * len(variants)]  # fmt: skip
        for metric, by_region in by_metric.items():
            for region, entry in by_region.items():
                cells = []
                for v in variants:
                    s = entry["variants"][v]
                    digits = 3 if metric in ("dice", "nsd") else 2
                    cells.append(f"{_fmt(s['mean'], digits)} ± {_fmt(s['std'], digits)} "
                                 f"({_fmt(s['median'], digits)})")  # fmt: skip
                n = entry["variants"][variants[0]]["n"]
                lines.append(f"| {METRIC_NAMES.get(metric, metric)} | {region} | {n} | "
                             + " | ".join(cells) + " |")  # fmt: skip
    return lines


def _test_table(summary: dict, labels: dict, level: int, power: int) -> list[str]:
    lines = [
        f"| Grid | Metric | Region | Method | n | mean difference | {level}% CI | t | "
        "p (paired t-test) | p Holm (t) | W | p (Wilcoxon) | p Holm (W) | "
        f"d_z [{level}% CI] | cases for {power}% power |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for grid, by_metric in summary["grids"].items():
        for metric, by_region in by_metric.items():
            for region, entry in by_region.items():
                for v, t in entry["tests"].items():
                    need = t["cases_for_power"]
                    lines.append(
                        f"| {grid} | {METRIC_NAMES.get(metric, metric)} | {region} | "
                        f"{labels[v]} | {t['n']} | {_fmt(t['mean_difference'], 4)} | "
                        f"[{_fmt(t['ci_low'], 4)}, {_fmt(t['ci_high'], 4)}] | "
                        f"{_fmt(t['t'], 3)} | {_p(t['p_ttest'])} | {_p(t['p_ttest_holm'])} | "
                        f"{_fmt(t['w'], 1)} | {_p(t['p_wilcoxon'])} | "
                        f"{_p(t['p_wilcoxon_holm'])} | {_fmt(t['d_z'], 2)} "
                        f"[{_fmt(t['dz_ci_low'], 2)}, {_fmt(t['dz_ci_high'], 2)}] | "
                        f"{'n/a' if need is None else need} |"
                    )
    return lines


def _verdicts(summary: dict, labels: dict) -> list[str]:
    alpha = summary["alpha"]
    found = []
    for grid, by_metric in summary["grids"].items():
        for metric, by_region in by_metric.items():
            for region, entry in by_region.items():
                for v, t in entry["tests"].items():
                    p = t["p_ttest_holm"]
                    if not math.isnan(p) and p < alpha:
                        found.append(f"{labels[v]}, {METRIC_NAMES.get(metric, metric)} of "
                                     f"{region} on the {grid} grid (Holm p = {_p(p)})")  # fmt: skip
    if not found:
        return [f"No paired t-test difference is significant at alpha = {alpha} after Holm's "
                "correction over the family."]  # fmt: skip
    return [f"Significant at alpha = {alpha} after Holm's correction (paired t-test): "
            + "; ".join(found) + "."]  # fmt: skip


def conventions(summary: dict, labels: dict) -> list[str]:
    """The conventions paragraph: grids, empty masks, NSD tolerance, Holm family, CIs, power."""
    conv = summary.get("conventions") or {}
    family = summary["family"]
    level = round(100 * (1 - summary["alpha"]))
    tol, empty = conv.get("nsd_tolerance_mm"), conv.get("empty_dice")
    return [
        "## Conventions",
        "",
        "- **Grids.** `resampled`: the prediction against the cached label on the preprocessed "
        "(resampled, cropped) grid, with its voxel spacing, as the paper scored. `original`: "
        "the prediction mapped back to the source scan's grid (undo the crop, resample the "
        "labels back; the map `evaluate.export` writes) against the original label file, with "
        "the source spacing, as the challenges score. A case whose original label could not be "
        "read has no original-grid numbers; it is listed below with the reason and left out "
        "of the original-grid statistics.",
        "- **Metrics.** Dice; HD95 (the larger of the two directed 95th percentiles of the "
        "surface distances) and ASSD (average symmetric surface distance), in mm, with surface "
        "elements weighted by their area; NSD, the normalised surface Dice: the share of both "
        f"surfaces within {_fmt(tol, 2)} mm of the other (`evaluate.nsd_tolerance_mm`).",
        f"- **Empty masks.** Region absent from both prediction and label: Dice {empty}, "
        "HD95 = ASSD = 0, NSD = 1. Absent from exactly one: Dice 0, HD95 = ASSD = the diagonal "
        "of the image in mm, NSD = 0.",
        "- **Tests.** Each variant against the baseline "
        f"({labels[summary['baseline']]}), paired by case, difference = other − baseline (for "
        "HD95 and ASSD a negative difference is an improvement): paired t-test "
        "(`scipy.stats.ttest_rel`) and Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, "
        f"zero differences dropped), both two-sided; the {level}% CI of the mean difference "
        "from the t distribution with n − 1 degrees of freedom.",
        f"- **Holm family.** The family is {family['description']}: {family['size']} comparisons "
        f"({family['defined_ttest']} t-tests and {family['defined_wilcoxon']} Wilcoxon tests "
        "defined).",
        f"- **Effect size.** Cohen's d_z = mean(d) / SD(d); its {level}% CI is exact, from the "
        "noncentral t distribution of t = d_z √n (the noncentralities under which the observed "
        "t is the upper and lower quantile, divided by √n).",
        f"- **Power.** Cases for {round(100 * summary['power'])}% power: the smallest n at "
        f"which a two-sided paired t-test at alpha = {summary['alpha']} rejects with that "
        "probability if the true d_z were the observed one (noncentral t with n − 1 degrees of "
        "freedom and noncentrality d_z √n). It is a planning figure: the observed d_z of a "
        "small sample is itself uncertain (see its CI).",
    ]


def markdown(cfg: Mapping, summary: dict, figures: dict[str, str], images: list[str]) -> str:
    """report.md (see the module docstring). ``figures``: metric -> box-plot file name;
    ``images``: the example overlays' file names."""
    variants = common.variant_names(cfg)
    labels = {v: str(cfg["variants"][v].get("label", v)) for v in variants}
    paper = common.plain(cfg["report"].get("paper")) or {}
    level = round(100 * (1 - summary["alpha"]))
    dice = summary["grids"]["resampled"]["dice"]
    first = next(iter(dice.values()), None)
    n = first["variants"][variants[0]]["n"] if first else 0
    head = (
        f"{n} held-out cases ({len(common.load_splits(cfg))} fold(s) of "
        f"{cfg['data']['split']['scheme']}), {cfg['train']['steps']} steps per run."
    )
    lines = [f"# {cfg['name']}: {' vs '.join(labels.values())} on {cfg['data']['name']}", ""]
    section = paper_table_section(cfg, summary)
    if section:  # the paper's layout takes the place of the generic table
        lines += [head, "", *section]
    else:
        lines += [
            f"{head} Dice on the resampled grid, mean ± SD over cases (SD with ddof 1):",
            "",
            *_paper_table(summary, variants, labels, paper),
        ]
        if paper:
            lines.append(
                "\nThe paper's numbers (Monteiro et al. 2018) are on the real data at full size; "
                "they are printed for comparison of the layout and magnitude only."
            )
    lines += ["", "## Every metric on both grids", *_metric_tables(summary, variants, labels)]
    unavailable = summary.get("original_unavailable") or {}
    lines += ["", "Cases without original-grid numbers: "
              + ("none." if not unavailable else f"{len(unavailable)}:")]  # fmt: skip
    lines += [f"- {key}: {why}" for key, why in sorted(unavailable.items())]
    lines += [
        "",
        f"## Paired comparison against {labels[variants[0]]} (difference = other − baseline)",
        "",
        *_test_table(summary, labels, level, round(100 * summary["power"])),
        "",
        *_verdicts(summary, labels),
        "",
        *conventions(summary, labels),
        "",
        "## Figures",
        "",
    ]
    lines += [
        f"- [{METRIC_NAMES.get(m, m)} per case, paired]({name})" for m, name in figures.items()
    ]
    lines += [""] + [f"![{METRIC_NAMES.get(m, m)} per case]({name})" for m, name in figures.items()]
    lines += [""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"
