"""The paper's sanity experiment (Fig. 3) on a real 2D RGB photograph.

    .venv/bin/python scripts/sanity_2d.py [--config configs/crf/sanity_2d.yaml]
        [--set train.steps=30] [--results DIR]          (make sanity-2d)

The photograph is matplotlib's bundled ``grace_hopper.jpg`` (600 x 512 RGB; matplotlib is a
pinned dependency, nothing is downloaded). The reference segmentation (person / background)
ships as ``scripts/sanity_2d_reference.png`` and was made with ``--make-reference``: a person
outline drawn by hand as a polygon (REFERENCE_POLYGON, pixel coordinates read off the photo),
then, within 12 pixels of that outline, each pixel reassigned by colour with two 6-component
Gaussian mixtures (scikit-learn) fitted to the pixels well inside and well outside it, the
log-likelihood ratio smoothed (sigma 1.5 px), a 2-px opening and closing (on an edge-padded
copy), the largest component kept and its holes filled. It was checked by eye on an overlay.

The reference is distorted as a poor network would (shifted, blurred borders and speckle;
scripts/sanity_common.py), and only the CrfRnn layer's weights are trained to map
(distorted, image) to the reference. Writes results/sanity_2d/<time>/: figure.png (image |
distorted | reference | CRF output), metrics.json (Dice / IoU before and after, the losses,
the trained weights) and config.yaml; prints the Dice / IoU.
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
DEFAULT_CONFIG = ROOT / "configs" / "crf" / "sanity_2d.yaml"
REFERENCE = HERE / "sanity_2d_reference.png"
# Hand-drawn outline of the person (x, y) in pixels of the 512 x 600 photograph.
REFERENCE_POLYGON = [
    (260, 22), (300, 28), (335, 45), (355, 70), (365, 100), (372, 125), (370, 160), (368, 200),
    (372, 240), (362, 290), (345, 320), (335, 330), (380, 345), (430, 365), (470, 385),
    (495, 410), (508, 450), (512, 600), (10, 600), (12, 470), (25, 430), (60, 395), (120, 370),
    (185, 345), (200, 330), (180, 300), (162, 270), (155, 230), (152, 180), (150, 150),
    (155, 120), (170, 95), (178, 60), (200, 40), (230, 28),
]  # fmt: skip


def _common() -> Any:
    spec = importlib.util.spec_from_file_location("sanity_common", HERE / "sanity_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def photograph() -> np.ndarray:
    """matplotlib's bundled Grace Hopper photograph, uint8 [600, 512, 3]."""
    import matplotlib.cbook as cbook
    import matplotlib.image as mimage

    return np.asarray(mimage.imread(cbook.get_sample_data("grace_hopper.jpg")))


def make_reference(image: np.ndarray) -> np.ndarray:
    """The reference segmentation as described in the module docstring: uint8 [H, W] {0, 1}."""
    from matplotlib.path import Path as PolygonPath
    from scipy import ndimage
    from sklearn.mixture import GaussianMixture

    height, width = image.shape[:2]
    yy, xx = np.mgrid[:height, :width]
    points = np.c_[xx.ravel() + 0.5, yy.ravel() + 0.5]
    inside = PolygonPath(REFERENCE_POLYGON).contains_points(points).reshape(height, width)
    band, pad = 12, 16
    # morphology on an edge-padded copy, so the image border is no boundary of the person
    inside = np.pad(inside, pad, mode="edge")
    inner = ndimage.binary_erosion(inside, iterations=band)[pad:-pad, pad:-pad]
    outer = ~ndimage.binary_dilation(inside, iterations=band)[pad:-pad, pad:-pad]
    inside = inside[pad:-pad, pad:-pad]
    colours = image.reshape(-1, 3).astype(np.float64) / 255.0
    person = GaussianMixture(6, random_state=0).fit(colours[inner.ravel()][::7])
    rest = GaussianMixture(6, random_state=0).fit(colours[outer.ravel()][::7])
    ratio = (person.score_samples(colours) - rest.score_samples(colours)).reshape(height, width)
    ratio = ndimage.gaussian_filter(ratio, 1.5)
    mask = np.pad(np.where(~inner & ~outer, ratio > 0, inside), pad, mode="edge")
    mask = ndimage.binary_closing(ndimage.binary_opening(mask, iterations=2), iterations=2)
    mask = mask[pad:-pad, pad:-pad]
    components, count = ndimage.label(mask)
    sizes = ndimage.sum(mask, components, range(1, count + 1))
    mask = ndimage.binary_fill_holes(components == 1 + int(np.argmax(sizes)))
    return mask.astype(np.uint8)


def load_reference() -> np.ndarray:
    import matplotlib.image as mimage

    ref = np.asarray(mimage.imread(REFERENCE))
    if ref.ndim == 3:
        ref = ref[..., 0]
    return (ref > 0.5).astype(np.int64)


def run(cfg: Any, results: str | None = None, log: Any = print) -> dict[str, Any]:
    """The experiment; returns the metrics (also written to the run folder)."""
    common = _common()
    image = photograph()
    reference = load_reference()
    if cfg.crop is not None:
        y0, y1, x0, x1 = cfg.crop
        image, reference = image[y0:y1, x0:x1], reference[y0:y1, x0:x1]
    step = int(cfg.downsample)
    image, reference = image[::step, ::step], reference[::step, ::step]
    rng = np.random.default_rng(int(cfg.train.seed))
    unaries = common.distort(reference, 2, cfg.distortion, rng)
    rgb = image.astype(np.float32)
    distorted = unaries.argmax(-1)
    before = common.overlap(distorted, reference, 2)
    log(f"image {image.shape}, distorted: Dice {before['dice']:.4f} IoU {before['iou']:.4f}")
    crf_cfg = OmegaConf.to_container(cfg.crf)
    layer, losses = common.train_crf(unaries, rgb, reference, (1.0, 1.0), crf_cfg, cfg.train)
    output = common.predict(layer, unaries, rgb)
    after = common.overlap(output, reference, 2)
    log(f"CRF output ({cfg.train.steps} steps): Dice {after['dice']:.4f} IoU {after['iou']:.4f}")
    metrics = {
        "before": before,
        "after": after,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "weights": common.layer_weights(layer),
        "shape": list(image.shape),
    }
    out = common.run_dir("sanity_2d", results)
    common.write_json(out / "metrics.json", metrics)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    common.save_figure(
        out / "figure.png",
        [
            [
                ("image", image),
                (f"distorted (Dice {before['dice']:.3f})", distorted),
                ("reference", reference),
                (f"CRF output (Dice {after['dice']:.3f})", output),
            ]
        ],
    )
    log(f"wrote {out}")
    metrics["run_dir"] = str(out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", help="folder for the run folder (default results/sanity_2d)")
    parser.add_argument(
        "--make-reference",
        action="store_true",
        help=f"remake {REFERENCE.name} from the hand-drawn outline (see the module docstring)",
    )
    args = parser.parse_args(argv)
    if args.make_reference:
        import matplotlib.image as mimage

        tmp = REFERENCE.with_name(f".tmp-{REFERENCE.name}")
        mimage.imsave(tmp, make_reference(photograph()) * 255, cmap="gray", format="png")
        tmp.replace(REFERENCE)
        print(f"wrote {REFERENCE}")
        return 0
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.set))
    run(cfg, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
