"""Synthetic phantoms: real formats and names, the configured geometry, known noise statistics,
reproducible and regenerated only when their settings change."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from crf_rnn_3d.datasets import phantoms
from crf_rnn_3d.datasets.readers import find_cases, read_case

SMALL_PROMISE = [
    "data.phantom.n_cases=3",
    "data.phantom.fov_xyz=[64,64,40]",
    "data.phantom.inplane_spacings=[0.8,1.25]",
    "data.phantom.slice_spacings=[3.0,4.0]",
    "data.phantom.organ_radii_mm=[9,12]",
]
SMALL_BRATS = [
    "data.phantom.n_cases=2",
    "data.phantom.template_resolution_mm=2",
    "data.phantom.spacing_xyz=[3,3,3]",
    "data.phantom.shape_xyz=[56,68,56]",
    "data.phantom.tumour_radius_mm=[9,12]",
]


def small_cfg(data: str, root: Path, extra: list[str]):
    from datasets_fixtures import compose_config

    cfg = compose_config(data, [f"data.root={root}", *extra])
    return cfg.data, OmegaConf.to_container(cfg.data.phantom, resolve=True)


def test_rician_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    sigma = 20.0
    for nu in (0.0, 30.0, 200.0):
        x = phantoms.rician(np.full(200_000, nu), sigma, rng)
        ref = stats.rice(nu / sigma, scale=sigma)
        assert x.mean() == pytest.approx(ref.mean(), rel=0.01)
        assert x.std() == pytest.approx(ref.std(), rel=0.02)
    assert phantoms.rician(np.zeros(10), 1.0, rng).min() >= 0


def test_bias_field_range_and_smoothness() -> None:
    rng = np.random.default_rng(1)
    b = phantoms.bias_field(rng, (10, 40, 30), (3.0, 1.0, 1.2), 0.2)
    log = np.log(b)
    assert np.abs(log).max() == pytest.approx(0.2)
    # at most quadratic in position: third differences vanish along every axis
    for axis in range(3):
        assert np.abs(np.diff(log, n=3, axis=axis)).max() < 1e-9


def test_promise_phantoms_in_promise_format(tmp_path: Path) -> None:
    data, pcfg = small_cfg("synthetic_promise", tmp_path, SMALL_PROMISE)
    ids, wrote = phantoms.write_phantoms("promise12", pcfg, tmp_path)
    assert wrote and ids == ["Case00", "Case01", "Case02"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [
            f"Case0{i}{s}"
            for i in range(3)
            for s in (".mhd", ".raw", "_segmentation.mhd", "_segmentation.raw")
        ]
        + ["phantoms.json"]
    )
    spacings = set()
    for case in find_cases(data):
        raw = read_case(case, [0, 1], 1e-3)
        z, y, x = raw.spacing
        assert z in (3.0, 4.0) and y == x and x in (0.8, 1.25)
        spacings.add(raw.spacing)
        # field of view kept: 40 x 64 x 64 mm (z, y, x)
        assert raw.image.shape[:3] == tuple(
            round(f / s) for f, s in zip((40, 64, 64), raw.spacing, strict=True)
        )
        assert set(np.unique(raw.label)) == {0, 1}
        # organ volume: an ellipsoid with semi-axes (0.8, 1, 1.1) r, r in [9, 12] mm, give or
        # take the surface roughness
        volume = raw.label.sum() * np.prod(raw.spacing)
        lo, hi = (4 / 3 * np.pi * 0.88 * r**3 for r in (9, 12))
        assert 0.6 * lo < volume < 1.5 * hi
        # brighter organ than its surroundings, but low contrast against the noise
        inside = raw.image[..., 0][raw.label == 1].mean()
        muscle = np.median(raw.image[..., 0][raw.label == 0])
        assert 1.5 * 25 < inside - muscle < 6 * 25
    assert len(spacings) > 1


def test_promise_phantom_edges_are_soft(tmp_path: Path) -> None:
    _, pcfg = small_cfg("synthetic_promise", tmp_path, SMALL_PROMISE)
    base = {**pcfg, "inplane_spacings": [0.5], "slice_spacings": [3.0]}
    base.update(bias_amplitude=0.0, noise_sigma=0.0)
    sharp, lab, _ = phantoms.promise_phantom(np.random.default_rng(5), {**base, "edge_blur_mm": 0})
    soft, lab2, _ = phantoms.promise_phantom(
        np.random.default_rng(5), {**base, "edge_blur_mm": 1.5}
    )
    np.testing.assert_array_equal(lab, lab2)  # same anatomy
    g_sharp = np.abs(np.diff(sharp.astype(float), axis=2)).max()
    g_soft = np.abs(np.diff(soft.astype(float), axis=2)).max()
    # a step blurred by a Gaussian of sigma = 3 voxels has a largest slope of step / (3 sqrt(2 pi))
    assert g_soft < 0.3 * g_sharp


def test_phantoms_reproducible_and_regenerated_only_on_change(tmp_path: Path) -> None:
    _, pcfg = small_cfg("synthetic_promise", tmp_path / "a", SMALL_PROMISE)
    phantoms.write_phantoms("promise12", pcfg, tmp_path / "a")
    phantoms.write_phantoms("promise12", pcfg, tmp_path / "b")
    for name in ("Case01.raw", "Case02_segmentation.raw"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    mtime = (tmp_path / "a" / "Case00.raw").stat().st_mtime_ns
    ids, wrote = phantoms.write_phantoms("promise12", pcfg, tmp_path / "a")
    assert not wrote and ids == ["Case00", "Case01", "Case02"]
    assert (tmp_path / "a" / "Case00.raw").stat().st_mtime_ns == mtime
    (tmp_path / "a" / "keep.txt").write_text("not ours")
    ids, wrote = phantoms.write_phantoms(
        "promise12", {**pcfg, "n_cases": 2, "seed": 1}, tmp_path / "a"
    )
    assert wrote and ids == ["Case00", "Case01"]
    assert not (tmp_path / "a" / "Case02.mhd").exists()
    assert (tmp_path / "a" / "keep.txt").exists()
    assert (tmp_path / "a" / "Case01.raw").read_bytes() != (
        tmp_path / "b" / "Case01.raw"
    ).read_bytes()


def test_mni152_tissues_keep_the_brain_volume() -> None:
    from nilearn import datasets as nd

    mask = np.asarray(nd.load_mni152_brain_mask(resolution=2).dataobj) > 0
    ref_volume = mask.sum() * 8.0  # mm^3 at 2 mm
    t = phantoms.mni152_tissues(2, (3.0, 3.0, 3.0), (56, 68, 56))
    total = t["csf"] + t["gm"] + t["wm"]
    assert total.shape == (56, 68, 56)
    assert total.max() <= 1 + 1e-6 and min(v.min() for v in t.values()) >= 0
    assert (total > 0.5).sum() * 27.0 == pytest.approx(ref_volume, rel=0.05)
    # white matter is the largest class in the middle of the brain, none outside it
    assert t["wm"].sum() > 0.3 * total.sum()
    assert not total[0].any() and not total[:, :, 0].any()


def test_brats_phantoms_in_brats2015_layout(tmp_path: Path) -> None:
    data, pcfg = small_cfg("synthetic_brats", tmp_path, SMALL_BRATS)
    ids, _ = phantoms.write_phantoms("brats2015", pcfg, tmp_path)
    assert ids == ["brats_synth_pat0000_1", "brats_synth_pat0001_1"]
    folder = tmp_path / "HGG" / ids[0]
    names = sorted(os.listdir(folder))
    assert [n.rsplit(".", 1)[0] for n in names] == [
        "VSD.Brain.XX.O.MR_Flair",
        "VSD.Brain.XX.O.MR_T1",
        "VSD.Brain.XX.O.MR_T1c",
        "VSD.Brain.XX.O.MR_T2",
        "VSD.Brain_3more.XX.O.OT",
    ]
    assert len({n.rsplit(".", 1)[1] for n in names}) == 5  # every file its own id
    cases = find_cases(data)
    assert [c.case_id for c in cases] == ids
    for case in cases:
        raw = read_case(case, [0, 1, 2, 3, 4], 1e-3)
        assert raw.image.shape == (56, 68, 56, 4) and raw.spacing == (3.0, 3.0, 3.0)
        lab, img = raw.label, raw.image
        assert {1, 2, 4} <= set(np.unique(lab))
        brain = np.any(img != 0, axis=-1)
        assert brain.sum() * 27 == pytest.approx(1.88e6, rel=0.08)  # MNI152 brain, ~1.9 l
        assert not lab[~brain].any()  # tumour only inside the brain
        t1, t1c, t2, flair = (img[..., c] for c in range(4))
        enhancing, oedema, necrosis = lab == 4, lab == 2, lab == 1
        healthy = brain & (lab == 0)
        assert t1c[enhancing].mean() > 1.5 * t1[enhancing].mean()  # contrast uptake
        assert flair[oedema].mean() > np.percentile(flair[healthy], 95)  # bright oedema
        assert t1[necrosis].mean() < t1[healthy].mean()
        assert t2[oedema].mean() > t2[healthy].mean()


def test_unknown_phantom_format(tmp_path: Path) -> None:
    from crf_rnn_3d.datasets.errors import ConfigError

    with pytest.raises(ConfigError, match="phantoms"):
        phantoms.write_phantoms("brats_nifti", {}, tmp_path)


def test_nilearn_template_is_bundled() -> None:
    # the BraTS phantoms must work offline: the template file ships inside the wheel
    from nilearn import datasets as nd

    img = nd.load_mni152_template(resolution=2)
    assert isinstance(img, nib.Nifti1Image)
    assert img.header.get_zooms()[:3] == (2.0, 2.0, 2.0)
