"""Monitor Dice during training (``train.validation``): a curve of the model in inference mode
on a few of the fold's training cases, without changing the paper's protocol.

Every ``train.validation.every`` steps (default ``train.log_every``) and at the run's last step,
the model predicts ``train.validation.cases`` cases of the fold's training list (chosen from the
run's seed, :func:`choose_cases`) as ``evaluate`` does: whole cached volumes, no augmentation,
``training=False`` (the CRF head with ``num_iterations_inference``), arg-max, class -> label
value. Each ``data.regions`` entry (each foreground class when the data set has none) is scored
with Dice (:func:`crf_rnn_3d.experiments.evaluate.region_dice`, ``evaluate.empty_dice`` when
both masks are empty), and the values go to

- TensorBoard: ``<set>/dice_<region>`` (mean over the cases) and ``<set>/dice_mean`` (mean over
  cases and regions, the value ``select=best`` ranks by), where ``<set>`` is
  ``monitor_training_cases`` by default (the cases stay in training: the curve is a monitor on
  training cases, not a validation) and ``validation_holdout`` with ``holdout: true``;
- ``monitor.csv`` in the run folder: one row per step, case and region (step, set, case, region,
  dice), rewritten atomically at each evaluation.

``holdout: true`` takes the cases out of the training stream (a different run: part of the run's
identity). ``select: best`` keeps the weights of the step with the highest ``dice_mean`` (the
earliest on a tie) in ``best/ckpt-<step>`` with ``best/best.json``; ``evaluate`` then takes that
checkpoint (:func:`crf_rnn_3d.experiments.model_io.selected_checkpoint`). The best checkpoint is
written whatever ``select`` says, so a finished run can be evaluated either way.

Resume: what was recorded after the step a run resumes from is dropped (the CSV rows, a best
checkpoint of a later step) and the best is found again among the rows kept. Best checkpoints
are kept for the current best and, for each regular checkpoint on disk, the best of the steps up
to it, so whichever checkpoint a run resumes from, its best is still there. The evaluation runs
outside the replica step (cross-replica context under ``train.distribute=mirrored``); it does
not touch the training's random streams, so the training is the same with it on or off.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.errors import ConfigError
from crf_rnn_3d.datasets.io import atomic_output, atomic_write_json
from crf_rnn_3d.datasets.tfdata import cached_cases
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.evaluate import region_dice
from crf_rnn_3d.experiments.model_io import BEST, BEST_RECORD, CHECKPOINTS, select_of

MONITOR_CSV = "monitor.csv"
CSV_COLUMNS = ["step", "set", "case", "region", "dice"]
SETS = {False: "monitor_training_cases", True: "validation_holdout"}  # by holdout


@dataclass(frozen=True)
class Settings:
    """The checked ``train.validation`` settings (``every`` resolved to ``log_every``)."""

    cases: int
    every: int
    holdout: bool
    select: str

    @property
    def tag(self) -> str:
        """The TensorBoard group and the CSV's ``set``: what the curve measures."""
        return SETS[self.holdout]


def _flag(setting: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(setting, "true or false", value)
    return value


def settings(train_cfg: Mapping) -> Settings:
    """``train.validation`` checked (ConfigError naming a bad key); an absent section is
    ``cases: 0`` (no monitor)."""
    v = train_cfg.get("validation") or {}
    cases = common.integer("train.validation.cases", v.get("cases", 0), minimum=0)
    every = v.get("every")
    if every is None:
        every = common.integer("train.log_every", train_cfg["log_every"], minimum=1)
    every = common.integer("train.validation.every", every, minimum=1)
    holdout = _flag("train.validation.holdout", v.get("holdout", False))
    select = select_of({"train": train_cfg})
    if cases == 0 and (holdout or select == "best"):
        key = "holdout" if holdout else "select"
        raise ConfigError(
            f"train.validation.{key}", "train.validation.cases >= 1 (holdout and select=best "
            "need monitor cases)", f"{key}={'true' if holdout else 'best'} with cases=0",
        )  # fmt: skip
    return Settings(cases, every, holdout, select)


def choose_cases(train_ids: list[str], n: int, seed: int, holdout: bool) -> list[str]:
    """``n`` of the fold's training cases, drawn without replacement from ``seed`` (the run's
    seed) out of the sorted list, returned in sorted order. ConfigError when the fold has too
    few (with ``holdout`` at least one must stay for training)."""
    ids = sorted(train_ids)
    most = len(ids) - 1 if holdout else len(ids)
    if n > most:
        raise ConfigError(
            "train.validation.cases",
            f"at most {most} (the fold's {len(ids)} training cases"
            + (", one left to train on)" if holdout else ")"),
            n,
        )
    picked = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return [ids[i] for i in sorted(int(i) for i in picked)]


def split_cases(train_cfg: Mapping, train_ids: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(the cases the training stream takes, the monitor cases): the training list unchanged
    unless ``holdout``, which removes the monitor cases from it."""
    s = settings(train_cfg)
    if s.cases == 0:
        return list(train_ids), []
    monitor = choose_cases(train_ids, s.cases, seed, s.holdout)
    kept = [c for c in train_ids if c not in monitor] if s.holdout else list(train_ids)
    return kept, monitor


def regions_of(cfg: Mapping) -> dict[str, list[int]]:
    """``data.regions`` (name -> label values), or one region per foreground label value
    (``label_<v>``) when the data set has none."""
    regions = common.plain(cfg["data"].get("regions")) or {}
    if regions:
        return {str(k): [int(v) for v in vals] for k, vals in regions.items()}
    return {f"label_{v}": [v] for v in common.label_values(cfg)[1:]}


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {**r, "step": int(r["step"]), "dice": float(r["dice"]) if r["dice"] else math.nan}
            for r in csv.DictReader(f)
        ]


def means_by_step(rows: list[dict]) -> dict[int, float]:
    """Step -> the mean Dice over the step's rows (cases x regions), the ``dice_mean`` curve."""
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(int(r["step"]), []).append(float(r["dice"]))
    return {step: float(np.mean(values)) for step, values in sorted(by.items())}


def best_of(rows: list[dict]) -> tuple[int, float] | None:
    """(step, dice_mean) of the highest ``dice_mean`` in ``rows`` (the earliest on a tie)."""
    best = None
    for step, value in means_by_step(rows).items():
        if best is None or value > best[1]:
            best = (step, value)
    return best


class Monitor:
    """The monitor of one training invocation: the cases in memory, a compiled prediction,
    the CSV rows and the best checkpoint (see the module docstring)."""

    def __init__(
        self, cfg: Mapping, model: keras.Model, case_ids: list[str], folder: Path, steps: int
    ) -> None:
        self.settings = settings(cfg["train"])
        self.folder = folder
        self.steps = steps
        self.regions = regions_of(cfg)
        self.labels = np.asarray(common.label_values(cfg), np.uint8)
        self.empty = common.real("evaluate.empty_dice", cfg["evaluate"]["empty_dice"])
        entries = cached_cases(common.processed_dir(cfg), case_ids)
        self.cases: list[tuple[str, np.ndarray, np.ndarray]] = []
        for case, entry in zip(case_ids, entries, strict=True):
            image, label, _ = cache.read_case(entry["path"])  # label values [Z, Y, X]
            self.cases.append((case, image[None].astype(np.float32), label))
        spec = tf.TensorSpec([1, *self.cases[0][1].shape[1:]], tf.float32)
        self._predict = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        self._checkpoint = tf.train.Checkpoint(model=model)
        self.rows: list[dict] = _read_rows(folder / MONITOR_CSV)
        self.best: tuple[int, float] | None = None
        self.seconds = 0.0

    # ------------------------------------------------------------------ resume and pruning

    def resume(self, start: int) -> None:
        """Drops what was recorded after ``start`` (CSV rows, later best checkpoints) and finds
        the best of the rows kept; warns when its checkpoint is no longer on disk (the run
        resumed from an older checkpoint than the newest), and then starts the best afresh."""
        self.rows = [r for r in self.rows if int(r["step"]) <= start]
        self._write_rows()
        self.best = best_of(self.rows)
        if self.best is not None and not self._has(self.best[0]):
            print(f"warning: the best checkpoint of step {self.best[0]} is gone (the run "
                  f"resumed from step {start}); the best is tracked from step {start} on",
                  file=sys.stderr)  # fmt: skip
            self.best = None
        self._prune(keep=self._needed())
        if self.best is not None:
            self._write_best()
        elif (self.folder / BEST / BEST_RECORD).is_file():
            (self.folder / BEST / BEST_RECORD).unlink()

    def checkpointed(self) -> None:
        """After a regular checkpoint: drops the best checkpoints no resume can need any more."""
        self._prune(keep=self._needed())

    # ------------------------------------------------------------------------ evaluation

    def due(self, step: int) -> bool:
        """Every ``every`` steps and at the run's last step (not at an invocation's end, so
        that a resumed run records the steps an uninterrupted one does)."""
        return step % self.settings.every == 0 or step == self.steps

    def scores(self) -> dict[str, dict[str, float]]:
        """Case -> region -> Dice of the model as it is now (inference mode, whole volumes)."""
        out = {}
        for case, image, label in self.cases:
            logits = np.asarray(self._predict(tf.constant(image)))[0]
            pred = self.labels[np.argmax(logits, axis=-1)]
            out[case] = region_dice(pred, label, self.regions, self.empty)
        return out

    def run(self, step: int) -> str:
        """Scores the model at ``step``: TensorBoard (inside the caller's default writer), the
        CSV, the best checkpoint; returns a short note for the progress bar."""
        t0 = time.perf_counter()
        scores = self.scores()
        tag = self.settings.tag
        new = [
            {"step": step, "set": tag, "case": case, "region": region, "dice": value}
            for case, by_region in scores.items()
            for region, value in by_region.items()
        ]
        for region in self.regions:
            value = float(np.mean([scores[c][region] for c in scores]))
            tf.summary.scalar(f"{tag}/dice_{region}", value, step=step)
        mean = float(np.mean([r["dice"] for r in new]))
        tf.summary.scalar(f"{tag}/dice_mean", mean, step=step)
        self.rows = [r for r in self.rows if int(r["step"]) != step] + new
        self._write_rows()
        if self.best is None or mean > self.best[1]:
            previous = self.best
            self._checkpoint.write(str(self.folder / BEST / f"ckpt-{step}"))
            self.best = (step, mean)
            self._write_best()
            if previous is not None:
                self._prune(keep=self._needed())
        self.seconds += time.perf_counter() - t0
        return f"{mean:.3f} ({time.perf_counter() - t0:.1f}s)"

    # ------------------------------------------------------------------------ files

    def _write_rows(self) -> None:
        with atomic_output(self.folder / MONITOR_CSV) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS)
            writer.writeheader()
            for r in sorted(self.rows, key=lambda r: int(r["step"])):
                writer.writerow({**r, "dice": f"{float(r['dice']):.6f}"})

    def _write_best(self) -> None:
        assert self.best is not None
        atomic_write_json(
            self.folder / BEST / BEST_RECORD,
            {"step": self.best[0], "dice": self.best[1], "set": self.settings.tag},
        )

    def _steps_on_disk(self) -> set[int]:
        folder = self.folder / BEST
        if not folder.is_dir():
            return set()
        return {int(p.name[len("ckpt-") : -len(".index")]) for p in folder.glob("ckpt-*.index")}

    def _has(self, step: int) -> bool:
        return step in self._steps_on_disk()

    def _needed(self) -> set[int]:
        """The current best's step and, for each regular checkpoint on disk (any of them may
        be resumed from), the best step among the rows up to it."""
        state = tf.train.get_checkpoint_state(str(self.folder / CHECKPOINTS))
        paths = state.all_model_checkpoint_paths if state else []
        kept = [int(p.rsplit("-", 1)[-1]) for p in paths]
        needed = {self.best[0]} if self.best else set()
        for last in kept:
            best = best_of([r for r in self.rows if int(r["step"]) <= last])
            if best is not None:
                needed.add(best[0])
        return needed

    def _prune(self, keep: set[int]) -> None:
        for step in self._steps_on_disk() - keep:
            for part in (self.folder / BEST).glob(f"ckpt-{step}.*"):
                part.unlink()
