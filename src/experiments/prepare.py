"""Prepare a data set: ``python -m crf_rnn_3d.experiments.prepare data=<promise12|brats2015|...>``.

Reads the raw download (or writes the synthetic phantoms), preprocesses every case into
``data.processed`` and writes the manifest and the splits; see :mod:`crf_rnn_3d.datasets.build`.
Any Hydra override works, e.g. ``data.root=/mnt/PROMISE12 data.on_error=skip``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from crf_rnn_3d.datasets.build import BuildReport, build_cache
from crf_rnn_3d.datasets.io import atomic_write_json
from crf_rnn_3d.experiments.cli import hydra_app, run_stage


def prepare(cfg: DictConfig) -> BuildReport:
    """Builds the cache described by ``cfg.data``; writes the resolved data config beside it
    (``prepare_config.json``) and returns the report."""
    report = build_cache(cfg.data, progress=bool(cfg.get("progress", True)))
    atomic_write_json(
        report.processed_dir / "prepare_config.json", OmegaConf.to_container(cfg, resolve=True)
    )
    return report


def summary(report: BuildReport) -> str:
    """A few lines for the terminal."""
    lines = [
        f"{report.processed_dir}: {len(report.cases)} cases "
        f"({len(report.written)} written, {len(report.up_to_date)} up to date) "
        f"in {report.seconds:.1f} s",
    ]
    if report.removed:
        lines.append(f"removed (sources gone): {', '.join(report.removed)}")
    for case_id, reason in report.skipped.items():
        lines.append(f"skipped {case_id}: {reason}")
    return "\n".join(lines)


@hydra_app("config")
def main(cfg: DictConfig) -> None:
    run_stage(prepare, cfg, show=lambda report: print(summary(report)))


if __name__ == "__main__":
    main()
