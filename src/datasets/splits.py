"""Train / validation splits, stored beside the cache like nnU-Net's ``splits_final.json``.

The file is a JSON list with one ``{"train": [...], "val": [...]}`` entry per fold. For
``kfold`` there are ``folds`` entries and each case is in exactly one ``val`` list; for
``holdout`` there is one entry whose ``val`` list is the held-out test set (``round(n *
holdout_fraction)`` cases, 33 of BraTS 2015's 220 HGG cases at 0.15). A split file that exists
is reused (like nnU-Net), provided it covers exactly the cached cases and, when this code made
it, was made with the current settings (see :func:`load_or_create_splits`).
:func:`read_splits` is the one reader of the file (the cache builder, the tf.data loader and the
experiment stages all use it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.datasets.io import atomic_write_json

SCHEMES = ("kfold", "holdout")


def kfold_splits(case_ids: Sequence[str], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """``folds`` folds over the sorted ids shuffled with ``seed``; val sizes differ by <= 1."""
    ids = sorted(case_ids)
    if not 2 <= folds <= len(ids):
        raise ConfigError("data.split.folds", f"2..{len(ids)} (number of cases)", folds)
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, folds)
    out = []
    for part in parts:
        val = sorted(ids[i] for i in part)
        out.append({"train": [i for i in ids if i not in set(val)], "val": val})
    return out


def holdout_split(
    case_ids: Sequence[str], fraction: float, seed: int
) -> list[dict[str, list[str]]]:
    """One split: ``round(n * fraction)`` cases (at least 1) held out, chosen with ``seed``."""
    ids = sorted(case_ids)
    if not 0 < fraction < 1:
        raise ConfigError("data.split.holdout_fraction", "a fraction in (0, 1)", fraction)
    if len(ids) < 2:
        raise ConfigError(
            "data.split.scheme",
            f"kfold or holdout over at least 2 cases, not {len(ids)}",
            "holdout",
        )
    n_test = min(len(ids) - 1, max(1, round(len(ids) * fraction)))
    order = np.random.default_rng(seed).permutation(len(ids))
    test = sorted(ids[i] for i in order[:n_test])
    return [{"train": [i for i in ids if i not in set(test)], "val": test}]


def make_splits(case_ids: Sequence[str], split_cfg: Mapping) -> list[dict[str, list[str]]]:
    """Splits as chosen by the ``data.split`` config (scheme, folds, holdout_fraction, seed)."""
    scheme = str(split_cfg["scheme"])
    if scheme == "kfold":
        return kfold_splits(case_ids, int(split_cfg["folds"]), int(split_cfg["seed"]))
    if scheme == "holdout":
        return holdout_split(case_ids, float(split_cfg["holdout_fraction"]), int(split_cfg["seed"]))
    raise ConfigError("data.split.scheme", f"one of {SCHEMES}", scheme)


def split_file(processed_dir: str | os.PathLike, split_cfg: Mapping) -> Path:
    """Where the splits live: ``split.file`` in the cache folder."""
    return Path(processed_dir) / str(split_cfg["file"])


def read_splits(path: str | os.PathLike) -> list[dict[str, list[str]]]:
    """The folds stored in the split file ``path``: ``[{"train": [ids], "val": [ids]}, ...]``.

    Raises DataError naming the file when it is missing, unreadable, or not a non-empty JSON
    list of {train, val} folds (the prepare stage writes it).
    """
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
        if not isinstance(splits, list) or not splits:
            raise ValueError(f"not a non-empty list: {str(splits)[:60]}")
        splits = [{"train": list(s["train"]), "val": list(s["val"])} for s in splits]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            str(path),
            "a JSON list of {train, val} folds (run `python -m crf_rnn_3d.experiments.prepare`)",
            repr(exc),
        ) from exc
    return splits


def load_or_create_splits(
    processed_dir: str | os.PathLike, case_ids: Sequence[str], split_cfg: Mapping
) -> list[dict[str, list[str]]]:
    """Reuses the split file when present (it must cover exactly ``case_ids``), else makes one.

    Splits this function made are recorded with their settings (``<file>.settings.json``):
    when ``data.split`` changes, they are made again if nobody edited them, and refused
    otherwise, never silently kept. A split file without that record is the user's (as with
    nnU-Net's splits_final.json) and is reused as is, provided a k-fold one has
    ``data.split.folds`` folds.

    Raises DataError naming the file when it is unreadable, covers other cases, was edited and
    made with other settings, or has another number of folds.
    """
    path = split_file(processed_dir, split_cfg)
    made_with = _settings_file(path)
    wanted = split_settings(split_cfg)
    if path.is_file():
        splits = read_splits(path)
        covered = {c for s in splits for c in (*s["train"], *s["val"])}
        if covered != set(case_ids):
            extra = sorted(covered - set(case_ids))[:5]
            missing = sorted(set(case_ids) - covered)[:5]
            raise DataError(
                str(path),
                f"splits over the {len(case_ids)} cached cases",
                f"cases not in the cache {extra}, cached cases missing {missing}; "
                "delete the file to make new splits",
            )
        recorded = _read_settings(made_with) if made_with.is_file() else None
        if recorded is not None and recorded != wanted:
            if splits != make_splits(case_ids, recorded):  # (they cover case_ids: see above)
                raise DataError(
                    str(path),
                    f"splits made with the current data.split settings {wanted}",
                    f"splits made with {recorded} and edited since; delete the file (and "
                    f"{made_with.name}) to make new splits, or restore those settings",
                )
            splits = make_splits(case_ids, split_cfg)  # ours, untouched: made again
            atomic_write_json(path, splits)
            atomic_write_json(made_with, wanted)
            return splits
        if recorded is None and wanted["scheme"] == "kfold" and len(splits) != wanted["folds"]:
            raise DataError(
                str(path),
                f"{wanted['folds']} folds (data.split.folds)",
                f"{len(splits)}; delete the file to make new splits, or set data.split.folds",
            )
        return splits
    splits = make_splits(case_ids, split_cfg)
    atomic_write_json(path, splits)
    atomic_write_json(made_with, wanted)
    return splits


def split_settings(split_cfg: Mapping) -> dict:
    """The settings that decide the splits (scheme, and folds or holdout_fraction, and seed)."""
    scheme = str(split_cfg["scheme"])
    settings: dict = {"scheme": scheme, "seed": int(split_cfg["seed"])}
    if scheme == "kfold":
        settings["folds"] = int(split_cfg["folds"])
    else:
        settings["holdout_fraction"] = float(split_cfg["holdout_fraction"])
    return settings


def _settings_file(path: Path) -> Path:
    """``<split file>.settings.json``: the settings the splits were made with, beside them."""
    return path.with_name(path.name + ".settings.json")


def _read_settings(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(
            str(path), "the settings the splits were made with (JSON)", repr(exc)
        ) from exc
