"""The paper's sanity experiment (Fig. 3) in 3D: a synthetic phantom with soft, low-contrast
borders (one channel).

    .venv/bin/python scripts/sanity_3d.py [--config configs/sanity/3d.yaml]
        [--set train.steps=30] [--results DIR]          (make sanity-3d)

The phantom is the PROMISE12-like one of src/datasets/phantoms.py (a prostate-like organ only
slightly brighter than the muscle around it, edges blurred, bias field, Rician noise), with the
field of view, spacing and edge blur of configs/sanity/3d.yaml. Its organ mask (the phantom's
own label) is the reference; it is distorted as a poor network would (shifted, blurred borders
and speckle) and only the CrfRnn layer's weights are trained to map (distorted, image) to the
reference (src/experiments/sanity.py: run_3d). Writes results/sanity_3d/<time>/: figure.png
(axial slices: image | distorted | reference | CRF output), metrics.json (Dice / IoU before and
after, the fraction of the distortion's wrong voxels that the layer removes, the weights) and
config.yaml. Bad settings exit 2 (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from crf_rnn_3d.experiments import sanity
from crf_rnn_3d.experiments.cli import fail

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(sanity.config_file(3)))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--results",
        default=str(ROOT / "results" / "sanity_3d"),
        help="folder for the run folder (default results/sanity_3d)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.set))
    except Exception as err:  # missing file, bad YAML or override
        fail(f"config {args.config} {args.set}: {str(err).splitlines()[0]}")
    sanity.run_3d(cfg, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
