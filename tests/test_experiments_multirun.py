"""Hydra multirun: folds x variants as parallel joblib jobs (hydra/launcher=local_parallel),
then the report collects them; the Slurm launcher config composes (it is not run here)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from experiments_fixtures import CONFIGS, smoke_config
from hydra import compose, initialize_config_dir

from crf_rnn_3d.experiments.prepare import prepare
from crf_rnn_3d.experiments.report import report

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 4 TensorFlow processes: about 40 s on 2 idle cores
def test_joblib_multirun_then_report(tmp_path):
    # the preset's third variant (learnt widths) is not part of this sweep
    cfg = smoke_config(tmp_path, "~variants.vnet_crf_theta", "~variants.vnet_crf_theta_per_case")
    prepare(cfg)
    command = [
        sys.executable, "-m", "crf_rnn_3d.experiments.train", "-m", "experiment=smoke",
        f"data.root={tmp_path}/raw", f"data.processed={tmp_path}/processed",
        f"runs_dir={tmp_path}/runs", f"reports_dir={tmp_path}/results", "progress=false",
        "fold=0,1", "variant=vnet,vnet_crf", "~variants.vnet_crf_theta",
        "~variants.vnet_crf_theta_per_case",
        "hydra/launcher=local_parallel",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=400)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout.decode() + done.stderr.decode()
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]

    result = report(cfg)
    with open(result.folder / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({(r["fold"], r["variant"]) for r in rows}) == [
        ("0", "vnet"), ("0", "vnet_crf"), ("1", "vnet"), ("1", "vnet_crf"),
    ]  # fmt: skip
    assert len(rows) == 16  # 4 cases x 2 variants x 2 grids, one region


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=promise_cv", "hydra/launcher=slurm"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.max_num_timeout == 3
