"""The report's figures (matplotlib, Agg): ``box_<metric>.png`` (one per metric: a panel per
grid and region, a box per variant with each case's paired values joined by a line) and
``example_<case>.png`` overlays (the slice with most foreground: image, label and each
variant's prediction outline)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.experiments import common

AXIS_LABELS = {"dice": "Dice", "hd95": "HD95 (mm)", "assd": "ASSD (mm)", "nsd": "NSD"}


def plot_metric(
    rows: list[dict], variants: list[str], labels: dict, metric: str, path: Path
) -> None:
    """``path`` (PNG, 100 dpi): for each grid (a row of panels) and region (a column) a box plot
    of each variant's ``metric`` over the cases that have it for every variant, each case's
    values joined across variants. ``rows``: {case, variant, grid, region, <metric>}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = list(dict.fromkeys(r["grid"] for r in rows))
    regions = list(dict.fromkeys(r["region"] for r in rows))
    width = 2.2 + 1.6 * len(variants) * len(regions)
    fig, axes = plt.subplots(len(grids), len(regions), figsize=(width, 3.6 * len(grids)),
                             squeeze=False)  # fmt: skip
    for i, grid in enumerate(grids):
        for j, region in enumerate(regions):
            ax = axes[i, j]
            values = {v: {} for v in variants}
            for r in rows:
                if r["grid"] == grid and r["region"] == region and r["variant"] in values:
                    values[r["variant"]][r["case"]] = float(r[metric])
            complete = [all(math.isfinite(values[v].get(c, math.nan)) for v in variants)
                        for c in values[variants[0]]]  # fmt: skip
            cases = sorted(c for c, ok in zip(values[variants[0]], complete, strict=True) if ok)
            ax.set_title(f"{region}, {grid} grid")
            ax.set_ylabel(AXIS_LABELS.get(metric, metric))
            if cases:
                data = np.array([[values[v][c] for c in cases] for v in variants])
                ax.boxplot(list(data), showfliers=False)
                for k in range(data.shape[1]):
                    ax.plot(range(1, len(variants) + 1), data[:, k], "-o", color="0.4",
                            alpha=0.5, ms=3)  # fmt: skip
            else:
                ax.text(0.5, 0.5, "no case", ha="center", va="center", transform=ax.transAxes)
            # long labels ("V-Net + CRF (theta per case)") wrapped, so that four fit side by side
            names = [textwrap.fill(labels[v], 16) for v in variants]
            ax.set_xticks(range(1, len(variants) + 1), names)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_examples(cfg: Mapping, rows: list[dict], folder: Path) -> list[str]:
    """Overlay PNGs of the lowest, median and highest baseline-Dice cases (``report.example_cases``
    of them; Dice of the first region on the resampled grid, where the cached case lies) written
    into ``folder``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = common.variant_names(cfg)
    labels = {v: str(cfg["variants"][v].get("label", v)) for v in variants}
    rows = [r for r in rows if r["grid"] == "resampled"]
    region = rows[0]["region"]
    base = sorted(
        (r["dice"], r["case"], r["fold"]) for r in rows
        if r["variant"] == variants[0] and r["region"] == region
    )  # fmt: skip
    count = min(int(cfg["report"]["example_cases"]), len(base))
    picks = [base[round(i * (len(base) - 1) / max(1, count - 1))] for i in range(count)]
    processed = common.processed_dir(cfg)
    manifest = cache.load_manifest(processed) or {"cases": {}}
    names = []
    colours = ["tab:red", "tab:blue", "tab:orange", "tab:purple"]
    for _, case, fold in dict.fromkeys(picks):
        image, label, _ = cache.read_case(processed / manifest["cases"][case]["file"])
        z = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(1)))
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(image[z, :, :, 0], cmap="gray")
        ax.contour(label[z] > 0, levels=[0.5], colors="lime", linewidths=1.5)
        handles = [plt.Line2D([], [], color="lime", label="label")]
        for v, colour in zip(variants, colours, strict=False):
            with np.load(common.run_dir(cfg, fold, v) / "predictions" / f"{case}.npz") as f:
                pred = f["label"]
            if np.any(pred[z] > 0):
                ax.contour(pred[z] > 0, levels=[0.5], colors=colour, linewidths=1.0)
            d = next(r["dice"] for r in rows if r["case"] == case and r["variant"] == v
                     and r["region"] == region)  # fmt: skip
            handles.append(plt.Line2D([], [], color=colour, label=f"{labels[v]} ({d:.3f})"))
        ax.legend(handles=handles, loc="lower right", fontsize=8)
        ax.set_title(f"{case} (fold {fold}), slice z={z}")
        ax.axis("off")
        name = f"example_{case}.png"
        fig.savefig(folder / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    return names
