"""The report's figures (matplotlib, Agg): ``dice.png`` (box plot per region with each case's
paired dots joined by a line) and ``example_<case>.png`` overlays (the slice with most
foreground: image, label and each variant's prediction outline)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.experiments import common


def plot_dice(rows: list[dict], variants: list[str], labels: dict, path: Path) -> None:
    """``path`` (PNG, 100 dpi): per region a box plot of each variant's Dice over the cases of
    ``rows`` ({case, variant, region, dice}), each case's values joined across variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = list(dict.fromkeys(r["region"] for r in rows))
    fig, axes = plt.subplots(1, len(regions), figsize=(2.2 + 1.6 * len(variants) * len(regions), 4))
    axes = np.atleast_1d(axes)
    for ax, region in zip(axes, regions, strict=True):
        cases = sorted({r["case"] for r in rows if r["region"] == region})
        data = []
        for v in variants:
            by_case = {
                r["case"]: r["dice"] for r in rows if r["region"] == region and r["variant"] == v
            }
            data.append([by_case[c] for c in cases])
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(variants) + 1), [labels[v] for v in variants])
        arr = np.array(data)
        for j in range(arr.shape[1]):
            ax.plot(range(1, len(variants) + 1), arr[:, j], "-o", color="0.4", alpha=0.5, ms=3)
        ax.set_title(region)
        ax.set_ylabel("Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_examples(cfg: Mapping, rows: list[dict], folder: Path) -> list[str]:
    """Overlay PNGs of the lowest, median and highest baseline-Dice cases (``report.example_cases``
    of them) written into ``folder``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = common.variant_names(cfg)
    labels = {v: str(cfg["variants"][v].get("label", v)) for v in variants}
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
