"""A real training run killed (SIGKILL) after its first checkpoint resumes when started again
with the same config, and ends with the weights of a run that was never interrupted."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from experiments_fixtures import smoke_config

from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
STEPS = 120
EVERY = 7
TRAIN = [
    f"train.steps={STEPS}",
    f"train.checkpoint_every={EVERY}",
    "train.log_every=50",
    "train.image_every=1000",
    "train.deterministic=true",
    "train.optimizer.name=sgd",
    "train.optimizer.learning_rate=0.05",
    "fold=0",
    "variant=vnet",
]


def _command(root: Path, runs: str) -> list[str]:
    return [
        sys.executable, "-m", "crf_rnn_3d.experiments.train", "experiment=smoke",
        f"data.root={root}/raw", f"data.processed={root}/processed", f"runs_dir={root}/{runs}",
        f"reports_dir={root}/results", "progress=false", "train.progress=false",
        f"hydra.run.dir={root}/hydra/{runs}", *TRAIN,
    ]  # fmt: skip


def _weights(run: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run / "checkpoints"))
    # the model's weights (saved once, under the optimizer's list of trainable variables)
    names = [
        n for n, _ in tf.train.list_variables(str(run / "checkpoints"))
        if n.startswith("optimizer/_trainable_variables/")
    ]  # fmt: skip
    return {n: reader.get_tensor(n) for n in names}


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    cfg = smoke_config(tmp_path, *TRAIN)
    prepare(cfg)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    kw = {"cwd": ROOT, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    whole = subprocess.Popen(_command(tmp_path, "runs_whole"), **kw)
    victim = subprocess.Popen(_command(tmp_path, "runs"), **kw)
    run = common.run_dir(smoke_config(tmp_path, *TRAIN, f"runs_dir={tmp_path}/runs"), 0, "vnet")
    state = run / "state.json"
    deadline = time.monotonic() + 240
    while not state.is_file() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.kill()
    victim.wait()
    at_kill = json.loads(state.read_text())
    assert 0 < at_kill["steps_done"] < STEPS and not at_kill["complete"], at_kill
    assert at_kill["steps_done"] % EVERY == 0

    again = subprocess.run(_command(tmp_path, "runs"), timeout=300, **kw)
    out = again.stdout.decode()
    assert again.returncode == 0, out[-3000:]
    final = json.loads(state.read_text())
    resumed = final["started_from"]
    assert len(resumed) == 2 and resumed[0] == 0
    assert at_kill["steps_done"] <= resumed[1] < STEPS and resumed[1] % EVERY == 0
    assert final["steps_done"] == STEPS and final["complete"]
    assert f"resumed from step {resumed[1]}" in out
    assert (run / "model.keras").is_file() and (run / "evaluation.json").is_file()

    assert whole.wait(timeout=300) == 0, whole.stdout.read().decode()[-3000:]
    run_whole = common.run_dir(
        smoke_config(tmp_path, *TRAIN, f"runs_dir={tmp_path}/runs_whole"), 0, "vnet"
    )
    assert json.loads((run_whole / "state.json").read_text())["started_from"] == [0]
    a, b = _weights(run_whole), _weights(run)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
