"""Scaling of the C++ lattice core with voxels and threads (run with `make bench-scaling`).

Four centre crops of the BraTS-sized benchmark reference (src/datasets/phantoms.py,
lattice_bench_reference: 155 x 240 x 240 at 1 mm, F = 7 bilateral features, C = 5 label
probabilities), from an eighth of the volume to all of it, each built and filtered by
build/bench_core (scripts/bench_core.cc: the core alone, no TensorFlow, minimum of REPEATS runs)
with 1 and 2 threads. For the build and the filter it prints

  - the time per voxel at each size and thread count,
  - the exponent b of time ~ a N^b, fitted by least squares on log time against log N over the
    four sizes (b = 1: linear in N),
  - the speed-up from 1 to 2 threads at each size,

then the same as a Markdown table for docs/benchmarks.md. The crops are written once as raw
float32 into build/bench_scaling/<crop>/ (the format bench_core reads) and reused.

Timings need a quiet machine: the minimum over repeats only removes part of the noise.

  make bench-scaling                       # 4 crops x threads 1, 2, 3 repeats
  make bench-scaling ARGS="--quick"        # crops of the small reference (a smoke run)
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np

from crf_rnn_3d.datasets.phantoms import (
    LATTICE_BENCH_FULL_SHAPES,
    LATTICE_BENCH_LABELS,
    LATTICE_BENCH_QUICK_SHAPES,
    lattice_bench_reference,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Fractions of each axis (z, y, x) of the four crops: 1/8, 1/4, 1/2 and all of the voxels.
CROPS = {
    "eighth": (0.5, 0.5, 0.5),
    "quarter": (0.5, 1.0, 0.5),
    "half": (0.5, 1.0, 1.0),
    "full": (1.0, 1.0, 1.0),
}


def crop_slices(shape: tuple[int, ...], fractions: tuple[float, ...]) -> tuple[slice, ...]:
    """Centre crop of `shape` keeping round(fraction * size) voxels (at least 1) per axis."""
    out = []
    for size, frac in zip(shape, fractions, strict=True):
        keep = max(1, round(size * frac))
        start = (size - keep) // 2
        out.append(slice(start, start + keep))
    return tuple(out)


def write_crops(shape: tuple[int, int, int], folder: Path) -> dict[str, Path]:
    """Writes each crop of the BraTS reference as bench_core's raw input; returns the folders."""
    dirs = {name: folder / name for name in CROPS}
    if all((d / "meta.txt").exists() for d in dirs.values()):
        return dirs
    arrays = lattice_bench_reference("brats", shape)
    feats = arrays["bilateral"][0]  # [*S, F]
    vals = arrays[f"probs{LATTICE_BENCH_LABELS['brats']}"][0]  # [*S, C]
    for name, fractions in CROPS.items():
        sl = crop_slices(shape, fractions)
        f = np.ascontiguousarray(feats[sl], dtype=np.float32)
        v = np.ascontiguousarray(vals[sl], dtype=np.float32)
        d = dirs[name]
        d.mkdir(parents=True, exist_ok=True)
        f.tofile(d / "features.f32")
        v.tofile(d / "values.f32")
        n = int(np.prod(f.shape[:-1]))
        (d / "meta.txt").write_text(f"{n} {f.shape[-1]} {v.shape[-1]}\n")
        print(f"[{name}] {f.shape[:-1]} = {n} voxels -> {d}", flush=True)
    return dirs


def run_core(binary: Path, folder: Path, threads: int, repeats: int) -> dict[str, float]:
    """Runs bench_core on one crop and returns its RESULT line as a dict of numbers."""
    proc = subprocess.run(
        [str(binary), str(folder), str(threads), str(repeats)],
        capture_output=True,
        text=True,
        env={"BENCH_CORE_STAGES_ONLY": "1"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{binary} {folder} {threads} failed:\n{proc.stdout}{proc.stderr}")
    return {k: float(v) for k, v in (kv.split("=") for kv in lines[-1].split()[1:])}


def fit_exponent(sizes: list[float], times: list[float]) -> float:
    """Least-squares slope of log(time) against log(size)."""
    x = np.log(np.asarray(sizes, dtype=np.float64))
    y = np.log(np.asarray(times, dtype=np.float64))
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="crops of the small reference (smoke run)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (minimum kept)")
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--binary", type=Path, default=REPO_ROOT / "build" / "bench_core")
    p.add_argument("--data", type=Path, default=None, help="folder for the crops")
    a = p.parse_args()
    if not a.binary.exists():
        p.error(f"{a.binary} not found: build it with `make bench-scaling` (or bench-core)")
    threads = [int(t) for t in a.threads.split(",") if t.strip()]
    if not threads or min(threads) < 1 or a.repeats < 1:
        p.error("--threads must list counts >= 1 and --repeats must be >= 1")
    shape = (LATTICE_BENCH_QUICK_SHAPES if a.quick else LATTICE_BENCH_FULL_SHAPES)["brats"]
    folder = a.data or REPO_ROOT / "build" / ("bench_scaling_quick" if a.quick else "bench_scaling")
    dirs = write_crops(tuple(shape), folder)

    rows = []  # (crop, voxels, threads, result)
    for name, d in dirs.items():
        for t in threads:
            res = run_core(a.binary, d, t, a.repeats)
            rows.append((name, int(res["voxels"]), t, res))
            print(
                f"{name:8s} N = {int(res['voxels']):9d}  threads {t}"
                f"  points {int(res['points']):9d}"
                f"  build {res['build_s']:.4f} s  filter {res['filter_s']:.4f} s",
                flush=True,
            )

    print(
        "\n| crop | voxels N | threads | lattice points | build s | build ns/voxel "
        "| filter s | filter ns/voxel |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, n, t, res in rows:
        print(
            f"| {name} | {n} | {t} | {int(res['points'])} | {res['build_s']:.3f} "
            f"| {res['build_s'] * 1e9 / n:.0f} | {res['filter_s']:.3f} "
            f"| {res['filter_s'] * 1e9 / n:.1f} |"
        )
    print("\n| threads | build: exponent of N | filter: exponent of N |")
    print("|---|---|---|")
    for t in threads:
        sel = [(n, res) for _, n, tt, res in rows if tt == t]
        sizes = [n for n, _ in sel]
        b = fit_exponent(sizes, [res["build_s"] for _, res in sel])
        f = fit_exponent(sizes, [res["filter_s"] for _, res in sel])
        print(f"| {t} | {b:.3f} | {f:.3f} |")
    if 1 in threads and 2 in threads:
        print("\n| crop | build 1 -> 2 threads | filter 1 -> 2 threads |")
        print("|---|---|---|")
        by = {(name, t): res for name, _, t, res in rows}
        for name in dirs:
            one, two = by[(name, 1)], by[(name, 2)]
            print(
                f"| {name} | {one['build_s'] / two['build_s']:.2f}x "
                f"| {one['filter_s'] / two['filter_s']:.2f}x |"
            )


if __name__ == "__main__":
    main()
