"""CI smoke run of the whole chain (experiment=smoke): phantoms -> cache -> 2 folds x 4 variants
trained for a few steps -> evaluation -> report; the report's content is checked against the
per-case numbers recomputed here with scipy."""

import csv
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf
from experiments_fixtures import smoke_config
from scipy import stats

from crf_rnn_3d.experiments.cross_validate import cross_validate
from crf_rnn_3d.experiments.report import report


def test_smoke_chain_report_content(tmp_path):
    cfg = smoke_config(tmp_path, "evaluate.export=true", "evaluate.export_format=.mha")
    result = cross_validate(cfg)
    folder = result.report.folder
    assert folder.parent == tmp_path / "results" / "smoke"
    names = {p.name for p in folder.iterdir()}
    figures = {f"box_{m}.png" for m in ("dice", "hd95", "assd", "nsd")}
    assert {"per_case.csv", "summary.json", "report.md", "config.yaml"} | figures <= names
    assert any(n.startswith("example_") and n.endswith(".png") for n in names)
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(folder / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    splits = json.loads((tmp_path / "processed" / "splits.json").read_text())
    cases = sorted(c for s in splits for c in s["val"])
    assert len(cases) == 4
    for variant in ("vnet", "vnet_crf", "vnet_crf_theta", "vnet_crf_theta_per_case"):
        for grid in ("resampled", "original"):  # the phantoms' source files are all there
            got = sorted(r["case"] for r in rows if r["variant"] == variant and r["grid"] == grid)
            assert got == cases  # every case predicted once, by the fold that did not see it
    for r in rows:
        fold = int(r["fold"])
        assert r["case"] in splits[fold]["val"] and r["note"] == ""
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["nsd"]) <= 1.0
        assert float(r["assd"]) >= 0.0 and float(r["hd95"]) >= 0.0

    def column(variant, grid="resampled", metric="dice"):
        return np.array([float(r[metric]) for r in sorted(rows, key=lambda r: r["case"])
                         if r["variant"] == variant and r["grid"] == grid])  # fmt: skip

    dice = {v: column(v) for v in ("vnet", "vnet_crf")}
    summary = json.loads((folder / "summary.json").read_text())
    region = summary["grids"]["resampled"]["dice"]["prostate"]
    for v, x in dice.items():
        assert region["variants"][v]["mean"] == pytest.approx(x.mean())
        assert region["variants"][v]["std"] == pytest.approx(x.std(ddof=1))
        assert region["variants"][v]["n"] == 4
    test = region["tests"]["vnet_crf"]
    d = dice["vnet_crf"] - dice["vnet"]
    assert test["mean_difference"] == pytest.approx(d.mean())
    if np.std(d) > 0:
        assert test["p_ttest"] == pytest.approx(
            stats.ttest_rel(dice["vnet_crf"], dice["vnet"]).pvalue
        )
        assert test["d_z"] == pytest.approx(d.mean() / d.std(ddof=1))
    # the original grid's HD95 of the learnt-theta variant, recomputed from the CSV
    hd = column("vnet_crf_theta", "original", "hd95") - column("vnet", "original", "hd95")
    other = summary["grids"]["original"]["hd95"]["prostate"]["tests"]["vnet_crf_theta"]
    assert other["mean_difference"] == pytest.approx(hd.mean()) and other["n"] == 4
    assert summary["family"]["size"] == 2 * 4 * 1 * 3  # grids x metrics x regions x comparisons
    assert summary["original_unavailable"] == {}
    assert summary["conventions"] == {"nsd_tolerance_mm": 2.0, "empty_dice": 1.0}

    md = (folder / "report.md").read_text()
    assert "| Method | prostate (this run) | prostate (paper) |" in md
    row = re.search(r"\| V-Net \| ([0-9.]+) ± ([0-9.]+) \| 0\.767 ± 0\.109 \|", md)
    assert row and float(row.group(1)) == pytest.approx(dice["vnet"].mean(), abs=5e-4)
    assert re.search(r"\| V-Net \+ CRF \| [0-9.]+ ± [0-9.]+ \| 0\.780 ± 0\.110 \|", md)
    assert re.search(r"\| V-Net \+ CRF \(learnt theta\) \| [0-9.]+ ± [0-9.]+ \|", md)
    assert "p (paired t-test)" in md and "p (Wilcoxon)" in md and "95% CI" in md
    assert "p Holm (t)" in md and "p Holm (W)" in md and "cases for 80% power" in md
    assert "## Conventions" in md and "Cases without original-grid numbers: none." in md
    for name in sorted(figures):
        assert f"]({name})" in md
    assert "steps: 4" in (folder / "config.yaml").read_text()

    # TensorBoard: scalars and the image summary of every run
    from crf_rnn_3d.experiments import common

    run = common.run_dir(cfg, 1, "vnet_crf")
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    tags = {v.tag for e in events for ev in tf.compat.v1.train.summary_iterator(str(e))
            for v in ev.summary.value}  # fmt: skip
    assert {"train/loss", "train/dice", "train/learning_rate",
            "train/image_label_prediction"} <= tags  # fmt: skip
    # the variant with learnt widths logs them, and they moved from their starting values
    learnt = common.run_dir(cfg, 1, "vnet_crf_theta")
    widths = {}
    for e in (learnt / "tensorboard").glob("events.out.tfevents.*"):
        for ev in tf.compat.v1.train.summary_iterator(str(e)):
            for v in ev.summary.value:
                if v.tag.startswith("crf/") and v.tag.endswith("/theta_alpha"):
                    widths[ev.step] = float(tf.make_ndarray(v.tensor))
    assert len(widths) >= 2 and widths[min(widths)] != widths[max(widths)]
    # the variant with widths per case logs their batch means (tests/test_theta_per_case.py)
    per_case = common.run_dir(cfg, 1, "vnet_crf_theta_per_case")
    events = list((per_case / "tensorboard").glob("events.out.tfevents.*"))
    tags = {v.tag for e in events for ev in tf.compat.v1.train.summary_iterator(str(e))
            for v in ev.summary.value}  # fmt: skip
    assert {"crf/case_theta/theta_alpha", "crf/case_theta/theta_gamma"} <= tags

    # predictions written back in the source geometry (compared with the raw label file)
    case = splits[0]["val"][0]
    exported = sitk.ReadImage(str(run.parent / common.run_dir(cfg, 0, "vnet").name / "export"
                                  / f"{case}.mha"))  # fmt: skip
    raw = sitk.ReadImage(str(tmp_path / "raw" / f"{case}_segmentation.mhd"))
    assert exported.GetSize() == raw.GetSize()
    np.testing.assert_allclose(exported.GetSpacing(), raw.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(exported.GetOrigin(), raw.GetOrigin(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(exported))) <= {0, 1}
    # the original-grid Dice is the exported file against the raw label file (counted here)
    p = sitk.GetArrayFromImage(exported) > 0
    g = sitk.GetArrayFromImage(raw) > 0
    want = 2 * np.logical_and(p, g).sum() / (p.sum() + g.sum()) if p.sum() + g.sum() else 1.0
    got = next(float(r["dice"]) for r in rows if r["case"] == case and r["variant"] == "vnet"
               and r["grid"] == "original")  # fmt: skip
    assert got == pytest.approx(want, abs=1e-12)

    # a second report never overwrites the first
    second = report(cfg)
    assert second.folder != folder and folder.is_dir()
    assert (second.folder / "per_case.csv").read_text() == (folder / "per_case.csv").read_text()

    # an evaluation written before the surface metrics, or with another NSD tolerance than
    # the other runs, stops the report with the file named
    from crf_rnn_3d.datasets.errors import DataError

    path = common.run_dir(cfg, 1, "vnet_crf") / "evaluation.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "nsd_tolerance_mm": 1.0}))
    with pytest.raises(DataError, match=r"conventions of the other runs"):
        report(cfg)
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "metrics"}))
    with pytest.raises(DataError, match=r"evaluation\.json.*Dice only.*evaluate fold=1"):
        report(cfg)
