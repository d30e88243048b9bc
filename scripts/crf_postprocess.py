"""Refine a probability map with a dense CRF (NIfTI / MetaImage / anything SimpleITK reads).

    .venv/bin/python scripts/crf_postprocess.py \\
        --image t1.nii.gz --image flair.nii.gz --probabilities probs.nii.gz \\
        --output labels.nii.gz [--output-probabilities refined.mha] [--set theta_alpha=8]

Inputs: one or more images (each scalar or multi-component: the channels are the CRF's
reference image), all on the same voxel grid, and one probability map on that grid, as
  - a multi-component image with K components (K classes), or
  - a scalar image with one more dimension than the image, classes along the last file axis
    (e.g. a 4D NIfTI), or
  - a scalar image of the image's dimension: a foreground probability (K = 2, [1 - p, p]).
Settings come from configs/crf/postprocess.yaml, overridden by --set key=value; kernel widths
are in mm and the spacing is read from the first image. Outputs (a uint8/uint16 label map, and
optionally a float32 K-component probability map) get the first image's geometry (spacing,
origin, direction) and are written under a temporary name and then renamed, so that a failure
never leaves a half-written file. Bad input exits with status 2 and a message naming the file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "crf" / "postprocess.yaml"
SETTINGS = (
    "theta_alpha",
    "theta_beta",
    "theta_gamma",
    "bilateral_weight",
    "spatial_weight",
    "num_iterations",
    "mode",
    "clip",
    "standardise_image",
)


class PostprocessError(Exception):
    """Bad input or output file: the message names the file and what is wrong with it."""


def _short(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def read_image(path: str, role: str) -> sitk.Image:
    """Reads `path` with SimpleITK; PostprocessError naming the file when it cannot."""
    if not os.path.isfile(path):
        raise PostprocessError(f"{role} {path}: no such file")
    try:
        return sitk.ReadImage(path)
    except Exception as err:  # SimpleITK raises RuntimeError with a long ITK trace
        raise PostprocessError(f"{role} {path}: could not be read ({_short(err)})") from err


def _array(image: sitk.Image) -> np.ndarray:
    """Array in SimpleITK's order: [*spatial reversed (z, y, x)] plus a component axis for
    multi-component images."""
    return sitk.GetArrayFromImage(image)


def check_same_grid(ref: sitk.Image, ref_path: str, other: sitk.Image, path: str, role: str):
    """Same size and (to 1e-4 relative) spacing, origin and direction as the first image."""
    ndim = ref.GetDimension()
    size, ref_size = other.GetSize()[:ndim], ref.GetSize()
    if size != ref_size:
        raise PostprocessError(
            f"{role} {path}: voxel grid {size} (x, y, z) differs from the image {ref_path}: "
            f"{ref_size}"
        )
    for name in ("Spacing", "Origin"):
        a = np.array(getattr(other, f"Get{name}")()[:ndim])
        b = np.array(getattr(ref, f"Get{name}")())
        if not np.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise PostprocessError(
                f"{role} {path}: {name.lower()} {tuple(a)} differs from the image {ref_path}: "
                f"{tuple(b)}"
            )
    full = np.array(other.GetDirection()).reshape(other.GetDimension(), -1)[:ndim, :ndim]
    if not np.allclose(full, np.array(ref.GetDirection()).reshape(ndim, ndim), atol=1e-4):
        raise PostprocessError(f"{role} {path}: direction differs from the image {ref_path}")


def load_images(paths: list[str]) -> tuple[sitk.Image, np.ndarray, tuple[float, ...]]:
    """The first image (geometry reference), all channels as [*spatial, M] float32, and the
    spacing in array axis order (the reverse of SimpleITK's x, y, z)."""
    ref = read_image(paths[0], "image")
    channels = []
    for path in paths:
        image = ref if path == paths[0] else read_image(path, "image")
        if image.GetDimension() != ref.GetDimension():
            raise PostprocessError(
                f"image {path}: {image.GetDimension()}D, but {paths[0]} is {ref.GetDimension()}D"
            )
        check_same_grid(ref, paths[0], image, path, "image")
        arr = _array(image).astype(np.float32)
        if image.GetNumberOfComponentsPerPixel() == 1:
            arr = arr[..., None]
        if not np.all(np.isfinite(arr)):
            raise PostprocessError(f"image {path}: contains NaN or Inf")
        channels.append(arr)
    spacing = tuple(float(s) for s in reversed(ref.GetSpacing()))
    return ref, np.concatenate(channels, axis=-1), spacing


def load_probabilities(path: str, ref: sitk.Image, ref_path: str) -> np.ndarray:
    """[*spatial, K] float32 probabilities from one of the three layouts (module docstring)."""
    image = read_image(path, "probability map")
    ndim = ref.GetDimension()
    comps = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() == ndim and comps > 1:
        check_same_grid(ref, ref_path, image, path, "probability map")
        probs = _array(image)
    elif image.GetDimension() == ndim + 1 and comps == 1:
        check_same_grid(ref, ref_path, image, path, "probability map")
        probs = np.moveaxis(_array(image), 0, -1)  # file's last axis comes first in the array
    elif image.GetDimension() == ndim and comps == 1:
        check_same_grid(ref, ref_path, image, path, "probability map")
        fg = _array(image)
        probs = np.stack([1.0 - fg, fg], axis=-1)
    else:
        raise PostprocessError(
            f"probability map {path}: expected a {ndim}D image with K components, a "
            f"{ndim + 1}D scalar image or a {ndim}D foreground probability; found a "
            f"{image.GetDimension()}D image with {comps} components"
        )
    probs = probs.astype(np.float32)
    if probs.shape[-1] < 2:
        raise PostprocessError(f"probability map {path}: {probs.shape[-1]} class; need >= 2")
    if not np.all(np.isfinite(probs)):
        raise PostprocessError(f"probability map {path}: contains NaN or Inf")
    low, high = float(probs.min()), float(probs.max())
    if low < 0.0 or high > 1.0 + 1e-3:
        raise PostprocessError(
            f"probability map {path}: values must lie in [0, 1]; found [{low:g}, {high:g}]"
        )
    return probs


def write_atomic(image: sitk.Image, path: str) -> None:
    """Writes `image` to `path` through a temporary folder beside it, then renames: data files
    first and the named file (the header, for .mhd) last, so `path` only ever appears whole."""
    target = Path(path)
    if not target.parent.is_dir():
        raise PostprocessError(f"output {path}: folder {target.parent} does not exist")
    tmp_dir = target.parent / f".tmp-crf-{os.getpid()}-{target.name}"
    try:
        tmp_dir.mkdir()
        try:
            sitk.WriteImage(image, str(tmp_dir / target.name))
        except Exception as err:
            raise PostprocessError(f"output {path}: could not be written ({_short(err)})") from err
        for item in sorted(tmp_dir.iterdir(), key=lambda p: p.name == target.name):
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_settings(config: str | os.PathLike, overrides: list[str]) -> dict[str, Any]:
    """Settings from the YAML file, with dotlist overrides (key=value); unknown keys refused."""
    if not os.path.isfile(config):
        raise PostprocessError(f"config {config}: no such file")
    try:
        cfg = OmegaConf.load(config)
    except Exception as err:
        raise PostprocessError(f"config {config}: could not be read ({_short(err)})") from err
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except Exception as err:
        raise PostprocessError(f"--set {overrides}: {_short(err)}") from err
    settings = OmegaConf.to_container(cfg)
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise PostprocessError(f"config {config}: unknown settings {unknown}; known: {SETTINGS}")
    missing = sorted(set(SETTINGS) - set(settings))
    if missing:
        raise PostprocessError(f"config {config}: missing settings {missing}")
    return settings


def run(
    images: list[str],
    probabilities: str,
    output: str,
    output_probabilities: str | None = None,
    settings: dict[str, Any] | None = None,
    log: Any = print,
) -> dict[str, float]:
    """The whole post-processing; returns the timings in seconds. Raises PostprocessError."""
    settings = dict(settings or load_settings(DEFAULT_CONFIG, []))
    standardise = bool(settings.pop("standardise_image"))
    start = time.perf_counter()
    log(f"reading {len(images)} image(s) and {probabilities}")
    ref, image, spacing = load_images(images)
    probs = load_probabilities(probabilities, ref, images[0])
    if standardise:
        std = image.reshape(-1, image.shape[-1]).std(axis=0)
        image = (image - image.reshape(-1, image.shape[-1]).mean(axis=0)) / np.where(
            std > 0, std, 1.0
        )
    read_s = time.perf_counter() - start
    log(
        f"CRF on {'x'.join(map(str, probs.shape[:-1]))} voxels (spacing {spacing} mm), "
        f"{probs.shape[-1]} classes, {image.shape[-1]} image channel(s), "
        f"{settings['num_iterations']} iterations, mode {settings['mode']}"
    )
    start = time.perf_counter()
    from crf_rnn_3d.crf.dense_crf import dense_crf  # TensorFlow loads only once the inputs are good

    try:
        refined = dense_crf(probs, image, spacing, **settings)
    except ValueError as err:
        raise PostprocessError(f"settings or inputs ({probabilities}): {err}") from err
    crf_s = time.perf_counter() - start
    start = time.perf_counter()
    labels = refined.argmax(axis=-1)
    labels = labels.astype(np.uint8 if refined.shape[-1] <= 256 else np.uint16)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(ref)
    write_atomic(label_image, output)
    log(f"wrote labels {output}")
    if output_probabilities:
        prob_image = sitk.GetImageFromArray(refined.astype(np.float32), isVector=True)
        prob_image.CopyInformation(ref)
        write_atomic(prob_image, output_probabilities)
        log(f"wrote probabilities {output_probabilities}")
    write_s = time.perf_counter() - start
    log(f"time: read {read_s:.2f} s, CRF {crf_s:.2f} s, write {write_s:.2f} s")
    return {"read": read_s, "crf": crf_s, "write": write_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", action="append", required=True, help="reference image(s)")
    parser.add_argument("--probabilities", required=True, help="probability map")
    parser.add_argument("--output", required=True, help="label map to write")
    parser.add_argument("--output-probabilities", help="refined probabilities to write")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="settings YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, args.set)
        run(args.image, args.probabilities, args.output, args.output_probabilities, settings)
    except PostprocessError as err:
        print(f"crf_postprocess: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
