"""The prepare step end to end on small phantoms: cache contents, up-to-date checks, skipped and
interrupted cases, the Hydra command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from datasets_fixtures import compose_config, write_promise_case
from test_datasets_phantoms import SMALL_BRATS, SMALL_PROMISE

from crf_rnn_3d.datasets import build
from crf_rnn_3d.datasets.cache import export_prediction
from crf_rnn_3d.datasets.cache import read_case as read_cached
from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.datasets.preprocess import to_original_grid
from crf_rnn_3d.experiments.prepare import prepare, summary

REPO = Path(__file__).resolve().parents[1]


def promise_cfg(tmp_path: Path, *extra: str):
    return compose_config(
        "synthetic_promise",
        [
            f"data.root={tmp_path / 'raw'}",
            f"data.processed={tmp_path / 'processed'}",
            "data.preprocess.target_shape_xyz=[48,48,20]",
            "data.split.folds=3",
            "progress=false",
            *SMALL_PROMISE,
            *extra,
        ],
    )


def test_prepare_promise_phantoms(tmp_path: Path) -> None:
    cfg = promise_cfg(tmp_path)
    report = prepare(cfg)
    out = tmp_path / "processed"
    assert report.cases == report.written == ["Case00", "Case01", "Case02"]
    assert report.phantoms_written
    assert sorted(os.listdir(out)) == [
        "Case00.npz",
        "Case01.npz",
        "Case02.npz",
        "manifest.json",
        "prepare_config.json",
        "splits.json",
        "splits.json.settings.json",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["channels"] == ["T2"]
    for cid in report.cases:
        image, label, geo = read_cached(out / f"{cid}.npz")
        assert image.shape == (20, 48, 48, 1) and label.shape == (20, 48, 48)
        assert geo.spacing == (2.0, 1.0, 1.0)
        entry = manifest["cases"][cid]
        assert entry["shape"] == [20, 48, 48, 1] and entry["label_values"] == [0, 1]
        # the prediction written back on the source grid matches the source segmentation
        src = sitk.GetArrayFromImage(
            sitk.ReadImage(str(tmp_path / "raw" / f"{cid}_segmentation.mhd"))
        )
        back = to_original_grid(label, geo)
        assert back.shape == src.shape
        assert 2 * (back & src).sum() / (back.sum() + src.sum()) > 0.85
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(c for s in splits for c in s["val"]) == report.cases
    assert "3 cases (3 written, 0 up to date)" in summary(report)


def test_rerun_redoes_only_what_changed(tmp_path: Path) -> None:
    cfg = promise_cfg(tmp_path)
    prepare(cfg)
    out, raw = tmp_path / "processed", tmp_path / "raw"
    mtimes = {f: (out / f).stat().st_mtime_ns for f in ("Case00.npz", "Case01.npz", "Case02.npz")}
    again = prepare(cfg)
    assert again.written == [] and again.up_to_date == ["Case00", "Case01", "Case02"]
    assert not again.phantoms_written
    assert {f: (out / f).stat().st_mtime_ns for f in mtimes} == mtimes
    # a source file changes: that case only
    st = (raw / "Case01.raw").stat()
    os.utime(raw / "Case01.raw", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert prepare(cfg).written == ["Case01"]
    # a setting changes: every case
    changed = prepare(promise_cfg(tmp_path, "data.preprocess.image_interpolation=bspline"))
    assert changed.written == ["Case00", "Case01", "Case02"]
    # a case disappears from the sources: dropped from the cache and its file removed; the old
    # splits file no longer fits and says so
    for f in raw.glob("Case02*"):
        f.unlink()
    with pytest.raises(DataError, match=r"splits\.json"):
        prepare(
            promise_cfg(
                tmp_path, "data.preprocess.image_interpolation=bspline", "data.phantom=null"
            )
        )
    assert not (out / "Case02.npz").exists()
    assert "Case02" not in json.loads((out / "manifest.json").read_text())["cases"]


def test_bad_case_raises_or_is_skipped(tmp_path: Path) -> None:
    prepare(promise_cfg(tmp_path))
    seg = tmp_path / "raw" / "Case01_segmentation.mhd"
    lab = sitk.ReadImage(str(seg))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 9
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, str(seg))
    cfg = promise_cfg(tmp_path, "data.phantom=null")
    with pytest.raises(DataError, match=r"found values \[9\]") as info:
        prepare(cfg)
    assert str(seg) in str(info.value)
    skip = promise_cfg(tmp_path, "data.phantom=null", "data.on_error=skip", "data.split.folds=2")
    # the cache is written, but the splits made over three cases no longer fit: kept, with
    # an error that says so (folds never change silently)
    with pytest.raises(DataError, match="delete the file to make new splits"):
        prepare(skip)
    (tmp_path / "processed" / "splits.json").unlink()
    report = prepare(skip)
    assert list(report.skipped) == ["Case01"] and str(seg) in report.skipped["Case01"]
    manifest = json.loads((tmp_path / "processed" / "manifest.json").read_text())
    assert "Case01" in manifest["skipped"] and "Case01" not in manifest["cases"]
    assert not (tmp_path / "processed" / "Case01.npz").exists()


def test_interrupted_run_keeps_finished_cases(tmp_path: Path, monkeypatch) -> None:
    cfg = promise_cfg(tmp_path)
    real = build.preprocess_case
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "preprocess_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    out = tmp_path / "processed"
    assert sorted(os.listdir(out)) == ["Case00.npz", "manifest.json"]
    monkeypatch.setattr(build, "preprocess_case", real)
    report = prepare(cfg)
    assert report.up_to_date == ["Case00"] and report.written == ["Case01", "Case02"]


def test_prepare_brats_phantoms(tmp_path: Path) -> None:
    cfg = compose_config(
        "synthetic_brats",
        [
            f"data.root={tmp_path / 'raw'}",
            f"data.processed={tmp_path / 'processed'}",
            "data.preprocess.target_shape_xyz=[64,64,56]",
            "progress=false",
            *SMALL_BRATS,
        ],
    )
    report = prepare(cfg)
    assert len(report.cases) == 2
    image, label, _ = read_cached(tmp_path / "processed" / f"{report.cases[0]}.npz")
    assert image.shape == (56, 64, 64, 4)  # channels T1, T1c, T2, Flair
    brain = np.any(image != 0, axis=-1)
    for c in range(4):  # z-scored inside the brain, 0 outside
        inside = image[..., c][brain]
        assert abs(inside.mean()) < 1e-3 and inside.std() == pytest.approx(1, abs=1e-3)
    assert not label[~brain].any()
    splits = json.loads((tmp_path / "processed" / "splits.json").read_text())
    assert len(splits) == 1 and len(splits[0]["val"]) == 1  # holdout 0.25 of 2, at least 1


def test_prediction_written_in_the_source_geometry(tmp_path: Path) -> None:
    shape, spacing_xyz = (8, 40, 36), (0.625, 0.7, 3.6)
    idx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = [(n - 1) / 2 for n in shape]
    r2 = sum(((i - c) * s) ** 2 for i, c, s in zip(idx, centre, spacing_xyz[::-1], strict=True))
    label = (r2 < 9.0**2).astype(np.uint8)
    write_promise_case(tmp_path / "raw", "Case07", shape, spacing_xyz, label=label)
    cfg = compose_config(
        "promise12",
        [
            f"data.root={tmp_path / 'raw'}",
            f"data.processed={tmp_path / 'processed'}",
            "data.preprocess.target_shape_xyz=[24,24,12]",
            "data.split.scheme=holdout",
            "data.split.holdout_fraction=0.5",
            "progress=false",
        ],
    )
    with pytest.raises(ConfigError, match="holdout"):  # one case cannot be split
        prepare(cfg)
    _, cached, geo = read_cached(tmp_path / "processed" / "Case07.npz")
    for name, pred in [("labels.mhd", cached), ("probs.nii.gz", np.eye(2)[cached])]:
        export_prediction(pred, geo, tmp_path / name)
        out = sitk.ReadImage(str(tmp_path / name))
        src = sitk.ReadImage(str(tmp_path / "raw" / "Case07_segmentation.mhd"))
        assert out.GetSize() == src.GetSize()
        assert out.GetSpacing() == pytest.approx(src.GetSpacing())
        assert out.GetOrigin() == pytest.approx(src.GetOrigin())
        back = sitk.GetArrayFromImage(out)
        assert 2 * (back & label).sum() / (back.sum() + label.sum()) > 0.85


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crf_rnn_3d.experiments.prepare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


def test_command_line(tmp_path: Path) -> None:
    args = [
        "data=synthetic_promise",
        f"data.root={tmp_path / 'raw'}",
        f"data.processed={tmp_path / 'processed'}",
        "data.preprocess.target_shape_xyz=[32,32,16]",
        "data.split.folds=3",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *SMALL_PROMISE,
    ]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "3 cases (3 written, 0 up to date)" in done.stdout
    assert (tmp_path / "hydra" / ".hydra" / "config.yaml").is_file()
    missing = run_cli(
        "data=promise12",
        f"data.root={tmp_path / 'nowhere'}",
        f"hydra.run.dir={tmp_path / 'hydra2'}",
    )
    assert missing.returncode == 2
    assert "data set not found" in missing.stderr and str(tmp_path / "nowhere") in missing.stderr
    assert "promise12.grand-challenge.org" in missing.stderr


@pytest.mark.slow
def test_default_phantom_sets_reach_the_papers_shapes(tmp_path: Path) -> None:
    """One case of each default phantom set, full size, through the default preprocessing."""
    shapes = {"synthetic_promise": (63, 200, 200, 1), "synthetic_brats": (155, 240, 240, 4)}
    for name, shape in shapes.items():
        cfg = compose_config(
            name,
            [
                f"data.root={tmp_path / name}",
                f"data.processed={tmp_path / 'processed' / name}",
                "data.phantom.n_cases=2",
                "data.split.scheme=holdout",
                "data.split.holdout_fraction=0.5",
                "progress=false",
            ],
        )
        report = prepare(cfg)
        image, label, geo = read_cached(report.processed_dir / f"{report.cases[0]}.npz")
        assert image.shape == shape and label.shape == shape[:3]
        assert label.max() > 0
        if name == "synthetic_promise":
            assert geo.spacing == (2.0, 1.0, 1.0)
