"""A run's model: built from the config (V-Net, with the CRF head when the variant says so, and
the per-case widths' head when it says ``theta_per_case``) and restored from the run's
checkpoints, or loaded from the ``model.keras`` a finished run saved (:func:`load_keras_model`).
The training stage (:mod:`crf_rnn_3d.experiments.train`) and the evaluation stage
(:mod:`crf_rnn_3d.experiments.evaluate`) both take their model from here, so neither imports the
other for it. With ``train.validation.select=best`` the model is the run's best checkpoint by
monitor Dice (``best/``, written by :mod:`crf_rnn_3d.experiments.validation`), otherwise its last
checkpoint.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import keras
import tensorflow as tf

from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.experiments import common
from crf_rnn_3d.models.vnet import PRECISIONS, CaseTheta, VNetConfigError, build_vnet

CHECKPOINTS = "checkpoints"  # the checkpoint folder inside a run folder
BEST = "best"  # the folder of the best checkpoint by monitor Dice (train.validation.select=best)
BEST_RECORD = "best.json"  # in BEST: {"step": s, "dice": d}, written after ckpt-<s> is complete
SELECT = ("last", "best")  # train.validation.select


def select_of(cfg: Mapping) -> str:
    """``train.validation.select`` (``last`` when the setting is absent); ConfigError when
    unknown."""
    validation = cfg["train"].get("validation") or {}
    select = str(validation.get("select", "last"))
    if select not in SELECT:
        raise ConfigError("train.validation.select", f"one of {SELECT}", select)
    return select


def best_checkpoint(run: Path) -> tuple[str, dict]:
    """The path of the run folder's best checkpoint and its record ``{"step", "dice"}``;
    DataError naming the file when there is none or it is unreadable."""
    record = run / BEST / BEST_RECORD
    if not record.is_file():
        raise DataError(
            str(record), "the best checkpoint's record of a run trained with "
            "train.validation.select=best and train.validation.cases >= 1", "no such file",
        )  # fmt: skip
    try:
        info = json.loads(record.read_text())
        step = int(info["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(str(record), '{"step": <int>, "dice": <float>}', repr(exc)) from exc
    path = str(run / BEST / f"ckpt-{step}")
    if not tf.io.gfile.exists(path + ".index"):
        raise DataError(path + ".index", "the best checkpoint named in " + str(record), "none")
    return path, info


def selected_checkpoint(cfg: Mapping, fold: int, variant: str) -> tuple[str, dict]:
    """The checkpoint that is the (fold, variant) run's model: the last one, or with
    ``train.validation.select=best`` the best one by monitor Dice. Returns its path and
    ``{"select": ..., "step": ...}`` (and ``"dice"`` for best); DataError when it is missing."""
    out = common.run_dir(cfg, fold, variant)
    if select_of(cfg) == "best":
        path, info = best_checkpoint(out)
        return path, {"select": "best", "step": int(info["step"]), "dice": info.get("dice")}
    latest = tf.train.latest_checkpoint(str(out / CHECKPOINTS))
    if latest is None:
        raise DataError(str(out / CHECKPOINTS), "a checkpoint of a trained run", "none")
    return latest, {"select": "last", "step": int(latest.rsplit("-", 1)[-1])}


def build_model(cfg: Mapping, variant: str, input_shape: tuple, spacing: tuple) -> keras.Model:
    """The variant's model for cases of ``input_shape`` (Z, Y, X, C) and ``spacing`` (z, y, x)
    in mm: logits [B, Z, Y, X, K] with K = len(data.labels), in the dtype policy of
    ``train.precision`` (the CRF head and the logits float32). A CRF setting the layer refuses
    (``crf.theta_alpha=-1``, ``crf.num_iterations=0``) is a ConfigError naming ``crf.<key>``."""
    crf = common.variant_crf(cfg, variant)
    precision = str(cfg["train"].get("precision", "float32"))
    if precision not in PRECISIONS:
        raise ConfigError("train.precision", f"one of {PRECISIONS}", precision)
    try:
        return build_vnet(
            input_shape,
            len(common.label_values(cfg)),
            common.plain(cfg["model"]),
            crf=crf,
            spacing=spacing,
            name=variant,
            precision=precision,
        )
    except VNetConfigError:
        raise
    except ValueError as exc:
        if crf is None:
            raise
        # the layer's messages start with the argument's name ("theta_alpha must be ...")
        words = str(exc).split()
        key = words[0].split("[")[0] if words else ""
        setting = f"crf.{key}" if key in crf else "crf"
        raise ConfigError(setting, "a value the CRF layer accepts", str(exc)) from exc


def restore_checkpoint(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restores every object of ``checkpoint`` (model, optimiser, step) from the checkpoint
    ``path`` of a run being resumed; DataError naming it when it is unreadable or holds
    another model."""
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, IndexError, ValueError, tf.errors.OpError) as exc:
        raise DataError(
            path,
            "a checkpoint of this run's model and optimiser (delete the run folder to "
            "start it over)",
            f"{type(exc).__name__}: {str(exc)[:200]}",
        ) from exc


def restore_model(cfg: Mapping, fold: int, variant: str) -> keras.Model:
    """The (fold, variant) run's model with the weights of its last checkpoint, or of its best
    one with ``train.validation.select=best`` (:func:`selected_checkpoint`; DataError when it
    has none)."""
    return restore_selected(cfg, fold, variant)[0]


def restore_selected(cfg: Mapping, fold: int, variant: str) -> tuple[keras.Model, dict]:
    """:func:`restore_model` and which checkpoint it restored (:func:`selected_checkpoint`)."""
    path, which = selected_checkpoint(cfg, fold, variant)
    cases = common.fold_cases(cfg, fold)
    input_shape, spacing = common.manifest_shape_and_spacing(cfg, cases["train"])
    model = build_model(cfg, variant, input_shape, spacing)
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return model, which


def load_keras_model(path: str | Path) -> keras.Model:
    """A model saved as ``.keras`` (a run's ``model.keras``), any variant: the package's layers
    (CrfRnn, CaseTheta) are registered with Keras by their modules, imported here. DataError
    naming the file when it is missing or not a model Keras can read."""
    assert CaseTheta is not None  # imported for its registration with Keras
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "a saved model (.keras)", "no such file")
    try:
        return keras.models.load_model(path)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(
            str(path), "a saved model (.keras)", f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
