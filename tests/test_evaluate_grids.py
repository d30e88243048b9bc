"""Evaluation on the resampled and on the original grid, against answers known from geometry.

A PROMISE12-style case is written with SimpleITK on a 0.5 x 0.5 x 1 mm grid (x, y, z) holding a
ball of radius R = 10 mm; the real cache build resamples it to 1 x 1 x 2 mm and crops it. The
"prediction" is the cached label moved by 4 voxels = D = 4 mm along x. On both grids the
metrics must then be those of two balls of radius R whose centres are D apart, worked out
without the code under test: the lens volume for the Dice and the surface distances
integrated over the sphere (as in tests/test_metrics.py). On the original grid this holds only
if the prediction is mapped back through the crop and the resampling and scored with the
source spacing against the original label file."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
from experiments_fixtures import compose_config
from scipy import integrate

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.build import build_cache
from crf_rnn_3d.experiments.evaluate import (
    METRICS,
    Evaluation,
    OriginalLabels,
    score_case,
    table_rows,
    write_table,
)
from crf_rnn_3d.experiments.metrics import surface_metrics

R, D = 10.0, 4.0
SPACING_XYZ = (0.5, 0.5, 1.0)
SIZE_XYZ = (80, 80, 40)  # 40 mm each way
ORIGIN_XYZ = (-12.0, 7.5, 30.0)
REGIONS = {"prostate": [1]}


def _distance(u: np.ndarray) -> np.ndarray:
    """Distance from the point at cos(angle) = u on one sphere to the other (law of cosines)."""
    return np.abs(np.sqrt(R * R + D * D - 2 * R * D * u) - R)


def exact() -> dict[str, float]:
    """The continuum answer: u = cos(angle from the offset axis) is uniform over a sphere's
    area, so ASSD is the mean of the distance over u in [-1, 1]; HD95 its 95th percentile.
    Dice: twice the lens volume pi (4R + D)(2R - D)^2 / 12 over the two balls' volumes."""
    assd, _ = integrate.quad(lambda u: _distance(u) / 2.0, -1.0, 1.0)
    lens = math.pi * (4 * R + D) * (2 * R - D) ** 2 / 12
    return {
        "dice": lens / (4 / 3 * math.pi * R**3),
        "assd": assd,
        "hd95": float(np.percentile(_distance(np.linspace(-1, 1, 200_001)), 95.0)),
        "nsd": float(np.mean(_distance(np.linspace(-1, 1, 200_001)) <= 2.0)),  # at 2 mm
    }


def write_case(root, case: str = "Case00") -> None:
    """CaseNN.mhd (a smooth image) and CaseNN_segmentation.mhd (the ball) on the source grid."""
    root.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = SIZE_XYZ
    sx, sy, sz = SPACING_XYZ
    z, y, x = np.meshgrid(np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx,
                          indexing="ij")  # fmt: skip
    ball = (x - 20.0) ** 2 + (y - 20.0) ** 2 + (z - 20.0) ** 2 <= R * R
    for name, array in ((f"{case}.mhd", 100.0 + 50.0 * ball + x),
                        (f"{case}_segmentation.mhd", ball.astype(np.uint8))):  # fmt: skip
        image = sitk.GetImageFromArray(array.astype(np.float32 if array.dtype != np.uint8
                                                    else np.uint8))  # fmt: skip
        image.SetSpacing(SPACING_XYZ)
        image.SetOrigin(ORIGIN_XYZ)
        sitk.WriteImage(image, str(root / name))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("grids")
    write_case(root / "raw", "Case00")
    write_case(root / "raw", "Case01")  # a split needs two cases
    cfg = compose_config([
        f"data.root={root}/raw", f"data.processed={root}/processed",
        "data.preprocess.target_spacing_xyz=[1.0,1.0,2.0]",
        "data.preprocess.target_shape_xyz=[36,36,20]",  # crops 2 voxels off each side in x, y
        "data.split.folds=2", "evaluate.nsd_tolerance_mm=1.0",
    ])  # fmt: skip
    build_cache(cfg.data, progress=False)
    manifest = cache.load_manifest(root / "processed")
    entry = manifest["cases"]["Case00"]
    _, label, geometry = cache.read_case(root / "processed" / entry["file"])
    return cfg, entry, label, geometry, root


def test_grids_differ_as_set_up(built):
    _, _, label, geometry, _ = built
    assert geometry.original_spacing == (1.0, 0.5, 0.5)  # (z, y, x)
    assert geometry.spacing == (2.0, 1.0, 1.0)
    assert geometry.original_shape == (40, 80, 80) and geometry.shape == (20, 36, 36)
    assert geometry.offsets == (0, 2, 2)
    assert label.max() == 1


def test_shifted_ball_scores_the_geometric_answer_on_both_grids(built):
    cfg, entry, label, geometry, _ = built
    pred = np.roll(label, 4, axis=2)  # 4 voxels of 1 mm along x
    assert not pred[:, :, :4].any()  # nothing wrapped round
    original, path = OriginalLabels(cfg).read("Case00", entry, geometry)
    assert path.endswith("Case00_segmentation.mhd")
    on, back = score_case(pred, label, geometry, original, REGIONS, 2.0)
    want = exact()
    assert want["assd"] == pytest.approx(2.0, abs=1e-6)  # by hand: the mean distance is 2 mm
    assert want["dice"] == pytest.approx(0.704, abs=1e-3)  # 2949.0 / 4188.8 mm^3
    assert want["nsd"] == pytest.approx(0.5, abs=1e-4)  # distance <= 2 mm for u >= 0.4 ... 1
    # Voxelised surfaces lie up to half a voxel off the true spheres (and their staircases
    # sit closer to each other than the spheres do); bounds as in tests/test_metrics.py, for
    # the coarser grid's voxel (1 x 1 x 2 mm), which the original-grid prediction went through
    # too: ASSD 0.6 mm, HD95 1 mm, Dice 0.04, NSD 0.15 per mm of the largest side (0.3).
    # Scored in wrong units (voxels, or the other grid's spacing) the distances would be
    # about twice or half as large: outside these bounds.
    for grid in ("resampled", "original"):
        got = on[grid]["prostate"]
        assert got["assd"] == pytest.approx(want["assd"], abs=0.6), (grid, got)
        assert got["hd95"] == pytest.approx(want["hd95"], abs=1.0), (grid, got)
        assert got["dice"] == pytest.approx(want["dice"], abs=0.04), (grid, got)
        assert got["nsd"] == pytest.approx(want["nsd"], abs=0.3), (grid, got)
    # the same shift made directly on the original grid (8 voxels of 0.5 mm), without the
    # round trip: the mapped-back prediction differs from it by under a coarse voxel
    direct = surface_metrics(np.roll(original, 8, axis=2), original, (1.0, 0.5, 0.5), 2.0)
    assert on["original"]["prostate"]["assd"] == pytest.approx(direct["assd"], abs=0.5)
    assert on["original"]["prostate"]["hd95"] == pytest.approx(direct["hd95"], abs=1.0)
    # the original grid is scored against the original file: the Dice recomputed here from
    # the file read with SimpleITK and the mapped-back prediction
    source = sitk.GetArrayFromImage(sitk.ReadImage(path)) > 0
    assert back.shape == source.shape == (40, 80, 80)
    moved = back > 0
    dice = 2 * np.logical_and(moved, source).sum() / (moved.sum() + source.sum())
    assert on["original"]["prostate"]["dice"] == pytest.approx(dice, abs=1e-12)
    # a perfect prediction scores 0 mm on the resampled grid; on the original one the
    # round trip through the coarser grid costs less than the coarse voxel's half-diagonal
    perfect, _ = score_case(label, label, geometry, original, REGIONS, 2.0)
    assert perfect["resampled"]["prostate"] == {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    assert perfect["original"]["prostate"]["assd"] < 0.5 * math.sqrt(2**2 + 1 + 1)
    assert perfect["original"]["prostate"]["dice"] > 0.95


def test_empty_prediction_follows_the_convention_on_both_grids(built):
    cfg, entry, label, geometry, _ = built
    original, _ = OriginalLabels(cfg).read("Case00", entry, geometry)
    on, _ = score_case(np.zeros_like(label), label, geometry, original, REGIONS, 1.0)
    diag_resampled = math.sqrt((19 * 2.0) ** 2 + (35 * 1.0) ** 2 + (35 * 1.0) ** 2)
    diag_original = math.sqrt((39 * 1.0) ** 2 + (79 * 0.5) ** 2 + (79 * 0.5) ** 2)
    for grid, diagonal in (("resampled", diag_resampled), ("original", diag_original)):
        got = on[grid]["prostate"]
        assert got == {"dice": 0.0, "hd95": pytest.approx(diagonal),
                       "assd": pytest.approx(diagonal), "nsd": 0.0}  # fmt: skip


def test_unavailable_original_label_is_said_not_skipped(built, tmp_path):
    cfg, entry, label, geometry, root = built
    # no data under data.root
    gone = cfg.copy()
    gone.data.root = str(tmp_path / "nowhere")
    missing, why = OriginalLabels(gone).read("Case00", entry, geometry)
    assert missing is None and why == f"no source data set under data.root={tmp_path}/nowhere"
    # switched off
    off, why_off = OriginalLabels(cfg, enabled=False).read("Case00", entry, geometry)
    assert off is None and "original_grid is false" in why_off
    # the label file changed since the cache was built (its modification time)
    seg = root / "raw" / "Case00_segmentation.mhd"
    before = os.stat(seg)
    try:
        os.utime(seg, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        changed, why_changed = OriginalLabels(cfg).read("Case00", entry, geometry)
    finally:
        os.utime(seg, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert changed is None and "not the file the cache was built from" in why_changed
    # the table carries the reason and NaN for every metric of the original grid
    on, _ = score_case(label, label, geometry, None, REGIONS, 1.0)
    run = Evaluation(tmp_path, 0, "vnet", {"Case00": {"prostate": 1.0}}, {"Case00": on},
                     {"Case00": why})  # fmt: skip
    rows = table_rows(run, ["prostate"])
    assert [r["grid"] for r in rows] == ["resampled", "original"]
    assert rows[0]["dice"] == 1.0 and rows[0]["note"] == ""
    assert all(math.isnan(rows[1][m]) for m in METRICS)
    assert rows[1]["note"] == f"original label unavailable: {why}"
    write_table(rows, tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "fold,case,variant,grid,region,dice,hd95,assd,nsd,note"
    assert lines[2] == f"0,Case00,vnet,original,prostate,,,,,original label unavailable: {why}"


def test_label_file_on_another_grid_than_recorded_is_an_error(built):
    import dataclasses

    from crf_rnn_3d.datasets.errors import DataError

    cfg, entry, _, geometry, _ = built
    other = dataclasses.replace(geometry, original_shape=(40, 80, 81))
    with pytest.raises(DataError, match=r"Case00_segmentation\.mhd.*grid recorded in the cache"):
        OriginalLabels(cfg).read("Case00", entry, other)


def test_bad_nsd_tolerance_is_named():
    from crf_rnn_3d.datasets.errors import ConfigError
    from crf_rnn_3d.experiments.evaluate import settings

    for bad in ("-1", "abc"):
        with pytest.raises(ConfigError, match=r"evaluate\.nsd_tolerance_mm"):
            settings(compose_config([f"evaluate.nsd_tolerance_mm={bad}"]))
    assert settings(compose_config([]))["nsd_tolerance_mm"] == 2.0
