"""What the experiment stages share: run identity and folders, variants, splits, labels.

A run is one (fold, variant) training of one configuration. Its folder is
``<runs_dir>/<name>/<data.name>/<fold>-<variant>-<hash>/`` where the hash covers everything that
changes its result (the resolved ``data``, ``model``, ``train`` settings but for the ones that
only steer the process, the CRF settings when the variant uses the head, the fold and the
variant). Starting a run again with the same config therefore finds its checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.datasets.splits import read_splits, split_file

# train settings that steer the process but not the result: not part of a run's identity
# (distribute: one device or mirrored replicas train the same run, equal to float rounding)
PROCESS_ONLY = ("checkpoint_every", "keep_checkpoints", "stop_after", "log_every", "image_every",
                "progress", "save_model", "distribute", "validation")  # fmt: skip
# crf settings of the per-case widths' head (crf_rnn_3d.models.vnet.CASE_THETA_DEFAULTS): part
# of a run's identity only in a variant with theta_per_case true (the head exists only there)
CASE_THETA_KEYS = ("theta_per_case", "theta_case_factor", "theta_case_hidden")


def validation_identity(train: Mapping) -> dict | None:
    """The part of ``train.validation`` that changes a run's result: the monitor cases when
    they are held out of training, and the cases and frequency when the best step is the
    model (``select: best``); None when it only monitors (src/experiments/validation.py)."""
    v = train.get("validation") or {}
    holdout = v.get("holdout", False) is True
    out: dict = {"cases": v.get("cases"), "holdout": True} if holdout else {}
    if str(v.get("select", "last")) == "best":
        every = v.get("every")
        out.update(cases=v.get("cases"), holdout=holdout, select="best",
                   every=train.get("log_every") if every is None else every)  # fmt: skip
    return out or None


def integer(setting: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (a whole number, at least ``minimum``); ConfigError naming
    ``setting`` otherwise (a command line's ``fold=abc`` stops with one line, not a traceback)."""
    if isinstance(value, bool):
        raise ConfigError(setting, "a whole number", value)
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(setting, "a whole number", value) from None
    if minimum is not None and number < minimum:
        raise ConfigError(setting, f"a whole number >= {minimum}", value)
    return number


def real(setting: str, value: Any, positive: bool = False) -> float:
    """``value`` as a finite float (> 0 with ``positive``); ConfigError naming ``setting``."""
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or (positive and number <= 0):
        raise ConfigError(setting, "a finite number" + (" > 0" if positive else ""), value)
    return number


def plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of an OmegaConf node (other values are returned as they are)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def variant_names(cfg: Mapping) -> list[str]:
    """The variants compared, in the config's order (``variants``)."""
    variants = cfg.get("variants")
    if not variants:
        raise ConfigError("variants", "a mapping name -> {crf: true|false}", variants)
    return list(variants)


def variant_crf(cfg: Mapping, variant: str) -> dict | None:
    """The CRF head settings of ``variant`` or None: ``cfg.crf`` when its ``crf`` flag is true,
    updated with the variant's ``crf_overrides`` (e.g. ``{learn_theta: true}`` for the variant
    with learnt kernel widths, ``{theta_per_case: true}`` for widths predicted per case); an
    override must name a setting that ``cfg.crf`` has."""
    variants = cfg.get("variants") or {}
    if variant not in variants:
        raise ConfigError("variant", f"one of {list(variants)}", variant)
    spec = variants[variant]
    if not bool(spec["crf"]):
        return None
    settings = plain(cfg["crf"])
    overrides = plain(spec.get("crf_overrides") or {})
    for key, value in overrides.items():
        if key not in settings:
            raise ConfigError(
                f"variants.{variant}.crf_overrides.{key}", f"one of {sorted(settings)}", key
            )
        settings[key] = value
    return settings


def run_identity(cfg: Mapping, fold: int, variant: str) -> dict:
    """Everything that changes the result of the (fold, variant) run, as plain data."""
    train = {k: v for k, v in plain(cfg["train"]).items() if k not in PROCESS_ONLY}
    if train.get("precision") == "float32":  # the default keeps the folders of earlier runs
        train.pop("precision")
    validation = validation_identity(plain(cfg["train"]))
    if validation is not None:  # a monitor alone keeps the folders of earlier runs too
        train["validation"] = validation
    data = plain(cfg["data"])
    data.pop("root", None)  # where the files are does not change the result
    data.pop("processed", None)
    crf = variant_crf(cfg, variant)
    if crf is not None and crf.get("theta_per_case") is False:
        for key in CASE_THETA_KEYS:  # no per-case head: keeps the folders of earlier runs
            crf.pop(key, None)
    return {
        "data": data,
        "model": plain(cfg["model"]),
        "crf": crf,
        "train": train,
        "fold": int(fold),
        "variant": variant,
    }


def run_dir(cfg: Mapping, fold: int, variant: str) -> Path:
    """The folder of the (fold, variant) run (see the module docstring)."""
    key = cache.settings_hash(run_identity(cfg, fold, variant))
    return (
        Path(str(cfg["runs_dir"]))
        / str(cfg["name"])
        / str(cfg["data"]["name"])
        / (f"fold{int(fold)}-{variant}-{key}")
    )


def processed_dir(cfg: Mapping) -> Path:
    return Path(str(cfg["data"]["processed"]))


def load_splits(cfg: Mapping) -> list[dict[str, list[str]]]:
    """The folds of the prepared cache (``splits.json``); DataError naming it when missing."""
    return read_splits(split_file(processed_dir(cfg), cfg["data"]["split"]))


def fold_cases(cfg: Mapping, fold: int) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}`` of ``fold``; ConfigError when out of range."""
    splits = load_splits(cfg)
    if not 0 <= int(fold) < len(splits):
        raise ConfigError("fold", f"0..{len(splits) - 1} (folds in the splits file)", fold)
    return splits[int(fold)]


def label_values(cfg: Mapping) -> list[int]:
    """The data set's label values (``data.labels``); class index k stands for value [k]."""
    labels = [int(v) for v in cfg["data"]["labels"]]
    if len(labels) < 2 or sorted(set(labels)) != labels or labels[0] != 0:
        raise ConfigError("data.labels", "sorted distinct label values starting at 0", labels)
    return labels


def label_lut(labels: list[int]) -> np.ndarray:
    """Label value -> class index table [max(labels) + 1] int32 (-1 for values not listed)."""
    lut = np.full(max(labels) + 1, -1, np.int32)
    lut[labels] = np.arange(len(labels), dtype=np.int32)
    return lut


def manifest_shape_and_spacing(cfg: Mapping, case_ids: list[str]) -> tuple[tuple, tuple]:
    """(Z, Y, X, C) shared by the cached cases and their (z, y, x) spacing in mm."""
    from crf_rnn_3d.datasets.tfdata import cached_cases, common_spacing

    entries = cached_cases(processed_dir(cfg), case_ids)
    shapes = {tuple(int(s) for s in e["shape"]) for e in entries}
    if len(shapes) != 1:
        raise DataError(
            str(processed_dir(cfg) / cache.MANIFEST),
            "one shape shared by the cases (set data.preprocess.target_shape_xyz)",
            f"{sorted(shapes)[:3]}",
        )
    spacing = common_spacing(processed_dir(cfg), case_ids)
    return shapes.pop(), spacing
