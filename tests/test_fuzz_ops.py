"""Property-based fuzzing of the lattice op and the CRF layer against the bad-input contract
(issue 13): every call either returns finite outputs of the input's shape or raises one of the
documented errors (tf.errors.InvalidArgumentError, ResourceExhaustedError, ValueError,
TypeError) with a message; never a crash (signal), a hang, or an undocumented exception.

Each case runs in tests/fuzz_worker.py, a subprocess kept alive across cases (one per test
module; restarted after a death), so that a segfault or abort of the compiled op shows up as
the death of that process with the case that caused it.

Interim rule (until NaN/Inf in values is an error on every path): a non-finite output is
accepted only when the case put a non-finite number into an input (collected, per op and
input, in NON_FINITE_PATHS).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
CASE_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0

# The inputs each op takes (a non-finite value is placed in one of them).
INPUTS = {
    "lattice": ("features", "values"),
    "permutohedral": ("features", "values"),
    "separable": ("values", "taps"),
    "crf": ("unaries", "image"),
    "crf_fused": ("unaries", "image"),
}
MISMATCHES = {
    "lattice": ("spatial", "batch", "rank"),
    "permutohedral": ("spatial", "batch", "rank"),
    "separable": ("rank", "taps"),
    "crf": ("spatial", "batch", "rank"),
    "crf_fused": ("spatial", "batch", "rank"),
}


class WorkerDied(AssertionError):
    """The worker process ended (a signal: a crash of the op) while running a case."""


class FuzzWorker:
    """tests/fuzz_worker.py in a subprocess: one JSON case in, one JSON answer out."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr = tempfile.TemporaryFile(mode="w+")

    def start(self) -> None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")
        self.stderr.seek(0)
        self.stderr.truncate()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, self.lines), daemon=True).start()
        self._read(START_TIMEOUT_S, "start-up")

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        return "\n".join(self.stderr.read().strip().splitlines()[-8:])

    def _read(self, timeout: float, what: str) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"hang: no answer to {what} within {timeout} s") from None
        if line is None:
            code = self.proc.wait()
            self.proc = None
            raise WorkerDied(
                f"worker died (exit status {code}; negative: signal {-code}) on {what}\n"
                f"stderr tail:\n{self._stderr_tail()}"
            )
        return json.loads(line)

    def ask(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        return self._read(CASE_TIMEOUT_S, f"case {json.dumps(case)}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = FuzzWorker()
    yield w
    w.stop()
    if NON_FINITE_PATHS:  # shown with pytest -s: the paths the interim rule lets through
        print(f"\nnon-finite output from non-finite input: {sorted(NON_FINITE_PATHS)}")


# Where a non-finite output came from a non-finite input (interim rule): (op, input) pairs.
NON_FINITE_PATHS: set[tuple[str, str]] = set()


def check_contract(case: dict, answer: dict) -> None:
    """The contract for one case's answer (see the module docstring)."""
    if answer["status"] == "error":
        assert answer["documented"], (
            f"undocumented exception {answer['type']}: {answer['message']}\ncase {case}"
        )
        assert answer["message"].strip(), f"{answer['type']} without a message; case {case}"
        return
    assert answer["status"] == "ok", answer
    assert answer["shape"] == answer["expected_shape"], (
        f"output shape {answer['shape']} != {answer['expected_shape']}; case {case}"
    )
    if not answer["finite"]:
        bad = case["bad"]
        assert bad is not None, f"non-finite output from finite input; case {case}"
        NON_FINITE_PATHS.add((case["op"], bad[0]))


@st.composite
def cases(draw: st.DrawFn, ops: tuple[str, ...]) -> dict:
    op = draw(st.sampled_from(ops))
    spatial = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    # mostly non-empty grids; an empty axis or no spatial axis at all now and then
    if draw(st.integers(0, 9)) > 1:
        spatial = [max(n, 1) for n in spatial]
    elif draw(st.booleans()):
        spatial = []
    bad = None
    if draw(st.integers(0, 3)) == 0:
        bad = [
            draw(st.sampled_from(INPUTS[op])),
            draw(st.sampled_from(["nan", "inf", "-inf"])),
            draw(st.sampled_from(["one", "all"])),
        ]
    mismatch = None
    if draw(st.integers(0, 5)) == 0:
        mismatch = draw(st.sampled_from(MISMATCHES[op]))
    dtype = "float32"
    if draw(st.integers(0, 4)) == 0:
        dtype = draw(st.sampled_from(["float16", "float64", "int32"]))
    return {
        "op": op,
        "batch": draw(st.integers(1, 3)),
        "spatial": spatial,
        "f": draw(st.integers(1, 10)),
        "c": draw(st.integers(1, 20)),
        "dtype": dtype,
        "width": 10.0 ** draw(st.floats(-6.0, 6.0)),
        "bad": bad,
        "mismatch": mismatch,
        "reverse": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


FAST = settings(
    max_examples=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SLOW = settings(
    max_examples=5000,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LATTICE_OPS = ("lattice", "permutohedral", "separable")
CRF_OPS = ("crf", "crf_fused")


@FAST
@given(case=cases(LATTICE_OPS))
def test_lattice_ops_keep_the_contract(worker: FuzzWorker, case: dict) -> None:
    check_contract(case, worker.ask(case))


@FAST
@given(case=cases(CRF_OPS))
def test_crf_layer_keeps_the_contract(worker: FuzzWorker, case: dict) -> None:
    check_contract(case, worker.ask(case))


@pytest.mark.slow
@SLOW
@given(case=cases(LATTICE_OPS + CRF_OPS))
def test_many_cases_keep_the_contract(worker: FuzzWorker, case: dict) -> None:
    check_contract(case, worker.ask(case))


# Hand-picked corners that the strategies above reach only by chance: each must keep the
# contract (never a crash), whatever it answers.
CORNERS = [
    {"op": "lattice", "spatial": [1], "f": 1, "c": 1, "width": 1e-6},
    {"op": "lattice", "spatial": [5, 5, 5, 5], "f": 10, "c": 20, "width": 1e-6},
    {"op": "lattice", "spatial": [5, 5, 5, 5], "f": 10, "c": 20, "width": 1e6},
    {"op": "lattice", "spatial": [0], "f": 1, "c": 1},
    {"op": "permutohedral", "spatial": [4, 0, 3], "f": 3, "c": 2},
    {"op": "separable", "spatial": [0, 0], "c": 3},
    {"op": "separable", "spatial": [5, 5, 5, 5], "c": 20, "width": 1e6},
    {"op": "separable", "spatial": [3], "c": 1, "width": 1e-6},
    {"op": "crf", "spatial": [1], "f": 1, "c": 2},
    {"op": "crf", "spatial": [4, 4, 4, 4], "f": 10, "c": 20, "width": 1e-6},
    {"op": "crf_fused", "spatial": [4, 4, 4, 4], "f": 10, "c": 20, "width": 1e6},
    {"op": "crf_fused", "spatial": [3, 0], "f": 2, "c": 2},
    {"op": "crf", "spatial": [3, 3], "f": 2, "c": 3, "dtype": "float16"},
]


@pytest.mark.parametrize("corner", CORNERS, ids=lambda c: f"{c['op']}-{c['spatial']}")
def test_corner_cases_keep_the_contract(worker: FuzzWorker, corner: dict) -> None:
    case = {
        "batch": 1,
        "f": 2,
        "dtype": "float32",
        "width": 1.0,
        "bad": None,
        "mismatch": None,
        "reverse": False,
        "seed": 0,
        **corner,
    }
    check_contract(case, worker.ask(case))


def test_worker_reports_a_crash_as_a_crash() -> None:
    """The harness itself: a worker killed by a signal is reported, not taken as an answer."""
    w = FuzzWorker()
    try:
        with pytest.raises(WorkerDied, match="signal 6"):
            w.ask({"op": "_abort"})
    finally:
        w.stop()
