"""Composes the real Hydra configs (configs/) with small overrides into temporary folders."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/config.yaml with the overrides (as on the command line)."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=overrides)


def smoke_config(root: Path, *extra: str) -> DictConfig:
    """experiment=smoke with every path under ``root``."""
    return compose_config(
        [
            "experiment=smoke",
            f"output_root={root}",
            f"data.root={root}/raw",
            f"data.processed={root}/processed",
            f"runs_dir={root}/runs",
            f"reports_dir={root}/results",
            "progress=false",
            *extra,
        ]
    )
