"""Per-step diagnosis of the first training steps of a run (docs/training.md, "The loss spike at
step 2"): the loss and its parts, the size of the V-Net's logits (the CRF's unaries) and of the
head's output, what the unaries alone would score, the gradient norms of the V-Net and of the
head, and the head's weights after each step.

    python scripts/loss_spike.py [--steps 10] experiment=demo variant=vnet_crf \
        train.optimizer.learning_rate=1e-3 [hydra overrides ...]

It trains exactly as ``crf3d-train`` does on one device (the same seeded model, optimiser,
schedule and batch stream, :mod:`crf_rnn_3d.experiments.train`), writes nothing, and prints one
line per step. The prepared cache of the config's data set must exist (``crf3d-prepare``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra import compose, initialize_config_dir

import crf_rnn_3d.configs
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.train import segmentation_loss, set_up, training_stream


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    configs = str(Path(crf_rnn_3d.configs.__file__).parent)
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    variant = str(cfg.variant)
    session = set_up(cfg, int(cfg.fold), variant)
    model, optimizer = session.model, session.optimizer
    head = model.get_layer("crf") if common.variant_crf(cfg, variant) else None
    outputs = [head.input[0] if head else model.output, model.output]
    probe = keras.Model(model.input, outputs)
    train_cfg = common.plain(cfg.train)
    parts = {
        "ce": {**train_cfg, "loss": "ce"},
        "dice": {**train_cfg, "loss": "dice"},
    }
    crf_vars = [v for v in model.trainable_variables if v.path.startswith("crf/")]
    net_vars = [v for v in model.trainable_variables if not v.path.startswith("crf/")]

    @tf.function
    def step(image: tf.Tensor, label: tf.Tensor) -> dict:
        classes = tf.gather(session.lut, tf.cast(label, tf.int32))
        with tf.GradientTape() as tape:
            unary, logits = probe(image, training=True)
            loss = segmentation_loss(classes, logits, train_cfg)
        grads = tape.gradient(loss, model.trainable_variables)
        norm = {id(v): tf.norm(g) for v, g in zip(model.trainable_variables, grads, strict=True)}
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return {
            "loss": loss,
            "ce": segmentation_loss(classes, logits, parts["ce"]),
            "dice": segmentation_loss(classes, logits, parts["dice"]),
            "unary_ce": segmentation_loss(classes, unary, parts["ce"]),
            "unary_absmax": tf.reduce_max(tf.abs(unary)),
            "unary_margin": tf.reduce_mean(tf.abs(unary[..., 1] - unary[..., 0])),
            "out_absmax": tf.reduce_max(tf.abs(logits)),
            "grad_net": tf.linalg.global_norm([norm[id(v)] for v in net_vars]),
            "grad_crf": tf.linalg.global_norm([norm[id(v)] for v in crf_vars] or [0.0]),
        }

    batches = iter(training_stream(cfg, session.cases["train"], session.seed, 0))
    print(f"# {variant}: {' '.join(args.overrides)}")
    for i in range(1, args.steps + 1):
        rate = float(optimizer.learning_rate)  # the schedule's value at this update
        out = {k: float(v) for k, v in step(*next(batches)).items()}
        crf = {v.path.split("/")[-1]: np.asarray(v) for v in crf_vars}
        head_now = ""
        if crf:
            mu = crf["compatibility"]
            off = mu[~np.eye(mu.shape[0], dtype=bool)]
            head_now = (
                f" w_bil {np.ravel(crf['bilateral_weight']).round(4).tolist()}"
                f" w_sp {np.ravel(crf['spatial_weight']).round(4).tolist()}"
                f" mu_off {off.round(4).tolist()}"
            )
        print(
            f"step {i:3d} lr {rate:.2e} loss {out['loss']:.3f} (ce {out['ce']:.3f} dice "
            f"{out['dice']:.3f}) unaries: ce {out['unary_ce']:.3f} |max| "
            f"{out['unary_absmax']:.1f} mean|margin| {out['unary_margin']:.2f}; output |max| "
            f"{out['out_absmax']:.1f}; grad norm net {out['grad_net']:.3g} crf "
            f"{out['grad_crf']:.3g};{head_now}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
