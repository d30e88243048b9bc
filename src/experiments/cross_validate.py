"""The paper's protocols: ``python -m crf_rnn_3d.experiments.cross_validate experiment=promise_cv``
(5-fold cross-validation) or ``experiment=brats_holdout`` (one 85/15 holdout split): the same
loop, over the folds of the data set's ``splits.json``.

:func:`cross_validate` prepares the data (``crf_rnn_3d.experiments.prepare``: a missing data set
stops at once and says where to download it), then for every fold (``folds``: null = all) and every
variant trains the run (resuming or skipping finished ones), evaluates it on the fold's
held-out cases, and finally writes the report (:mod:`crf_rnn_3d.experiments.report`). Every case is
predicted once by the model of the fold that did not see it. Folds and variants are independent
runs: ``python -m crf_rnn_3d.experiments.train -m fold=0,1,2,3,4 variant=vnet,vnet_crf
hydra/launcher=joblib`` trains them in parallel (or on Slurm with ``hydra/launcher=slurm``),
and ``python -m crf_rnn_3d.experiments.report`` then collects them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import keras
from omegaconf import DictConfig, ListConfig

from crf_rnn_3d.datasets.errors import ConfigError
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.cli import hydra_app, run_stage
from crf_rnn_3d.experiments.evaluate import Evaluation, evaluate
from crf_rnn_3d.experiments.prepare import prepare
from crf_rnn_3d.experiments.report import ReportResult, report
from crf_rnn_3d.experiments.report_markdown import paper_table_section
from crf_rnn_3d.experiments.train import train


@dataclass
class ProtocolResult:
    """The evaluations of every (fold, variant) run and the report."""

    evaluations: list[Evaluation] = field(default_factory=list)
    report: ReportResult | None = None


def _finished_evaluation(cfg: Mapping, fold: int, variant: str) -> Evaluation | None:
    out = common.run_dir(cfg, fold, variant)
    path = out / "evaluation.json"
    state = out / "state.json"
    if not (path.is_file() and state.is_file()):
        return None
    if (
        not json.loads(state.read_text()).get("complete")
        or path.stat().st_mtime < state.stat().st_mtime
    ):
        return None
    return Evaluation(out, fold, variant, json.loads(path.read_text())["dice"])


def cross_validate(cfg: DictConfig | Mapping, prepare_data: bool = True) -> ProtocolResult:
    """Runs the protocol of the config (see the module docstring) and returns its result."""
    if prepare_data:
        prepare(cfg)
    n_folds = len(common.load_splits(cfg))
    folds = cfg.get("folds")
    if folds is not None and (
        isinstance(folds, str) or not isinstance(folds, Sequence | ListConfig)
    ):
        expected = "null (all folds) or a list of fold numbers, e.g. folds=[0,2]"
        raise ConfigError("folds", expected, folds)
    folds = (
        list(range(n_folds))
        if folds is None
        else [common.integer("folds", f, minimum=0) for f in folds]
    )
    for f in folds:
        if not 0 <= f < n_folds:
            raise ConfigError("folds", f"fold numbers in 0..{n_folds - 1}", folds)
    result = ProtocolResult()
    for fold in folds:
        for variant in common.variant_names(cfg):
            done = _finished_evaluation(cfg, fold, variant)
            if done is None:
                keras.backend.clear_session()
                trained = train(cfg, fold, variant)
                if not trained.complete:  # stop_after: the rest in a later invocation
                    return result
                done = evaluate(cfg, fold, variant)
            result.evaluations.append(done)
    if folds == list(range(n_folds)):
        result.report = report(cfg)
    return result


@hydra_app("config")
def main(cfg: DictConfig) -> None:
    result = run_stage(cross_validate, cfg)
    for e in result.evaluations:
        print(f"fold {e.fold} {e.variant}: mean Dice {e.mean_dice()}")
    if result.report is not None:
        print((result.report.folder / "report.md").read_text())
        print(f"report: {result.report.folder}")
        section = paper_table_section(cfg, result.report.summary)
        if section:  # report.paper_table: the paper's layout again, last on the terminal
            print("\n" + "\n".join(section))


if __name__ == "__main__":
    main()
