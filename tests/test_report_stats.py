"""The report's statistics against values worked out by hand, textbook sample sizes and an
independent computation of the noncentral t distribution (an integral over the chi-square
distribution with scipy.integrate, not scipy.stats.nct)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import chi2, norm
from scipy.stats import t as student

from crf_rnn_3d.experiments.report_stats import (
    cases_for_power,
    cohen_dz,
    dz_confidence_interval,
    holm,
    paired_t_power,
    paired_tests,
    summarise,
)


def nct_cdf(t: float, df: int, delta: float) -> float:
    """P(T <= t) for T = (Z + delta) / sqrt(V / df), Z normal, V chi-square(df): the mean over
    V of Phi(t sqrt(V / df) - delta)."""
    value, _ = integrate.quad(
        lambda v: norm.cdf(t * math.sqrt(v / df) - delta) * chi2.pdf(v, df), 0, np.inf,
        epsabs=1e-12, epsrel=1e-10, limit=200,
    )  # fmt: skip
    return value


def power_by_integration(dz: float, n: int, alpha: float = 0.05) -> float:
    """P(|T| > t_{1 - alpha/2}(n - 1)) under the noncentrality dz sqrt(n), via nct_cdf."""
    df = n - 1
    crit = student.ppf(1 - alpha / 2, df)
    delta = dz * math.sqrt(n)
    return 1 - nct_cdf(crit, df, delta) + nct_cdf(-crit, df, delta)


def test_holm_hand_values():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN is left out of the family (m = 2) and stays NaN
    got = holm([0.02, math.nan, 0.01])
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1]) and got[2] == pytest.approx(0.02)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, then monotone
    assert holm([0.01]) == [0.01] and holm([]) == []


def test_cohen_dz_and_its_interval():
    # d = 0.1, 0.2, 0.3: mean 0.2, SD 0.1 -> d_z = 2
    assert cohen_dz(np.array([0.1, 0.2, 0.3])) == pytest.approx(2.0)
    assert math.isnan(cohen_dz(np.array([0.1, 0.1]))) and math.isnan(cohen_dz(np.array([1.0])))
    # observed d_z = 0: P(T <= 0) = Phi(-delta) exactly, so the ends are +- z_0.975 / sqrt(n)
    d = np.array([1.0, -1.0, 2.0, -2.0])
    assert cohen_dz(d) == 0.0
    low, high = dz_confidence_interval(0.0, 4, 0.05)
    assert low == pytest.approx(-1.959964 / 2, abs=1e-6)
    assert high == pytest.approx(1.959964 / 2, abs=1e-6)
    # d_z = 2 from n = 3: at the ends the observed t = 2 sqrt(3) is the 97.5% and 2.5% point
    low, high = dz_confidence_interval(2.0, 3, 0.05)
    t = 2 * math.sqrt(3)
    assert nct_cdf(t, 2, low * math.sqrt(3)) == pytest.approx(0.975, abs=1e-6)
    assert nct_cdf(t, 2, high * math.sqrt(3)) == pytest.approx(0.025, abs=1e-6)
    assert low < 2.0 < high
    # n = 2 with two nearly equal differences (a demo_brats run): t = -70.6 on 1 degree of
    # freedom, where scipy's nct.cdf is NaN for part of the bracket; the ends still satisfy
    # the integral
    dz = float(cohen_dz(np.array([-0.07986609279398563, -0.07763581917985558])))
    low, high = dz_confidence_interval(dz, 2, 0.05)
    t = dz * math.sqrt(2)
    assert t == pytest.approx(-70.62, abs=0.01)
    assert nct_cdf(t, 1, low * math.sqrt(2)) == pytest.approx(0.975, abs=1e-6)
    assert nct_cdf(t, 1, high * math.sqrt(2)) == pytest.approx(0.025, abs=1e-6)
    assert low < dz < high
    # large n: close to the normal approximation d_z +- z sqrt(1/n + d_z^2 / (2n))
    low, high = dz_confidence_interval(0.5, 400, 0.05)
    half = 1.959964 * math.sqrt(1 / 400 + 0.25 / 800)
    assert low == pytest.approx(0.5 - half, abs=0.005)
    assert high == pytest.approx(0.5 + half, abs=0.005)


def test_cases_for_80_percent_power_match_the_textbook():
    # paired t-test, two-sided, alpha 0.05, power 0.8 (Cohen 1988; G*Power): 34 and 15 pairs
    assert cases_for_power(0.5) == 34 and cases_for_power(-0.5) == 34
    assert cases_for_power(0.8) == 15
    for dz, n in ((0.5, 34), (0.8, 15)):
        assert power_by_integration(dz, n) >= 0.8 > power_by_integration(dz, n - 1)
        assert paired_t_power(dz, n) == pytest.approx(power_by_integration(dz, n), abs=1e-6)
    assert cases_for_power(0.0) is None and cases_for_power(math.nan) is None
    assert cases_for_power(1e-4) is None  # beyond the search limit
    assert cases_for_power(5.0) == 3  # huge effect: power(2) < 0.8 (1 dof), power(3) above
    assert paired_t_power(5.0, 2) < 0.8 <= paired_t_power(5.0, 3)


def test_wilcoxon_and_t_hand_case():
    # differences 1, -2, 3, 4, 5: ranks 1..5, W+ = 13, W- = 2 -> W = 2; exact two-sided p =
    # 2 P(W <= 2) = 2 x 3 / 32 (the subsets {}, {1}, {2} of the ranks sum to <= 2)
    base = np.zeros(5)
    out = paired_tests(base, np.array([1.0, -2.0, 3.0, 4.0, 5.0]))
    assert out["w"] == 2.0 and out["p_wilcoxon"] == pytest.approx(0.1875)
    # mean 2.2, SD sqrt(7.7): d_z = 2.2 / sqrt(7.7), t = d_z sqrt(5)
    dz = 2.2 / math.sqrt(7.7)
    assert out["d_z"] == pytest.approx(dz) and out["t"] == pytest.approx(dz * math.sqrt(5))
    assert out["dz_ci_low"] < dz < out["dz_ci_high"]
    assert out["cases_for_power"] == cases_for_power(dz)
    with pytest.raises(ValueError, match="finite"):
        paired_tests(base, np.array([1.0, math.nan, 3.0, 4.0, 5.0]))


def _rows(values: dict) -> list[dict]:
    """{(grid, variant): [per-case dice]} -> rows with hd95 = 10 x (1 - dice)."""
    rows = []
    for (grid, variant), xs in values.items():
        for i, x in enumerate(xs):
            rows.append({"case": f"c{i}", "variant": variant, "grid": grid, "region": "r",
                         "dice": x, "hd95": 10 * (1 - x)})  # fmt: skip
    return rows


def test_summary_family_holm_and_incomplete_cases():
    nan = math.nan
    rows = _rows({
        ("resampled", "a"): [0.70, 0.80, 0.60, 0.75],
        ("resampled", "b"): [0.74, 0.81, 0.66, 0.80],
        ("original", "a"): [0.68, 0.79, 0.61, nan],  # c3 has no original label
        ("original", "b"): [0.71, 0.82, 0.62, nan],
    })  # fmt: skip
    s = summarise(rows, ["a", "b"], 0.05, 0.8, metrics=("dice", "hd95"))
    assert s["family"]["size"] == 4  # 2 grids x 2 metrics x 1 region x 1 comparison
    res, orig = s["grids"]["resampled"]["dice"]["r"], s["grids"]["original"]["dice"]["r"]
    assert res["variants"]["a"]["n"] == 4 and orig["variants"]["a"]["n"] == 3
    assert orig["excluded"] == ["c3"]
    assert orig["variants"]["a"]["mean"] == pytest.approx((0.68 + 0.79 + 0.61) / 3)
    # by hand: resampled differences 0.04, 0.01, 0.06, 0.05 (mean 0.04)
    assert res["tests"]["b"]["mean_difference"] == pytest.approx(0.04)
    # the Holm-adjusted p-values, recomputed here from the four raw ones
    tests = [s["grids"][g][m]["r"]["tests"]["b"] for g in ("resampled", "original")
             for m in ("dice", "hd95")]  # fmt: skip
    raw = [t["p_ttest"] for t in tests]
    order = sorted(range(4), key=lambda i: raw[i])
    expect, running = [0.0] * 4, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (4 - k) * raw[i]))
        expect[i] = running
    assert [t["p_ttest_holm"] for t in tests] == pytest.approx(expect)
    # hd95 = 10 (1 - dice): the same test, the sign of the difference and of d_z reversed
    h = s["grids"]["resampled"]["hd95"]["r"]["tests"]["b"]
    assert h["p_ttest"] == pytest.approx(res["tests"]["b"]["p_ttest"])
    assert h["d_z"] == pytest.approx(-res["tests"]["b"]["d_z"])
