"""The paper's sanity experiment (Fig. 3) on a real 2D RGB photograph.

    .venv/bin/python scripts/sanity_2d.py [--config configs/sanity/2d.yaml]
        [--set train.steps=30] [--results DIR]          (make sanity-2d)

The photograph is matplotlib's bundled ``grace_hopper.jpg`` (600 x 512 RGB; matplotlib is a
pinned dependency, nothing is downloaded). The reference segmentation (person / background)
ships as ``scripts/sanity_2d_reference.png`` and was made with ``--make-reference``: a person
outline drawn by hand as a polygon (REFERENCE_POLYGON in src/experiments/sanity.py, pixel
coordinates read off the photo), then, within 12 pixels of that outline, each pixel reassigned
by colour with two 6-component Gaussian mixtures (scikit-learn) fitted to the pixels well inside
and well outside it, the log-likelihood ratio smoothed (sigma 1.5 px), a 2-px opening and
closing (on an edge-padded copy), the largest component kept and its holes filled. It was
checked by eye on an overlay.

The reference is distorted as a poor network would (shifted, blurred borders and speckle;
src/experiments/sanity.py), and only the CrfRnn layer's weights are trained to map
(distorted, image) to the reference. Writes results/sanity_2d/<time>/: figure.png (image |
distorted | reference | CRF output), metrics.json (Dice / IoU before and after, the losses,
the trained weights) and config.yaml; prints the Dice / IoU. Bad settings exit 2 (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from crf_rnn_3d.experiments import sanity
from crf_rnn_3d.experiments.cli import fail

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "sanity_2d_reference.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(sanity.config_file(2)))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--results",
        default=str(HERE.parent / "results" / "sanity_2d"),
        help="folder for the run folder (default results/sanity_2d)",
    )
    parser.add_argument(
        "--make-reference",
        action="store_true",
        help=f"remake {REFERENCE.name} from the hand-drawn outline (see the module docstring)",
    )
    args = parser.parse_args(argv)
    if args.make_reference:
        import matplotlib.image as mimage

        tmp = REFERENCE.with_name(f".tmp-{REFERENCE.name}")
        reference = sanity.make_reference(sanity.photograph())
        mimage.imsave(tmp, reference * 255, cmap="gray", format="png")
        tmp.replace(REFERENCE)
        print(f"wrote {REFERENCE}")
        return 0
    try:
        cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.set))
    except Exception as err:  # missing file, bad YAML or override
        fail(f"config {args.config} {args.set}: {str(err).splitlines()[0]}")
    sanity.run_2d(cfg, args.results, reference_path=REFERENCE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
