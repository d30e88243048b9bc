"""CRF benchmarks (results in docs/crf.md).

  spatial:    the smoothness kernel as an exact separable Gaussian vs a position-only
              permutohedral lattice (time for setup + 5 normalised applications, and the error
              against an untruncated float64 Gaussian).
  profile:    the time of each step of the mean field on one of those phantoms, composed of TF
              ops (the layer's path) and in the fused kernel (dense_crf's path).
  layer:      CrfRnn at inference on those phantoms, composed path against fused_inference.
  pydensecrf: dense_crf against pydensecrf2 on the same arrays with equivalent settings, on a
              PROMISE12-sized phantom (63 x 200 x 200 at 2 x 1 x 1 mm, 2 labels) and a
              BraTS-sized one (155 x 240 x 240, 4 modalities, 5 labels), 5 iterations, bilateral
              + spatial kernel: total time (setup + inference), peak memory above the state
              before the call, and the fraction of voxels whose argmax label agrees.

Usage: .venv/bin/python scripts/bench_crf.py {spatial,pydensecrf,profile,layer} [options]
(`make bench-crf` runs the pydensecrf comparison; it needs requirements-bench.txt.) The phantoms
come from src/datasets/phantoms.py (crf_bench_case), the pydensecrf2 driver and the memory
probe from src/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from crf_rnn_3d.benchmarks.memory import measure
from crf_rnn_3d.benchmarks.pydensecrf import dense_crf_pydensecrf
from crf_rnn_3d.crf.functional import lattice_filter, positions, separable_spatial_filter
from crf_rnn_3d.datasets.phantoms import crf_bench_case as benchmark_case
from crf_rnn_3d.experiments.cli import fail


def exact_spatial(values: np.ndarray, spacing: tuple[float, ...], theta: float) -> np.ndarray:
    """Exact normalised spatial Gaussian of values [*spatial, C] in float64: a dense (untruncated)
    Gaussian matrix per axis, applied axis by axis."""
    out, ones = values, np.ones((*values.shape[:-1], 1))
    for axis, (length, step) in enumerate(zip(values.shape[:-1], spacing, strict=True)):
        idx = np.arange(length) * step / theta
        mat = np.exp(-0.5 * (idx[:, None] - idx[None, :]) ** 2)
        out = np.moveaxis(np.tensordot(mat, out, axes=([1], [axis])), 0, axis)
        ones = np.moveaxis(np.tensordot(mat, ones, axes=([1], [axis])), 0, axis)
    return out / ones


def bench_spatial(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    shape = (1, *args.shape, args.classes)
    q = tf.constant(rng.uniform(size=shape).astype(np.float32))
    spacing = tuple(args.spacing)
    results = {}
    for name in ("separable", "lattice") * 2:  # second round is the one reported (warm)
        start = time.perf_counter()
        if name == "separable":
            filt = separable_spatial_filter(
                tf.shape(q), spacing, args.theta, "mean", tf.float32, q.shape
            )
        else:
            filt = lattice_filter(positions(tf.shape(q), spacing, args.theta, tf.float32), "mean")
        setup = time.perf_counter() - start
        out = None
        for _ in range(args.iterations):
            out = filt(q)
        out = out.numpy()
        total = time.perf_counter() - start
        results[name] = (setup, total, out)
    exact = exact_spatial(q.numpy()[0].astype(np.float64), spacing, args.theta)[None]
    for name, (setup, total, out) in results.items():
        err = np.abs(out - exact)
        print(
            f"{name:10s} shape={args.shape} C={args.classes} spacing={spacing} "
            f"theta_gamma={args.theta}mm: setup {setup:.3f}s, setup+{args.iterations} "
            f"applications {total:.3f}s; |error| vs exact max {err.max():.2e} "
            f"RMS {np.sqrt(np.mean(err**2)):.2e} (values in [0, 1])"
        )


def bench_profile(args: argparse.Namespace) -> None:
    """Times each step of the composed mean field (src/crf/functional.py's pieces, called one
    by one eagerly: the CrfRnn layer's path) and of dense_crf's fused path, on a phantom with
    the settings of the pydensecrf comparison."""
    import tensorflow as tf

    from crf_rnn_3d.crf import functional as mf

    image, labels, spacing, classes, probs = benchmark_case(args.case, args.seed)
    unaries = tf.constant(np.log(np.clip(probs, 1e-5, None))[None])
    img = tf.constant(image[None])
    betas = [args.theta_beta] * image.shape[-1]
    norm = "symmetric"
    mf.lattice_filter(tf.zeros([1, 4, 4, 4, 1]), norm)  # load the op
    for spatial in ("lattice", "separable"):
        times: dict[str, float] = {}
        start = time.perf_counter()

        def tick(name: str, start: float, times: dict[str, float] = times) -> float:
            now = time.perf_counter()
            times[name] = times.get(name, 0.0) + now - start
            return now

        feats = mf.bilateral_features(img, spacing, args.theta_alpha, betas)
        start = tick("features", start)
        appearance = mf.lattice_filter(feats, norm)
        start = tick("bilateral lattice: build + filter of ones", start)
        if spatial == "lattice":
            pos = mf.positions(tf.shape(unaries), spacing, args.theta_gamma, tf.float32)
            smooth = mf.lattice_filter(pos, norm)
        else:
            smooth = mf.separable_spatial_filter(
                tf.shape(unaries), spacing, args.theta_gamma, norm, tf.float32, unaries.shape
            )
        start = tick(f"spatial ({spatial}): setup", start)
        weights, mu = tf.fill([classes], 5.0), 1.0 - tf.eye(classes)
        logits = unaries
        for _ in range(args.iterations):
            flat = tf.reshape(logits, [-1, classes])
            q = tf.reshape(tf.nn.softmax(flat), tf.shape(unaries))
            start = tick("softmax", start)
            a = appearance(q)
            start = tick("bilateral filter (normalised)", start)
            g = smooth(q)
            start = tick(f"spatial ({spatial}) filter (normalised)", start)
            pairwise = tf.einsum("...k,lk->...l", weights * a + 0.6 * weights * g, mu)
            logits = unaries - pairwise
            _ = logits.numpy()
            start = tick("weighting, compatibility, unaries", start)
        print(f"{args.case} {labels.shape}, {classes} labels, {args.iterations} iterations:")
        for name, seconds in times.items():
            print(f"  {name:42s} {seconds:7.2f} s")
        print(f"  {'total':42s} {sum(times.values()):7.2f} s", flush=True)
    # dense_crf's path: features and lattice in TF, then every iteration in the fused kernel
    # (one run with 1 iteration and one with all of them split its fixed and per-iteration cost)
    from crf_rnn_3d.crf._ops import fused_mean_field
    from crf_rnn_3d.lattice_op import Lattice

    taps = mf.spatial_taps(spacing, args.theta_gamma, unaries.shape)
    best: dict[str, float] = {}
    for _ in range(3):
        start = time.perf_counter()
        feats = mf.bilateral_features(img, spacing, args.theta_alpha, betas)
        _ = feats.numpy()
        now = time.perf_counter()
        runs = {"features": now - start}
        lattice = Lattice(feats)
        _ = lattice.tensors.splat_weights.numpy()
        runs["bilateral lattice: build"], now = time.perf_counter() - now, time.perf_counter()
        for iterations in (1, args.iterations):
            fused_mean_field(
                unaries,
                lattice.tensors,
                tf.fill([classes], 5.0),
                tf.fill([classes], 3.0),
                1.0 - tf.eye(classes),
                taps,
                num_iterations=iterations,
                normalisation=norm,
            )[1].numpy()
            runs[f"fused kernel, {iterations} iteration(s)"] = time.perf_counter() - now
            now = time.perf_counter()
        for name, seconds in runs.items():
            best[name] = min(best.get(name, seconds), seconds)
    one, all_ = (
        best["fused kernel, 1 iteration(s)"],
        best[f"fused kernel, {args.iterations} iteration(s)"],
    )
    per_iteration = (all_ - one) / max(args.iterations - 1, 1)
    print(f"{args.case}, dense_crf's fused path (fastest of 3 runs):")
    print(f"  {'features':42s} {best['features']:7.2f} s")
    print(f"  {'bilateral lattice: build':42s} {best['bilateral lattice: build']:7.2f} s")
    print(f"  {'fused kernel: filters of ones, setup':42s} {one - per_iteration:7.2f} s")
    print(f"  {'fused kernel: per iteration':42s} {per_iteration:7.2f} s")
    total = best["features"] + best["bilateral lattice: build"] + all_
    print(f"  {f'total, {args.iterations} iterations':42s} {total:7.2f} s", flush=True)


def bench_layer(args: argparse.Namespace) -> None:
    """CrfRnn at inference on both phantoms (the pydensecrf comparison's settings, "mean"
    normalisation, default weights): composed TF path against fused_inference=True,
    alternating in one process, fastest of --repeats."""
    from crf_rnn_3d.crf import CrfRnn

    for name in args.cases:
        image, labels, spacing, classes, probs = benchmark_case(name, args.seed)
        unaries = tf.constant(np.log(np.clip(probs, 1e-5, None))[None])
        img = tf.constant(image[None])
        settings = dict(
            theta_alpha=args.theta_alpha,
            theta_beta=args.theta_beta,
            theta_gamma=args.theta_gamma,
            spacing=list(spacing),
            num_iterations=args.iterations,
        )
        layers = {
            "composed": CrfRnn(**settings),
            "fused_inference": CrfRnn(fused_inference=True, **settings),
        }
        for layer in layers.values():  # build and warm up
            layer([unaries[:, :8, :8, :8], img[:, :8, :8, :8]], training=False)
        times: dict[str, list[float]] = {key: [] for key in layers}
        for _ in range(args.repeats):
            for key, layer in layers.items():
                start = time.perf_counter()
                layer([unaries, img], training=False).numpy()
                times[key].append(time.perf_counter() - start)
        best = {key: min(values) for key, values in times.items()}
        print(
            f"{name} {labels.shape}, {classes} labels, {args.iterations} iterations: "
            f"composed {best['composed']:.2f} s, fused_inference "
            f"{best['fused_inference']:.2f} s (fastest of {args.repeats}; "
            f"{best['composed'] / best['fused_inference']:.2f}x)",
            flush=True,
        )


METHODS = ("pydensecrf2", "ours-pydensecrf-mode", "ours-default-mode")


def run_one(args: argparse.Namespace) -> None:
    """Child process: one method on the saved arrays; prints a JSON line with time and memory,
    saves the argmax labels. A fresh process per method keeps the peak-memory numbers apart."""
    if args.threads:  # TensorFlow's intra-op pool, which our kernels run on
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    data = np.load(args.data)
    probs, image, spacing = data["probs"], data["image"], tuple(data["spacing"])
    settings = json.loads(args.settings)
    if args.method == "pydensecrf2":
        fn = lambda: dense_crf_pydensecrf(probs, image, spacing, settings)[0]  # noqa: E731
    else:
        from crf_rnn_3d.crf.dense_crf import dense_crf

        mode = "pydensecrf" if args.method == "ours-pydensecrf-mode" else "default"
        dense_crf(probs[:8, :8, :8], image[:8, :8, :8], spacing)  # load the op, warm up TF

        def fn():
            return dense_crf(
                probs,
                image,
                spacing,
                theta_alpha=settings["theta_alpha"],
                theta_beta=settings["theta_beta"],
                theta_gamma=settings["theta_gamma"],
                bilateral_weight=settings["w_bilateral"],
                spatial_weight=settings["w_spatial"],
                num_iterations=settings["iterations"],
                mode=mode,
            )

    seconds, peaks = [], []
    for _ in range(args.repeats):
        q, elapsed, peak = measure(fn)
        seconds.append(elapsed)
        peaks.append(peak)
    np.save(args.out, q.argmax(-1).astype(np.uint8))
    print(json.dumps({"seconds": seconds, "peak_mib": max(peaks)}))


def bench_pydensecrf(args: argparse.Namespace) -> None:
    asked = args.methods.split(",")
    unknown = [m for m in asked if m not in METHODS]
    if unknown:
        fail(f"bench_crf.py pydensecrf: unknown method(s) {unknown}; choose from {list(METHODS)}")
    methods = tuple(m for m in METHODS if m in asked)
    if "pydensecrf2" not in methods:
        fail("bench_crf.py pydensecrf: --methods must include pydensecrf2 (the peer)")
    report: dict = {"threads": args.threads, "repeats": args.repeats, "cases": {}}
    for name in args.cases:
        image, labels, spacing, classes, probs = benchmark_case(name, args.seed)
        settings = dict(
            theta_alpha=args.theta_alpha,
            theta_beta=args.theta_beta,
            theta_gamma=args.theta_gamma,
            w_bilateral=args.w_bilateral,
            w_spatial=args.w_spatial,
            iterations=args.iterations,
        )
        threads = args.threads or "default"
        print(
            f"{name}: {'x'.join(map(str, labels.shape))} voxels, spacing {spacing} mm, "
            f"{image.shape[-1]} channel(s), {classes} labels; settings {settings}; "
            f"threads for ours: {threads}",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "case.npz")
            np.savez(data, probs=probs, image=image, spacing=np.asarray(spacing))
            runs: dict[str, np.ndarray] = {}
            seconds: dict[str, list[float]] = {m: [] for m in methods}
            peaks: dict[str, float] = dict.fromkeys(methods, 0.0)
            # interleaved (each round runs every method once, each in a fresh process), so that
            # the load of a shared machine drifts over all methods alike
            for _ in range(args.repeats):
                for method in methods:
                    out = os.path.join(tmp, f"{method}.npy")
                    command = [sys.executable, __file__, "one", "--data", data]
                    command += ["--method", method, "--settings", json.dumps(settings)]
                    command += ["--out", out, "--threads", str(args.threads)]
                    child = subprocess.run(command, capture_output=True, text=True, check=False)
                    if child.returncode != 0:
                        raise RuntimeError(f"{method} failed:\n{child.stderr[-3000:]}")
                    result = json.loads(child.stdout.strip().splitlines()[-1])
                    runs[method] = np.load(out)
                    seconds[method] += result["seconds"]
                    peaks[method] = max(peaks[method], result["peak_mib"])
            for method in methods:
                times = sorted(seconds[method])
                print(
                    f"  {method:22s} total: min {times[0]:7.2f} s, median "
                    f"{times[len(times) // 2]:7.2f} s of {len(times)}   "
                    f"peak +{peaks[method]:6.0f} MiB",
                    flush=True,
                )
        ref = runs["pydensecrf2"]
        unary = probs.argmax(-1)
        report["cases"][name] = {
            "shape": list(labels.shape),
            "channels": int(image.shape[-1]),
            "labels": int(classes),
            "settings": settings,
            "seconds": seconds,
            "peak_mib": peaks,
            "agreement": {m: float(np.mean(lab == ref)) for m, lab in runs.items()},
        }
        for method, lab in runs.items():
            print(
                f"  {method:22s} labels equal to pydensecrf2's: {np.mean(lab == ref):.5f}; "
                f"to the true labels: {np.mean(lab == labels):.4f} "
                f"(unaries alone: {np.mean(unary == labels):.4f})",
                flush=True,
            )

    if args.json:
        with open(args.json + ".tmp", "w") as handle:
            json.dump(report, handle, indent=1)
        os.replace(args.json + ".tmp", args.json)


def _phantom_arguments(parser: argparse.ArgumentParser, several: bool) -> None:
    """The benchmark phantoms (--cases, or one --case) and the CRF settings shared by the
    pydensecrf, profile and layer commands."""
    if several:
        parser.add_argument(
            "--cases", nargs="+", choices=["promise", "brats"], default=["promise", "brats"]
        )
    else:
        parser.add_argument("--case", choices=["promise", "brats"], default="promise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--theta-alpha", type=float, default=10.0, help="mm")
    parser.add_argument("--theta-beta", type=float, default=0.5, help="image standard deviations")
    parser.add_argument("--theta-gamma", type=float, default=3.0, help="mm")
    parser.add_argument("--iterations", type=int, default=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    spatial = sub.add_parser("spatial", help="separable exact vs lattice smoothness kernel")
    spatial.add_argument("--shape", type=int, nargs="+", default=[63, 200, 200])
    spatial.add_argument("--spacing", type=float, nargs="+", default=[2.0, 1.0, 1.0])
    spatial.add_argument("--theta", type=float, default=3.0, help="theta_gamma in mm")
    spatial.add_argument("--classes", type=int, default=2)
    spatial.add_argument("--iterations", type=int, default=5)
    dense = sub.add_parser("pydensecrf", help="dense_crf vs pydensecrf2 on phantoms")
    _phantom_arguments(dense, several=True)
    dense.add_argument("--w-bilateral", type=float, default=5.0)
    dense.add_argument("--w-spatial", type=float, default=3.0)
    dense.add_argument("--repeats", type=int, default=3, help="runs per method (min, median)")
    dense.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads for ours (0: TensorFlow's default, one per core); pydensecrf2 "
        "always uses one",
    )
    dense.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}"
    )
    dense.add_argument("--json", default=None, help="also write the results to this JSON file")
    prof = sub.add_parser("profile", help="time each step of the mean field on a phantom")
    _phantom_arguments(prof, several=False)
    layer = sub.add_parser("layer", help="CrfRnn inference: composed vs fused_inference")
    _phantom_arguments(layer, several=True)
    layer.add_argument("--repeats", type=int, default=3)
    one = sub.add_parser("one", help="(internal) one method in a fresh process")
    one.add_argument("--data", required=True)
    one.add_argument("--method", choices=METHODS, required=True)
    one.add_argument("--settings", required=True)
    one.add_argument("--out", required=True)
    one.add_argument("--repeats", type=int, default=1)
    one.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    commands = {
        "spatial": bench_spatial,
        "one": run_one,
        "profile": bench_profile,
        "layer": bench_layer,
        "pydensecrf": bench_pydensecrf,
    }
    try:
        commands[args.command](args)
    except (ImportError, RuntimeError, ValueError) as err:  # pydensecrf2 missing, a child failed
        fail(f"bench_crf {args.command}: {err}")


if __name__ == "__main__":
    main()
