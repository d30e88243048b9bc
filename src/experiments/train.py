"""Train one (fold, variant) run: ``python -m crf_rnn_3d.experiments.train [experiment=...] fold=0
variant=vnet_crf``.

:func:`train` is a plain function of the config. It streams the fold's training cases from the
prepared cache (src/datasets/tfdata.py, augmentation on), builds the V-Net (with the CRF head
when the variant says so), and runs ``train.steps`` optimiser steps with the loss, optimiser and
schedule of ``train``. Seeds: ``train.seed + fold`` seeds the initialisation (the V-Net's
layers are made before the head, so both variants of a fold start from the same V-Net weights)
and the data loader (same batch order and augmentation for both variants).

The run's folder (:func:`crf_rnn_3d.experiments.common.run_dir`) holds ``checkpoints/`` (every
``train.checkpoint_every`` steps and at the end: model, optimiser, step), ``tensorboard/``
(loss, Dice, learning rate; a slice of image | label | prediction), ``state.json`` (progress and
the steps each invocation started from) and ``model.keras``. A run started again with the same
config resumes from its last checkpoint and sees the batches it has not seen yet; a finished
run is not trained again. With more than one GPU visible, training is mirrored over them
(tf.distribute.MirroredStrategy; the batch is split between the replicas).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from crf_rnn_3d import CONFIG_PATH
from crf_rnn_3d.crf.callbacks import log_theta_summaries
from crf_rnn_3d.datasets.cache import atomic_write_json
from crf_rnn_3d.datasets.errors import ConfigError, DataError, DatasetNotFoundError
from crf_rnn_3d.datasets.io import atomic_output
from crf_rnn_3d.datasets.tfdata import make_dataset
from crf_rnn_3d.experiments import common
from crf_rnn_3d.models.vnet import VNetConfigError, build_vnet

LOSSES = ("dice", "ce", "dice_ce")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "exponential")


@dataclass
class TrainResult:
    """What :func:`train` did: the run folder, steps done, the step this invocation started from
    (> 0 when it resumed), whether the run is complete, the last logged loss, wall time (s)."""

    run_dir: Path
    steps_done: int
    started_from: int
    complete: bool
    last_loss: float | None = None
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- losses


def soft_dice_loss(labels: tf.Tensor, probs: tf.Tensor, smooth: float = 1.0) -> tf.Tensor:
    """1 - mean over cases and foreground classes of (2 |P G| + s) / (|P| + |G| + s).

    labels [B, Z, Y, X] int class indices, probs [B, Z, Y, X, K] softmax output; scalar.
    """
    k = probs.shape[-1]
    onehot = tf.one_hot(labels, k, dtype=probs.dtype)[..., 1:]
    p = probs[..., 1:]
    axes = [1, 2, 3]
    inter = tf.reduce_sum(p * onehot, axes)
    denom = tf.reduce_sum(p, axes) + tf.reduce_sum(onehot, axes)
    return 1.0 - tf.reduce_mean((2.0 * inter + smooth) / (denom + smooth))


def segmentation_loss(labels: tf.Tensor, logits: tf.Tensor, train_cfg: Mapping) -> tf.Tensor:
    """The ``train.loss`` of logits [B, Z, Y, X, K] against class indices [B, Z, Y, X]:
    ``dice`` (soft Dice, see :func:`soft_dice_loss`), ``ce`` (mean voxel cross-entropy, nats)
    or ``dice_ce`` (dice_weight * dice + ce_weight * ce)."""
    kind = str(train_cfg["loss"])
    if kind not in LOSSES:
        raise ConfigError("train.loss", f"one of {LOSSES}", kind)
    logits = tf.cast(logits, tf.float32)
    total = tf.constant(0.0)
    if kind in ("ce", "dice_ce"):
        ce = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        )
        total += (float(train_cfg["ce_weight"]) if kind == "dice_ce" else 1.0) * ce
    if kind in ("dice", "dice_ce"):
        dice = soft_dice_loss(labels, tf.nn.softmax(logits), float(train_cfg["dice_smooth"]))
        total += (float(train_cfg["dice_weight"]) if kind == "dice_ce" else 1.0) * dice
    return total


def hard_dice(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean over cases and foreground classes of the Dice of the arg-max (1 when both empty)."""
    k = logits.shape[-1]
    pred = tf.one_hot(tf.argmax(logits, -1, output_type=tf.int32), k)[..., 1:]
    true = tf.one_hot(labels, k)[..., 1:]
    inter = tf.reduce_sum(pred * true, [1, 2, 3])
    denom = tf.reduce_sum(pred, [1, 2, 3]) + tf.reduce_sum(true, [1, 2, 3])
    return tf.reduce_mean(tf.where(denom > 0, 2.0 * inter / tf.maximum(denom, 1.0), 1.0))


# ------------------------------------------------------------------------ optimiser


def learning_rate(train_cfg: Mapping) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate or schedule of ``train.optimizer.learning_rate`` and ``train.schedule``
    over ``train.steps``."""
    lr = float(train_cfg["optimizer"]["learning_rate"])
    sched = train_cfg["schedule"]
    name = str(sched["name"])
    steps = int(train_cfg["steps"])
    if name == "constant":
        return lr
    if name == "cosine":
        warmup = int(sched["warmup_steps"])
        if warmup > 0:
            return keras.optimizers.schedules.CosineDecay(
                0.0, max(1, steps - warmup), float(sched["alpha"]), warmup_target=lr,
                warmup_steps=warmup,
            )  # fmt: skip
        return keras.optimizers.schedules.CosineDecay(lr, max(1, steps), float(sched["alpha"]))
    if name == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            lr, int(sched["decay_steps"]), float(sched["decay_rate"])
        )
    raise ConfigError("train.schedule.name", f"one of {SCHEDULES}", name)


def make_optimizer(train_cfg: Mapping) -> keras.optimizers.Optimizer:
    """Adam, AdamW or SGD (momentum) as ``train.optimizer`` says."""
    opt = train_cfg["optimizer"]
    name = str(opt["name"])
    lr = learning_rate(train_cfg)
    clip = opt.get("clipnorm")
    extra = {} if clip is None else {"clipnorm": float(clip)}
    if name == "adam":
        return keras.optimizers.Adam(lr, **extra)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=float(opt["weight_decay"]), **extra)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=float(opt["momentum"]), **extra)
    raise ConfigError("train.optimizer.name", f"one of {OPTIMIZERS}", name)


# ---------------------------------------------------------------------------- model


def build_model(cfg: Mapping, variant: str, input_shape: tuple, spacing: tuple) -> keras.Model:
    """The variant's model for cases of ``input_shape`` (Z, Y, X, C) and ``spacing`` (mm)."""
    return build_vnet(
        input_shape,
        len(common.label_values(cfg)),
        common.plain(cfg["model"]),
        crf=common.variant_crf(cfg, variant),
        spacing=spacing,
        name=variant,
    )


def seed_for(cfg: Mapping, fold: int) -> int:
    """The seed of a fold's runs (both variants): ``train.seed + fold``."""
    return int(cfg["train"]["seed"]) + int(fold)


def training_stream(cfg: Mapping, case_ids: list[str], seed: int, start: int) -> tf.data.Dataset:
    """Endless batches [B, Z, Y, X, C], [B, Z, Y, X] of the training cases from batch ``start``
    on: shuffled and augmented from ``seed``, so the sequence depends only on the seed."""
    loader = {**common.plain(cfg["data"]["loader"]), "batch_size": 1, "seed": seed}
    batch = int(cfg["train"]["batch_size"])
    if batch < 1:
        raise ConfigError("train.batch_size", "a positive integer", batch)
    ds = make_dataset(common.processed_dir(cfg), case_ids, loader, training=True)
    ds = ds.repeat().unbatch().batch(batch, drop_remainder=True)
    return ds.skip(start).prefetch(2)


def _slice_image(image: tf.Tensor, label: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """[1, Y, 3X, 1] in [0, 1]: the middle z slice of channel 0 | label | prediction."""
    z = image.shape[1] // 2
    im = image[0, z, :, :, 0]
    im = (im - tf.reduce_min(im)) / tf.maximum(tf.reduce_max(im) - tf.reduce_min(im), 1e-6)
    k = float(max(1, logits.shape[-1] - 1))
    lab = tf.cast(label[0, z], tf.float32) / k
    pred = tf.cast(tf.argmax(logits[0, z], -1), tf.float32) / k
    return tf.concat([im, lab, pred], axis=1)[None, :, :, None]


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(str(path), "the run's state (JSON)", repr(exc)) from exc


def train(
    cfg: DictConfig | Mapping, fold: int | None = None, variant: str | None = None
) -> TrainResult:
    """Trains (or resumes, or finds finished) the (fold, variant) run; defaults: ``cfg.fold``,
    ``cfg.variant``. Returns a :class:`TrainResult`. Raises ConfigError / VNetConfigError for
    a bad setting, DataError when the cache or splits are missing."""
    fold = int(cfg["fold"] if fold is None else fold)
    variant = str(cfg["variant"] if variant is None else variant)
    tcfg = cfg["train"]
    steps = int(tcfg["steps"])
    every = int(tcfg["checkpoint_every"])
    if steps < 1:
        raise ConfigError("train.steps", "a positive integer", steps)
    if every < 1:
        raise ConfigError("train.checkpoint_every", "a positive integer", every)
    out = common.run_dir(cfg, fold, variant)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "run.json", common.run_identity(cfg, fold, variant))
    state_path = out / "state.json"
    state = _read_state(state_path)
    if state.get("complete") and state.get("steps_done") == steps:
        return TrainResult(out, steps, steps, True, state.get("last_loss"))

    if bool(tcfg.get("deterministic", False)):
        tf.config.experimental.enable_op_determinism()
    cases = common.fold_cases(cfg, fold)
    input_shape, spacing = common.manifest_shape_and_spacing(cfg, cases["train"])
    lut = tf.constant(common.label_lut(common.label_values(cfg)))
    seed = seed_for(cfg, fold)

    gpus = tf.config.list_logical_devices("GPU")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    with strategy.scope():
        keras.utils.set_random_seed(seed)
        model = build_model(cfg, variant, input_shape, spacing)
        optimizer = make_optimizer(tcfg)
        optimizer.build(model.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(
        ckpt, str(out / "checkpoints"), max_to_keep=int(tcfg["keep_checkpoints"])
    )
    if manager.latest_checkpoint:
        try:
            ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        except (AssertionError, IndexError, ValueError, tf.errors.OpError) as exc:
            raise DataError(
                manager.latest_checkpoint,
                "a checkpoint of this run's model and optimiser (delete the run folder to "
                "start it over)",
                f"{type(exc).__name__}: {str(exc)[:200]}",
            ) from exc
    start = int(step_var.numpy())
    stop_after = tcfg.get("stop_after")
    end = steps if stop_after is None else min(steps, start + int(stop_after))

    stream = training_stream(cfg, cases["train"], seed, start)
    stream = strategy.experimental_distribute_dataset(stream)
    loss_weights_cfg = common.plain(tcfg)

    def replica_step(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        classes = tf.gather(lut, tf.cast(label, tf.int32))
        with tf.GradientTape() as tape:
            logits = model(image, training=True)
            loss = segmentation_loss(classes, logits, loss_weights_cfg)
            scaled = loss / strategy.num_replicas_in_sync
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss, hard_dice(classes, logits), _slice_image(image, classes, logits)

    @tf.function
    def train_step(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        loss, dice, picture = strategy.run(replica_step, args=(image, label))
        mean = tf.distribute.ReduceOp.MEAN
        picture = strategy.experimental_local_results(picture)[0]
        return strategy.reduce(mean, loss, None), strategy.reduce(mean, dice, None), picture

    writer = tf.summary.create_file_writer(str(out / "tensorboard"))
    history = state.get("history", [])
    started = [*state.get("started_from", []), start]
    t0 = time.perf_counter()
    last_loss = state.get("last_loss")
    bar = tqdm(
        total=steps, initial=start, desc=f"fold {fold} {variant}",
        disable=not bool(tcfg["progress"]), dynamic_ncols=True,
    )  # fmt: skip
    iterator = iter(stream)
    with writer.as_default():
        for step in range(start + 1, end + 1):
            image, label = next(iterator)
            loss, dice, picture = train_step(image, label)
            step_var.assign(step)
            bar.update(1)
            if step % int(tcfg["log_every"]) == 0 or step == end:
                last_loss = float(loss)
                lr = optimizer.learning_rate
                lr_now = float(lr(step) if callable(lr) else lr)
                tf.summary.scalar("train/loss", loss, step=step)
                tf.summary.scalar("train/dice", dice, step=step)
                tf.summary.scalar("train/learning_rate", lr_now, step=step)
                log_theta_summaries(model, step)  # kernel widths of a CRF head, if any
                history.append({"step": step, "loss": last_loss, "dice": float(dice)})
                bar.set_postfix(loss=f"{last_loss:.3f}", dice=f"{float(dice):.3f}")
            if step % int(tcfg["image_every"]) == 0 or step == end:
                tf.summary.image("train/image_label_prediction", picture, step=step)
            if step % every == 0 or step == end:
                manager.save(checkpoint_number=step)
                atomic_write_json(
                    state_path,
                    {"steps_done": step, "steps": steps, "complete": step == steps,
                     "started_from": started, "last_loss": last_loss, "history": history},
                )  # fmt: skip
    bar.close()
    writer.flush()
    done = int(step_var.numpy())
    if done == steps and bool(tcfg["save_model"]):
        tmp = out / f".tmp-model-{id(model)}.keras"
        model.save(tmp)
        tmp.replace(out / "model.keras")
    if done == steps:
        atomic_write_json(
            state_path,
            {"steps_done": done, "steps": steps, "complete": True, "started_from": started,
             "last_loss": last_loss, "history": history},
        )  # fmt: skip
    return TrainResult(
        out, done, start, done == steps, last_loss, time.perf_counter() - t0, history
    )


def restore_model(cfg: Mapping, fold: int, variant: str) -> keras.Model:
    """The (fold, variant) run's model with the weights of its last checkpoint (DataError when
    it has none)."""
    out = common.run_dir(cfg, fold, variant)
    cases = common.fold_cases(cfg, fold)
    input_shape, spacing = common.manifest_shape_and_spacing(cfg, cases["train"])
    model = build_model(cfg, variant, input_shape, spacing)
    latest = tf.train.latest_checkpoint(str(out / "checkpoints"))
    if latest is None:
        raise DataError(str(out / "checkpoints"), "a checkpoint of a trained run", "none")
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model


CLI_ERRORS = (ConfigError, DataError, DatasetNotFoundError, VNetConfigError)


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        result = train(cfg)
        from crf_rnn_3d.experiments.evaluate import evaluate

        if result.complete:
            evaluation = evaluate(cfg)
            print(f"{result.run_dir}: mean Dice {evaluation.mean_dice()}")
    except CLI_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    resumed = f", resumed from step {result.started_from}" if result.started_from else ""
    print(f"{result.run_dir}: {result.steps_done}/{cfg.train.steps} steps{resumed}")
    with atomic_output(result.run_dir / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)


if __name__ == "__main__":
    main()
