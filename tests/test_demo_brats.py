"""make demo-brats (configs/experiment/demo_brats.yaml) and the report's section in the layout of
the paper's Table 2 (report_markdown.paper_table_section): the preset's settings, the table
against a summary built by hand, and (slow) the whole demo end to end at a reduced size."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from experiments_fixtures import compose_config

from crf_rnn_3d.datasets.errors import ConfigError
from crf_rnn_3d.datasets.splits import holdout_split
from crf_rnn_3d.experiments.report_markdown import paper_table_section

VARIANTS = ["vnet", "vnet_crf", "vnet_crf_theta", "vnet_crf_theta_per_case"]


def test_demo_brats_preset_is_the_brats_protocol_on_its_own_phantoms():
    cfg = compose_config(["experiment=demo_brats"])
    brats = compose_config(["data=synthetic_brats"])
    data = cfg.data
    assert cfg.name == "demo_brats" and data.name == "demo_brats"
    # its own raw folder and cache: the phantom writer replaces another setting's files
    assert data.root != brats.data.root and data.processed != brats.data.processed
    assert data.processed == "data/processed/demo_brats"
    # read by the real BraTS 2015 reader: 4 channels, labels 0..4, the three regions
    assert data.format == "brats2015" and list(data.modalities) == ["T1", "T1c", "T2", "Flair"]
    assert list(data.labels) == [0, 1, 2, 3, 4]
    assert {k: list(v) for k, v in data.regions.items()} == {
        "whole": [1, 2, 3, 4],
        "core": [1, 3, 4],
        "enhancing": [4],
    }
    # 85/15 holdout of 40 cases: 0.15 x 40 = 6 held out, 34 trained on
    assert data.split.scheme == "holdout" and data.split.holdout_fraction == 0.15
    n = data.phantom.n_cases
    assert n == 40
    ids = [f"case{i:02d}" for i in range(n)]
    (split,) = holdout_split(ids, data.split.holdout_fraction, data.split.seed)
    assert (len(split["train"]), len(split["val"])) == (34, 6)
    assert sorted(split["train"] + split["val"]) == ids
    # phantoms at 2 mm on BraTS's 240 x 240 x 155 mm field of view (within a voxel)
    fov = np.multiply(data.phantom.spacing_xyz, data.phantom.shape_xyz)
    assert np.all(np.abs(fov - [240, 240, 155]) <= 2.0)
    assert data.phantom.template_resolution_mm == 2
    assert list(data.preprocess.target_spacing_xyz) == [4.0, 4.0, 4.0]
    # the four variants, V-Net first (the baseline), and the paper's Table 2 section
    assert list(cfg.variants) == VARIANTS
    assert cfg.variants.vnet_crf_theta.crf_overrides.learn_theta is True
    assert cfg.variants.vnet_crf_theta_per_case.crf_overrides.theta_per_case is True
    assert list(cfg.report.paper_table.regions) == ["whole", "core", "enhancing"]
    paper = cfg.report.paper
    assert (paper.whole.vnet.mean, paper.whole.vnet_crf.mean) == (0.735, 0.738)
    assert (paper.core.vnet.mean, paper.core.vnet_crf.mean) == (0.488, 0.482)
    assert "enhancing" not in paper and paper.whole.vnet.std is None
    assert "300 steps a run" in cfg.report.paper_table.note  # ${train.steps}, resolved


def test_demo_runs_every_variant_of_its_preset():
    assert list(compose_config(["experiment=demo"]).variants) == VARIANTS


def _hand_summary() -> dict:
    def entry(n, mean, std):
        return {"n": n, "mean": mean, "std": std, "median": mean}

    numbers = {  # region -> variant -> (mean, std)
        "whole": {"vnet": (0.9, 0.05), "vnet_crf": (0.91, 0.04), "vnet_crf_theta": (0.8, 0.1)},
        "core": {"vnet": (0.7, 0.2), "vnet_crf": (0.6543, 0.0), "vnet_crf_theta": (0.5, 0.25)},
        "enhancing": {
            "vnet": (0.6, 0.3),
            "vnet_crf": (float("nan"), float("nan")),
            "vnet_crf_theta": (0.1, 0.02),
        },
    }
    dice = {
        r: {"variants": {v: entry(6, *ms) for v, ms in by_v.items()}, "tests": {}}
        for r, by_v in numbers.items()
    }
    return {"grids": {"resampled": {"dice": dice}}}


def _hand_cfg(paper_table) -> dict:
    return {
        "variants": {
            "vnet": {"crf": False, "label": "V-Net"},
            "vnet_crf": {"crf": True, "label": "V-Net + CRF"},
            "vnet_crf_theta": {"crf": True, "label": "V-Net + CRF (learnt theta)"},
        },
        "report": {
            "paper": {
                "whole": {"vnet": {"mean": 0.735, "std": None}, "vnet_crf": {"mean": 0.738}},
                "core": {"vnet": {"mean": 0.488, "std": 0.1}, "vnet_crf": {"mean": None}},
            },
            "paper_table": paper_table,
        },
    }


def test_paper_table_section_layout_against_a_hand_built_summary():
    spec = {"title": "Table 2 here", "regions": ["whole", "core", "enhancing"], "note": "N."}
    lines = paper_table_section(_hand_cfg(spec), _hand_summary())
    assert lines == [
        "## Table 2 here",
        "",
        "Dice, mean ± SD (ddof 1) over this run's 6 held-out cases on the resampled grid, "
        "beside the paper's; n/a: the paper gives no such number.",
        "",
        "| Method | whole: this run | whole: paper | core: this run | core: paper | "
        "enhancing: this run | enhancing: paper |",
        "|---|---|---|---|---|---|---|",
        "| V-Net | 0.900 ± 0.050 | 0.735 ± n/a | 0.700 ± 0.200 | 0.488 ± 0.100 | "
        "0.600 ± 0.300 | n/a |",
        "| V-Net + CRF | 0.910 ± 0.040 | 0.738 ± n/a | 0.654 ± 0.000 | n/a | n/a ± n/a | n/a |",
        "| V-Net + CRF (learnt theta) | 0.800 ± 0.100 | n/a | 0.500 ± 0.250 | n/a | "
        "0.100 ± 0.020 | n/a |",
        "",
        "N.",
    ]
    # the columns follow the listed regions; no note, no title: a default heading
    lines = paper_table_section(_hand_cfg({"regions": ["core"]}), _hand_summary())
    assert lines[0] == "## The paper's table" and lines[-1].startswith("| V-Net + CRF (learnt")
    assert lines[4] == "| Method | core: this run | core: paper |"


def test_paper_table_section_is_absent_unless_set_and_checks_its_setting():
    assert paper_table_section(_hand_cfg(None), _hand_summary()) == []
    with pytest.raises(ConfigError, match=r"report\.paper_table\.regions.*'oedema'"):
        paper_table_section(_hand_cfg({"regions": ["whole", "oedema"]}), _hand_summary())
    with pytest.raises(ConfigError, match=r"report\.paper_table\.regions"):
        paper_table_section(_hand_cfg({"regions": []}), _hand_summary())
    with pytest.raises(ConfigError, match=r"report\.paper_table: expected a mapping"):
        paper_table_section(_hand_cfg("Table 2"), _hand_summary())


@pytest.mark.slow
def test_demo_brats_end_to_end(tmp_path):
    """The demo's command, its own phantoms and cache under a temporary root, fewer cases and
    steps: the report's files, and the Table 2 section (in report.md and last on the terminal)
    whose numbers are the per-case CSV's means and SDs recomputed here."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "crf_rnn_3d.experiments.cross_validate",
            "experiment=demo_brats",
            f"output_root={tmp_path}",
            f"data.root={tmp_path}/raw",
            f"data.processed={tmp_path}/processed",
            "data.phantom.n_cases=14",  # 0.15 x 14 = 2.1: 2 held out
            "train.steps=6",
            "train.checkpoint_every=3",
            "train.log_every=3",
            "train.image_every=3",
            "crf.num_iterations=2",
            "crf.num_iterations_inference=2",
            "report.example_cases=1",
            "progress=false",
            "train.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (folder,) = (tmp_path / "reports" / "demo_brats").iterdir()
    for name in ["per_case.csv", "summary.json", "report.md", "config.yaml", "box_dice.png"]:
        assert (folder / name).is_file(), name
    assert len(list(folder.glob("example_*.png"))) == 1
    splits = json.loads((tmp_path / "processed" / "splits.json").read_text())
    assert [len(splits[0]["train"]), len(splits[0]["val"])] == [12, 2]
    with open(folder / "per_case.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["grid"] == "resampled"]
    labels = ["V-Net", "V-Net + CRF", "V-Net + CRF (learnt theta)", "V-Net + CRF (theta per case)"]
    paper = {("V-Net", "whole"): "0.735 ± n/a", ("V-Net + CRF", "whole"): "0.738 ± n/a",
             ("V-Net", "core"): "0.488 ± n/a", ("V-Net + CRF", "core"): "0.482 ± n/a"}  # fmt: skip
    expected = []
    for variant, label in zip(VARIANTS, labels, strict=True):
        cells = []
        for region in ["whole", "core", "enhancing"]:
            d = [float(r["dice"]) for r in rows if (r["variant"], r["region"]) == (variant, region)]
            assert len(d) == 2
            cells += [
                f"{np.mean(d):.3f} ± {np.std(d, ddof=1):.3f}",
                paper.get((label, region), "n/a"),
            ]
        expected.append(f"| {label} | " + " | ".join(cells) + " |")
    md = (folder / "report.md").read_text()
    assert "## In the layout of the paper's Table 2 (BraTS 2015)" in md
    assert "whole (this run)" not in md  # the section takes the generic table's place
    for line in expected:
        assert line in md
    assert "6 steps a run" in md
    # cross_validate ends with the same section on the terminal
    tail = out.stdout.rstrip().splitlines()
    assert tail[-1].endswith("not a like-for-like comparison.")
    assert tail[-2 - len(expected) : -2] == expected
