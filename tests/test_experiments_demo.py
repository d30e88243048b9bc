"""The demo's promise (slow, about 7 CPU-minutes): on the phantoms the V-Net alone reaches a
mean Dice >= 0.7 over the 10 cases of the 5-fold CV, and the report holds every variant of the
preset, each compared with V-Net."""

import json

import numpy as np
import pytest
from experiments_fixtures import compose_config

from crf_rnn_3d.experiments.cross_validate import cross_validate


@pytest.mark.slow
def test_demo_vnet_reaches_dice_0_7(tmp_path):
    cfg = compose_config(
        [
            "experiment=demo",
            f"data.root={tmp_path}/raw",
            f"data.processed={tmp_path}/processed",
            f"runs_dir={tmp_path}/runs",
            f"reports_dir={tmp_path}/results",
            "progress=false",
            "train.progress=false",
        ]
    )
    result = cross_validate(cfg)
    per_variant = {}
    for e in result.evaluations:
        per_variant.setdefault(e.variant, []).extend(d["prostate"] for d in e.dice.values())
    variants = list(cfg.variants)
    assert variants == ["vnet", "vnet_crf", "vnet_crf_theta", "vnet_crf_theta_per_case"]
    assert sorted(per_variant) == sorted(variants)
    assert all(len(per_variant[v]) == 10 for v in variants)
    assert np.mean(per_variant["vnet"]) >= 0.7
    summary = json.loads((result.report.folder / "summary.json").read_text())
    prostate = summary["grids"]["resampled"]["dice"]["prostate"]
    for v in variants:
        assert prostate["variants"][v]["mean"] == pytest.approx(np.mean(per_variant[v]))
    assert sorted(prostate["tests"]) == variants[1:]  # each against V-Net
    assert prostate["tests"]["vnet_crf_theta"]["n"] == 10
