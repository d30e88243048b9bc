"""Train one (fold, variant) run: ``python -m crf_rnn_3d.experiments.train [experiment=...] fold=0
variant=vnet_crf``.

:func:`train` is a plain function of the config. It streams the fold's training cases from the
prepared cache (src/datasets/tfdata.py, augmentation on), builds the V-Net (with the CRF head
when the variant says so), and runs ``train.steps`` optimiser steps with the loss, optimiser and
schedule of ``train``. Seeds: ``train.seed + fold`` seeds the initialisation (the V-Net's
layers are made before the head, so both variants of a fold start from the same V-Net weights)
and the data loader (same batch order and augmentation for both variants).

The run's folder (:func:`crf_rnn_3d.experiments.common.run_dir`) holds ``run.json`` (the run's
identity), ``checkpoints/`` (every ``train.checkpoint_every`` steps and at the end: model,
optimiser, step), ``tensorboard/`` (loss, Dice, learning rate; a slice of image | label |
prediction), ``state.json`` (progress and the steps each invocation started from),
``model.keras`` and ``config.yaml``; :class:`RunRecord` is their one writer. With
``train.validation`` (src/experiments/validation.py) a monitor Dice on a few training cases goes
to TensorBoard and ``monitor.csv``, and the best step's weights to ``best/``. A run started
again with the same config resumes from its last checkpoint and sees the batches it has not
seen yet; a finished run is not trained again.

``train.distribute``: ``none`` trains on one device; ``mirrored`` is data-parallel training
through tf.distribute.MirroredStrategy over the visible GPUs (over the logical CPU devices when
there is no GPU), the global batch ``train.batch_size`` split evenly between the replicas (a
batch that the replicas do not divide is a ConfigError) and each replica's loss scaled by its
share of the global batch, so that the summed gradients are those of the global batch's mean
loss. ``train.precision``: ``float32``, ``mixed_float16`` (with Keras' dynamic loss scaling,
``keras.optimizers.LossScaleOptimizer``) or ``mixed_bfloat16``; the CRF head and the loss are
computed in float32 whatever the policy (src/models/vnet.py). docs/training.md has the commands.

:func:`train` reads as its steps: :func:`check_settings`, :class:`RunRecord` (open the folder,
read the state), :func:`set_up` (cases, seeded model, optimiser), ``RunRecord.resume`` (the
last checkpoint), :func:`run_steps` (the step loop, logging and checkpoints) and
``RunRecord.finish`` (``model.keras``, the final state). The model itself comes from
:mod:`crf_rnn_3d.experiments.model_io`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from crf_rnn_3d.crf.callbacks import log_theta_summaries
from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.datasets.io import atomic_output, atomic_write_json, remove_stale_temporaries
from crf_rnn_3d.datasets.tfdata import make_dataset
from crf_rnn_3d.experiments import common, validation
from crf_rnn_3d.experiments.cli import hydra_app, run_stage
from crf_rnn_3d.experiments.evaluate import Evaluation, evaluate
from crf_rnn_3d.experiments.model_io import CHECKPOINTS, build_model, restore_checkpoint
from crf_rnn_3d.models.vnet import PRECISIONS, case_theta_scalars

LOSSES = ("dice", "ce", "dice_ce")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "exponential")
DISTRIBUTE = ("none", "mirrored")


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
    monitor: dict[int, float] = field(default_factory=dict)  # step -> monitor Dice (mean)


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
    """Adam, AdamW or SGD (momentum) as ``train.optimizer`` says; under
    ``train.precision=mixed_float16`` wrapped in ``keras.optimizers.LossScaleOptimizer``
    (dynamic loss scale: steps whose gradients overflow are skipped and the scale halved)."""
    opt = train_cfg["optimizer"]
    name = str(opt["name"])
    lr = learning_rate(train_cfg)
    clip = opt.get("clipnorm")
    extra = {} if clip is None else {"clipnorm": float(clip)}
    if name == "adam":
        inner = keras.optimizers.Adam(lr, **extra)
    elif name == "adamw":
        inner = keras.optimizers.AdamW(lr, weight_decay=float(opt["weight_decay"]), **extra)
    elif name == "sgd":
        inner = keras.optimizers.SGD(lr, momentum=float(opt["momentum"]), **extra)
    else:
        raise ConfigError("train.optimizer.name", f"one of {OPTIMIZERS}", name)
    if precision_of(train_cfg) == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(inner)
    return inner


def precision_of(train_cfg: Mapping) -> str:
    """``train.precision`` (float32 when the setting is absent); ConfigError when unknown."""
    precision = str(train_cfg.get("precision", "float32"))
    if precision not in PRECISIONS:
        raise ConfigError("train.precision", f"one of {PRECISIONS}", precision)
    return precision


# One MirroredStrategy per device list and process: the runs one process trains in turn
# (cross_validate) share it, because the collective all-reduce keys of a second strategy over
# the same devices collide with the first one's (a shape mismatch at the next run). A plain
# dict, not functools.cache: `python -m ...train -m` pickles this module's functions by value
# for the submitit launchers, and a cache wrapper does not survive that.
_MIRRORED: dict[tuple[str, ...], tf.distribute.MirroredStrategy] = {}


def _mirrored(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    if devices not in _MIRRORED:
        _MIRRORED[devices] = tf.distribute.MirroredStrategy(devices=list(devices))
    return _MIRRORED[devices]


def make_strategy(train_cfg: Mapping) -> tf.distribute.Strategy:
    """The strategy of ``train.distribute``: ``none``, TensorFlow's default strategy (one
    device, no replicas); ``mirrored``, a MirroredStrategy over the logical GPUs, or over the
    logical CPU devices when there is no GPU (one unless configured otherwise, as the tests do
    with tf.config.set_logical_device_configuration). ConfigError when the setting is unknown
    or the replicas do not divide ``train.batch_size``."""
    kind = str(train_cfg.get("distribute", "none"))
    if kind not in DISTRIBUTE:
        raise ConfigError("train.distribute", f"one of {DISTRIBUTE}", kind)
    if kind == "none":
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = _mirrored(tuple(d.name for d in devices))
    replicas = strategy.num_replicas_in_sync
    batch = int(train_cfg["batch_size"])
    if batch % replicas:
        raise ConfigError(
            "train.batch_size",
            f"a multiple of the {replicas} replicas of train.distribute=mirrored "
            f"({', '.join(d.name for d in devices)})",
            batch,
        )
    return strategy


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


# ---------------------------------------------------------------------- the run's folder


def purge_tensorboard(folder: Path, after_step: int) -> int:
    """Drops the events of steps after ``after_step`` from the TensorBoard event files in
    ``folder`` (each file rewritten atomically), so that a resumed run does not log those steps
    a second time; returns how many events were dropped."""
    from tensorboard.compat.proto import event_pb2

    dropped = 0
    for events in sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []:
        kept, dropped_here = [], 0
        for record in tf.data.TFRecordDataset(str(events)):
            event = event_pb2.Event.FromString(record.numpy())
            if event.step > after_step and event.WhichOneof("what") == "summary":
                dropped_here += 1
            else:
                kept.append(record.numpy())
        dropped += dropped_here
        if dropped_here:
            with atomic_output(events) as tmp, tf.io.TFRecordWriter(str(tmp)) as out:
                for record in kept:
                    out.write(record)
    return dropped


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(str(path), "the run's state (JSON)", repr(exc)) from exc


class RunRecord:
    """The one writer of a run's folder: ``run.json`` (identity), ``state.json`` (steps done,
    complete, the step each invocation started from, last logged loss, the logged history),
    ``checkpoints/`` (with its index), ``model.keras`` and ``config.yaml``.

    Opening it makes the folder, writes ``run.json`` and reads the state an earlier invocation
    left (``finished`` when that one completed the run's ``steps``).
    """

    STATE = "state.json"

    def __init__(self, cfg: Mapping, fold: int, variant: str, steps: int) -> None:
        self.folder = common.run_dir(cfg, fold, variant)
        self.steps = steps
        self.folder.mkdir(parents=True, exist_ok=True)
        for folder in (self.folder, self.folder / CHECKPOINTS):
            remove_stale_temporaries(folder)  # what a killed earlier invocation left
        atomic_write_json(self.folder / "run.json", common.run_identity(cfg, fold, variant))
        prior = _read_state(self.folder / self.STATE)
        self.finished = bool(prior.get("complete")) and prior.get("steps_done") == steps
        self.started_from: list[int] = list(prior.get("started_from", []))
        self.last_loss: float | None = prior.get("last_loss")
        self.history: list[dict] = prior.get("history", [])
        self._manager: tf.train.CheckpointManager | None = None

    def resume(self, session: Session, keep: int) -> int:
        """Restores the run's last readable checkpoint (if any) into the session's model,
        optimiser and step counter, keeping ``keep`` checkpoints from now on; returns the step
        resumed from.

        A newest checkpoint that cannot be read (a process killed while writing it) is set
        aside as ``<name>.corrupt-*`` with a warning, and the one before it is used; when none
        can be read, the newest one's DataError stops the run. What was logged after the step
        resumed from (TensorBoard events, the history in state.json) is dropped, so that the
        steps trained again are not logged twice.
        """
        checkpoint = tf.train.Checkpoint(
            model=session.model, optimizer=session.optimizer, step=session.step
        )
        directory = str(self.folder / CHECKPOINTS)
        self._manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
        candidates = list(reversed(self._manager.checkpoints))
        unreadable: list[str] = []
        newest_error: DataError | None = None
        for path in candidates:
            try:
                restore_checkpoint(checkpoint, path)
                break
            except DataError as exc:
                newest_error = newest_error or exc
                if path == candidates[-1]:
                    raise newest_error from None
                unreadable.append(path)
                print(f"warning: {exc}; resuming from the checkpoint before it",
                      file=sys.stderr)  # fmt: skip
        if unreadable:
            # The state keeps each remaining checkpoint's time: without them the manager treats
            # every listed checkpoint as preserved and never prunes it (keep_checkpoints would
            # stop holding after a fallback).
            state = tf.train.get_checkpoint_state(directory)
            times = dict(zip(state.all_model_checkpoint_paths,
                             state.all_model_checkpoint_timestamps, strict=False))  # fmt: skip
            usable = [p for p in state.all_model_checkpoint_paths if p not in unreadable]
            for path in unreadable:
                for part in Path(path).parent.glob(Path(path).name + ".*"):
                    part.rename(part.with_name(f"{part.name}.corrupt-{int(time.time())}"))
            tf.compat.v1.train.update_checkpoint_state(
                directory, usable[-1], usable,
                all_model_checkpoint_timestamps=[times.get(p, time.time()) for p in usable],
                last_preserved_timestamp=state.last_preserved_timestamp,
            )  # fmt: skip
            self._manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
        start = int(session.step.numpy())
        self.started_from.append(start)
        self.history = [h for h in self.history if int(h["step"]) <= start]
        purge_tensorboard(self.folder / "tensorboard", after_step=start)
        return start

    def log(self, step: int, loss: float, dice: float) -> None:
        """Records a logged step (loss in the loss's units, Dice in [0, 1])."""
        self.last_loss = loss
        self.history.append({"step": step, "loss": loss, "dice": dice})

    def checkpoint(self, step: int) -> None:
        """A checkpoint of ``step`` and the state that goes with it."""
        assert self._manager is not None, "RunRecord.resume comes first"
        self._manager.save(checkpoint_number=step)
        self._write_state(step)

    def finish(self, model: keras.Model, step: int, save_model: bool) -> None:
        """At the run's last step: ``model.keras`` (when ``save_model``) and the final state."""
        if step != self.steps:
            return
        if save_model:
            with atomic_output(self.folder / "model.keras") as tmp:
                model.save(tmp)
        self._write_state(step)

    @staticmethod
    def write_config(folder: Path, cfg: DictConfig) -> None:
        """The resolved config the run was started with (``config.yaml``)."""
        with atomic_output(folder / "config.yaml") as tmp:
            OmegaConf.save(cfg, tmp, resolve=True)

    def _write_state(self, step: int) -> None:
        atomic_write_json(
            self.folder / self.STATE,
            {"steps_done": step, "steps": self.steps, "complete": step == self.steps,
             "started_from": self.started_from, "last_loss": self.last_loss,
             "history": self.history},
        )  # fmt: skip


# ------------------------------------------------------------------------------- the steps


@dataclass
class Session:
    """What one invocation trains with: the distribution strategy (``train.distribute``), the
    model, its optimiser, the step counter (checkpointed), the fold's cases (``train``: what
    the training stream takes; ``monitor``: the cases of ``train.validation``), the seed, and
    the label value -> class index table."""

    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    cases: dict[str, list[str]]
    seed: int
    lut: tf.Tensor


def check_settings(train_cfg: Mapping) -> int:
    """Checks the ``train`` settings before anything is built or traced (a bad value is a
    ConfigError naming it, never a traceback from inside a compiled step); returns
    ``train.steps``."""
    steps = common.integer("train.steps", train_cfg["steps"], minimum=1)
    for key in ("checkpoint_every", "log_every", "image_every", "keep_checkpoints"):
        common.integer(f"train.{key}", train_cfg[key], minimum=1)
    if train_cfg.get("stop_after") is not None:
        common.integer("train.stop_after", train_cfg["stop_after"], minimum=1)
    if str(train_cfg["loss"]) not in LOSSES:
        raise ConfigError("train.loss", f"one of {LOSSES}", train_cfg["loss"])
    for key in ("ce_weight", "dice_weight", "dice_smooth"):
        if key in train_cfg:
            common.real(f"train.{key}", train_cfg[key])
    opt = train_cfg["optimizer"]
    if str(opt["name"]) not in OPTIMIZERS:
        raise ConfigError("train.optimizer.name", f"one of {OPTIMIZERS}", opt["name"])
    common.real("train.optimizer.learning_rate", opt["learning_rate"], positive=True)
    for key in ("weight_decay", "momentum", "clipnorm"):
        if opt.get(key) is not None:
            common.real(f"train.optimizer.{key}", opt[key])
    name = train_cfg["schedule"]["name"]
    if str(name) not in SCHEDULES:
        raise ConfigError("train.schedule.name", f"one of {SCHEDULES}", name)
    common.integer("train.batch_size", train_cfg["batch_size"], minimum=1)
    if str(train_cfg.get("distribute", "none")) not in DISTRIBUTE:
        raise ConfigError("train.distribute", f"one of {DISTRIBUTE}", train_cfg["distribute"])
    precision_of(train_cfg)
    validation.settings(train_cfg)
    return steps


def set_up(cfg: Mapping, fold: int, variant: str) -> Session:
    """The fold's cases and geometry, the seeded model and its (built) optimiser."""
    if bool(cfg["train"].get("deterministic", False)):
        tf.config.experimental.enable_op_determinism()
    cases = common.fold_cases(cfg, fold)
    input_shape, spacing = common.manifest_shape_and_spacing(cfg, cases["train"])
    lut = tf.constant(common.label_lut(common.label_values(cfg)))
    seed = seed_for(cfg, fold)
    train_ids, monitor_ids = validation.split_cases(cfg["train"], cases["train"], seed)
    cases = {**cases, "train": train_ids, "monitor": monitor_ids}  # holdout: train lacks them
    strategy = make_strategy(cfg["train"])
    if (
        precision_of(cfg["train"]) == "mixed_bfloat16"
        and not tf.config.list_logical_devices("GPU")
        and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0"
    ):
        print("warning: train.precision=mixed_bfloat16 on the CPU with TensorFlow's oneDNN "
              "kernels gave NaN losses at random here; set TF_ENABLE_ONEDNN_OPTS=0 "
              "(docs/training.md)", file=sys.stderr)  # fmt: skip
    with strategy.scope():
        keras.utils.set_random_seed(seed)
        model = build_model(cfg, variant, input_shape, spacing)
        optimizer = make_optimizer(cfg["train"])
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    return Session(strategy, model, optimizer, step, cases, seed, lut)


def last_step(train_cfg: Mapping, start: int) -> int:
    """The step this invocation stops at: ``train.steps``, or earlier with ``train.stop_after``."""
    steps = int(train_cfg["steps"])
    stop_after = train_cfg.get("stop_after")
    return steps if stop_after is None else min(steps, start + int(stop_after))


def make_train_step(session: Session, train_cfg: Mapping) -> Callable:
    """The compiled step: (image [B, Z, Y, X, C], label values [B, Z, Y, X]) -> mean loss,
    mean hard Dice over the replicas, and the first replica's picture (:func:`_slice_image`).

    Each replica's loss (the mean over its cases) is scaled by its share of the global batch
    (its cases / ``train.batch_size``, 1 on one device), so that the gradients the optimiser
    sums over the replicas are those of the global batch's mean loss; under mixed_float16 the
    LossScaleOptimizer scales it further and unscales the gradients."""
    strategy, model, optimizer, lut = (
        session.strategy,
        session.model,
        session.optimizer,
        session.lut,
    )
    loss_cfg = common.plain(train_cfg)
    global_batch = int(train_cfg["batch_size"])
    loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_step(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        classes = tf.gather(lut, tf.cast(label, tf.int32))
        share = int(image.shape[0]) / global_batch  # static: batches drop their remainder
        with tf.GradientTape() as tape:
            logits = model(image, training=True)
            loss = segmentation_loss(classes, logits, loss_cfg)
            scaled = loss * share
            if loss_scaling:
                scaled = optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss, hard_dice(classes, logits), _slice_image(image, classes, logits)

    @tf.function
    def train_step(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        loss, dice, picture = strategy.run(replica_step, args=(image, label))
        mean = tf.distribute.ReduceOp.MEAN
        picture = strategy.experimental_local_results(picture)[0]
        return strategy.reduce(mean, loss, None), strategy.reduce(mean, dice, None), picture

    return train_step


def _log_scalars(session: Session, step: int, loss: tf.Tensor, dice: tf.Tensor) -> None:
    """TensorBoard: loss, Dice, the learning rate of ``step``, a CRF head's kernel widths and,
    with widths per case, their means over the step's batch (``crf/case_theta/theta_alpha``,
    ``theta_beta_<c>``, ``theta_gamma``)."""
    lr = session.optimizer.learning_rate
    lr_now = float(lr(step) if callable(lr) else lr)
    tf.summary.scalar("train/loss", loss, step=step)
    tf.summary.scalar("train/dice", dice, step=step)
    tf.summary.scalar("train/learning_rate", lr_now, step=step)
    log_theta_summaries(session.model, step)  # kernel widths of a CRF head, if any
    for name, value in case_theta_scalars(session.model).items():  # widths per case, if any
        tf.summary.scalar(name, value, step=step)


def run_steps(
    cfg: Mapping,
    session: Session,
    record: RunRecord,
    start: int,
    end: int,
    desc: str,
    monitor: validation.Monitor | None = None,
) -> None:
    """Steps ``start + 1 .. end`` on the batches from ``start`` on: TensorBoard every
    ``log_every`` / ``image_every`` steps, a checkpoint every ``checkpoint_every`` steps, and
    all three at ``end``; the ``monitor`` (train.validation) when it is due, outside the
    replica step."""
    tcfg = cfg["train"]
    every, log_every, image_every = (
        int(tcfg["checkpoint_every"]), int(tcfg["log_every"]), int(tcfg["image_every"])
    )  # fmt: skip
    stream = training_stream(cfg, session.cases["train"], session.seed, start)
    stream = session.strategy.experimental_distribute_dataset(stream)
    train_step = make_train_step(session, tcfg)
    writer = tf.summary.create_file_writer(str(record.folder / "tensorboard"))
    bar = tqdm(
        total=int(tcfg["steps"]), initial=start, desc=desc, disable=not bool(tcfg["progress"]),
        dynamic_ncols=True,
    )  # fmt: skip
    iterator = iter(stream)
    postfix: dict[str, str] = {}
    with writer.as_default():
        for step in range(start + 1, end + 1):
            image, label = next(iterator)
            loss, dice, picture = train_step(image, label)
            session.step.assign(step)
            bar.update(1)
            if step % log_every == 0 or step == end:
                _log_scalars(session, step, loss, dice)
                record.log(step, float(loss), float(dice))
                postfix.update(loss=f"{float(loss):.3f}", dice=f"{float(dice):.3f}")
                bar.set_postfix(postfix)
            if step % image_every == 0 or step == end:
                tf.summary.image("train/image_label_prediction", picture, step=step)
            if monitor is not None and monitor.due(step):
                postfix["monitor"] = monitor.run(step)  # Dice (seconds), outside the replicas
                bar.set_postfix(postfix)
            if step % every == 0 or step == end:
                record.checkpoint(step)
                if monitor is not None:
                    monitor.checkpointed()
    bar.close()
    writer.flush()


def train(
    cfg: DictConfig | Mapping, fold: int | None = None, variant: str | None = None
) -> TrainResult:
    """Trains (or resumes, or finds finished) the (fold, variant) run; defaults: ``cfg.fold``,
    ``cfg.variant``. Returns a :class:`TrainResult`. Raises ConfigError / VNetConfigError for
    a bad setting, DataError when the cache or splits are missing."""
    fold = common.integer("fold", cfg["fold"] if fold is None else fold, minimum=0)
    variant = str(cfg["variant"] if variant is None else variant)
    steps = check_settings(cfg["train"])
    record = RunRecord(cfg, fold, variant, steps)
    if record.finished:
        return TrainResult(record.folder, steps, steps, True, record.last_loss)
    session = set_up(cfg, fold, variant)
    start = record.resume(session, int(cfg["train"]["keep_checkpoints"]))
    monitor = None
    if session.cases["monitor"]:
        monitor = validation.Monitor(cfg, session.model, session.cases["monitor"], record.folder,
                                     steps)  # fmt: skip
        monitor.resume(start)
    t0 = time.perf_counter()
    run_steps(cfg, session, record, start, last_step(cfg["train"], start), f"fold {fold} {variant}",
              monitor)  # fmt: skip
    done = int(session.step.numpy())
    record.finish(session.model, done, bool(cfg["train"]["save_model"]))
    return TrainResult(
        record.folder, done, start, done == steps, record.last_loss, time.perf_counter() - t0,
        record.history, validation.means_by_step(monitor.rows) if monitor else {},
    )  # fmt: skip


def train_and_evaluate(cfg: DictConfig) -> tuple[TrainResult, Evaluation | None]:
    """The train command: trains ``cfg.fold``, ``cfg.variant`` and, once the run is complete,
    evaluates it on the fold's held-out cases."""
    result = train(cfg)
    return result, (evaluate(cfg) if result.complete else None)


@hydra_app("config")
def main(cfg: DictConfig) -> None:
    result, evaluation = run_stage(train_and_evaluate, cfg)
    if evaluation is not None:
        print(f"{result.run_dir}: mean Dice {evaluation.mean_dice()}")
    resumed = f", resumed from step {result.started_from}" if result.started_from else ""
    print(f"{result.run_dir}: {result.steps_done}/{cfg.train.steps} steps{resumed}")
    RunRecord.write_config(result.run_dir, cfg)


if __name__ == "__main__":
    main()
