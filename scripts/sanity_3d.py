"""The paper's sanity experiment (Fig. 3) in 3D: a synthetic phantom with soft, low-contrast
borders (one channel).

    .venv/bin/python scripts/sanity_3d.py [--config configs/crf/sanity_3d.yaml]
        [--set train.steps=30] [--results DIR]          (make sanity-3d)

The phantom is the PROMISE12-like one of src/datasets/phantoms.py (a prostate-like organ only
slightly brighter than the muscle around it, edges blurred, bias field, Rician noise), with the
field of view, spacing and edge blur of configs/crf/sanity_3d.yaml. Its organ mask (the
phantom's own label) is the reference; it is distorted as a poor network would (shifted, blurred
borders and speckle) and only the CrfRnn layer's weights are trained to map
(distorted, image) to the reference. Writes results/sanity_3d/<time>/: figure.png (axial
slices: image | distorted | reference | CRF output), metrics.json (Dice / IoU before and after,
the fraction of the distortion's wrong voxels that the layer removes, the weights) and
config.yaml.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CONFIG = ROOT / "configs" / "crf" / "sanity_3d.yaml"


def _common() -> Any:
    spec = importlib.util.spec_from_file_location("sanity_common", HERE / "sanity_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def phantom(cfg: Any) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Image [z, y, x] float32 (standardised), organ labels [z, y, x] int64, spacing (z, y, x)."""
    from crf_rnn_3d.datasets.phantoms import promise_phantom

    data_cfg = OmegaConf.load(ROOT / "configs" / "data" / "synthetic_promise.yaml")
    settings = OmegaConf.to_container(data_cfg.phantom)
    settings.update(
        fov_xyz=list(cfg.fov_xyz),
        inplane_spacings=[float(cfg.inplane_spacing)],
        slice_spacings=[float(cfg.slice_spacing)],
        edge_blur_mm=float(cfg.edge_blur_mm),
    )
    image, label, spacing = promise_phantom(np.random.default_rng(int(cfg.seed)), settings)
    image = image.astype(np.float32)
    image = (image - image.mean()) / image.std()
    return image, label.astype(np.int64), spacing


def run(cfg: Any, results: str | None = None, log: Any = print) -> dict[str, Any]:
    """The experiment; returns the metrics (also written to the run folder)."""
    common = _common()
    image, reference, spacing = phantom(cfg.phantom)
    rng = np.random.default_rng(int(cfg.train.seed))
    unaries = common.distort(reference, 2, cfg.distortion, rng)
    distorted = unaries.argmax(-1)
    before = common.overlap(distorted, reference, 2)
    log(
        f"phantom {image.shape} at {spacing} mm, distorted: Dice {before['dice']:.4f} "
        f"IoU {before['iou']:.4f}"
    )
    crf_cfg = OmegaConf.to_container(cfg.crf)
    layer, losses = common.train_crf(
        unaries, image[..., None], reference, spacing, crf_cfg, cfg.train
    )
    output = common.predict(layer, unaries, image[..., None])
    after = common.overlap(output, reference, 2)
    wrong_before = int(np.sum(distorted != reference))
    wrong_after = int(np.sum(output != reference))
    removed = (wrong_before - wrong_after) / max(wrong_before, 1)
    log(
        f"CRF output ({cfg.train.steps} steps): Dice {after['dice']:.4f} IoU {after['iou']:.4f}; "
        f"wrong voxels {wrong_before} -> {wrong_after} ({100 * removed:.1f}% of the distortion "
        "removed)"
    )
    metrics = {
        "before": before,
        "after": after,
        "wrong_voxels_before": wrong_before,
        "wrong_voxels_after": wrong_after,
        "distortion_removed": removed,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "weights": common.layer_weights(layer),
        "shape": list(image.shape),
        "spacing_mm": list(spacing),
    }
    out = common.run_dir("sanity_3d", results)
    common.write_json(out / "metrics.json", metrics)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    zs = np.nonzero(reference.any(axis=(1, 2)))[0]
    rows = []
    for z in (zs[len(zs) // 4], zs[len(zs) // 2], zs[3 * len(zs) // 4]) if len(zs) else (0,):
        rows.append(
            [
                (f"image, slice z={z}", image[z]),
                (f"distorted (Dice {before['dice']:.3f})", distorted[z]),
                ("reference", reference[z]),
                (f"CRF output (Dice {after['dice']:.3f})", output[z]),
            ]
        )
    common.save_figure(out / "figure.png", rows)
    log(f"wrote {out}")
    metrics["run_dir"] = str(out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", help="folder for the run folder (default results/sanity_3d)")
    args = parser.parse_args(argv)
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.set))
    run(cfg, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
