"""The tf.data input pipeline: streams preprocessed cases from the cache.

Elements are ``(image, label)``: image [Z, Y, X, C] float32, label [Z, Y, X] uint8, batched to
[B, Z, Y, X, C] and [B, Z, Y, X]. The pipeline shuffles the *file names* (never the volumes),
reads ``parallel_reads`` cases at a time from their ``.npz`` files, and keeps ``prefetch``
batches ready, so at most about ``parallel_reads + (prefetch + 1) * batch_size`` cases are in
memory whatever the size of the set (a BraTS case is 143 MB as float32).

Training-only augmentation (``loader.augment``), drawn per element from a seeded stream
(``tf.data.Dataset.random``, new draws each epoch, the same sequence for the same seed):

- flip along each axis whose ``flip_axes_xyz`` entry is true, with ``flip_probability``; image
  and label together;
- per channel, multiply by U(1 - intensity_scale, 1 + intensity_scale), then add
  U(-intensity_shift, intensity_shift) (normalised intensity units; applied to every voxel).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.datasets.preprocess import xyz_to_zyx
from crf_rnn_3d.datasets.splits import read_splits


def _load_npz(path: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path.decode()) as z:
        return z["image"].astype(np.float32, copy=False), z["label"].astype(np.uint8, copy=False)


def cached_cases(processed_dir: str | os.PathLike, case_ids: Sequence[str]) -> list[dict]:
    """The manifest entries of ``case_ids`` (in that order), each with its ``path``.

    Raises DataError naming the manifest when it is missing or lacks a case.
    """
    processed_dir = Path(processed_dir)
    manifest = cache.load_manifest(processed_dir)
    where = str(processed_dir / cache.MANIFEST)
    if manifest is None:
        raise DataError(where, "a cache manifest (run the prepare step)", "none or unreadable")
    missing = [c for c in case_ids if c not in manifest["cases"]]
    if missing:
        raise DataError(where, "every requested case cached", f"missing {missing[:5]}")
    return [
        {**manifest["cases"][c], "path": str(processed_dir / manifest["cases"][c]["file"])}
        for c in case_ids
    ]


def common_spacing(
    processed_dir: str | os.PathLike, case_ids: Sequence[str]
) -> tuple[float, float, float]:
    """The (z, y, x) voxel spacing in mm shared by the cached ``case_ids`` (from the manifest):
    what turns the CRF's kernel widths in mm into voxels. Raises DataError naming the manifest
    when the cases differ (e.g. a data set kept on its original grids)."""
    spacings = {
        tuple(float(s) for s in e["spacing"]) for e in cached_cases(processed_dir, case_ids)
    }
    if len(spacings) != 1:
        raise DataError(
            str(Path(processed_dir) / cache.MANIFEST),
            "one spacing shared by the cases",
            f"{len(spacings)}: {sorted(spacings)[:3]}",
        )
    return spacings.pop()


def _flip_axes(loader_cfg: Mapping) -> list[int]:
    flags = xyz_to_zyx(list(loader_cfg["augment"]["flip_axes_xyz"]))
    return [axis for axis, flag in enumerate(flags) if flag]


def _augment(
    image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, aug: Mapping, axes: list[int]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Random flips and intensity scale/shift of one element, from the int64 ``seed``."""
    seeds = tf.random.experimental.stateless_split(tf.stack([seed, tf.constant(0, tf.int64)]), 3)
    p = float(aug["flip_probability"])
    if axes and p > 0:
        draws = tf.random.stateless_uniform([len(axes)], seeds[0])
        for k, axis in enumerate(axes):
            flip = draws[k] < p
            image = tf.cond(flip, lambda im=image, a=axis: tf.reverse(im, [a]), lambda im=image: im)
            label = tf.cond(flip, lambda lb=label, a=axis: tf.reverse(lb, [a]), lambda lb=label: lb)
    channels = tf.shape(image)[-1:]
    scale, shift = float(aug["intensity_scale"]), float(aug["intensity_shift"])
    if scale > 0:
        image = image * tf.random.stateless_uniform(channels, seeds[1], 1 - scale, 1 + scale)
    if shift > 0:
        image = image + tf.random.stateless_uniform(channels, seeds[2], -shift, shift)
    return image, label


def make_dataset(
    processed_dir: str | os.PathLike,
    case_ids: Sequence[str],
    loader_cfg: Mapping,
    training: bool,
) -> tf.data.Dataset:
    """A dataset of ``(image [B, Z, Y, X, C] float32, label [B, Z, Y, X] uint8)`` batches.

    Args:
      processed_dir: the cache folder (``data.processed``).
      case_ids: the cases to stream, e.g. a fold's ``train`` or ``val`` list.
      loader_cfg: ``data.loader`` (batch_size, shuffle, prefetch, parallel_reads, seed,
        augment).
      training: shuffle (when ``loader.shuffle``) and augment; otherwise the cases come in the
        given order, unchanged. One pass over the cases per iteration; call ``.repeat()`` for
        more.
    """
    batch = int(loader_cfg["batch_size"])
    if batch < 1:
        raise ConfigError("data.loader.batch_size", "a positive integer", batch)
    if not case_ids:
        raise ConfigError("case_ids", "at least one case", list(case_ids))
    entries = cached_cases(processed_dir, case_ids)
    shapes = {tuple(e["shape"]) for e in entries if "shape" in e}
    shape = shapes.pop() if len(shapes) == 1 else (None, None, None, None)
    seed = int(loader_cfg["seed"])

    ds = tf.data.Dataset.from_tensor_slices([e["path"] for e in entries])
    if training and bool(loader_cfg["shuffle"]):
        ds = ds.shuffle(len(entries), seed=seed, reshuffle_each_iteration=True)

    def load(path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = tf.numpy_function(_load_npz, [path], [tf.float32, tf.uint8])
        image.set_shape(shape)
        label.set_shape(shape[:3])
        return image, label

    parallel = int(loader_cfg["parallel_reads"])
    ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
    if training:
        aug = loader_cfg["augment"]
        axes = _flip_axes(loader_cfg)
        rand = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, rand)).map(
            lambda pair, s: _augment(pair[0], pair[1], s, aug, axes),
            num_parallel_calls=parallel,
            deterministic=True,
        )
    return ds.batch(batch).prefetch(int(loader_cfg["prefetch"]))


def fold_datasets(
    processed_dir: str | os.PathLike, loader_cfg: Mapping, fold: int, split_file: str
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """(training, validation) datasets of fold ``fold`` of the splits file in the cache."""
    path = Path(processed_dir) / split_file
    splits = read_splits(path)
    if not 0 <= fold < len(splits):
        raise ConfigError("fold", f"0..{len(splits) - 1} (folds in {path})", fold)
    split = splits[fold]
    return (
        make_dataset(processed_dir, split["train"], loader_cfg, training=True),
        make_dataset(processed_dir, split["val"], loader_cfg, training=False),
    )
