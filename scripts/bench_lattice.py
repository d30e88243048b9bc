"""Benchmark of the permutohedral lattice op against pydensecrf2 (run with `make bench-lattice`).

Two references of realistic size, made deterministically (smooth anatomy, bias field, noise;
never uniform random features, which would explode the lattice; src/datasets/phantoms.py,
lattice_bench_reference):

  promise  one T2-like channel, 63 x 200 x 200 voxels at (z, y, x) = (2, 1, 1) mm, F = 4
           (three positions in mm / theta_alpha, intensity / theta_beta), 2 labels;
  brats    four correlated modalities (T1, T1c, T2, FLAIR), 155 x 240 x 240 at 1 mm, F = 7
           (three positions + four intensities), 5 labels.

For each it reports the lattice points, build time, time per filter call with C = 2 and C = 5
values, peak memory, the normalised error against the exact float64 filter on a random
subsample of voxels, and the CRF-shaped comparison with pydensecrf2 (Krahenbuhl's DenseCRF):

  ours    Lattice(bilateral features) + 10 filter calls with C = number of labels;
  theirs  DenseCRF setup (unary, a bilateral and a spatial kernel) + inference(5), i.e. its
          10 filter calls (5 bilateral, 5 spatial) plus its own lattice builds.

It also times our C++ filter kernel against the same filter written in TensorFlow ops (gather,
segment_sum) on the same lattice, our op with 1 and with 2 intra-op threads, and build / filter
time over four input sizes (crops of the promise volume) to show that the cost grows linearly
with voxels.
Every timing and memory figure comes from a fresh subprocess (the script re-invokes itself with
--worker), so TensorFlow's thread count is set before it initialises and peak RSS (VmHWM) is per
configuration. All subprocesses read the same arrays, written once to a temporary folder.

Results go to stdout (a table, then the Markdown for docs/benchmarks.md) and, as JSON, to
results/bench_lattice/<timestamp>.json. The memory probe, the pydensecrf2 driver and the Markdown
writer are in src/benchmarks/.

Examples:
  make bench-lattice                                  # the full benchmark (about 10 minutes)
  make bench-lattice ARGS="--quick"                   # small volumes, a smoke run
  make bench-lattice ARGS="--refs promise --parts ours,dcrf"
  make bench-core                                     # stage timings of the C++ core alone
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from crf_rnn_3d.benchmarks.lattice_report import machine, markdown
from crf_rnn_3d.benchmarks.memory import peak_mib, reset_peak
from crf_rnn_3d.benchmarks.pydensecrf import features_of, run_densecrf, unary_from_probabilities
from crf_rnn_3d.datasets.phantoms import (
    LATTICE_BENCH_FULL_SHAPES,
    LATTICE_BENCH_LABELS,
    LATTICE_BENCH_QUICK_SHAPES,
    LATTICE_BENCH_THETA,
    lattice_bench_reference,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PARTS = ("ours", "threads", "dcrf", "error", "scaling", "tfops")

# Kernel widths (documented in docs/benchmarks.md). Intensities are z-scored, so theta_beta is
# in units of the image's standard deviation; positions are in mm. The references themselves are
# src/datasets/phantoms.py's lattice_bench_reference.
THETA_ALPHA_MM = LATTICE_BENCH_THETA["alpha_mm"]  # bilateral kernel, positions
THETA_BETA = LATTICE_BENCH_THETA["beta_zscore"]  # bilateral kernel, intensities (z-score units)
THETA_GAMMA_MM = LATTICE_BENCH_THETA["gamma_mm"]  # spatial kernel
W_BILATERAL, W_SPATIAL = 5.0, 3.0  # pydensecrf Potts weights (do not change the cost)

FULL_SHAPES = LATTICE_BENCH_FULL_SHAPES
QUICK_SHAPES = LATTICE_BENCH_QUICK_SHAPES
LABELS = LATTICE_BENCH_LABELS


# ---------------------------------------------------------------------------------------------
# workers (each in a fresh process)
# ---------------------------------------------------------------------------------------------


def _load(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(folder.glob("*.npy"))}


def _init_tf(threads: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from crf_rnn_3d.lattice_op import Lattice

    # Warm up: load the library and run both code paths once on a tiny lattice.
    tiny = np.random.default_rng(0).normal(size=(1, 6, 6, 6, 4)).astype(np.float32)
    lat = Lattice(tiny)
    for c in (1, 2, 5):
        lat.filter(np.ones((1, 6, 6, 6, c), np.float32)).numpy()
    return tf, Lattice


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


def _lattice_bytes(lat) -> int:
    return int(sum(t.numpy().nbytes for t in lat.tensors))


def worker_ours(folder: Path, threads: int, repeats: int, labels: int) -> dict:
    """Build, filter, CRF-shaped sequence and peak memory of our op at a given thread count."""
    tf, Lattice = _init_tf(threads)
    data = _load(folder)
    feats = tf.constant(data["bilateral"])
    spatial = tf.constant(data["spatial"])
    vals = {2: tf.constant(data["probs2"]), 5: tf.constant(data["probs5"])}
    crf_vals = vals[labels]
    del data
    n = int(np.prod(feats.shape[1:-1]))
    base = reset_peak()

    # Peak memory of one lattice and one C = 5 filter call, before anything else runs.
    t0 = time.perf_counter()
    lat = Lattice(feats)
    points = int(lat.num_points.numpy())
    first_build = time.perf_counter() - t0
    lat.filter(vals[5]).numpy()
    peak_one = peak_mib()
    lattice_bytes = _lattice_bytes(lat)
    out = {
        "threads": threads,
        "voxels": n,
        "features": int(feats.shape[-1]),
        "lattice_points": points,
        "points_per_voxel": points / n,
        "lattice_mib": lattice_bytes / 2**20,
        "rss_baseline_mib": base,
        "rss_peak_build_filter_mib": peak_one,
        "rss_increase_mib": peak_one - base,
        "first_build_s": first_build,
    }
    del lat

    def build():
        Lattice(feats).num_points.numpy()

    out["build_s"], out["build_runs_s"] = _timed(build, repeats)
    lat = Lattice(feats)
    for c, v in vals.items():
        out[f"filter_c{c}_s"], out[f"filter_c{c}_runs_s"] = _timed(
            lambda v=v, lat=lat: lat.filter(v).numpy(), max(3, repeats)
        )
    del lat

    def crf_sequence():
        lattice = Lattice(feats)
        for _ in range(10):
            lattice.filter(crf_vals).numpy()

    out["crf_s"], out["crf_runs_s"] = _timed(crf_sequence, repeats)

    # Like-for-like with DenseCRF: both kernels, each filtered 5 times.
    def crf_both_kernels():
        lb, ls = Lattice(feats), Lattice(spatial)
        for _ in range(5):
            lb.filter(crf_vals).numpy()
            ls.filter(crf_vals).numpy()

    out["crf_both_s"], out["crf_both_runs_s"] = _timed(crf_both_kernels, repeats)
    ls = Lattice(spatial)
    out["spatial_points"] = int(ls.num_points.numpy())
    out["spatial_filter_s"], _ = _timed(lambda: ls.filter(crf_vals).numpy(), 3)
    out["rss_peak_end_mib"] = peak_mib()
    return out


def worker_dcrf(folder: Path, repeats: int, labels: int) -> dict:
    """pydensecrf2: setup (unary + bilateral + spatial kernel) and inference(5), peak memory."""
    data = _load(folder)
    probs = data[f"probs{labels}"][0]
    n = int(np.prod(probs.shape[:-1]))
    unary = unary_from_probabilities(probs, clip=1e-8)
    kernels = [
        ("bilateral", features_of(data["bilateral"][0]), W_BILATERAL),
        ("spatial", features_of(data["spatial"][0]), W_SPATIAL),
    ]
    del data, probs
    base = reset_peak()
    runs = []
    for r in range(repeats):
        q, times = run_densecrf(unary, kernels, 5)
        if r == 0:
            peak = peak_mib()
            check = bool(np.allclose(q.sum(0), 1.0, atol=1e-3))
        del q
        runs.append(
            {
                "setup_s": times["setup_s"],
                "setup_bilateral_s": times["setup_bilateral_s"],
                "setup_spatial_s": times["setup_spatial_s"],
                "inference5_s": times["inference_s"],
                "total_s": times["total_s"],
            }
        )
    best = min(runs, key=lambda x: x["total_s"])
    return {
        "voxels": n,
        "labels": labels,
        **best,
        "runs": runs,
        "rss_baseline_mib": base,
        "rss_peak_mib": peak,
        "rss_increase_mib": peak - base,
        "q_sums_to_one": check,
    }


def _exact_rows_windowed(values, features, shape, spacing, rows, radius):
    """Exact normalised filter at `rows`, summing over a box of +-radius theta_alpha around each.

    Terms outside the box have a position distance > radius (in units of theta_alpha), so each
    weighs < exp(-radius^2 / 2); the caller picks radius so that all of them together are
    negligible. The sums themselves are src/lattice_op/reference.py's float64 brute force.
    """
    from crf_rnn_3d.lattice_op.reference import exact_normalised_filter

    half = [math.ceil(radius * THETA_ALPHA_MM / s) for s in spacing]
    vol_v = values.reshape(*shape, -1)
    vol_f = features.reshape(*shape, -1)
    out = np.empty((len(rows), values.shape[-1]), np.float64)
    for i, flat in enumerate(rows):
        c = np.unravel_index(int(flat), shape)
        sl = tuple(
            slice(max(0, ci - h), min(n, ci + h + 1))
            for ci, h, n in zip(c, half, shape, strict=True)
        )
        local = np.ravel_multi_index(
            tuple(ci - s.start for ci, s in zip(c, sl, strict=True)), [s.stop - s.start for s in sl]
        )
        fv = vol_f[sl].reshape(-1, features.shape[-1])
        vv = vol_v[sl].reshape(-1, values.shape[-1])
        out[i] = exact_normalised_filter(vv, fv, rows=np.array([local]))[0]
    return out


def worker_error(folder: Path, threads: int, labels: int, samples: int, seed: int) -> dict:
    """Normalised error of filter(v) / filter(1) against the exact filter on sampled voxels."""
    from crf_rnn_3d.lattice_op.reference import exact_gaussian_filter

    tf, Lattice = _init_tf(threads)
    data = _load(folder)
    feats = data["bilateral"]
    shape = feats.shape[1:-1]
    spacing = tuple(float(s) for s in data["spacing"])
    probs = data[f"probs{labels}"]
    n = int(np.prod(shape))
    stacked = np.concatenate([probs, np.ones_like(probs[..., :1])], -1)
    lat = Lattice(tf.constant(feats))
    out = lat.filter(tf.constant(stacked)).numpy().reshape(n, -1)
    ours = out[:, :-1] / out[:, -1:]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(samples, n), replace=False))
    v = probs.reshape(n, -1)
    f = feats.reshape(n, -1)
    # Box radius (in theta_alpha) such that N * exp(-r^2 / 2) <= 1e-9 (self weight is 1).
    radius = math.sqrt(2.0 * math.log(n * 1e9))
    t0 = time.perf_counter()
    exact = _exact_rows_windowed(v, f, shape, spacing, rows, radius)
    exact_s = time.perf_counter() - t0
    # Check the window on a few rows against the full O(N) sum.
    check_rows = rows[:: max(1, len(rows) // 6)][:6]
    full = exact_gaussian_filter(np.concatenate([v, np.ones((n, 1), v.dtype)], 1), f, check_rows, 2)
    full = full[:, :-1] / full[:, -1:]
    window_dev = float(np.abs(full - exact[np.searchsorted(rows, check_rows)]).max())
    value_range = float(v.max() - v.min())
    err = np.abs(ours[rows] - exact) / value_range
    return {
        "samples": len(rows),
        "channels": labels,
        "value_range": value_range,
        "max_error": float(err.max()),
        "rms_error": float(np.sqrt(np.mean(err**2))),
        "mean_error": float(err.mean()),
        "window_radius_theta": radius,
        "window_vs_full_max_dev": window_dev,
        "exact_s": exact_s,
    }


def worker_scaling(folder: Path, threads: int, repeats: int) -> dict:
    """Build and filter (C = 2) time over four crops of the volume: 1/8, 1/4, 1/2, 1 of it."""
    tf, Lattice = _init_tf(threads)
    data = _load(folder)
    feats, vals = data["bilateral"], data["probs2"]
    _, z, y, x, _ = feats.shape
    crops = [(z // 2, y // 2, x // 2), (z // 2, y, x // 2), (z, y, x // 2), (z, y, x)]
    rows = []
    for cz, cy, cx in crops:
        sl = (slice(None), slice(0, cz), slice(0, cy), slice((x - cx) // 2, (x - cx) // 2 + cx))
        f = tf.constant(np.ascontiguousarray(feats[sl]))
        v = tf.constant(np.ascontiguousarray(vals[sl]))
        n = cz * cy * cx
        build_s, _ = _timed(lambda f=f: Lattice(f).num_points.numpy(), repeats)
        lat = Lattice(f)
        points = int(lat.num_points.numpy())
        filter_s, _ = _timed(lambda lat=lat, v=v: lat.filter(v).numpy(), max(3, repeats))
        rows.append(
            {
                "shape": [cz, cy, cx],
                "voxels": n,
                "lattice_points": points,
                "build_s": build_s,
                "filter_c2_s": filter_s,
                "build_ns_per_voxel": build_s / n * 1e9,
                "filter_ns_per_voxel": filter_s / n * 1e9,
            }
        )
        del lat
    return {"threads": threads, "sizes": rows}


def _tf_ops_filter(tf, lattice_tensors, values, features_dim: int):
    """The lattice filter written with TensorFlow's own ops (unsorted_segment_sum, gather) over
    our build's tensors: the alternative to a C++ filter kernel that docs/lattice_op.md weighs."""
    vi, vw, nbrs = lattice_tensors[:3]  # the splat lists, when the build wrote them, go unused
    c = values.shape[-1]
    d1 = features_dim + 1
    m = tf.shape(nbrs)[1]
    flat = tf.reshape(values, [-1, c])
    vi2, vw2 = tf.reshape(vi, [-1, d1]), tf.reshape(vw, [-1, d1])
    products = vw2[..., None] * flat[:, None, :]  # [N, F+1, C], entry order
    cur = tf.math.unsorted_segment_sum(tf.reshape(products, [-1, c]), tf.reshape(vi2, [-1]), m)
    zero = tf.zeros([1, c], values.dtype)
    for j in range(d1):
        padded = tf.concat([cur, zero], 0)
        cur = cur + 0.5 * (tf.gather(padded, nbrs[j, :, 0]) + tf.gather(padded, nbrs[j, :, 1]))
    alpha = 1.0 / (1.0 + 2.0**-features_dim)
    out = tf.reduce_sum(tf.gather(cur, vi2) * vw2[..., None], axis=1) * alpha
    return tf.reshape(out, tf.shape(values))


def worker_tfops(folder: Path, threads: int, repeats: int, labels: int) -> dict:
    """Filter time of our C++ kernel against the same filter in TensorFlow ops (same lattice)."""
    tf, Lattice = _init_tf(threads)
    data = _load(folder)
    feats = tf.constant(data["bilateral"])
    vals = tf.constant(data[f"probs{labels}"])
    del data
    lat = Lattice(feats)
    dim = int(feats.shape[-1])
    tf_filter = tf.function(lambda v: _tf_ops_filter(tf, tuple(lat.tensors), v, dim))
    reference = lat.filter(vals).numpy()
    alternative = tf_filter(vals).numpy()
    scale = float(np.abs(reference).max())
    ours_s, _ = _timed(lambda: lat.filter(vals).numpy(), max(3, repeats))
    tfops_s, _ = _timed(lambda: tf_filter(vals).numpy(), max(3, repeats))
    return {
        "threads": threads,
        "channels": labels,
        "kernel_filter_s": ours_s,
        "tf_ops_filter_s": tfops_s,
        "tf_ops_over_kernel": tfops_s / ours_s,
        "max_relative_difference": float(np.abs(alternative - reference).max()) / scale,
    }


def run_worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["ours", "dcrf", "error", "scaling", "tfops"])
    p.add_argument("folder", type=Path)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--labels", type=int, default=2)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.kind == "ours":
        res = worker_ours(a.folder, a.threads, a.repeats, a.labels)
    elif a.kind == "dcrf":
        res = worker_dcrf(a.folder, a.repeats, a.labels)
    elif a.kind == "error":
        res = worker_error(a.folder, a.threads, a.labels, a.samples, a.seed)
    elif a.kind == "tfops":
        res = worker_tfops(a.folder, a.threads, a.repeats, a.labels)
    else:
        res = worker_scaling(a.folder, a.threads, a.repeats)
    print("RESULT " + json.dumps(res), flush=True)


def call_worker(*args: str) -> dict:
    """Runs this script as a worker in a fresh process and returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    res = json.loads(lines[-1][len("RESULT ") :])
    res["wall_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small volumes (a smoke run)")
    p.add_argument("--refs", default="promise,brats", help="comma list of promise, brats")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="main thread count")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (median is reported)")
    p.add_argument("--samples", type=int, default=2000, help="voxels for the error check")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench_lattice")
    p.add_argument(
        "--dump",
        type=Path,
        metavar="DIR",
        help="only write each reference's bilateral features and values as raw float32 into "
        "DIR/<reference>/ for scripts/bench_core.cc (make bench-core), then stop",
    )
    a = p.parse_args()
    refs = [r.strip() for r in a.refs.split(",") if r.strip()]
    parts = {s.strip() for s in a.parts.split(",") if s.strip()}
    for bad in [r for r in refs if r not in FULL_SHAPES] + [s for s in parts if s not in PARTS]:
        p.error(f"unknown reference or part {bad!r}")
    shapes = QUICK_SHAPES if a.quick else FULL_SHAPES
    samples = min(a.samples, 200) if a.quick else a.samples
    if a.dump is not None:
        for name in refs:
            dump_reference(name, shapes[name], a.dump / name)
        return

    results: dict = {
        "command": " ".join(["python", "scripts/bench_lattice.py", *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": a.threads,
        "theta": {
            "alpha_mm": THETA_ALPHA_MM,
            "beta_zscore": THETA_BETA,
            "gamma_mm": THETA_GAMMA_MM,
        },
        "references": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_lattice_"))
    t_start = time.perf_counter()
    try:
        for name in refs:
            t0 = time.perf_counter()
            arrays = lattice_bench_reference(name, shapes[name])
            folder = tmp / name
            folder.mkdir()
            for key, arr in arrays.items():
                np.save(folder / f"{key}.npy", arr)
            del arrays
            labels = LABELS[name]
            entry = {
                "shape": list(shapes[name]),
                "voxels": int(np.prod(shapes[name])),
                "labels": labels,
                "generate_s": time.perf_counter() - t0,
            }
            results["references"][name] = entry
            print(f"[{name}] generated {shapes[name]} in {entry['generate_s']:.1f} s", flush=True)
            common = ["--repeats", str(a.repeats), "--labels", str(labels)]
            if "ours" in parts:
                entry["ours"] = call_worker(
                    "ours", str(folder), "--threads", str(a.threads), *common
                )
                print(f"[{name}] ours: {json.dumps(_short(entry['ours']))}", flush=True)
            if "threads" in parts and a.threads != 1:
                entry["threads_1"] = call_worker("ours", str(folder), "--threads", "1", *common)
                print(f"[{name}] 1 thread: {json.dumps(_short(entry['threads_1']))}", flush=True)
            if "dcrf" in parts:
                entry["dcrf"] = call_worker("dcrf", str(folder), *common)
                print(f"[{name}] pydensecrf2: {json.dumps(_short(entry['dcrf']))}", flush=True)
            if "error" in parts:
                entry["error"] = call_worker(
                    "error",
                    str(folder),
                    "--threads",
                    str(a.threads),
                    "--labels",
                    str(labels),
                    "--samples",
                    str(samples),
                )
                print(f"[{name}] error: {json.dumps(_short(entry['error']))}", flush=True)
            if "tfops" in parts:
                entry["tfops"] = call_worker(
                    "tfops", str(folder), "--threads", str(a.threads), *common
                )
                print(f"[{name}] tf ops filter: {json.dumps(_short(entry['tfops']))}", flush=True)
            if "scaling" in parts and name == "promise":
                results["scaling"] = call_worker(
                    "scaling", str(folder), "--threads", str(a.threads), "--repeats", "3"
                )
                print("[promise] scaling done", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t_start
    results["machine"]["load_avg_at_end"] = os.getloadavg()

    md = markdown(results)
    print("\n" + md)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(results, indent=2))
    tmp_path.rename(path)
    print(f"\nresults written to {path.relative_to(REPO_ROOT)} (total {results['total_s']:.0f} s)")


def dump_reference(name: str, shape: tuple[int, int, int], folder: Path) -> None:
    """Writes meta.txt, features.f32 (bilateral) and values.f32 (label probabilities)."""
    arrays = lattice_bench_reference(name, shape)
    feats = arrays["bilateral"]
    vals = arrays[f"probs{LABELS[name]}"]
    folder.mkdir(parents=True, exist_ok=True)
    for fname, arr in (("features.f32", feats), ("values.f32", vals)):
        tmp = folder / (fname + ".tmp")
        arr.astype(np.float32).tofile(tmp)
        tmp.rename(folder / fname)
    n = int(np.prod(shape))
    (folder / "meta.txt").write_text(f"{n} {feats.shape[-1]} {vals.shape[-1]}\n")
    print(f"[{name}] wrote {folder}", flush=True)


def _short(res: dict) -> dict:
    """The scalar entries of a worker result, rounded, for progress lines."""
    return {
        k: (round(v, 4) if isinstance(v, float) else v)
        for k, v in res.items()
        if isinstance(v, int | float | bool)
    }


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as err:  # a worker failed: its stderr tail, on one line
        from crf_rnn_3d.experiments.cli import fail

        fail(f"bench_lattice: {err}")
