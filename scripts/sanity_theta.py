"""Learning theta in the sanity experiment: does CrfRnn(learn_theta=True), started with kernel
widths far too wide, find the widths a grid search finds, and its Dice?

    .venv/bin/python scripts/sanity_theta.py --dim 2|3 [--config FILE]
        [--set theta_search.scales=[0.5,1,2]] [--results DIR]

Same data, distortion and training as scripts/sanity_2d.py / sanity_3d.py (configs/sanity/
{2d,3d}.yaml), with the settings of the config's ``theta_search`` section; ``parts`` chooses
what runs (the experiment itself: src/experiments/sanity.py, run_theta):

- 2D only: ``downsample`` (optional) takes every n-th pixel, with the settings in pixels
  divided by n (see pixels_downsampled), to keep the runs short.
- joint: (1) grid: for each s in ``scales``, all three widths (theta_alpha, theta_beta,
  theta_gamma) are the config's times s, fixed, and only w1, w2, mu are trained
  (``train.steps`` steps); the Dice of the result is recorded. (2) learnt: the widths start at
  ``start_scale`` times the config's and are trained together with w1, w2, mu
  (``learn_theta: true``; theta_gamma_max the layer's default, 2 x its start) for
  ``learn_steps`` steps; the widths after every step and the final Dice are recorded.
- alpha_beta: a grid over theta_alpha x theta_beta scales (``alpha_beta_scales``), theta_gamma
  at the config's, weights trained as in the grid above.

Writes results/sanity_theta_{2d,3d}/<time>/: metrics.json, figure.png (Dice against the common
scale with the learnt run's final Dice; the theta_alpha x theta_beta Dice map with the learnt
run's path over it; each learnt width / the config's against the step; theta_beta as the
geometric mean over the image channels) and config.yaml; prints a summary.
``--previous METRICS`` reuses the parts an earlier run computed (drop its "learnt" entry to
rerun only the learnt run, e.g. from another ``start_scale``); ``--replot METRICS PNG``
only redraws a figure; ``--time-steps N`` only times a training step with theta fixed and
learnt. Bad settings exit 2 (one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from crf_rnn_3d.experiments import sanity
from crf_rnn_3d.experiments.cli import fail

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCE = HERE / "sanity_2d_reference.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, choices=(2, 3))
    parser.add_argument(
        "--time-steps", type=int, metavar="N", help="only time N training steps, theta fixed/learnt"
    )
    parser.add_argument(
        "--replot", nargs=2, metavar=("METRICS", "PNG"), help="only redraw a run's figure"
    )
    parser.add_argument("--config", help="default configs/sanity/{2d,3d}.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", help="folder for the run folder")
    parser.add_argument(
        "--previous", help="an earlier run's metrics.json: its parts are reused, not rerun"
    )
    parser.add_argument(
        "--reference", default=str(REFERENCE), help="2D: the reference segmentation (PNG)"
    )
    args = parser.parse_args(argv)
    if args.replot:
        sanity.figure(Path(args.replot[1]), json.loads(Path(args.replot[0]).read_text()))
        return 0
    if args.dim is None:
        parser.error("--dim is required (2 or 3) unless --replot")
    config = args.config or str(sanity.config_file(args.dim))
    try:
        cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(args.set))
    except Exception as err:  # missing file, bad YAML or override
        fail(f"config {config} {args.set}: {str(err).splitlines()[0]}")
    if args.time_steps:
        sanity.time_steps(args.dim, cfg, args.time_steps, reference_path=args.reference)
        return 0
    if "theta_search" not in cfg:
        fail(f"{config} has no theta_search section (scales, start_scale, learn_steps)")
    previous = json.loads(Path(args.previous).read_text()) if args.previous else None
    results = args.results or str(ROOT / "results" / f"sanity_theta_{args.dim}d")
    sanity.run_theta(args.dim, cfg, results, previous=previous, reference_path=args.reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
