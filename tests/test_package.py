"""The package installs as a library: a wheel built from the clone's files, installed into a
fresh virtual environment, imports crf_rnn_3d from there and runs (scripts/check_wheel.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_outside_the_repository() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_wheel.py")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for step in ("filter: normalised average", "CrfRnn: logits", "dense_crf: the flipped",
                 "crf3d-train: composed", "wheel check passed"):  # fmt: skip
        assert step in proc.stdout, proc.stdout[-4000:]
