"""The tf.data pipeline: streams the cached cases, shuffles, batches and augments as configured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.datasets.preprocess import Geometry
from crf_rnn_3d.datasets.tfdata import common_spacing, fold_datasets, make_dataset

SHAPE = (4, 6, 5)


def write_cache(root: Path, n: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """n cases [4, 6, 5, 2]: channel 0 holds the case number, channel 1 a ramp; manifest too."""
    geo = Geometry(
        SHAPE,
        (1.0, 1.0, 1.0),
        (0.0, 0.0, 0.0),
        ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
        SHAPE,
        (1.0, 1.0, 1.0),
        (0, 0, 0),
        SHAPE,
    )
    rng = np.random.default_rng(0)
    data, entries = {}, {}
    for i in range(n):
        image = np.stack(
            [
                np.full(SHAPE, i, np.float32),
                np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE),
            ],
            axis=-1,
        )
        label = rng.integers(0, 3, SHAPE).astype(np.uint8)
        cid = f"Case{i:02d}"
        size = cache.write_case(root / f"{cid}.npz", image, label, geo)
        data[cid] = (image, label)
        entries[cid] = {
            "file": f"{cid}.npz",
            "bytes": size,
            "shape": [*SHAPE, 2],
            "spacing": [2.0, 1.0, 1.0],
        }
    cache.atomic_write_json(
        root / cache.MANIFEST, {"version": cache.MANIFEST_VERSION, "cases": entries}
    )
    return data


def loader(**changes) -> dict:
    cfg = {
        "batch_size": 1,
        "shuffle": True,
        "prefetch": 2,
        "parallel_reads": 2,
        "seed": 0,
        "augment": {
            "flip_axes_xyz": [False, False, False],
            "flip_probability": 0.5,
            "intensity_shift": 0.0,
            "intensity_scale": 0.0,
        },
    }
    aug = changes.pop("augment", {})
    cfg.update(changes)
    cfg["augment"].update(aug)
    return cfg


def case_numbers(ds) -> list[int]:
    return [int(img[b, 0, 0, 0, 0]) for img, _ in ds for b in range(img.shape[0])]


def test_validation_stream_is_the_cache_in_order(tmp_path: Path) -> None:
    data = write_cache(tmp_path)
    ids = ["Case03", "Case00", "Case05"]
    ds = make_dataset(tmp_path, ids, loader(), training=False)
    assert ds.element_spec[0].shape.as_list() == [None, 4, 6, 5, 2]
    assert ds.element_spec[1].dtype == tf.uint8
    out = list(ds)
    assert len(out) == 3
    for (img, lab), cid in zip(out, ids, strict=True):
        np.testing.assert_array_equal(img[0].numpy(), data[cid][0])
        np.testing.assert_array_equal(lab[0].numpy(), data[cid][1])


def test_training_shuffles_each_epoch_reproducibly(tmp_path: Path) -> None:
    write_cache(tmp_path, 8)
    ids = [f"Case{i:02d}" for i in range(8)]
    ds = make_dataset(tmp_path, ids, loader(), training=True)
    epochs = [case_numbers(ds) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(8))  # every case once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # a new order each epoch
    again = make_dataset(tmp_path, ids, loader(), training=True)
    assert [case_numbers(again) for _ in range(3)] == epochs  # same seed, same sequence
    other = make_dataset(tmp_path, ids, loader(seed=1), training=True)
    assert case_numbers(other) != epochs[0]


def test_batches(tmp_path: Path) -> None:
    write_cache(tmp_path, 5)
    ids = [f"Case{i:02d}" for i in range(5)]
    sizes = [img.shape[0] for img, _ in make_dataset(tmp_path, ids, loader(batch_size=2), False)]
    assert sizes == [2, 2, 1]


def test_flip_always_along_x(tmp_path: Path) -> None:
    data = write_cache(tmp_path, 3)
    cfg = loader(
        shuffle=False, augment={"flip_axes_xyz": [True, False, False], "flip_probability": 1.0}
    )
    for (img, lab), cid in zip(make_dataset(tmp_path, list(data), cfg, True), data, strict=True):
        np.testing.assert_array_equal(img[0].numpy(), data[cid][0][:, :, ::-1])
        np.testing.assert_array_equal(lab[0].numpy(), data[cid][1][:, :, ::-1])
    cfg = loader(
        shuffle=False, augment={"flip_axes_xyz": [False, True, True], "flip_probability": 0.0}
    )
    for (img, _), cid in zip(make_dataset(tmp_path, list(data), cfg, True), data, strict=True):
        np.testing.assert_array_equal(img[0].numpy(), data[cid][0])


def test_flips_along_z_about_half_the_time(tmp_path: Path) -> None:
    data = write_cache(tmp_path, 8)
    cfg = loader(shuffle=False, augment={"flip_axes_xyz": [False, False, True]})
    ds = make_dataset(tmp_path, list(data), cfg, True)
    flipped = 0
    for _ in range(5):
        for (_, lab), cid in zip(ds, data, strict=True):
            ref = data[cid][1]
            if not np.array_equal(lab[0].numpy(), ref):
                np.testing.assert_array_equal(lab[0].numpy(), ref[::-1])
                flipped += 1
    assert 8 <= flipped <= 32  # of 40 draws at p = 0.5


def test_intensity_scale_and_shift_within_bounds(tmp_path: Path) -> None:
    data = write_cache(tmp_path, 4)
    cfg = loader(augment={"intensity_scale": 0.1, "intensity_shift": 0.2})
    seen = []
    for img, lab in make_dataset(tmp_path, list(data), cfg, True):
        ramp_out = img[0, ..., 1].numpy().ravel()
        ramp_in = np.arange(ramp_out.size, dtype=np.float64)
        m, b = np.polyfit(ramp_in, ramp_out, 1)  # out = in * m + b on the ramp channel
        np.testing.assert_allclose(ramp_out, ramp_in * m + b, atol=1e-3)
        assert 0.9 <= m <= 1.1 and -0.2 <= b <= 0.2
        seen.append(m)
        # the labels are never touched by intensity augmentation
        cid = next(c for c in data if np.array_equal(lab[0].numpy(), data[c][1]))
        assert cid in data
    assert len(set(np.round(seen, 6))) == 4


def test_missing_case_or_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest") as info:
        make_dataset(tmp_path, ["Case00"], loader(), False)
    assert str(tmp_path / "manifest.json") in str(info.value)
    write_cache(tmp_path, 2)
    with pytest.raises(DataError, match=r"missing \['Case07'\]"):
        make_dataset(tmp_path, ["Case00", "Case07"], loader(), False)


def test_fold_datasets(tmp_path: Path) -> None:
    write_cache(tmp_path, 4)
    splits = [{"train": ["Case00", "Case01", "Case02"], "val": ["Case03"]}]
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    train, val = fold_datasets(tmp_path, loader(), 0, "splits.json")
    assert sorted(case_numbers(train)) == [0, 1, 2]
    assert case_numbers(val) == [3]
    with pytest.raises(ConfigError, match="fold"):
        fold_datasets(tmp_path, loader(), 1, "splits.json")


def test_bench_stream_counts_every_element(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from crf_rnn_3d.datasets.bench_stream import measure

    write_cache(tmp_path, 3)
    cfg = OmegaConf.create({"processed": str(tmp_path), "loader": loader(batch_size=2)})
    result = measure(cfg, n_cases=3, training=True, passes=2)
    assert result["cases"] == 3 and result["elements"] == 6
    assert result["seconds_per_case"] > 0 and result["peak_rss_mb"] > 0


def test_common_spacing(tmp_path: Path) -> None:
    write_cache(tmp_path, 3)
    assert common_spacing(tmp_path, ["Case00", "Case02"]) == (2.0, 1.0, 1.0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["cases"]["Case01"]["spacing"] = [3.0, 1.0, 1.0]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="one spacing") as info:
        common_spacing(tmp_path, ["Case00", "Case01"])
    assert str(tmp_path / "manifest.json") in str(info.value)
