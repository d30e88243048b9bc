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
Times are the median of --repeats runs after one warm-up; memory is the GPU's peak
(tf.config.experimental.get_memory_info) or, on the CPU, the process's peak RSS above its size
before the step (crf_rnn_3d.benchmarks.memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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
    """Times a step on one device and reads that device's peak memory."""

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


def check_case(name: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    image, labels, spacing, classes, probs = crf_bench_case(name, seed=0)
    features = bilateral_features(
        tf.constant(image[None]),
        spacing,
        THETA["theta_alpha"],
        [THETA["theta_beta"]] * image.shape[-1],
    )
    values = tf.constant(probs[None])
    row: dict[str, Any] = {"case": name, "shape": list(image.shape), "classes": classes}

    # accuracy: the TF path on `device` against the compiled kernels on the CPU
    with tf.device("/CPU:0"):
        reference = Lattice(features, backend="compiled")
        ref_out = reference.filter(values).numpy()
        ref_points = int(reference.num_points)
        ref_labels = dense_crf(probs, image, spacing=spacing, **THETA, backend="compiled").argmax(
            -1
        )
    with tf.device(device):
        lattice = Lattice(features, backend="tf")
        out = lattice.filter(values).numpy()
        points = int(lattice.num_points)
        labels_tf = dense_crf(probs, image, spacing=spacing, **THETA, backend="tf").argmax(-1)
    row["accuracy"] = {
        "lattice_points": [points, ref_points],
        "filter_max_rel_error": float(np.abs(out - ref_out).max() / np.abs(ref_out).max()),
        "dense_crf_label_agreement": float((labels_tf == ref_labels).mean()),
    }
    del out, ref_out, reference, lattice

    steps = {}
    for backend, where in (("tf", device), ("compiled", "/CPU:0")):
        meter = Meter(where, args.repeats)
        built = Lattice(features, backend=backend)
        unaries = tf.math.log(tf.maximum(values, 1e-8))
        layer = CrfRnn(spacing=list(spacing), num_iterations=5, backend=backend, **THETA)
        steps[backend] = {
            "device": where,
            "build": meter(lambda b=backend: Lattice(features, backend=b).num_points),
            "filter": meter(lambda lat=built: lat.filter(values)),
            "crf": meter(crf_step(layer, unaries, tf.constant(image[None]))),
        }
        if args.train and (backend == "tf" or args.train_compiled):
            steps[backend]["train"] = meter(train_step(image, labels, spacing, classes, backend))
        del built, layer
    row["steps"] = steps
    return row


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
        lines.append(
            f"| {row['case']} {'x'.join(map(str, row['shape']))} | "
            f"{acc['lattice_points'][0]} / {acc['lattice_points'][1]} | "
            f"{acc['filter_max_rel_error']:.2e} | {100 * acc['dense_crf_label_agreement']:.3f}% |"
        )
    lines += [
        "",
        "| phantom | step | TF path (s) | compiled (s) | ratio | TF path peak (MiB) "
        "| compiled peak (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["cases"]:
        tf_steps, c_steps = row["steps"]["tf"], row["steps"]["compiled"]
        for step in ("build", "filter", "crf", "train"):
            if step not in tf_steps:
                continue
            a, b = tf_steps[step], c_steps.get(step)
            ratio = f"{a['seconds'] / b['seconds']:.2f}x" if b else "-"
            b_s = f"{b['seconds']:.3f}" if b else "-"
            b_m = f"{b['peak_mib']:.0f}" if b else "-"
            lines.append(
                f"| {row['case']} | {step} | {a['seconds']:.3f} | {b_s} | {ratio} | "
                f"{a['peak_mib']:.0f} | {b_m} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="promise,brats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="time a V-Net + CRF step too")
    parser.add_argument("--train-compiled", action="store_true", help="also for the compiled path")
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    args = parser.parse_args(argv)
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
