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

--explore measures instead the ideas tried for issue 14's goal (structured pairs of copies,
width corrections, a self-weight correction, a mass-keeping blur) on the same cases at F = 7 and
10, with a float64 numpy re-implementation of the lattice (``np_lattice``, ``np_filter``) that
can move and widen the lattice, which the op cannot; tests/test_lattice_accuracy_setting.py
checks that it is the op's lattice (same points, same filter to float32 rounding), and the
output prints the op's default error beside it. docs/lattice_op.md ("Ideas measured") has what
each idea is and why it fails.

Usage: .venv/bin/python scripts/bench_accuracy.py [--seeds 3] [--repeats 3] [--out DIR] [--explore]
(`make bench-accuracy`; needs requirements-bench.txt for pydensecrf2, except --explore.)
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


# --- Exploration of ideas for issue 14's goal (--explore) ---------------------------------------
# A float64 numpy re-implementation of the lattice (the algorithm of csrc/permutohedral.cc, step
# for step, without its float32 rounding or threads) that can move the lattice by an offset and
# change its width, which the op cannot: it tests ideas before anything is built into the op.
# On the default setting it reproduces the op's error to about 3 digits (printed beside it).


def np_lattice(features: np.ndarray, width: float = 1.0, offset: np.ndarray | None = None) -> dict:
    """The lattice of features [N, d] (float64): vertex points and barycentric weights per voxel,
    and each point's two neighbours per blur direction. `width` multiplies the embedding's
    scale (lattice units per feature unit; > 1 narrows the lattice's Gaussian); `offset` [d+1]
    moves the elevated features (on the hyperplane sum = 0, in lattice units) before rounding."""
    n, d = features.shape
    scale = (
        np.sqrt(2.0 / 3.0) * (d + 1) * width / np.sqrt(np.arange(1, d + 1) * np.arange(2, d + 2))
    )
    scaled = (features - features.min(0)) * scale
    elevated = np.zeros((n, d + 1))
    running = np.zeros(n)
    for i in range(d, 0, -1):  # Adams et al.'s elevation onto the hyperplane sum = 0
        elevated[:, i] = running - i * scaled[:, i - 1]
        running += scaled[:, i - 1]
    elevated[:, 0] = running
    if offset is not None:
        elevated = elevated + offset
    up = np.ceil(elevated / (d + 1)) * (d + 1)
    down = np.floor(elevated / (d + 1)) * (d + 1)
    rem0 = np.where(up - elevated < elevated - down, up, down)
    excess = np.rint(rem0.sum(1) / (d + 1)).astype(np.int64)[:, None]
    # rank: how many coordinates have a larger differential (ties: the lower index ranks first)
    order = np.argsort(rem0 - elevated, axis=1, kind="stable")
    rank = np.argsort(order, axis=1, kind="stable")
    high = (excess > 0) & (rank >= d + 1 - excess)
    low = (excess < 0) & (rank < -excess)
    rem0 = rem0 - (d + 1) * high + (d + 1) * low
    rank = rank + excess - (d + 1) * high + (d + 1) * low
    weights = np.zeros((n, d + 2))
    share = (elevated - rem0) / (d + 1)
    rows = np.arange(n)[:, None]
    np.add.at(weights, (rows, d - rank), share)
    np.add.at(weights, (rows, d + 1 - rank), -share)
    weights[:, 0] += 1.0 + weights[:, d + 1]
    remainder = np.arange(d + 1)[None, :, None]
    keys = rem0[:, None, :] + remainder - (d + 1) * (rank[:, None, :] > d - remainder)
    flat = keys.reshape(-1, d + 1).astype(np.int64)

    def code(rows_: np.ndarray) -> np.ndarray:
        rows_ = np.ascontiguousarray(rows_[:, :d])
        return rows_.view(np.dtype((np.void, 8 * d))).ravel()

    codes, first, index = np.unique(code(flat), return_index=True, return_inverse=True)
    points = flat[first]
    m = len(points)
    neighbours = []
    for j in range(d + 1):
        step = np.full(d + 1, 1, np.int64)
        step[j] = -d
        pair = []
        for sign in (-1, 1):
            wanted = code(points + sign * step)
            at = np.minimum(np.searchsorted(codes, wanted), m - 1)
            pair.append(np.where(codes[at] == wanted, at, m))
        neighbours.append(pair)
    return {
        "d": d,
        "m": m,
        "index": index.reshape(n, d + 1),
        "weights": weights[:, : d + 1],
        "neighbours": neighbours,
    }


def np_filter(lattice: dict, values: np.ndarray, keep_lost: bool = False) -> np.ndarray:
    """Splat, blur ([1/2, 1, 1/2] per direction) and slice of values [N, C], float64.
    keep_lost: a point keeps the half it would have sent to an absent neighbour."""
    d, m = lattice["d"], lattice["m"]
    grid = np.zeros((m + 1, values.shape[1]))
    np.add.at(
        grid,
        lattice["index"].ravel(),
        (lattice["weights"][..., None] * values[:, None, :]).reshape(-1, values.shape[1]),
    )
    for below, above in lattice["neighbours"]:
        blurred = grid[:m] + 0.5 * (grid[below] + grid[above])
        if keep_lost:
            absent = (below == m).astype(float) + (above == m)
            blurred += 0.5 * absent[:, None] * grid[:m]
        grid[:m] = blurred
    return (grid[lattice["index"]] * lattice["weights"][..., None]).sum(1) / (1.0 + 2.0**-d)


def np_self_weight(lattice: dict) -> np.ndarray:
    """Each voxel's weight on itself in the filter, [N], as it would be if every lattice point
    that a blur path passes through were stored: vertices k and l of a simplex are |k - l|
    steps apart one way round and d + 1 - |k - l| the other, and each step carries 1/2."""
    d = lattice["d"]
    apart = np.abs(np.arange(d + 1)[:, None] - np.arange(d + 1)[None, :])
    blur = np.where(apart == 0, 1.0 + 2.0**-d, 2.0**-apart + 2.0 ** -(d + 1 - apart))
    w = lattice["weights"]
    return np.einsum("nk,kl,nl->n", w, blur, w) / (1.0 + 2.0**-d)


def _partition_shift(d: int) -> np.ndarray:
    """Half a lattice period between two halves of the coordinates: kills the lowest Fourier
    harmonics of the lattice's position-dependent error that run between the halves."""
    shift = (d + 1) / 2.0 * (np.arange(d + 1) < (d + 1) // 2)
    return shift - shift.mean()


def _centroid_shift(d: int) -> np.ndarray:
    """The vertices of copy 1 at the centroids of copy 0's simplices."""
    return d / 2.0 - np.arange(d + 1, dtype=np.float64)


# label -> list of copies (rotation copy number or None, offset function or None, width),
# and a flag for the filter variant; every idea is a pair of copies (2x the cost) or one.
EXPLORE = {
    "rotation pair (copies=2)": ([(None, None, 1.0), (1, None, 1.0)], ""),
    "centroid-shift pair": ([(None, None, 1.0), (None, _centroid_shift, 1.0)], ""),
    "partition-shift pair": ([(None, None, 1.0), (None, _partition_shift, 1.0)], ""),
    "reflection pair": ([(None, None, 1.0), (-1, None, 1.0)], ""),
    "width x0.96": ([(None, None, 0.96)], ""),
    "width x1.04": ([(None, None, 1.04)], ""),
    "rotation pair, width x0.96": ([(None, None, 0.96), (1, None, 0.96)], ""),
    "rotation pair, width x0.92": ([(None, None, 0.92), (1, None, 0.92)], ""),
    "self weight to its mean": ([(None, None, 1.0)], "self"),
    "absent neighbour keeps its half": ([(None, None, 1.0)], "keep_lost"),
}


def _explore_filter(feats: np.ndarray, values: np.ndarray, copies, variant: str) -> np.ndarray:
    from crf_rnn_3d.lattice_op._common import copy_rotation

    d = feats.shape[1]
    total = 0.0
    for rotation, offset, width in copies:
        f = feats
        if rotation == -1:
            f = -feats
        elif rotation is not None:
            f = feats @ copy_rotation(d, rotation).astype(np.float64).T
        lattice = np_lattice(f, width, None if offset is None else offset(d))
        out = np_filter(lattice, values, keep_lost=variant == "keep_lost")
        if variant == "self":
            weight = np_self_weight(lattice)
            out = out + (weight.mean() - weight)[:, None] * values
        total = total + out
    return total


def explore(seeds: int, features: tuple[int, ...] = (7, 10)) -> list[dict]:
    """Each idea's error (relative L2 of the normalised filter, median over seeds) on the
    benchmark's cases, beside the numpy lattice's default and the op's default."""
    from crf_rnn_3d.lattice_op import Lattice
    from crf_rnn_3d.lattice_op.reference import exact_normalised_filter

    rows = []
    for case, (shape, spacing, samples) in CASES.items():
        for num_f in features:
            for kind in ("smooth", "noise"):
                errors: dict[str, list[float]] = {}
                for seed in range(seeds):
                    rng = np.random.default_rng([num_f, seed, int(kind == "noise")])
                    feats = case_features(shape, spacing, num_f, rng)
                    vals = case_values(shape, spacing, kind, rng)
                    flat_f = feats.reshape(-1, num_f).astype(np.float64)
                    flat_v = vals.reshape(-1, 1).astype(np.float64)
                    n = flat_f.shape[0]
                    idx = np.arange(n) if samples is None else rng.choice(n, samples, False)
                    exact = exact_normalised_filter(flat_v, flat_f, idx)[:, 0]
                    both = np.concatenate([flat_v, np.ones_like(flat_v)], 1)
                    lat = Lattice(feats[None], backend="compiled")
                    op = lat.filter(np.concatenate([vals, np.ones_like(vals)], -1)[None])
                    op = op.numpy().reshape(-1, 2)
                    errors.setdefault("op default", []).append(
                        relative_l2((op[:, 0] / op[:, 1])[idx], exact)
                    )
                    ideas = {"numpy default": ([(None, None, 1.0)], ""), **EXPLORE}
                    for label, (copies, variant) in ideas.items():
                        out = _explore_filter(flat_f, both, copies, variant)
                        errors.setdefault(label, []).append(
                            relative_l2((out[:, 0] / out[:, 1])[idx], exact)
                        )
                row = {
                    "case": case,
                    "F": num_f,
                    "values": kind,
                    "error": {k: float(np.median(v)) for k, v in errors.items()},
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def explore_markdown(rows: list[dict]) -> str:
    labels = list(EXPLORE)
    lines = [
        "| case | F | values | op default | numpy default | " + " | ".join(labels) + " |",
        "|---|---|---|---|---|" + "---|" * len(labels),
    ]
    for r in rows:
        e = r["error"]
        ratios = " | ".join(f"{e[k] / e['numpy default']:.2f}" for k in labels)
        lines.append(
            f"| {r['case']} | {r['F']} | {r['values']} | {e['op default']:.3f} | "
            f"{e['numpy default']:.3f} | {ratios} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench_accuracy"))
    parser.add_argument(
        "--explore",
        action="store_true",
        help="measure the ideas tried for issue 14 on a numpy lattice instead (F = 7, 10)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.repeats < 1:
        print("bench_accuracy: --seeds and --repeats must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    if args.explore:
        rows = explore(args.seeds)
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        path = args.out / f"explore-{stamp}.json"
        path.write_text(json.dumps({"utc": stamp, "explore": rows}, indent=1))
        print(explore_markdown(rows))
        print(f"written {path}")
        return
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
