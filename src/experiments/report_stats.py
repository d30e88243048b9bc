"""The report's statistics (scipy.stats only; no files are read or written here).

Per grid, metric, region and variant: n, mean, sample SD (ddof 1), median. Per grid, metric,
region and variant against the baseline (the first variant), on the cases that have a value
for every variant, the paired comparison of :func:`paired_tests`:

- the mean difference (other - baseline) and its 1 - alpha confidence interval (t, n - 1 dof);
- the paired t-test (``scipy.stats.ttest_rel``, two-sided) and the Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, two-sided, zero differences dropped, scipy's default method);
- Cohen's d_z = mean(d) / SD(d) with its exact 1 - alpha confidence interval, found by
  inverting the noncentral t distribution of the observed t = d_z sqrt(n)
  (:func:`dz_confidence_interval`);
- the number of cases a paired t-test (two-sided, level alpha) needs to reach the target power
  if the true effect were the observed d_z (:func:`cases_for_power`, noncentral t).

Across the report, :func:`holm` adjusts the p-values of one test for the family of every
comparison of that test in the report (grid x metric x region x variant against the baseline;
the t-test and the Wilcoxon test are two families of the same size); see :func:`summarise`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

# the metrics of crf_rnn_3d.experiments.metrics and which way is better
METRICS = ("dice", "hd95", "assd", "nsd")
HIGHER_IS_BETTER = {"dice": True, "hd95": False, "assd": False, "nsd": True}
MAX_CASES = 1_000_000  # cases_for_power gives up (None) beyond this


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their input order.

    The m defined p-values sorted p_(1) <= ... <= p_(m) become
    max_{j <= i} min(1, (m - j + 1) p_(j)); NaN entries (tests that could not be computed) stay
    NaN and are not counted in m. Rejecting where the adjusted p < alpha controls the
    family-wise error rate at alpha.
    """
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(x) for x in out]


def cohen_dz(d: np.ndarray) -> float:
    """mean(d) / SD(d) (ddof 1) of paired differences; NaN when n < 2 or SD is 0."""
    d = np.asarray(d, float)
    if d.size < 2 or not np.std(d) > 0:
        return math.nan
    return float(d.mean() / d.std(ddof=1))


def _ncp_where_cdf_is(t: float, df: int, target: float) -> float:
    """The noncentrality delta with P(T <= t) = target for T ~ noncentral t(df, delta); the
    cdf falls from 1 to 0 as delta grows, so a bracket widened until it changes sign holds
    exactly one root."""

    def f(delta: float) -> float:
        p = float(stats.nct.cdf(t, df, delta))
        if math.isnan(p):  # scipy's cdf gives NaN far in a tail (t = -70, df = 1, delta = 9);
            p = float(stats.nct.sf(-t, df, -delta))  # the same probability, by symmetry
        if math.isnan(p):
            raise ValueError(f"noncentral t cdf undefined at t = {t}, df = {df}, delta = {delta}")
        return p - target

    width = 10.0
    lo, hi = t - width, t + width
    while f(lo) < 0 or f(hi) > 0:
        width *= 2
        lo, hi = t - width, t + width
        if width > 1e6:
            raise ValueError(f"no noncentrality found for t = {t}, df = {df}")
    return float(optimize.brentq(f, lo, hi, xtol=1e-10, rtol=1e-12))


def dz_confidence_interval(dz: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact 1 - alpha confidence interval of Cohen's d_z from n pairs.

    t = d_z sqrt(n) follows the noncentral t with n - 1 degrees of freedom and noncentrality
    delta = d_z(true) sqrt(n). The interval's ends are the deltas under which the observed t
    is the 1 - alpha/2 and the alpha/2 quantile, divided by sqrt(n). (At d_z = 0 this is
    +- z_{1-alpha/2} / sqrt(n), since P(T <= 0) = Phi(-delta) exactly.) NaN when undefined.
    """
    if not math.isfinite(dz) or n < 2:
        return math.nan, math.nan
    t, df, root = dz * math.sqrt(n), n - 1, math.sqrt(n)
    low = _ncp_where_cdf_is(t, df, 1 - alpha / 2)
    high = _ncp_where_cdf_is(t, df, alpha / 2)
    return low / root, high / root


def paired_t_power(dz: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level alpha with n pairs when the true
    standardised effect is ``dz``: P(|T| > t_{1-alpha/2, n-1}), T ~ noncentral t(n - 1,
    dz sqrt(n))."""
    if n < 2:
        return math.nan
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    ncp = dz * math.sqrt(n)
    return float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))


def cases_for_power(dz: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """The smallest n >= 2 with :func:`paired_t_power` (dz, n, alpha) >= ``power``; None when
    d_z is 0 or undefined, or more than MAX_CASES would be needed. The power grows with n, so
    the answer is bracketed by doubling and then bisected."""
    if not math.isfinite(dz) or dz == 0:
        return None
    if paired_t_power(dz, 2, alpha) >= power:
        return 2
    lo, hi = 2, 4  # power(lo) < target
    while paired_t_power(dz, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > MAX_CASES:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if paired_t_power(dz, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def paired_tests(
    baseline: np.ndarray, other: np.ndarray, alpha: float = 0.05, power: float = 0.8
) -> dict:
    """Paired comparison of ``other`` against ``baseline`` (same cases, same order), [n] each.

    Returns n, mean_difference (other - baseline), ci_low / ci_high (the 1 - alpha interval of
    the mean difference, t with n - 1 dof), t and p_ttest (scipy.stats.ttest_rel, two-sided),
    w and p_wilcoxon (scipy.stats.wilcoxon, two-sided; NaN when every difference is zero or
    n < 2), d_z with dz_ci_low / dz_ci_high (:func:`dz_confidence_interval`) and
    cases_for_power (:func:`cases_for_power` at ``power``). Statistics that are undefined
    (n < 2, zero variance) are NaN (None for cases_for_power).
    """
    a = np.asarray(baseline, float)
    b = np.asarray(other, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired_tests needs two [n] arrays of one shape; got {a.shape}, {b.shape}"
        )
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("paired_tests: the values must be finite (drop incomplete cases first)")
    d = b - a
    n = int(d.size)
    nan = math.nan
    out = {"n": n, "mean_difference": float(d.mean()) if n else nan}
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
    dz = cohen_dz(d)
    low, high = dz_confidence_interval(dz, n, alpha)
    out.update(d_z=dz, dz_ci_low=low, dz_ci_high=high,
               cases_for_power=cases_for_power(dz, alpha, power))  # fmt: skip
    return out


def _complete(values: dict, variants: list[str], case: str) -> bool:
    return all(math.isfinite(values[v].get(case, math.nan)) for v in variants)


def _describe(x: np.ndarray) -> dict:
    return {
        "n": int(x.size),
        "mean": float(x.mean()) if x.size else math.nan,
        "std": float(x.std(ddof=1)) if x.size > 1 else math.nan,
        "median": float(np.median(x)) if x.size else math.nan,
    }


def summarise(
    rows: list[dict],
    variants: list[str],
    alpha: float,
    power: float = 0.8,
    metrics: Sequence[str] = METRICS,
) -> dict:
    """The statistics of the report from per-case rows {case, variant, grid, region, <metric>}
    (a metric NaN where it is not available, e.g. no original label).

    Returns {baseline, alpha, power, metrics, family, grids: {grid: {metric: {region:
    {variants: {v: {n, mean, std, median}}, tests: {v: paired_tests + p_ttest_holm,
    p_wilcoxon_holm}, cases: [...], excluded: [...]}}}}}. Descriptives and tests use the cases
    with a finite value for every variant (the paired set); ``excluded`` lists the others.
    ``family`` states the Holm family: every (grid, metric, region, variant) test of the report,
    one family per test kind.
    """
    out: dict = {"baseline": variants[0], "alpha": alpha, "power": power,
                 "metrics": list(metrics), "grids": {}}  # fmt: skip
    grids = list(dict.fromkeys(r["grid"] for r in rows))
    regions = list(dict.fromkeys(r["region"] for r in rows))
    family = []  # the tests entries, in report order
    for grid in grids:
        out["grids"][grid] = {}
        for metric in metrics:
            per_metric = {}
            for region in regions:
                values = {v: {} for v in variants}
                for r in rows:
                    if r["grid"] == grid and r["region"] == region and r["variant"] in values:
                        values[r["variant"]][r["case"]] = float(r[metric])
                all_cases = sorted(set().union(*(set(x) for x in values.values())))
                cases = [c for c in all_cases if _complete(values, variants, c)]
                entry: dict = {
                    "cases": cases,
                    "excluded": [c for c in all_cases if c not in cases],
                    "variants": {},
                    "tests": {},
                }
                for v in variants:
                    entry["variants"][v] = _describe(np.array([values[v][c] for c in cases]))
                base = np.array([values[variants[0]][c] for c in cases])
                for v in variants[1:]:
                    test = paired_tests(base, np.array([values[v][c] for c in cases]), alpha, power)
                    entry["tests"][v] = test
                    family.append(test)
                per_metric[region] = entry
            out["grids"][grid][metric] = per_metric
    for kind in ("p_ttest", "p_wilcoxon"):
        for test, adjusted in zip(family, holm([t[kind] for t in family]), strict=True):
            test[f"{kind}_holm"] = adjusted
    out["family"] = {
        "size": len(family),
        "defined_ttest": sum(not math.isnan(t["p_ttest"]) for t in family),
        "defined_wilcoxon": sum(not math.isnan(t["p_wilcoxon"]) for t in family),
        "description": (
            f"every comparison with the baseline in this report: {len(grids)} grid(s) x "
            f"{len(metrics)} metric(s) x {len(regions)} region(s) x {len(variants) - 1} "
            "variant(s); Holm is applied to the t-test p-values and to the Wilcoxon p-values "
            "separately, each over this family (tests that could not be computed are left out)"
        ),
    }
    return out
