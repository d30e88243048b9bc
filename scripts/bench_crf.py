"""CRF benchmarks.

  spatial: the smoothness kernel as an exact separable Gaussian vs a position-only permutohedral
           lattice (time for setup + 5 normalised applications, and the lattice's error against
           the exact filter), recorded in docs/crf.md.

Usage: PYTHONPATH=. .venv/bin/python scripts/bench_crf.py spatial [--shape 63 200 200] ...
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tensorflow as tf

from src.crf.functional import lattice_filter, positions, separable_spatial_filter


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    spatial = sub.add_parser("spatial", help="separable exact vs lattice smoothness kernel")
    spatial.add_argument("--shape", type=int, nargs="+", default=[63, 200, 200])
    spatial.add_argument("--spacing", type=float, nargs="+", default=[2.0, 1.0, 1.0])
    spatial.add_argument("--theta", type=float, default=3.0, help="theta_gamma in mm")
    spatial.add_argument("--classes", type=int, default=2)
    spatial.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()
    if args.command == "spatial":
        bench_spatial(args)


if __name__ == "__main__":
    main()
