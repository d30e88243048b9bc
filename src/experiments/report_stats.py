"""The report's statistics: per region and variant n, mean, sample SD, median, and the paired
comparison of each variant with the baseline (mean difference, its t confidence interval, the
paired t-test and the Wilcoxon signed-rank test). Dice values in [0, 1]; no files are read or
written here."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


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
