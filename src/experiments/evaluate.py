"""Evaluate a trained (fold, variant) run on its held-out cases: ``python -m
crf_rnn_3d.experiments.evaluate [experiment=...] fold=0 variant=vnet``.

For each case of the fold's ``val`` list: predict with the model of the run's last checkpoint
(inference mode, the CRF head with ``num_iterations_inference``), take the arg-max, map class
indices to label values (``data.labels``) and compute the Dice of every region of
``data.regions`` (PROMISE12: prostate = {1}; BraTS: whole = {1, 2, 3, 4}, core = {1, 3, 4},
enhancing = {4}). The run folder gets ``predictions/<case>.npz`` (labels [Z, Y, X] uint8 on the
preprocessed grid) and ``evaluation.json``; with ``evaluate.export`` also
``export/<case><export_format>`` in the source case's geometry
(:func:`crf_rnn_3d.datasets.cache.export_prediction`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.cache import export_prediction
from crf_rnn_3d.datasets.io import atomic_output, atomic_write_json
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.cli import hydra_app, run_stage
from crf_rnn_3d.experiments.metrics import dice as dice_score  # the one Dice of the package
from crf_rnn_3d.experiments.model_io import restore_model


@dataclass
class Evaluation:
    """Per-case Dice of one run: ``dice[case][region]``, in [0, 1]."""

    run_dir: Path
    fold: int
    variant: str
    dice: dict[str, dict[str, float]]

    def mean_dice(self) -> dict[str, float]:
        """Mean over cases of each region's Dice."""
        regions = next(iter(self.dice.values())).keys() if self.dice else []
        return {r: float(np.mean([d[r] for d in self.dice.values()])) for r in regions}


def region_dice(
    pred_labels: np.ndarray, true_labels: np.ndarray, regions: Mapping, empty: float = 1.0
) -> dict[str, float]:
    """Dice of each region (name -> label values counted as foreground) of two label maps."""
    return {
        str(name): dice_score(
            np.isin(pred_labels, list(values)), np.isin(true_labels, list(values)), empty
        )
        for name, values in regions.items()
    }


def evaluate(
    cfg: DictConfig | Mapping, fold: int | None = None, variant: str | None = None
) -> Evaluation:
    """Evaluates the (fold, variant) run (defaults ``cfg.fold``, ``cfg.variant``); returns an
    :class:`Evaluation` and writes predictions and ``evaluation.json`` into the run folder."""
    fold = common.integer("fold", cfg["fold"] if fold is None else fold, minimum=0)
    variant = str(cfg["variant"] if variant is None else variant)
    out = common.run_dir(cfg, fold, variant)
    model = restore_model(cfg, fold, variant)
    labels = np.asarray(common.label_values(cfg), np.uint8)
    regions = common.plain(cfg["data"]["regions"])
    ecfg = cfg["evaluate"]
    empty = float(ecfg["empty_dice"])
    processed = common.processed_dir(cfg)
    manifest = cache.load_manifest(processed) or {"cases": {}}
    dice = {}
    for case in common.fold_cases(cfg, fold)["val"]:
        image, label, geometry = cache.read_case(processed / manifest["cases"][case]["file"])
        logits = model(image[None].astype(np.float32), training=False)
        pred = labels[np.argmax(np.asarray(logits)[0], axis=-1)]
        dice[case] = region_dice(pred, label, regions, empty)
        with atomic_output(out / "predictions" / f"{case}.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, label=pred)
        if bool(ecfg["export"]):
            export_prediction(pred, geometry, out / "export" / f"{case}{ecfg['export_format']}")
    atomic_write_json(out / "evaluation.json", {"fold": fold, "variant": variant, "dice": dice})
    return Evaluation(out, fold, variant, dice)


@hydra_app("config")
def main(cfg: DictConfig) -> None:
    result = run_stage(evaluate, cfg)
    for case, d in result.dice.items():
        print(case, " ".join(f"{r}={v:.3f}" for r, v in d.items()))
    print("mean", result.mean_dice())


if __name__ == "__main__":
    main()
