"""crf3d-postprocess (crf_rnn_3d.experiments.postprocess) on small NIfTI and MetaImage files that
the tests write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from crf_rnn_3d.crf.dense_crf import dense_crf
from crf_rnn_3d.experiments import postprocess as cli

SPACING_XYZ = (0.8, 1.1, 2.5)
ORIGIN_XYZ = (-12.0, 30.5, 7.25)
# a rotation about z (not the identity, so a dropped direction is caught)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
SETTINGS = dict(
    theta_alpha=4.0,
    theta_beta=1.0,
    theta_gamma=2.0,
    bilateral_weight=4.0,
    spatial_weight=2.0,
    num_iterations=3,
    mode="default",
    clip=1e-5,
    standardise_image=True,
)


def _with_geometry(image: sitk.Image) -> sitk.Image:
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    image.SetDirection(DIRECTION)
    return image


def make_case(tmp_path: Path, ext: str, layout: str, classes: int = 3):
    """Two modalities and a probability map on a 7 x 9 x 11 (z, y, x) grid, all axes different
    so that a swapped axis or a reversed spacing changes the result."""
    rng = np.random.default_rng(0)
    shape = (7, 9, 11)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    labels = ((x * 0.8 - 4) ** 2 + (y * 1.1 - 5) ** 2 + (z * 2.5 - 8) ** 2 < 20).astype(int)
    if classes == 3:
        labels[(x < 3) & (labels == 0)] = 2
    t1 = (50.0 * labels + rng.normal(0, 10, shape)).astype(np.float32)
    t2 = (20.0 - 10.0 * labels + rng.normal(0, 5, shape)).astype(np.float32)
    logits = 2.0 * np.eye(classes)[labels] + rng.normal(0, 1.5, (*shape, classes))
    probs = np.exp(logits)
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    paths = {}
    for name, arr in (("t1", t1), ("t2", t2)):
        paths[name] = str(tmp_path / f"{name}{ext}")
        sitk.WriteImage(_with_geometry(sitk.GetImageFromArray(arr)), paths[name])
    if layout == "vector":
        prob_image = _with_geometry(sitk.GetImageFromArray(probs, isVector=True))
    elif layout == "fourd":  # classes along the 4th file axis: array [K, z, y, x]
        prob_image = sitk.JoinSeries(
            [sitk.GetImageFromArray(probs[..., k].copy()) for k in range(classes)]
        )
        prob_image.SetSpacing((*SPACING_XYZ, 1.0))
        prob_image.SetOrigin((*ORIGIN_XYZ, 0.0))
        d4 = np.eye(4)
        d4[:3, :3] = np.array(DIRECTION).reshape(3, 3)
        prob_image.SetDirection(tuple(d4.ravel()))
    else:  # foreground probability
        probs = probs[..., :2] / probs[..., :2].sum(-1, keepdims=True)
        prob_image = _with_geometry(sitk.GetImageFromArray(probs[..., 1].copy()))
    paths["probs"] = str(tmp_path / f"probs{ext}")
    sitk.WriteImage(prob_image, paths["probs"])
    return paths, np.stack([t1, t2], -1), probs


def expected_labels(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    std = image.reshape(-1, 2).std(0)
    standard = (image - image.reshape(-1, 2).mean(0)) / std
    settings = {k: v for k, v in SETTINGS.items() if k != "standardise_image"}
    spacing_zyx = SPACING_XYZ[::-1]
    return dense_crf(probs, standard, spacing_zyx, **settings)


@pytest.mark.parametrize(
    "ext,layout", [(".nii.gz", "fourd"), (".mha", "vector"), (".mhd", "foreground")]
)
def test_writes_refined_labels_with_input_geometry(tmp_path, ext, layout) -> None:
    paths, image, probs = make_case(tmp_path, ext, layout)
    out = str(tmp_path / f"labels{ext}")
    out_probs = str(tmp_path / "refined.mha")
    lines = []
    cli.run(
        [paths["t1"], paths["t2"]], paths["probs"], out, out_probs, dict(SETTINGS), lines.append
    )
    refined = expected_labels(image, probs)
    written = sitk.ReadImage(out)
    assert written.GetSpacing() == pytest.approx(SPACING_XYZ)
    assert written.GetOrigin() == pytest.approx(ORIGIN_XYZ)
    assert written.GetDirection() == pytest.approx(DIRECTION)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), refined.argmax(-1))
    assert sitk.GetArrayFromImage(written).dtype == np.uint8
    written_probs = sitk.ReadImage(out_probs)
    assert written_probs.GetNumberOfComponentsPerPixel() == probs.shape[-1]
    np.testing.assert_allclose(sitk.GetArrayFromImage(written_probs), refined, atol=1e-6)
    # the CRF changed some labels, and the wrong (x, y, z) spacing would give other ones
    assert np.any(refined.argmax(-1) != probs.argmax(-1))
    settings = {k: v for k, v in SETTINGS.items() if k != "standardise_image"}
    standard = (image - image.reshape(-1, 2).mean(0)) / image.reshape(-1, 2).std(0)
    swapped = dense_crf(probs, standard, SPACING_XYZ, **settings)
    assert np.any(swapped.argmax(-1) != refined.argmax(-1))
    assert any(line.startswith("time: read") for line in lines)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "crf_rnn_3d.experiments.postprocess", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_end_to_end_and_bad_file_exit_code(tmp_path) -> None:
    paths, _, _ = make_case(tmp_path, ".nii.gz", "fourd", classes=2)
    out = tmp_path / "labels.nii.gz"
    ok = _run_cli(
        f"image={paths['t1']}",
        f"probabilities={paths['probs']}",
        f"output={out}",
        "crf.num_iterations=2",
    )
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and "wrote labels" in ok.stdout
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    bad = _run_cli(
        f"image={broken}",
        f"probabilities={paths['probs']}",
        f"output={tmp_path / 'never.nii.gz'}",
    )
    assert bad.returncode == 2
    assert f"image {broken}: could not be read" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "never.nii.gz").exists()
    assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_settings_errors_are_one_line(tmp_path) -> None:
    """A list of images, an unknown CRF setting, a missing input and a bad channel_axis: exit
    status 2 and one line naming the setting or file."""
    paths, _, _ = make_case(tmp_path, ".mha", "vector", classes=2)
    out = tmp_path / "labels.mha"
    common = [f"probabilities={paths['probs']}", f"output={out}"]
    unknown = _run_cli(f"image=[{paths['t1']},{paths['t2']}]", *common, "+crf.theta=3")
    assert unknown.returncode == 2
    assert "unknown settings ['theta']" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    missing = _run_cli(f"output={out}", f"probabilities={paths['probs']}")
    assert missing.returncode == 2 and "setting image: missing" in missing.stderr
    axis = _run_cli(f"image={paths['t1']}", *common, "channel_axis=middle", cwd=tmp_path)
    assert axis.returncode == 2 and "setting channel_axis" in axis.stderr
    assert not out.exists()
    # a command-line tool: no Hydra run folder, log or .hydra/ in the working directory
    assert not any(
        p.name in ("outputs", ".hydra") or p.suffix == ".log" for p in tmp_path.iterdir()
    )


def test_bad_files_are_named(tmp_path) -> None:
    paths, image, probs = make_case(tmp_path, ".mha", "vector")
    out = str(tmp_path / "labels.mha")
    quiet = dict(settings=dict(SETTINGS), log=lambda _: None)
    missing = str(tmp_path / "nope.mha")
    with pytest.raises(cli.PostprocessError, match=f"probability map {missing}: no such file"):
        cli.run([paths["t1"]], missing, out, **quiet)
    # a probability map on another grid
    small = str(tmp_path / "small.mha")
    sitk.WriteImage(_with_geometry(sitk.GetImageFromArray(probs[:5].copy(), isVector=True)), small)
    with pytest.raises(cli.PostprocessError, match=f"probability map {small}: voxel grid"):
        cli.run([paths["t1"]], small, out, **quiet)
    # another spacing
    moved = sitk.GetImageFromArray(probs, isVector=True)
    moved.SetSpacing((1.0, 1.0, 1.0))
    moved_path = str(tmp_path / "moved.mha")
    sitk.WriteImage(moved, moved_path)
    with pytest.raises(cli.PostprocessError, match=f"probability map {moved_path}: spacing"):
        cli.run([paths["t1"]], moved_path, out, **quiet)
    # values that are not probabilities
    logits_path = str(tmp_path / "logits.mha")
    sitk.WriteImage(_with_geometry(sitk.GetImageFromArray(probs * 5, isVector=True)), logits_path)
    with pytest.raises(cli.PostprocessError, match=f"{logits_path}: values must lie in"):
        cli.run([paths["t1"]], logits_path, out, **quiet)
    # a 2D image against a 3D probability map
    flat = str(tmp_path / "flat.mha")
    sitk.WriteImage(sitk.GetImageFromArray(image[0, ..., 0].copy()), flat)
    with pytest.raises(cli.PostprocessError, match=f"probability map {paths['probs']}: expected"):
        cli.run([flat], paths["probs"], out, **quiet)
    assert not os.path.exists(out)
    with pytest.raises(cli.PostprocessError, match="unknown settings \\['theta'\\]"):
        cli.load_settings(cli.default_config_file(), ["theta=3"])


def test_failed_write_leaves_no_file(tmp_path, monkeypatch) -> None:
    paths, _, _ = make_case(tmp_path, ".mhd", "vector")
    out = tmp_path / "labels.mhd"

    def half_write(image, path, *args):
        Path(path).write_bytes(b"partial")
        Path(path).with_suffix(".raw").write_bytes(b"part")
        raise RuntimeError("disk full")

    monkeypatch.setattr(cli.sitk, "WriteImage", half_write)
    with pytest.raises(cli.PostprocessError, match=f"output {out}: could not be written"):
        cli.run([paths["t1"]], paths["probs"], str(out), None, dict(SETTINGS), lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["t1.mhd", "t1.raw", "t2.mhd", "t2.raw", "probs.mhd", "probs.raw"]
    )


# ---- refusals that were silent wrong results or tracebacks (issue 13)


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.mark.parametrize("target", ["probs", "t1", "t2"])
def test_output_over_an_input_is_refused(tmp_path, target) -> None:
    paths, _, _ = make_case(tmp_path, ".mha", "vector")
    before = _hashes(tmp_path)
    with pytest.raises(cli.PostprocessError, match=r"setting output: .* is an input") as info:
        cli.run([paths["t1"], paths["t2"]], paths["probs"], paths[target], None, dict(SETTINGS))
    assert paths[target] in str(info.value)
    assert _hashes(tmp_path) == before  # nothing changed, nothing added
    with pytest.raises(cli.PostprocessError, match=r"output_probabilities: .* is an input"):
        cli.run([paths["t1"], paths["t2"]], paths["probs"], str(tmp_path / "l.mha"), paths[target],
                dict(SETTINGS))  # fmt: skip
    assert _hashes(tmp_path) == before


def test_output_over_an_input_by_another_name_is_refused(tmp_path) -> None:
    paths, _, _ = make_case(tmp_path, ".mha", "vector")
    (tmp_path / "sub").mkdir()
    other_name = str(tmp_path / "sub" / ".." / "probs.mha")
    with pytest.raises(cli.PostprocessError, match="is an input"):
        cli.run([paths["t1"]], paths["probs"], other_name, None, dict(SETTINGS))


def test_both_outputs_on_one_file_and_a_folder_as_output_are_refused(tmp_path) -> None:
    paths, _, _ = make_case(tmp_path, ".mha", "vector")
    same = str(tmp_path / "out.mha")
    with pytest.raises(cli.PostprocessError, match="output and output_probabilities: both"):
        cli.run([paths["t1"]], paths["probs"], same, same, dict(SETTINGS))
    with pytest.raises(cli.PostprocessError, match=r"setting output: .* is a folder"):
        cli.run([paths["t1"]], paths["probs"], str(tmp_path), None, dict(SETTINGS))
    assert not (tmp_path / "out.mha").exists()


def test_volume_beside_a_2d_image_is_not_read_as_classes(tmp_path) -> None:
    """A 3D map of 20 slices beside a 2D image was read as 20 classes and the run exited 0."""
    rng = np.random.default_rng(1)
    image = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(rng.normal(size=(9, 11)).astype(np.float32)),
                    str(image))  # fmt: skip
    volume = tmp_path / "volume.mha"
    sitk.WriteImage(sitk.GetImageFromArray(rng.uniform(size=(20, 9, 11)).astype(np.float32)),
                    str(volume))  # fmt: skip
    with pytest.raises(cli.PostprocessError, match=r"20 classes .* do not sum to 1") as info:
        cli.run([str(image)], str(volume), str(tmp_path / "l.mha"), None, dict(SETTINGS))
    assert str(volume) in str(info.value)
    assert not (tmp_path / "l.mha").exists()


def test_width_too_small_for_the_lattice_is_one_line(tmp_path) -> None:
    paths, _, _ = make_case(tmp_path, ".nii.gz", "fourd", classes=2)
    out = tmp_path / "labels.nii.gz"
    proc = _run_cli(
        f"image={paths['t1']}", f"probabilities={paths['probs']}", f"output={out}",
        "crf.theta_alpha=1e-6", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: settings crf"), proc.stderr[-3000:]
    assert "function_node" not in errors[0] and "[Op:" not in errors[0]
    assert "theta_alpha=1e-06" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
