"""Learning theta in the sanity experiment: does CrfRnn(learn_theta=True), started with kernel
widths far too wide, find the widths a grid search finds, and its Dice?

    .venv/bin/python scripts/sanity_theta.py --dim 2|3 [--config FILE]
        [--set theta_search.scales=[0.5,1,2]] [--results DIR]

Same data, distortion and training as scripts/sanity_2d.py / sanity_3d.py (configs/crf/
sanity_{2d,3d}.yaml), with the settings of the config's ``theta_search`` section; ``parts``
chooses what runs:

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
learnt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment_data(dim: int, cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """(unaries [*spatial, 2], image [*spatial, M] float32, reference [*spatial], spacing in mm)
    exactly as the 2D / 3D sanity experiment builds them."""
    common = _load("sanity_common")
    if dim == 2:
        sanity = _load("sanity_2d")
        image, reference = sanity.photograph(), sanity.load_reference()
        if cfg.crop is not None:
            y0, y1, x0, x1 = cfg.crop
            image, reference = image[y0:y1, x0:x1], reference[y0:y1, x0:x1]
        step = int(cfg.downsample)
        image, reference = image[::step, ::step], reference[::step, ::step]
        image, spacing = image.astype(np.float32), (1.0, 1.0)
    else:
        sanity = _load("sanity_3d")
        image, reference, spacing = sanity.phantom(cfg.phantom)
        image = image[..., None]
    rng = np.random.default_rng(int(cfg.train.seed))
    unaries = common.distort(reference, 2, cfg.distortion, rng)
    return unaries, image, reference, tuple(float(s) for s in spacing)


def pixels_downsampled(cfg: Any) -> Any:
    """2D: the config with ``theta_search.downsample`` (if set) as its downsampling step, and the
    settings in pixels (distortion shift and blur, theta_alpha, theta_gamma) divided by it, so
    they mean the same lengths on the photograph. theta_beta (colour units) is unchanged."""
    step = cfg.theta_search.get("downsample")
    if step is None:
        return cfg
    step = int(step)
    cfg = OmegaConf.merge(cfg, {"downsample": step * int(cfg.downsample)})
    cfg.distortion.shift = [float(s) / step for s in cfg.distortion.shift]
    cfg.distortion.blur_sigma = float(cfg.distortion.blur_sigma) / step
    cfg.crf.theta_alpha = float(cfg.crf.theta_alpha) / step
    cfg.crf.theta_gamma = float(cfg.crf.theta_gamma) / step
    return cfg


def geomean(values: Any) -> float:
    """Geometric mean of a width or a list of widths (theta_beta over the image channels)."""
    return float(np.exp(np.mean(np.log(np.atleast_1d(np.asarray(values, dtype=np.float64))))))


def scaled_crf(
    cfg: Any, scale: float, alpha: float | None = None, beta: float | None = None
) -> dict[str, Any]:
    """The config's CrfRnn settings with every kernel width multiplied by `scale`, or theta_alpha
    by `alpha` and theta_beta by `beta` where given (theta_gamma then by `scale`)."""
    crf = OmegaConf.to_container(cfg.crf)
    crf["theta_alpha"] = float(crf["theta_alpha"]) * (scale if alpha is None else alpha)
    crf["theta_gamma"] = float(crf["theta_gamma"]) * scale
    b_scale = scale if beta is None else beta
    widths = crf["theta_beta"]
    crf["theta_beta"] = (
        [float(b) * b_scale for b in widths]
        if isinstance(widths, list)
        else float(widths) * b_scale
    )
    return crf


def run(
    dim: int,
    cfg: Any,
    results: str | None = None,
    log: Any = print,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The parts named in ``theta_search.parts`` (joint: grid over one common scale and the
    learnt run; alpha_beta: grid over theta_alpha x theta_beta scales); parts found in
    `previous` (an earlier run's metrics.json) are taken from there. Returns the metrics (also
    written to a new run folder)."""
    common = _load("sanity_common")
    parts = list(cfg.theta_search.get("parts", ["joint"]))
    metrics: dict[str, Any] = dict(previous or {})
    if dim == 2:
        cfg = pixels_downsampled(cfg)
        cfg.theta_search.downsample = None  # applied once
    search = cfg.theta_search
    unaries, image, reference, spacing = experiment_data(dim, cfg)
    before = common.overlap(unaries.argmax(-1), reference, 2)
    log(f"data {image.shape} at {spacing}, distorted Dice {before['dice']:.4f}")
    metrics.update(shape=list(image.shape), spacing=list(spacing), distorted=before)
    base = {
        "theta_alpha": float(cfg.crf.theta_alpha),
        "theta_beta": geomean(OmegaConf.to_container(cfg.crf)["theta_beta"]),
        "theta_gamma": float(cfg.crf.theta_gamma),
    }
    metrics["config_theta"] = base
    if "alpha_beta" in parts and "grid_alpha_beta" not in metrics:
        cells = []
        for a in [float(x) for x in search.alpha_beta_scales.alpha]:
            for b in [float(x) for x in search.alpha_beta_scales.beta]:
                t0 = time.perf_counter()
                crf = scaled_crf(cfg, 1.0, alpha=a, beta=b)
                layer, _ = common.train_crf(unaries, image, reference, spacing, crf, cfg.train)
                dice = common.overlap(common.predict(layer, unaries, image), reference, 2)["dice"]
                cells.append({"alpha_scale": a, "beta_scale": b, "dice": dice})
                took = time.perf_counter() - t0
                log(f"grid alpha x{a:g} beta x{b:g}: Dice {dice:.4f} ({took:.0f} s)")
        metrics["grid_alpha_beta"] = cells
        metrics["grid_alpha_beta_best"] = max(cells, key=lambda c: c["dice"])
    if "joint" not in parts or "learnt" in metrics:
        return _finish(dim, cfg, metrics, results, log)
    grid = list(metrics.get("grid", []))
    for scale in [] if grid else [float(s) for s in search.scales]:
        t0 = time.perf_counter()
        layer, losses = common.train_crf(
            unaries, image, reference, spacing, scaled_crf(cfg, scale), cfg.train
        )
        after = common.overlap(common.predict(layer, unaries, image), reference, 2)
        grid.append({"scale": scale, "dice": after["dice"], "iou": after["iou"], "loss": losses})
        log(f"grid x{scale:g}: Dice {after['dice']:.4f} ({time.perf_counter() - t0:.0f} s)")
    best = max(grid, key=lambda g: g["dice"])
    crf = scaled_crf(cfg, float(search.start_scale))
    crf["learn_theta"] = True
    train = OmegaConf.merge(cfg.train, {"steps": int(search.learn_steps)})
    trace: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    layer, losses = common.train_crf(unaries, image, reference, spacing, crf, train, trace)
    learnt_dice = common.overlap(common.predict(layer, unaries, image), reference, 2)
    start_crf = scaled_crf(cfg, float(search.start_scale))
    start_train = OmegaConf.merge(cfg.train, {"steps": 0})
    start_layer, _ = common.train_crf(unaries, image, reference, spacing, start_crf, start_train)
    start_dice = common.overlap(common.predict(start_layer, unaries, image), reference, 2)
    final = trace[-1]
    ratios = {
        "theta_alpha": final["theta_alpha"] / base["theta_alpha"],
        "theta_beta": geomean(final["theta_beta"]) / base["theta_beta"],
        "theta_gamma": final["theta_gamma"] / base["theta_gamma"],
    }
    log(
        f"learnt (start x{float(search.start_scale):g}, {int(search.learn_steps)} steps, "
        f"{time.perf_counter() - t0:.0f} s): Dice {learnt_dice['dice']:.4f}; widths / config: "
        + ", ".join(f"{k} x{v:.3f}" for k, v in ratios.items())
        + f"; grid best x{best['scale']:g} Dice {best['dice']:.4f}"
    )
    metrics.update(
        {
            "dim": dim,
            "shape": list(image.shape),
            "spacing": list(spacing),
            "distorted": before,
            "config_theta": base,
            "grid": grid,
            "grid_best": {"scale": best["scale"], "dice": best["dice"]},
            "learnt": {
                "start_scale": float(search.start_scale),
                "steps": int(search.learn_steps),
                "dice_at_start_untrained": start_dice["dice"],
                "dice": learnt_dice["dice"],
                "iou": learnt_dice["iou"],
                "theta_over_config": ratios,
                "theta_trace": trace,
                "loss": losses,
                "weights": common.layer_weights(layer),
            },
        }
    )
    return _finish(dim, cfg, metrics, results, log)


def _finish(
    dim: int, cfg: Any, metrics: dict[str, Any], results: str | None, log: Any
) -> dict[str, Any]:
    """Writes metrics.json, config.yaml and figure.png to a new run folder."""
    common = _load("sanity_common")
    metrics = {k: v for k, v in metrics.items() if k != "run_dir"}
    metrics["dim"] = dim
    out = common.run_dir(f"sanity_theta_{dim}d", results)
    common.write_json(out / "metrics.json", metrics)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    figure(out / "figure.png", metrics)
    log(f"wrote {out}")
    metrics["run_dir"] = str(out)
    return metrics


def time_steps(dim: int, cfg: Any, steps: int, log: Any = print) -> dict[str, float]:
    """Seconds per training step (forward, backward, Adam update; traced once, 2 warm-up steps,
    then the mean of `steps`) on the experiment's data, without and with learn_theta, each
    measured twice in alternation. Returns {"fixed": s, "learnt": s} (the smaller of each
    pair)."""
    import keras
    import tensorflow as tf

    from crf_rnn_3d.crf import CrfRnn

    if dim == 2:
        cfg = pixels_downsampled(cfg)
    unaries, image, reference, spacing = experiment_data(dim, cfg)
    u, im = tf.constant(unaries[None]), tf.constant(image[None])
    target = tf.constant(reference[None])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    best: dict[str, float] = {}
    for learn in (False, True, False, True):
        crf = OmegaConf.to_container(cfg.crf)
        layer = CrfRnn(spacing=list(spacing), learn_theta=learn, **crf)
        layer([u, im])
        optimizer = keras.optimizers.Adam(float(cfg.train.learning_rate))

        @tf.function
        def step(layer: Any = layer, optimizer: Any = optimizer) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = loss_fn(target, layer([u, im], training=True))
            grads = tape.gradient(loss, layer.trainable_variables)
            optimizer.apply_gradients(zip(grads, layer.trainable_variables, strict=True))
            return loss

        step(), step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - t0) / steps
        key = "learnt" if learn else "fixed"
        best[key] = min(best.get(key, math.inf), seconds)
        log(f"{dim}D {image.shape}: learn_theta={learn}: {seconds:.3f} s/step")
    return best


def figure(path: Path, metrics: dict[str, Any]) -> None:
    """Up to three panels, for the parts present: the joint grid's Dice against the common scale
    (with the learnt run's final Dice); the theta_alpha x theta_beta grid's Dice as a map with
    the learnt run's path over it; the learnt widths / the config's against the training step
    (log scale). Written via a temporary name."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim, learnt = metrics["dim"], metrics.get("learnt")
    base = metrics.get("config_theta")
    panels = [k for k in ("grid", "grid_alpha_beta") if k in metrics] + (
        ["trace"] if learnt else []
    )
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 4.4), layout="constrained", squeeze=False
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "grid":
            scales = [g["scale"] for g in metrics["grid"]]
            ax.plot(scales, [g["dice"] for g in metrics["grid"]], "o-", label="grid: theta fixed")
            ax.axhline(metrics["distorted"]["dice"], color="grey", ls=":", label="distorted input")
            if learnt:
                ax.axhline(learnt["dice"], color="C3", ls="--", label="learnt theta (final)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("all three widths / config's")
            ax.set_ylabel("Dice")
            ax.set_title(f"{dim}D: Dice, one common scale")
            ax.legend(fontsize=8)
        elif panel == "grid_alpha_beta":
            cells = metrics["grid_alpha_beta"]
            alphas = sorted({c["alpha_scale"] for c in cells})
            betas = sorted({c["beta_scale"] for c in cells})
            dice = np.full((len(betas), len(alphas)), np.nan)
            for c in cells:
                dice[betas.index(c["beta_scale"]), alphas.index(c["alpha_scale"])] = c["dice"]
            la, lb = np.log2(alphas), np.log2(betas)
            image = ax.imshow(
                dice,
                origin="lower",
                cmap="viridis",
                extent=(la[0] - 0.5, la[-1] + 0.5, lb[0] - 0.5, lb[-1] + 0.5),
                aspect="auto",
            )
            fig.colorbar(image, ax=ax, label="Dice (theta_gamma x1)")
            for c in cells:
                ax.text(
                    np.log2(c["alpha_scale"]),
                    np.log2(c["beta_scale"]),
                    f"{c['dice']:.3f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w",
                )
            if learnt and base:
                path_a = [
                    np.log2(t["theta_alpha"] / base["theta_alpha"]) for t in learnt["theta_trace"]
                ]
                path_b = [
                    np.log2(geomean(t["theta_beta"]) / base["theta_beta"])
                    for t in learnt["theta_trace"]
                ]
                ax.plot(path_a, path_b, "-", color="C3", lw=1.5, label="learnt theta, per step")
                ax.plot(path_a[0], path_b[0], "o", color="C3", label="start")
                ax.plot(path_a[-1], path_b[-1], "*", color="C3", ms=12, label="end")
                ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
            ax.set_xlabel("log2(theta_alpha / config's)")
            ax.set_ylabel("log2(theta_beta / config's)")
            ax.set_title(f"{dim}D: Dice, theta_alpha x theta_beta grid")
        else:
            steps = np.arange(len(learnt["theta_trace"]))
            for key, colour in (("theta_alpha", "C0"), ("theta_beta", "C1"), ("theta_gamma", "C2")):
                values = [geomean(t[key]) / base[key] for t in learnt["theta_trace"]]
                ax.plot(steps, values, color=colour, label=key)
            if "grid_best" in metrics:
                best = metrics["grid_best"]["scale"]
                ax.axhline(best, color="k", ls="--", label="common-scale grid's best")
            ax.set_yscale("log", base=2)
            ax.set_xlabel("training step")
            ax.set_ylabel("learnt width / config's width")
            ax.set_title(f"learn_theta, started x{learnt['start_scale']:g}")
            ax.legend(fontsize=8)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, choices=(2, 3))
    parser.add_argument(
        "--time-steps", type=int, metavar="N", help="only time N training steps, theta fixed/learnt"
    )
    parser.add_argument(
        "--replot", nargs=2, metavar=("METRICS", "PNG"), help="only redraw a run's figure"
    )
    parser.add_argument("--config", help="default configs/crf/sanity_{2d,3d}.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", help="folder for the run folder")
    parser.add_argument(
        "--previous", help="an earlier run's metrics.json: its parts are reused, not rerun"
    )
    args = parser.parse_args(argv)
    if args.replot:
        figure(Path(args.replot[1]), json.loads(Path(args.replot[0]).read_text()))
        return 0
    if args.dim is None:
        parser.error("--dim is required (2 or 3) unless --replot")
    config = args.config or str(ROOT / "configs" / "crf" / f"sanity_{args.dim}d.yaml")
    cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(args.set))
    if args.time_steps:
        time_steps(args.dim, cfg, args.time_steps)
        return 0
    if "theta_search" not in cfg:
        print(f"{config} has no theta_search section (scales, start_scale, learn_steps)")
        return 2
    previous = json.loads(Path(args.previous).read_text()) if args.previous else None
    run(args.dim, cfg, args.results, previous=previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
