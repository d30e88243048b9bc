"""Every comparison the README quotes, in one run (`make bench`, docs/benchmarks.md).

Parts (each its own script, run here as a subprocess that writes JSON):
  dense_crf  scripts/bench_crf.py pydensecrf: dense_crf against pydensecrf2 on the PROMISE12- and
             BraTS-sized phantoms, with TensorFlow's default threads and again with one thread;
  lattice    scripts/bench_lattice.py: a lattice build + 10 filters against pydensecrf2's setup +
             5-iteration inference, peak memory, 1 and 2 threads;
  accuracy   scripts/bench_accuracy.py: the lattice's error against the exact filter at F >= 7,
             beside pydensecrf2's on the same cases, default and lattice_copies=2, and the cost
             of the copies;
  train      scripts/bench_crf_train.py: a CrfRnn forward + backward (5 iterations) in a traced
             training step at the PROMISE12 size, recompute off and on, both backends.

Writes results/bench/<UTC time>/: each part's JSON, summary.json (the rows) and summary.md (one
table: ours, the peer's, the ratio, the goal and whether it is met), and prints the table. The
ratios compare runs of the same script on the same machine, interleaved where the part does so;
run it on an otherwise idle machine (the load average is recorded at the start and the end).

  make bench                          # everything (about 10-15 minutes on 2 cores)
  make bench ARGS="--parts dense_crf"
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from crf_rnn_3d.benchmarks.lattice_report import machine
from crf_rnn_3d.benchmarks.summary import (
    Row,
    accuracy_rows,
    dense_crf_rows,
    lattice_rows,
    markdown,
    train_rows,
)
from crf_rnn_3d.experiments.cli import fail

REPO_ROOT = Path(__file__).resolve().parents[1]
PARTS = ("dense_crf", "lattice", "accuracy", "train")


def _run(command: list[str], log: Path) -> None:
    """Runs one part's script, its output echoed and kept in `log`; a failure stops the run."""
    print("$ " + " ".join(command), flush=True)
    with log.open("w") as handle:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT
        )
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            handle.write(line)
        code = child.wait()
    if code != 0:
        fail(f"bench_all.py: {' '.join(command[1:3])} failed (exit {code}); its output: {log}")


def run_dense_crf(out: Path, repeats: int) -> list[Row]:
    script = str(REPO_ROOT / "scripts" / "bench_crf.py")
    two, one = out / "dense_crf.json", out / "dense_crf_1thread.json"
    base = [sys.executable, script, "pydensecrf", "--repeats", str(repeats)]
    _run([*base, "--json", str(two)], out / "dense_crf.log")
    _run([*base, "--threads", "1", "--json", str(one)], out / "dense_crf_1thread.log")
    return dense_crf_rows(json.loads(two.read_text()), json.loads(one.read_text()))


def run_lattice(out: Path, repeats: int) -> list[Row]:
    script = str(REPO_ROOT / "scripts" / "bench_lattice.py")
    folder = out / "lattice"
    command = [sys.executable, script, "--parts", "ours,threads,dcrf", "--repeats", str(repeats)]
    _run([*command, "--out", str(folder)], out / "lattice.log")
    (result,) = sorted(folder.glob("*.json"))
    return lattice_rows(json.loads(result.read_text()))


def run_accuracy(out: Path, repeats: int) -> list[Row]:
    script = str(REPO_ROOT / "scripts" / "bench_accuracy.py")
    folder = out / "accuracy"
    command = [sys.executable, script, "--seeds", "3", "--repeats", str(repeats)]
    _run([*command, "--out", str(folder)], out / "accuracy.log")
    (result,) = sorted(folder.glob("*.json"))
    return accuracy_rows(json.loads(result.read_text()))


def run_train(out: Path, repeats: int) -> list[Row]:
    script = str(REPO_ROOT / "scripts" / "bench_crf_train.py")
    result = out / "crf_train.json"
    command = [sys.executable, script, "--cases", "promise", "--backends", "compiled", "tf"]
    _run([*command, "--repeats", str(min(repeats, 2)), "--json", str(result)], out / "train.log")
    return train_rows(json.loads(result.read_text()))


RUNNERS = {
    "dense_crf": run_dense_crf,
    "lattice": run_lattice,
    "accuracy": run_accuracy,
    "train": run_train,
}


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + (" (with uncommitted changes)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in RUNNERS]
    if unknown or not parts:
        fail(f"bench_all.py: unknown part(s) {unknown or parts}; choose from {list(PARTS)}")
    if args.repeats < 1:
        fail(f"bench_all.py: --repeats must be at least 1, got {args.repeats}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out / stamp
    out.mkdir(parents=True)
    header: dict[str, object] = {
        "command": "python scripts/bench_all.py " + " ".join(sys.argv[1:]),
        "commit": _commit(),
        "date (UTC)": stamp,
        "machine": machine(),
    }
    start = time.perf_counter()
    rows: list[Row] = []
    for part in parts:
        rows += RUNNERS[part](out, args.repeats)
    header["wall time"] = f"{time.perf_counter() - start:.0f} s"
    header["load average at the end"] = os.getloadavg()
    table = markdown(rows, header)
    (out / "summary.json").write_text(
        json.dumps(
            {"header": header, "rows": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows]},
            indent=1,
            default=str,
        )
    )
    (out / "summary.md").write_text(table)
    print("\n" + table)
    print(f"written to {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}")


if __name__ == "__main__":
    main()
