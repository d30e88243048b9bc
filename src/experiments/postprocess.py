"""crf3d-postprocess: refine another tool's probability map with a dense CRF (no model needed).

    crf3d-postprocess image=[t1.nii.gz,flair.nii.gz] probabilities=probs.nii.gz \\
        output=labels.nii.gz [output_probabilities=refined.mha] [crf.theta_alpha=8]
    (or python -m crf_rnn_3d.experiments.postprocess ...)

A Hydra app on ``configs/postprocess.yaml``: the inputs, outputs and ``channel_axis`` at the top
level, the dense-CRF settings under ``crf``; every key can be overridden on the command line.

Inputs: one or more images (each scalar or multi-component: the channels are the CRF's
reference image), all on the same voxel grid, and one probability map on that grid, as
  - a multi-component image with K components (K classes), or
  - a scalar image with one more dimension than the image, classes along the last file axis
    (e.g. a 4D MetaImage), or
  - a scalar image of the image's dimension: a foreground probability (K = 2, [1 - p, p]), or
  - a 4-D NIfTI on a 3D image's grid (MONAI style), classes along the file's last axis
    ([x, y, z, C], MONAI's SaveImage) or first ([C, x, y, z]): the class axis is the one that
    leaves the image's grid; where both readings fit, ``channel_axis=first|last`` must say
    which (the run stops and asks rather than guess), or
  - nnU-Net v2's ``--save_probabilities`` output: ``<case>.npz`` with a ``probabilities``
    array [C, z, y, x] (nnU-Net's SimpleITK order); its ``.pkl`` is never read.
Every map's values must lie in [0, 1] (sums over the classes are not checked: region-based
nnU-Net models give overlapping sigmoid outputs). Kernel widths are in mm and the spacing is
read from the first image. Outputs (a uint8/uint16 label map, and optionally a float32
K-component probability map) get the first image's geometry (spacing, origin, direction) and
are written under a temporary name and then renamed, so that a failure never leaves a
half-written file. Reading and writing go through src/datasets/io.py. Bad input exits with
status 2 and one line naming the file or setting.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from omegaconf import DictConfig, OmegaConf

from crf_rnn_3d import CONFIG_MODULE
from crf_rnn_3d.datasets import io
from crf_rnn_3d.experiments.cli import hydra_app, run_stage

CONFIG_NAME = "postprocess"
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
REQUIRED = ("image", "probabilities", "output")
# Class probabilities read from the extra axis of a scalar image must sum to 1 within this.
SUM_TOL = 1e-2

# Bad input or output file or setting: the message names it (``<role> <path>: <what>``). A
# DataError, so the stage wrapper reports it as one line with exit code 2.
PostprocessError = io.InputFileError


def default_config_file() -> Path:
    """configs/postprocess.yaml as installed (the package crf_rnn_3d.configs)."""
    import importlib.resources

    return Path(str(importlib.resources.files(CONFIG_MODULE) / f"{CONFIG_NAME}.yaml"))


def crf_settings(crf: Mapping[str, Any]) -> dict[str, Any]:
    """The ``crf`` block as a plain dict; unknown or missing keys are refused (named)."""
    settings = dict(OmegaConf.to_container(crf) if OmegaConf.is_config(crf) else crf)
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise PostprocessError(f"settings crf: unknown settings {unknown}; known: {SETTINGS}")
    missing = sorted(set(SETTINGS) - set(settings))
    if missing:
        raise PostprocessError(f"settings crf: missing settings {missing}")
    return settings


def load_settings(config: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """The ``crf`` settings of a postprocess config file (default: the shipped one) with
    dotlist overrides of its keys (``theta_alpha=8``); unknown keys refused."""
    config = Path(config) if config is not None else default_config_file()
    if not config.is_file():
        raise PostprocessError(f"config {config}: no such file")
    cfg = OmegaConf.load(config)
    try:
        crf = OmegaConf.merge(cfg.crf, OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:
        raise PostprocessError(f"overrides {list(overrides)}: {err}".splitlines()[0]) from err
    return crf_settings(crf)


def load_images(paths: Sequence[str]) -> tuple[sitk.Image, np.ndarray, tuple[float, ...]]:
    """The first image (geometry reference), all channels as [*spatial, M] float32 (z, y, x
    order), and the spacing in mm in that order."""
    ref = io.read_image(paths[0], "image")
    channels = []
    for path in paths:
        image = ref if path == paths[0] else io.read_image(path, "image")
        if image.GetDimension() != ref.GetDimension():
            raise PostprocessError(
                f"image {path}: {image.GetDimension()}D, but {paths[0]} is {ref.GetDimension()}D"
            )
        io.check_same_grid(ref, paths[0], image, path, "image")
        arr = io.image_array(image).astype(np.float32)
        if image.GetNumberOfComponentsPerPixel() == 1:
            arr = arr[..., None]
        if not np.all(np.isfinite(arr)):
            raise PostprocessError(f"image {path}: contains NaN or Inf")
        channels.append(arr)
    return ref, np.concatenate(channels, axis=-1), io.image_spacing_zyx(ref)


def _is_nifti(path: str) -> bool:
    name = path.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _nifti_ndim(path: str) -> int | None:
    """The number of axes of a NIfTI file's data (None if its header cannot be read: the
    SimpleITK reader then reports the file)."""
    import nibabel as nib

    try:
        return len(nib.load(path).shape)
    except Exception:
        return None


def _sitk_probabilities(path: str, ref: sitk.Image, ref_path: str) -> np.ndarray:
    """The three SimpleITK layouts (module docstring) as [*spatial, K]."""
    image = io.read_image(path, "probability map")
    ndim = ref.GetDimension()
    comps = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() == ndim and comps > 1:
        io.check_same_grid(ref, ref_path, image, path, "probability map")
        return io.image_array(image)
    if image.GetDimension() == ndim + 1 and comps == 1:
        io.check_same_grid(ref, ref_path, image, path, "probability map")
        probs = np.moveaxis(io.image_array(image), 0, -1)  # file's last axis comes first
        # A scalar image with one more axis may as well be a volume that does not belong to a
        # lower-dimensional image (a 3D map beside a 2D image read as 20 "classes"): it is read
        # as classes only when they form a distribution (sum 1 at every voxel).
        sums = probs.astype(np.float64).sum(axis=-1)
        if probs.shape[-1] > 1 and not np.allclose(sums, 1.0, atol=SUM_TOL):
            raise PostprocessError(
                f"probability map {path}: a {image.GetDimension()}D scalar image beside a "
                f"{ndim}D image is read as {probs.shape[-1]} classes along its last axis, but "
                f"they do not sum to 1 (sums {float(sums.min()):.3g}..{float(sums.max()):.3g}): "
                "if it is a volume, it does not belong to this image; a multi-label map must "
                "be a K-component image"
            )
        return probs
    if image.GetDimension() == ndim and comps == 1:
        io.check_same_grid(ref, ref_path, image, path, "probability map")
        fg = io.image_array(image)
        return np.stack([1.0 - fg, fg], axis=-1)
    raise PostprocessError(
        f"probability map {path}: expected a {ndim}D image with K components, a "
        f"{ndim + 1}D scalar image or a {ndim}D foreground probability; found a "
        f"{image.GetDimension()}D image with {comps} components"
    )


def load_probabilities(
    path: str, ref: sitk.Image, ref_path: str, channel_axis: str | None = None
) -> np.ndarray:
    """[*spatial, K] float32 probabilities from any of the layouts of the module docstring:
    ``.npz`` is nnU-Net's, a 4-D NIfTI on a 3D image is read with nibabel (class axis first or
    last), anything else with SimpleITK. Values must be finite and in [0, 1], K >= 2."""
    path = str(path)
    if path.lower().endswith(".npz"):
        probs = io.read_nnunet_probabilities(path, ref, ref_path)
    elif _is_nifti(path) and ref.GetDimension() == 3 and _nifti_ndim(path) == 4:
        probs = io.read_nifti_probabilities(path, ref, ref_path, channel_axis)
    else:
        probs = _sitk_probabilities(path, ref, ref_path)
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


def run(
    images: Sequence[str],
    probabilities: str,
    output: str,
    output_probabilities: str | None = None,
    settings: Mapping[str, Any] | None = None,
    log: Callable[[str], Any] = print,
    channel_axis: str | None = None,
) -> dict[str, float]:
    """The whole post-processing; returns the timings in seconds. Raises PostprocessError."""
    settings = dict(settings or load_settings())
    standardise = bool(settings.pop("standardise_image"))
    images = [str(p) for p in images]
    check_outputs(images, str(probabilities), str(output), output_probabilities)
    start = time.perf_counter()
    log(f"reading {len(images)} image(s) and {probabilities}")
    ref, image, spacing = load_images(images)
    probs = load_probabilities(probabilities, ref, images[0], channel_axis)
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
    import tensorflow as tf

    from crf_rnn_3d.crf.dense_crf import dense_crf  # TensorFlow loads only once the inputs are good

    try:
        refined = dense_crf(probs, image, spacing, **settings)
    except ValueError as err:
        raise PostprocessError(f"settings or inputs ({probabilities}): {err}") from err
    except (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError) as err:
        # e.g. a kernel width so small that the features outgrow the lattice
        raise PostprocessError(
            f"settings crf (widths theta_alpha={settings['theta_alpha']}, theta_beta="
            f"{settings['theta_beta']}, theta_gamma={settings['theta_gamma']} for spacing "
            f"{spacing} mm): {_op_message(err)}"
        ) from err
    crf_s = time.perf_counter() - start
    start = time.perf_counter()
    labels = refined.argmax(axis=-1)
    labels = labels.astype(np.uint8 if refined.shape[-1] <= 256 else np.uint16)
    io.write_image_like(labels, ref, output)
    log(f"wrote labels {output}")
    if output_probabilities:
        io.write_image_like(refined.astype(np.float32), ref, output_probabilities, is_vector=True)
        log(f"wrote probabilities {output_probabilities}")
    write_s = time.perf_counter() - start
    log(f"time: read {read_s:.2f} s, CRF {crf_s:.2f} s, write {write_s:.2f} s")
    return {"read": read_s, "crf": crf_s, "write": write_s}


def _op_message(err: Exception) -> str:
    """A TensorFlow op error's own sentence, without the graph node's name and the op tag."""
    text = str(getattr(err, "message", err)).splitlines()[0]
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:.*$", "", text).strip()


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(
    images: Sequence[str], probabilities: str, output: str, output_probabilities: str | None
) -> None:
    """Refuses outputs that would replace an input or each other, or that are folders
    (PostprocessError naming both), before anything is read or written."""
    outputs = {"output": output}
    if output_probabilities:
        outputs["output_probabilities"] = output_probabilities
    inputs = {**{f"image {p}": p for p in images}, f"probabilities {probabilities}": probabilities}
    for key, path in outputs.items():
        if os.path.isdir(path):
            raise PostprocessError(
                f"setting {key}: {path} is a folder; give a file name, e.g. {path}/labels.nii.gz"
            )
        for role, source in inputs.items():
            if _same_file(path, source):
                raise PostprocessError(
                    f"setting {key}: {path} is an input ({role}); it would be overwritten"
                )
    if output_probabilities and _same_file(output, output_probabilities):
        raise PostprocessError(
            f"settings output and output_probabilities: both are {output}; one would "
            "overwrite the other"
        )


def postprocess(cfg: DictConfig, log: Callable[[str], Any] = print) -> dict[str, float]:
    """The stage: ``run`` on a composed postprocess config (module docstring)."""
    for key in REQUIRED:
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            raise PostprocessError(f"setting {key}: missing (e.g. {key}=<file>)")
    images = cfg.image
    images = [str(p) for p in images] if OmegaConf.is_list(images) else [str(images)]
    if not images:
        raise PostprocessError("setting image: empty list; give at least one image")
    channel_axis = cfg.get("channel_axis")
    if channel_axis is not None and channel_axis not in io.CHANNEL_AXES:
        raise PostprocessError(
            f"setting channel_axis: expected one of {io.CHANNEL_AXES} or null, found "
            f"{channel_axis!r}"
        )
    out_probs = cfg.get("output_probabilities")
    return run(
        images,
        str(cfg.probabilities),
        str(cfg.output),
        str(out_probs) if out_probs else None,
        crf_settings(cfg.crf),
        log,
        channel_axis,
    )


@hydra_app(CONFIG_NAME)
def main(cfg: DictConfig) -> None:
    run_stage(postprocess, cfg)


if __name__ == "__main__":
    main()
