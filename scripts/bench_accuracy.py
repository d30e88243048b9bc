"""The lattice's accuracy settings: error against the exact Gaussian filter and cost.

For F in 3, 5, 7, 10 feature channels and each setting (``lattice_copies`` 1-4, ``blur_passes``
2-3), the normalised filter ``filter(v) / filter(1)`` is compared with the exact float64
normalised filter (src/lattice_op/reference.py) on the same voxels, beside pydensecrf2's lattice
on the same features and values. Error: relative L2, ||approx - exact|| / ||exact - mean(exact)||
over the sampled voxels (the centring keeps a constant offset of the values from counting).

Cases (3D grids, features = positions * spacing, then F - 3 intensity-like channels: a shared
smooth pattern of amplitude 2 plus Gaussian noise of 0.3, all in kernel widths):
  dense:  24^3 voxels, 0.25 kernel widths apart (a CRF's bilateral kernel over 1 mm voxels with
          theta_alpha of 4 mm), 1,500 sampled voxels;
  sparse: 12^3 voxels, 0.6 apart (the accuracy tests' sampling), every voxel.
Values: "smooth" (a cosine along the grid) or "noise" (uniform in [-1, 1]); medians over seeds.

pydensecrf2 exposes no filter, so its normalised filter is read off one mean-field step: two
labels with probabilities (p, 1 - p), p = 0.5 + 0.45 v, unary -log p, one Potts kernel of weight 1
with NORMALIZE_AFTER (its K p / K 1): log(q1 / q0) after one step is log(p / (1 - p)) +
2 N(p) - 1, so N(p) and then N(v) = (N(p) - 0.5) / 0.45 follow exactly.

Cost: lattice points (exact counts, not noisy) and the time of a build plus 10 filters of two
channels on a 48^3 dense grid, as a ratio to the default setting in the same run (the fastest
of --repeats, after a warm-up call). On a shared machine the times are noisy; the point counts
are not.

Usage: .venv/bin/python scripts/bench_accuracy.py [--seeds 3] [--repeats 3] [--out DIR]
(`make bench-accuracy`; needs requirements-bench.txt for pydensecrf2.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FEATURES = (3, 5, 7, 10)
# (label, lattice_copies, blur_passes)
SETTINGS = (
    ("default", 1, 1),
    ("copies=2", 2, 1),
    ("copies=3", 3, 1),
    ("copies=4", 4, 1),
    ("passes=2", 1, 2),
    ("passes=3", 1, 3),
)
CASES = {"dense": ((24, 24, 24), 0.25, 1500), "sparse": ((12, 12, 12), 0.6, None)}
TIMING_SHAPE = (48, 48, 48)


def case_features(shape: tuple[int, ...], spacing: float, num_f: int, rng) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * spacing
    extra = num_f - 3
    pattern = 2.0 * np.sin(0.7 * grid.sum(-1, keepdims=True) + np.arange(extra))
    noisy = pattern + 0.3 * rng.normal(size=(*shape, extra))
    return np.concatenate([grid, noisy], -1).astype(np.float32)


def case_values(shape: tuple[int, ...], spacing: float, kind: str, rng) -> np.ndarray:
    if kind == "smooth":
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
        return np.cos(0.5 * spacing * grid.sum(-1, keepdims=True)).astype(np.float32)
    return rng.uniform(-1.0, 1.0, size=(*shape, 1)).astype(np.float32)


def pydensecrf_normalised(values: np.ndarray, features: np.ndarray) -> np.ndarray | None:
    """pydensecrf2's K v / K 1 for values [N] in [-1, 1] (see the module docstring); None when
    pydensecrf2 is not installed."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        return None
    p = 0.5 + 0.45 * values.astype(np.float64)
    unary = np.ascontiguousarray(-np.log(np.stack([p, 1.0 - p])), dtype=np.float32)
    crf = dcrf.DenseCRF(int(p.shape[0]), 2)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseEnergy(
        np.ascontiguousarray(features.T, dtype=np.float32),
        compat=1.0,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NORMALIZE_AFTER,
    )
    q = np.asarray(crf.inference(1), np.float64)
    # log(q0 / q1) = -(u0 - u1) + N(p) - N(1 - p) = -(u0 - u1) + 2 N(p) - 1
    n_p = (np.log(q[0]) - np.log(q[1]) + (unary[0] - unary[1]) + 1.0) / 2.0
    return (n_p - 0.5) / 0.45


def relative_l2(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact - exact.mean()))


def measure_errors(seeds: int) -> list[dict]:
    from crf_rnn_3d.lattice_op import Lattice
    from crf_rnn_3d.lattice_op.reference import exact_normalised_filter

    rows = []
    for case, (shape, spacing, samples) in CASES.items():
        for num_f in FEATURES:
            for kind in ("smooth", "noise"):
                errors: dict[str, list[float]] = {label: [] for label, _, _ in SETTINGS}
                errors["pydensecrf2"] = []
                points: dict[str, list[int]] = {label: [] for label, _, _ in SETTINGS}
                for seed in range(seeds):
                    rng = np.random.default_rng([num_f, seed, int(kind == "noise")])
                    feats = case_features(shape, spacing, num_f, rng)
                    vals = case_values(shape, spacing, kind, rng)
                    flat_f, flat_v = feats.reshape(-1, num_f), vals.reshape(-1, 1)
                    n = flat_f.shape[0]
                    idx = np.arange(n) if samples is None else rng.choice(n, samples, False)
                    exact = exact_normalised_filter(flat_v, flat_f, idx)[:, 0]
                    for label, copies, passes in SETTINGS:
                        lat = Lattice(
                            feats[None],
                            backend="compiled",
                            lattice_copies=copies,
                            blur_passes=passes,
                        )
                        out = lat.filter(vals[None]).numpy().reshape(-1)
                        ones = lat.filter(np.ones_like(vals[None])).numpy().reshape(-1)
                        errors[label].append(relative_l2((out / ones)[idx], exact))
                        points[label].append(int(lat.num_points.numpy()))
                    theirs = pydensecrf_normalised(flat_v[:, 0], flat_f)
                    if theirs is not None:
                        errors["pydensecrf2"].append(relative_l2(theirs[idx], exact))
                row = {
                    "case": case,
                    "F": num_f,
                    "values": kind,
                    "voxels": int(np.prod(shape)),
                    "error": {k: float(np.median(v)) for k, v in errors.items() if v},
                    "points": {k: int(np.median(v)) for k, v in points.items()},
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def measure_cost(repeats: int) -> list[dict]:
    from crf_rnn_3d.lattice_op import Lattice

    rows = []
    for num_f in FEATURES:
        rng = np.random.default_rng([num_f, 99])
        feats = case_features(TIMING_SHAPE, 0.25, num_f, rng)[None]
        vals = rng.uniform(0.0, 1.0, size=(*feats.shape[:-1], 2)).astype(np.float32)
        seconds = {}
        points = {}
        Lattice(feats, backend="compiled").filter(vals).numpy()  # warm-up: loads the op library
        for label, copies, passes in SETTINGS:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                lat = Lattice(feats, backend="compiled", lattice_copies=copies, blur_passes=passes)
                for _ in range(10):
                    lat.filter(vals).numpy()
                times.append(time.perf_counter() - start)
            seconds[label] = float(np.min(times))
            points[label] = int(lat.num_points.numpy())
        row = {
            "F": num_f,
            "voxels": int(np.prod(TIMING_SHAPE)),
            "seconds": seconds,
            "time_ratio": {k: v / seconds["default"] for k, v in seconds.items()},
            "points": points,
            "points_ratio": {k: v / points["default"] for k, v in points.items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(errors: list[dict], cost: list[dict]) -> str:
    labels = [label for label, _, _ in SETTINGS]
    lines = [
        "| case | F | values | pydensecrf2 | " + " | ".join(labels) + " |",
        "|---|---|---|---|" + "---|" * len(labels),
    ]
    for r in errors:
        e = r["error"]
        mine = " | ".join(f"{e[k]:.3f}" for k in labels)
        theirs = f"{e['pydensecrf2']:.3f}" if "pydensecrf2" in e else "-"
        lines.append(f"| {r['case']} | {r['F']} | {r['values']} | {theirs} | {mine} |")
    lines += [
        "",
        "| F | " + " | ".join(f"{k}: time x / points x" for k in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for r in cost:
        cells = " | ".join(f"{r['time_ratio'][k]:.2f} / {r['points_ratio'][k]:.2f}" for k in labels)
        lines.append(f"| {r['F']} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench_accuracy"))
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.repeats < 1:
        print("bench_accuracy: --seeds and --repeats must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    errors = measure_errors(args.seeds)
    cost = measure_cost(args.repeats)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}.json"
    path.write_text(
        json.dumps({"commit": commit, "utc": stamp, "errors": errors, "cost": cost}, indent=1)
    )
    print(markdown(errors, cost))
    print(f"written {path}")


if __name__ == "__main__":
    main()
