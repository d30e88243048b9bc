"""Hydra's submitit launcher run locally (hydra/launcher=local_submitit): the jobs of a train
multirun go through submitit, as on Slurm, each a process of its own, then the report
collects the runs.

The full sweep (2 folds x 2 variants, then the report) is marked slow (about 40 s on 2 busy
cores, 4 TensorFlow processes at once). The fast variant sends fold 0 x 2 variants through
the launcher with one training step each, trains fold 1 in this process, and reports.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from experiments_fixtures import CONFIGS, smoke_config
from hydra import compose, initialize_config_dir

from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.prepare import prepare
from crf_rnn_3d.experiments.report import report
from crf_rnn_3d.experiments.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]


def _sweep(root: Path, folds: str, *extra: str) -> None:
    """``train -m`` over ``folds`` x {vnet, vnet_crf} through hydra/launcher=local_submitit."""
    command = [
        sys.executable, "-m", "crf_rnn_3d.experiments.train", "-m", "experiment=smoke",
        f"data.root={root}/raw", f"data.processed={root}/processed", f"runs_dir={root}/runs",
        f"reports_dir={root}/results", "progress=false", f"fold={folds}",
        "variant=vnet,vnet_crf", "~variants.vnet_crf_theta", "~variants.vnet_crf_theta_per_case",
        "hydra/launcher=local_submitit",
        f"hydra.sweep.dir={root}/sweep", *extra,
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=500)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    log = done.stdout.decode() + done.stderr.decode()
    assert "Submitit 'local' sweep output dir" in log


def _submitit_jobs(root: Path) -> list[Path]:
    """The submitit job folders of the sweep (each with its logs and pickled result)."""
    return sorted(p for p in (root / "sweep" / ".submitit").iterdir() if p.name.isdigit())


def _report_rows(cfg) -> list[dict]:
    with open(report(cfg).folder / "per_case.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # 4 TensorFlow processes at once: about 40 s on 2 busy cores
def test_local_submitit_sweep_of_folds_and_variants_then_report(tmp_path):
    cfg = smoke_config(tmp_path, "~variants.vnet_crf_theta", "~variants.vnet_crf_theta_per_case")
    prepare(cfg)
    _sweep(tmp_path, "0,1")
    jobs = _submitit_jobs(tmp_path)
    assert len(jobs) == 4
    for job in jobs:
        assert list(job.glob("*_result.pkl")), job  # each job ran through submitit
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()) == [
        "0", "1", "2", "3",
    ]  # fmt: skip
    rows = _report_rows(cfg)
    assert sorted({(r["fold"], r["variant"]) for r in rows}) == [
        ("0", "vnet"), ("0", "vnet_crf"), ("1", "vnet"), ("1", "vnet_crf"),
    ]  # fmt: skip
    # 4 cases x 2 variants x 2 grids (resampled, original), one region
    assert len(rows) == 16
    assert sorted({r["grid"] for r in rows}) == ["original", "resampled"]


def test_local_submitit_one_fold_then_report(tmp_path):
    steps = ["train.steps=1", "train.checkpoint_every=1", "train.log_every=1"]
    cfg = smoke_config(
        tmp_path, "~variants.vnet_crf_theta", "~variants.vnet_crf_theta_per_case", *steps
    )
    prepare(cfg)
    _sweep(tmp_path, "0", *steps)
    jobs = _submitit_jobs(tmp_path)
    assert len(jobs) == 2 and all(list(job.glob("*_result.pkl")) for job in jobs)
    for variant in ("vnet", "vnet_crf"):
        run = common.run_dir(cfg, 0, variant)  # the folder the job trained in: same identity
        state = json.loads((run / "state.json").read_text())
        assert state["complete"] and state["steps_done"] == 1
        assert (run / "evaluation.json").is_file()
    for variant in ("vnet", "vnet_crf"):  # fold 1 here, so that the report has every fold
        train_and_evaluate(smoke_config(tmp_path, "~variants.vnet_crf_theta",
                                        "~variants.vnet_crf_theta_per_case", *steps,
                                        "fold=1", f"variant={variant}"))  # fmt: skip
    rows = _report_rows(cfg)
    assert sorted({(r["fold"], r["variant"]) for r in rows}) == [
        ("0", "vnet"), ("0", "vnet_crf"), ("1", "vnet"), ("1", "vnet_crf"),
    ]  # fmt: skip
    assert len(rows) == 16  # 4 cases x 2 variants x 2 grids, one region
    assert sorted({r["grid"] for r in rows}) == ["original", "resampled"]


def test_local_submitit_config_composes():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            "config", overrides=["experiment=demo", "hydra/launcher=local_submitit"],
            return_hydra_config=True,
        )  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert launcher.gpus_per_node == 0 and launcher.nodes == 1
    assert launcher.submitit_folder.endswith("/.submitit/%j")
