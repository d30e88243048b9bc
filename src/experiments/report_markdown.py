"""The report's ``report.md``: the paper's table layout (method x region, Dice mean ± SD) with
the paper's own numbers beside ours, the paired tests, the verdicts and the figures."""

from __future__ import annotations

import math
from collections.abc import Mapping

from crf_rnn_3d.experiments import common


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
