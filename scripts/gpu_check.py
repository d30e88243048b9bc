"""The device check (`make gpu-check`, docs/benchmarks.md): the TF-op path against the compiled
kernels, on the PROMISE12- and BraTS-sized phantoms, with timings and peak memory.

On a machine with an NVIDIA GPU (after `make gpu-check` has installed the GPU build of
TensorFlow into .venv-gpu) the TF-op path runs on the GPU; the compiled kernels, the peer, run on
the CPU. Without a GPU every step runs on the CPU: the accuracy check and the CPU comparison of
the two paths (issue: "CPU benchmark of the TF-op path"), and the table says that no GPU figure
was measured.

Per phantom (crf_rnn_3d.datasets.phantoms.crf_bench_case: 63 x 200 x 200 at 2 x 1 x 1 mm with 2
labels, and 155 x 240 x 240 with 4 modalities and 5 labels):
  accuracy  the lattice's point count and one filter of the class probabilities, TF path against
            the compiled op (max |a - b| / max |b|), and dense_crf's labels (agreement);
  build     the lattice build;
  filter    one filter of the K class probabilities on that lattice;
  crf       a CrfRnn forward and backward (5 iterations, gradient w.r.t. the unaries and the
            layer's weights);
  train     one V-Net + CRF training step at the case's size (configs/model/vnet.yaml, Adam),
            only on a GPU or with --train (on the CPU it takes minutes and ~10 GB).
Times are the median of --repeats runs after one warm-up. Memory on a GPU is the device's peak
during the timed runs (tf.config.experimental.get_memory_info). On the CPU each step runs in a
process of its own (this script with --child), and its memory is that process's peak RSS above
its size just before the step's first call (crf_rnn_3d.benchmarks.memory), over the warm-up and
the timed runs, with glibc's large blocks mmapped (MALLOC_MMAP_THRESHOLD_, as
scripts/bench_crf_train.py). In one long process a step's peak would be hidden by what the
allocator kept from an earlier step (later steps then read 0); the filter's set-up (its
lattice) is still in that process, so its RSS figure can hide what the filter reuses of the
build's freed memory. Beside it, "tensor peak": the peak of TensorFlow's CPU allocator
(tf.config.experimental.get_memory_info("CPU:0"), reset before the first call) above the
tensors alive before it: the tensors a step holds at once, the figure a GPU reports, immune to
pooling, but blind to memory a kernel allocates itself (the compiled op's C++ core, Unique's
hash table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from omegaconf import OmegaConf

from crf_rnn_3d.benchmarks.lattice_report import machine
from crf_rnn_3d.benchmarks.memory import peak_mib, reset_peak
from crf_rnn_3d.crf import CrfRnn
from crf_rnn_3d.crf.dense_crf import dense_crf
from crf_rnn_3d.crf.functional import bilateral_features
from crf_rnn_3d.datasets.phantoms import crf_bench_case
from crf_rnn_3d.lattice_op import Lattice

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CRF = OmegaConf.to_container(OmegaConf.load(CONFIGS / "crf" / "default.yaml"))
THETA = {k: CRF[k] for k in ("theta_alpha", "theta_beta", "theta_gamma")}


def gpu_name() -> str | None:
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else None


class Meter:
    """Times a step on one device and reads that device's peak memory: a GPU's own counters
    (tf.config.experimental), or for the compiled kernels beside a GPU run, the process's peak
    RSS (which misses what the allocator kept from earlier steps; on a CPU-only machine every
    step runs in a fresh process instead, see the module docstring)."""

    def __init__(self, device: str, repeats: int) -> None:
        self.device, self.repeats = device, repeats
        self.on_gpu = "GPU" in device

    def _reset(self) -> float:
        if self.on_gpu:
            tf.config.experimental.reset_memory_stats(self.device)
            return tf.config.experimental.get_memory_info(self.device)["current"] / 2**20
        return reset_peak()

    def _peak(self) -> float:
        if self.on_gpu:
            return tf.config.experimental.get_memory_info(self.device)["peak"] / 2**20
        return peak_mib()

    def __call__(self, fn: Callable[[], Any]) -> dict[str, float]:
        with tf.device(self.device):
            _finish(fn())  # warm-up: traces, allocations
            times, peaks = [], []
            for _ in range(self.repeats):
                before = self._reset()
                start = time.perf_counter()
                _finish(fn())
                times.append(time.perf_counter() - start)
                peaks.append(max(self._peak() - before, 0.0))
        return {"seconds": statistics.median(times), "peak_mib": max(peaks)}


def _finish(result: Any) -> None:
    """Waits for a result (a GPU runs asynchronously): reads one number of each tensor."""
    for t in tf.nest.flatten(result):
        if isinstance(t, tf.Tensor | tf.Variable):
            float(tf.reduce_sum(tf.cast(t, tf.float32)))


def crf_step(layer: CrfRnn, unaries: tf.Tensor, image: tf.Tensor) -> Callable[[], Any]:
    @tf.function
    def step(unaries: tf.Tensor, image: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(unaries)
            loss = tf.reduce_mean(tf.nn.softmax(layer([unaries, image], training=True)) ** 2)
        return tape.gradient(loss, [unaries, *layer.trainable_variables])

    return lambda: step(unaries, image)


def train_step(
    image: np.ndarray, labels: np.ndarray, spacing: tuple, classes: int, backend: str
) -> Callable[[], Any]:
    from crf_rnn_3d.models.vnet import build_vnet

    model_cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "vnet.yaml"))
    crf = {**CRF, "backend": backend}
    model = build_vnet(image.shape, classes, model_cfg, crf=crf, spacing=spacing)
    optimizer = tf.keras.optimizers.Adam(1e-3)
    x = tf.constant(image[None])
    y = tf.one_hot(tf.constant(labels[None]), classes)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step


STEPS = ("build", "filter", "crf", "train")


def case_inputs(name: str) -> dict[str, Any]:
    image, labels, spacing, classes, probs = crf_bench_case(name, seed=0)
    return {
        "image": image,
        "labels": labels,
        "spacing": spacing,
        "classes": classes,
        "probs": probs,
    }


def features_of(inputs: dict[str, Any]) -> tf.Tensor:
    image = inputs["image"]
    return bilateral_features(
        tf.constant(image[None]),
        inputs["spacing"],
        THETA["theta_alpha"],
        [THETA["theta_beta"]] * image.shape[-1],
    )


def accuracy(inputs: dict[str, Any], device: str) -> dict[str, Any]:
    """The TF path on `device` against the compiled kernels on the CPU."""
    image, spacing, probs = inputs["image"], inputs["spacing"], inputs["probs"]
    features, values = features_of(inputs), tf.constant(probs[None])
    with tf.device("/CPU:0"):
        reference = Lattice(features, backend="compiled")
        ref_out = reference.filter(values).numpy()
        ref_points = int(reference.num_points)
        ref_labels = dense_crf(probs, image, spacing=spacing, **THETA, backend="compiled").argmax(
            -1
        )
    del reference
    with tf.device(device):
        lattice = Lattice(features, backend="tf")
        out = lattice.filter(values).numpy()
        points = int(lattice.num_points)
        del lattice
        labels_tf = dense_crf(probs, image, spacing=spacing, **THETA, backend="tf").argmax(-1)
    return {
        "lattice_points": [points, ref_points],
        "filter_max_rel_error": float(np.abs(out - ref_out).max() / np.abs(ref_out).max()),
        "dense_crf_label_agreement": float((labels_tf == ref_labels).mean()),
    }


def step_fn(inputs: dict[str, Any], backend: str, step: str) -> Callable[[], Any]:
    """The function one step times (built outside the timing: the lattice a filter runs on, the
    layer, the model)."""
    features, values = features_of(inputs), tf.constant(inputs["probs"][None])
    spacing = inputs["spacing"]
    if step == "build":
        return lambda: Lattice(features, backend=backend).num_points
    if step == "filter":
        built = Lattice(features, backend=backend)
        return lambda: built.filter(values)
    if step == "crf":
        unaries = tf.math.log(tf.maximum(values, 1e-8))
        layer = CrfRnn(spacing=list(spacing), num_iterations=5, backend=backend, **THETA)
        return crf_step(layer, unaries, tf.constant(inputs["image"][None]))
    image, labels, classes = inputs["image"], inputs["labels"], inputs["classes"]
    return train_step(image, labels, spacing, classes, backend)


def wanted_steps(args: argparse.Namespace, backend: str) -> list[str]:
    train = args.train and (backend == "tf" or args.train_compiled)
    return [s for s in STEPS if s != "train" or train]


def _rss_mib(pid: int) -> float:
    """Resident size of process pid in MiB (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def run_child(npz: Path, name: str, what: str, args: argparse.Namespace) -> Any:
    """Runs one step (or the accuracy check) in a fresh process; returns what it printed last
    (one JSON line). A failure (e.g. out of memory) is recorded, not raised."""
    command = [sys.executable, __file__, "--child", what, "--inputs", str(npz), "--cases", name]
    command += ["--repeats", str(args.repeats)]
    print(f"   {what} ...", flush=True)
    # large blocks mmapped, so that what a step frees leaves the RSS (as scripts/bench_crf_train.py)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        while proc.poll() is None:  # stop a child past --max-gib (the machine is shared)
            if _rss_mib(proc.pid) > 1024 * args.max_gib:
                proc.kill()
                proc.wait()
                return {"error": f"stopped: over {args.max_gib:g} GiB RSS"}
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        errors = err.read().strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {(errors or ['no output'])[-1][:300]}"}
    return json.loads(lines[-1])


def check_case(name: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    inputs = case_inputs(name)
    image = inputs["image"]
    row: dict[str, Any] = {"case": name, "shape": list(image.shape), "classes": inputs["classes"]}
    places = {"tf": device, "compiled": "/CPU:0"}
    if "GPU" in device:  # one process: the GPU's own peak counters separate the steps
        row["accuracy"] = accuracy(inputs, device)
        steps: dict[str, Any] = {}
        for backend, where in places.items():
            meter = Meter(where, args.repeats)
            steps[backend] = {"device": where}
            for step in wanted_steps(args, backend):
                with tf.device(where):
                    fn = step_fn(inputs, backend, step)
                steps[backend][step] = meter(fn)
                del fn
        row["steps"] = steps
        return row
    # the CPU: every step in a process of its own (see the module docstring)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / f"{name}.npz"
        arrays = {k: inputs[k] for k in ("image", "labels", "probs")}
        np.savez(npz, spacing=np.asarray(inputs["spacing"]), classes=inputs["classes"], **arrays)
        del inputs
        row["accuracy"] = run_child(npz, name, "accuracy", args)
        steps = {}
        for backend, where in places.items():
            steps[backend] = {"device": where}
            for step in wanted_steps(args, backend):
                steps[backend][step] = run_child(npz, name, f"{backend}:{step}", args)
    row["steps"] = steps
    return row


def child(args: argparse.Namespace) -> int:
    """--child: one step (backend:step) or the accuracy check on the CPU, in this fresh process;
    prints one JSON line."""
    with np.load(args.inputs) as saved:
        inputs = {k: saved[k] for k in ("image", "labels", "probs")}
        inputs["spacing"] = tuple(float(x) for x in saved["spacing"])
        inputs["classes"] = int(saved["classes"])
    if args.child == "accuracy":
        print(json.dumps(accuracy(inputs, "/CPU:0")))
        return 0
    backend, step = args.child.split(":")
    with tf.device("/CPU:0"):
        fn = step_fn(inputs, backend, step)
        before = reset_peak()  # the process's size with the inputs and the step's set-up
        tf.config.experimental.reset_memory_stats("CPU:0")
        held = tf.config.experimental.get_memory_info("CPU:0")["current"]
        _finish(fn())  # warm-up: traces, allocations
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _finish(fn())
            times.append(time.perf_counter() - start)
        peak = max(peak_mib() - before, 0.0)
        tensors = tf.config.experimental.get_memory_info("CPU:0")["peak"] - held
    result = {"seconds": statistics.median(times), "peak_mib": peak}
    print(json.dumps({**result, "tensor_peak_mib": max(tensors, 0) / 2**20}))
    return 0


def markdown(results: dict[str, Any]) -> str:
    gpu = results["gpu"]
    lines = [
        f"Device of the TF path: {gpu or 'none (no GPU: every figure below is a CPU figure)'}; "
        f"compiled kernels on the CPU. TensorFlow {tf.__version__}.",
        "",
        "| phantom | lattice points (tf / compiled) | filter max rel. error "
        "| dense_crf labels agree |",
        "|---|---|---|---|",
    ]
    for row in results["cases"]:
        acc = row["accuracy"]
        if "error" in acc:
            lines.append(f"| {row['case']} | failed: {acc['error']} | - | - |")
            continue
        lines.append(
            f"| {row['case']} {'x'.join(map(str, row['shape']))} | "
            f"{acc['lattice_points'][0]} / {acc['lattice_points'][1]} | "
            f"{acc['filter_max_rel_error']:.2e} | {100 * acc['dense_crf_label_agreement']:.3f}% |"
        )
    lines += [
        "",
        "| phantom | step | TF path (s) | compiled (s) | ratio | TF path peak (MiB) "
        "| compiled peak (MiB) | TF path tensor peak (MiB) | compiled tensor peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["cases"]:
        tf_steps, c_steps = row["steps"]["tf"], row["steps"]["compiled"]
        for step in ("build", "filter", "crf", "train"):
            if step not in tf_steps:
                continue
            a, b = tf_steps[step], c_steps.get(step)
            failed = [
                f"{k}: {x['error']}" for k, x in (("tf", a), ("compiled", b)) if x and "error" in x
            ]
            if failed:
                lines.append(
                    f"| {row['case']} | {step} | failed ({'; '.join(failed)}) | | | | | | |"
                )
                continue
            ratio = f"{a['seconds'] / b['seconds']:.2f}x" if b else "-"
            b_s = f"{b['seconds']:.3f}" if b else "-"
            b_m = f"{b['peak_mib']:.0f}" if b else "-"
            t_a, t_b = (
                f"{x['tensor_peak_mib']:.0f}" if x and "tensor_peak_mib" in x else "-"
                for x in (a, b)
            )
            lines.append(
                f"| {row['case']} | {step} | {a['seconds']:.3f} | {b_s} | {ratio} | "
                f"{a['peak_mib']:.0f} | {b_m} | {t_a} | {t_b} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="promise,brats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="time a V-Net + CRF step too")
    parser.add_argument("--train-compiled", action="store_true", help="also for the compiled path")
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    parser.add_argument("--max-gib", type=float, default=16.0, help="stop a CPU step above this")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # backend:step or accuracy
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    gpu = gpu_name()
    if gpu is not None:
        args.train = True
    device = gpu or "/CPU:0"
    results: dict[str, Any] = {"machine": machine(), "gpu": gpu, "cases": []}
    for name in args.cases.split(","):
        print(f"== {name} on {device}", flush=True)
        results["cases"].append(check_case(name, args, device))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    if gpu is None:
        print("No GPU visible to TensorFlow: the GPU steps were not run (CPU figures only).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
