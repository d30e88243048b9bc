"""The CRF head in training: time and peak memory of a CrfRnn forward + backward pass
(results in docs/benchmarks.md, "The CRF head in training").

Cases (the paper's input sizes, on the benchmark phantoms of src/datasets/phantoms.py):
  promise: 64 x 128 x 128 voxels at 2 x 1 x 1 mm, 1 channel, 2 classes (the PROMISE12
           phantom, 63 x 200 x 200, centre-cropped in y and x, its last slice repeated);
  brats:   155 x 240 x 240 at 1 mm, 4 channels, 5 classes (the BraTS phantom as it is).
The unaries are the log of the phantom's "poor network" probabilities. Every run: CrfRnn with
the default settings of configs/crf/default.yaml (5 iterations), one training step traced by
tf.function (the way Keras trains: the layer's output, a loss, the gradients of the unaries and
of the CRF's weights), for each backend (compiled, tf) without and with ``recompute``.

Each measurement runs in a fresh child process, so that peaks do not mix. The child traces the
step on a small input first (unknown sizes), then runs it --repeats times at full size: time
is the fastest run, memory the peak RSS of the first full-size run above the RSS before it
(src/benchmarks/memory.py; later runs reuse memory the first one took and never returned).
With --held (eagerly, no tf.function) it also reports what the gradient tape holds: RSS
after the forward pass, tape alive, minus RSS before it (the layer's output included), i.e.
the tensors kept for the backward pass. Children run with glibc's mmap threshold fixed at
128 KiB (glibc would otherwise raise it as large blocks are freed and keep them in its heap).

``--build`` adds the bilateral lattice's build alone (its peak is part of every step's),
``--iterations`` changes the number of mean-field iterations (default 5) and
``--checkpoint-every`` CrfRnn's checkpoint_every (default 1; it acts with recompute only).
``--vnet`` adds the V-Net's own training step (configs/model/vnet.yaml, no CRF, cross-entropy,
Adam) at the PROMISE12 size for comparison.

The parent watches each child's RSS and stops it above --max-gib (reported as over the cap);
the BraTS runs start only when /proc/meminfo shows --min-free-gib available.

Usage: .venv/bin/python scripts/bench_crf_train.py [--cases promise brats] [--backends ...]
       [--repeats 2] [--held] [--vnet] (`make bench-crf-train` runs promise and brats, --held,
       --vnet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CASES = ("promise", "brats")
BACKENDS = ("compiled", "tf")


def case_arrays(name: str, seed: int = 0):
    """(unaries [1, *spatial, K], image [1, *spatial, M], spacing) as float32 arrays."""
    from crf_rnn_3d.datasets.phantoms import crf_bench_case

    image, _, spacing, _, probs = crf_bench_case(name, seed)
    if name == "promise":  # 63 x 200 x 200 -> 64 x 128 x 128
        y0, x0 = (image.shape[1] - 128) // 2, (image.shape[2] - 128) // 2
        crop = (slice(None), slice(y0, y0 + 128), slice(x0, x0 + 128))
        image = np.concatenate([image[crop], image[crop][-1:]], 0)
        probs = np.concatenate([probs[crop], probs[crop][-1:]], 0)
    unaries = np.log(np.clip(probs, 1e-5, None)).astype(np.float32)
    return unaries[None], np.ascontiguousarray(image[None], np.float32), tuple(spacing)


def _status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0**2
    return 0.0


def child(args: argparse.Namespace) -> None:
    """One measurement; prints one JSON line."""
    import tensorflow as tf

    from crf_rnn_3d.benchmarks.memory import measure, peak_mib, reset_peak, status_mib
    from crf_rnn_3d.crf import CrfRnn

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    unaries_np, image_np, spacing = case_arrays(args.case)
    unaries, image = tf.constant(unaries_np), tf.constant(image_np)
    k, m = unaries.shape[-1], image.shape[-1]
    result: dict = {"case": args.case, "voxels": int(np.prod(unaries.shape[1:-1]))}
    if args.what == "vnet":
        import keras

        from crf_rnn_3d.models.vnet import build_vnet

        cfg = dict(
            levels=4,
            base_channels=16,
            convs_per_level=[1, 2, 3, 3],
            bottom_convs=3,
            kernel_size=5,
            activation="prelu",
            dropout=0.0,
        )
        model = build_vnet(tuple(image.shape[1:]), k, cfg)
        optimizer = keras.optimizers.Adam(1e-4)
        labels = tf.argmax(unaries, axis=-1)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                )
            grads = tape.gradient(loss, model.trainable_weights)
            optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
            return loss

        optimizer.build(model.trainable_weights)
        # the first run traces at full size (the model's shape is fixed): its peak counts,
        # the time is the fastest of the runs
        runs = [measure(lambda: step(image, labels).numpy()) for _ in range(args.repeats)]
        result.update(seconds=min(r[1] for r in runs), peak_mib=runs[0][2])
        print(json.dumps(result))
        return
    if args.what == "build":  # the bilateral lattice's build alone, as the layer makes it
        from crf_rnn_3d.crf.functional import bilateral_features
        from crf_rnn_3d.lattice_op import Lattice

        features = bilateral_features(image, spacing, 10.0, [1.0] * m)
        Lattice(features[:, :8, :8, :8], backend=args.backend).tensors[0].numpy()
        run = measure(lambda: Lattice(features, backend=args.backend).tensors[0].numpy())
        result.update(seconds=run[1], peak_mib=run[2])
        print(json.dumps(result))
        return
    layer = CrfRnn(
        spacing=list(spacing),
        backend=args.backend,
        recompute=args.recompute,
        num_iterations=args.iterations,
        checkpoint_every=args.checkpoint_every,
    )
    layer.build([unaries.shape, image.shape])

    def loss_of(u: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
        target = tf.nn.softmax(tf.stop_gradient(u[..., ::-1]))  # moves every weight
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(target, out))

    small = [unaries[:, :8, :8, :8], image[:, :8, :8, :8]]
    if args.what == "held":  # eagerly: what the tape holds after the forward pass
        layer(small, training=True)  # warm up
        watched = tf.identity(unaries)
        before = reset_peak()
        start = time.perf_counter()
        with tf.GradientTape() as tape:
            tape.watch(watched)
            out = layer([watched, image], training=True)
            held = status_mib("VmRSS") - before
            loss = loss_of(watched, out)
        grads = tape.gradient(loss, [watched, *layer.trainable_weights])
        _ = [g.numpy() for g in grads]
        seconds = time.perf_counter() - start
        result.update(held_mib=held, eager_seconds=seconds, eager_peak_mib=peak_mib() - before)
        print(json.dumps(result))
        return
    spec = [tf.TensorSpec([None, None, None, None, k]), tf.TensorSpec([None, None, None, None, m])]

    @tf.function(input_signature=spec)
    def step(u: tf.Tensor, im: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(u)
            loss = loss_of(u, layer([u, im], training=True))
        return tape.gradient(loss, [u, *layer.trainable_weights])

    _ = [g.numpy() for g in step(*small)]  # trace (unknown sizes) and warm up
    runs = [measure(lambda: [g.numpy() for g in step(unaries, image)]) for _ in range(args.repeats)]
    result.update(seconds=min(r[1] for r in runs), peak_mib=runs[0][2])
    print(json.dumps(result))


def run_child(command: list[str], max_mib: float) -> tuple[dict | None, str]:
    """Runs a child, stopping it when its RSS passes max_mib; (its JSON result, or None, and a
    note: "" or why there is no result)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    over = False
    while proc.poll() is None:
        try:
            if _status_mib(proc.pid, "VmRSS") > max_mib:
                over = True
                proc.kill()
                break
        except OSError:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if over:
        return None, f"over the cap of {max_mib / 1024:.1f} GiB (stopped)"
    if proc.returncode != 0:
        return None, f"failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
    return json.loads(out.strip().splitlines()[-1]), ""


def main_parent(args: argparse.Namespace) -> None:
    base = [sys.executable, __file__, "child", "--repeats", str(args.repeats)]
    base += ["--threads", str(args.threads), "--iterations", str(args.iterations)]
    base += ["--checkpoint-every", str(args.checkpoint_every)]
    max_mib = args.max_gib * 1024.0
    records: list[dict] = []  # the traced steps, for --json
    print(
        "| case | backend | recompute | step time | peak RSS above start | held by the tape "
        "(eager) | eager step time |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        for backend in args.backends:
            for recompute in (False, True):
                if case == "brats" and available_gib() < args.min_free_gib:
                    print(
                        f"| {case} | {backend} | {recompute} | not run: "
                        f"{available_gib():.1f} GiB available < {args.min_free_gib} | | | |",
                        flush=True,
                    )
                    continue
                what = [*base, "--case", case, "--backend", backend]
                what += ["--recompute"] if recompute else []
                graph, note = run_child([*what, "--what", "graph"], max_mib)
                records.append(
                    {"case": case, "backend": backend, "recompute": recompute, "note": note}
                    | (graph or {})
                )
                cells = [
                    note or f"{graph['seconds']:.2f} s",
                    "" if note else f"+{graph['peak_mib']:.0f} MiB",
                ]
                if args.held:
                    held, note = run_child([*what, "--what", "held"], max_mib)
                    cells += (
                        [note] * 2
                        if note
                        else [
                            f"{held['held_mib']:.0f} MiB",
                            f"{held['eager_seconds']:.2f} s",
                        ]
                    )
                else:
                    cells += ["", ""]
                print(
                    f"| {case} | {backend} | {recompute} | " + " | ".join(cells) + " |", flush=True
                )
    if args.build:
        for case in args.cases:
            for backend in args.backends:
                run, note = run_child(
                    [*base, "--case", case, "--backend", backend, "--what", "build"], max_mib
                )
                cells = note or f"{run['seconds']:.2f} s, peak +{run['peak_mib']:.0f} MiB"
                print(f"\nlattice build alone, {case}, {backend}: {cells}", flush=True)
    if args.json:
        with open(args.json + ".tmp", "w") as handle:
            json.dump({"iterations": args.iterations, "steps": records}, handle, indent=1)
        os.replace(args.json + ".tmp", args.json)
    if args.vnet:
        vnet, note = run_child([*base, "--case", "promise", "--what", "vnet"], max_mib)
        cells = f"{note} | |" if note else f"{vnet['seconds']:.2f} s | +{vnet['peak_mib']:.0f} MiB"
        print(f"\nV-Net alone (configs/model/vnet.yaml), promise: step {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("child", help="(internal) one measurement in a fresh process")
    one.add_argument("--case", choices=CASES, required=True)
    one.add_argument("--backend", choices=BACKENDS, default="compiled")
    one.add_argument("--recompute", action="store_true")
    one.add_argument("--what", choices=["graph", "held", "vnet", "build"], default="graph")
    one.add_argument("--iterations", type=int, default=5)
    one.add_argument("--repeats", type=int, default=2)
    one.add_argument("--threads", type=int, default=0)
    one.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--repeats", type=int, default=2, help="full-size runs per child")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    parser.add_argument("--held", action="store_true", help="also the eager tape's holding")
    parser.add_argument("--vnet", action="store_true", help="also the V-Net's own step")
    parser.add_argument("--build", action="store_true", help="also the lattice build alone")
    parser.add_argument("--iterations", type=int, default=5, help="mean-field iterations")
    parser.add_argument(
        "--checkpoint-every", type=int, default=1, help="CrfRnn's checkpoint_every (recompute)"
    )
    parser.add_argument("--max-gib", type=float, default=10.0, help="stop a child above this RSS")
    parser.add_argument("--min-free-gib", type=float, default=12.0, help="for the brats runs")
    parser.add_argument("--json", default=None, help="also write the traced steps to this file")
    args = parser.parse_args()
    if args.command == "child":
        child(args)
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
