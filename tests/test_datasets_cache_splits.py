"""The preprocessed cache (atomic writes, up-to-date checks) and the split files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from datasets_fixtures import write_promise_case

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.datasets.io import atomic_folder, atomic_output, atomic_write_json
from crf_rnn_3d.datasets.preprocess import Geometry
from crf_rnn_3d.datasets.splits import (
    holdout_split,
    kfold_splits,
    load_or_create_splits,
    make_splits,
    read_splits,
)

GEO = Geometry(
    original_shape=(5, 12, 10),
    original_spacing=(3.6, 0.7, 0.625),
    original_origin=(5.0, 20.0, -10.0),
    original_direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    resampled_shape=(9, 8, 6),
    spacing=(2.0, 1.0, 1.0),
    offsets=(-1, 0, 1),
    shape=(11, 8, 4),
)


def test_case_file_round_trip_and_plain_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(11, 8, 4, 2)).astype(np.float32)
    label = rng.integers(0, 3, size=(11, 8, 4)).astype(np.uint8)
    path = tmp_path / "Case00.npz"
    size = cache.write_case(path, image, label, GEO)
    assert size == path.stat().st_size
    assert os.listdir(tmp_path) == ["Case00.npz"]
    img2, lab2, geo2 = cache.read_case(path)
    np.testing.assert_array_equal(img2, image)
    np.testing.assert_array_equal(lab2, label)
    assert geo2 == GEO
    with np.load(path) as z:  # readable without this code
        assert sorted(z.files) == ["geometry", "image", "label"]
        assert json.loads(str(z["geometry"]))["offsets"] == [-1, 0, 1]


def test_write_case_interrupted_leaves_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "Case01.npz"
    cache.write_case(path, np.zeros((2, 2, 2, 1), np.float32), None, GEO)
    before = path.read_bytes()

    def broken(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(KeyboardInterrupt):
        cache.write_case(path, np.ones((2, 2, 2, 1), np.float32), None, GEO)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["Case01.npz"]


def test_signature_includes_raw_and_sees_changes(tmp_path: Path) -> None:
    img, seg = write_promise_case(tmp_path, "Case02")
    sig = cache.signature([str(img), str(seg)])
    assert [Path(s["path"]).name for s in sig] == [
        "Case02.mhd",
        "Case02.raw",
        "Case02_segmentation.mhd",
        "Case02_segmentation.raw",
    ]
    assert sig[1]["size"] == 5 * 12 * 10 * 2  # int16 voxels
    entry = {"settings_hash": "h", "sources": sig, "file": "Case02.npz", "bytes": 3}
    (tmp_path / "Case02.npz").write_bytes(b"abc")
    assert cache.is_up_to_date(entry, tmp_path, sig, "h")
    assert not cache.is_up_to_date(entry, tmp_path, sig, "other settings")
    raw = tmp_path / "Case02.raw"
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    assert not cache.is_up_to_date(entry, tmp_path, cache.signature([str(img), str(seg)]), "h")
    (tmp_path / "Case02.npz").write_bytes(b"ab")  # cached file changed size (truncated)
    assert not cache.is_up_to_date(entry, tmp_path, sig, "h")
    assert not cache.is_up_to_date(None, tmp_path, sig, "h")


def test_settings_hash_and_manifest(tmp_path: Path) -> None:
    assert cache.settings_hash({"a": 1, "b": [1, 2]}) == cache.settings_hash({"b": [1, 2], "a": 1})
    assert cache.settings_hash({"a": 1}) != cache.settings_hash({"a": 2})
    assert cache.load_manifest(tmp_path) is None
    (tmp_path / cache.MANIFEST).write_text("{not json")
    assert cache.load_manifest(tmp_path) is None
    cache.atomic_write_json(tmp_path / cache.MANIFEST, {"version": cache.MANIFEST_VERSION})
    assert cache.load_manifest(tmp_path) == {"version": cache.MANIFEST_VERSION}


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_json_format_and_old_home(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.json"
    atomic_write_json(path, {"b": [1, 2], "a": None})
    assert path.read_text() == '{\n "a": null,\n "b": [\n  1,\n  2\n ]\n}\n'
    assert os.listdir(path.parent) == ["state.json"]
    assert cache.atomic_write_json is atomic_write_json  # still importable from the cache


def test_atomic_output_keeps_the_extension_last(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "model.keras") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("model.keras") and tmp != tmp_path
        tmp.write_text("x")
        assert not (tmp_path / "model.keras").exists()
    assert os.listdir(tmp_path) == ["model.keras"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "2026-01-01T00-00-00Z"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "a" and (target / "sub" / "b.txt").read_text() == "b"
    assert os.listdir(target.parent) == [target.name]
    # never overwritten: an existing folder is refused before anything is written
    with pytest.raises(FileExistsError, match=str(target)), atomic_folder(target) as tmp:
        raise AssertionError("the body must not run")
    assert sorted(os.listdir(target)) == ["a.txt", "sub"]
    # a failing body leaves nothing behind
    other = tmp_path / "reports" / "second"
    with pytest.raises(KeyboardInterrupt), atomic_folder(other) as tmp:
        (tmp / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert os.listdir(target.parent) == [target.name]


# --------------------------------------------------------------------------- splits

IDS = [f"Case{i:02d}" for i in range(50)]


def test_kfold_partition() -> None:
    splits = kfold_splits(IDS, 5, seed=12345)
    assert len(splits) == 5
    vals = [s["val"] for s in splits]
    assert sorted(c for v in vals for c in v) == IDS  # each case validated exactly once
    assert [len(v) for v in vals] == [10] * 5
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        assert sorted(s["train"] + s["val"]) == IDS
    assert kfold_splits(list(reversed(IDS)), 5, seed=12345) == splits  # order does not matter
    assert kfold_splits(IDS, 5, seed=1) != splits
    sizes = [len(s["val"]) for s in kfold_splits(IDS[:7], 3, seed=0)]
    assert sorted(sizes) == [2, 2, 3]


def test_holdout_brats_sizes() -> None:
    ids = [f"pat{i:03d}" for i in range(220)]
    (split,) = holdout_split(ids, 0.15, seed=7)
    assert len(split["val"]) == 33 and len(split["train"]) == 187
    assert sorted(split["train"] + split["val"]) == ids
    assert holdout_split(ids, 0.15, seed=7) == [split]


def test_split_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"data\.split\.folds"):
        kfold_splits(IDS[:3], 5, 0)
    with pytest.raises(ConfigError, match=r"data\.split\.holdout_fraction"):
        holdout_split(IDS, 1.5, 0)
    with pytest.raises(ConfigError, match=r"data\.split\.scheme"):
        make_splits(IDS, {"scheme": "loo"})
    with pytest.raises(ConfigError, match=r"data\.split\.scheme.*at least 2 cases"):
        holdout_split(IDS[:1], 0.15, 0)


def test_split_file_created_then_reused(tmp_path: Path) -> None:
    cfg = {"scheme": "kfold", "folds": 5, "seed": 0, "file": "splits.json"}
    first = load_or_create_splits(tmp_path, IDS, cfg)
    on_disk = json.loads((tmp_path / "splits.json").read_text())
    assert on_disk == first
    assert load_or_create_splits(tmp_path, IDS, cfg) == first  # reused
    # splits this code made are made again when a setting changes (never silently kept) ...
    reseeded = load_or_create_splits(tmp_path, IDS, {**cfg, "seed": 99})
    assert reseeded == kfold_splits(IDS, 5, 99) != first
    assert json.loads((tmp_path / "splits.json").read_text()) == reseeded
    # ... while a split file of the user's (no settings record) is reused as is, like nnU-Net
    (tmp_path / "splits.json.settings.json").unlink()
    assert load_or_create_splits(tmp_path, IDS, {**cfg, "seed": 0}) == reseeded
    with pytest.raises(DataError, match="cached cases missing") as info:
        load_or_create_splits(tmp_path, [*IDS, "Case50"], cfg)
    assert str(tmp_path / "splits.json") in str(info.value)
    (tmp_path / "splits.json").write_text("[{")
    with pytest.raises(DataError, match="JSON list") as info:
        load_or_create_splits(tmp_path, IDS, cfg)
    assert "splits.json" in str(info.value)


def test_read_splits_is_the_one_reader(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    folds = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["c"], "val": ["a", "b"]}]
    path.write_text(json.dumps(folds))
    assert read_splits(path) == folds
    for bad, why in [
        (None, "No such file"),
        ("[{", "JSONDecodeError"),
        ("[]", "non-empty list"),
        ('{"train": []}', "non-empty list"),
        ('[{"train": ["a"]}]', "KeyError"),
        ("[3]", "TypeError"),
    ]:
        if bad is None:
            path.unlink()
        else:
            path.write_text(bad)
        with pytest.raises(DataError, match=r"JSON list of \{train, val\} folds") as info:
            read_splits(path)
        assert str(path) in str(info.value) and why in str(info.value)
        assert "crf_rnn_3d.experiments.prepare" in str(info.value)
