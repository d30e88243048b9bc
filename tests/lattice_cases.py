"""Deterministic inputs for the lattice tests: grids with smooth or random values."""

from __future__ import annotations

import numpy as np


def grid_features(
    spatial: tuple[int, ...], num_features: int, rng: np.random.Generator, spacing: float = 0.6
) -> np.ndarray:
    """Features [*spatial, F]: voxel positions * spacing (as many axes as fit in F), then
    intensity-like channels (a smooth pattern plus noise) for the rest."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), -1)
    grid = grid.astype(np.float64) * spacing
    pos = grid[..., : min(len(spatial), num_features)]
    extra = num_features - pos.shape[-1]
    if extra == 0:
        return pos.astype(np.float32)
    smooth = 1.5 * np.sin(0.7 * grid.sum(-1, keepdims=True) + np.arange(extra))
    noisy = smooth + 0.3 * rng.normal(size=(*spatial, extra))
    return np.concatenate([pos, noisy], -1).astype(np.float32)


def grid_values(
    spatial: tuple[int, ...], channels: int, kind: str, rng: np.random.Generator
) -> np.ndarray:
    """Values [*spatial, C] in [-1, 1]: a smooth cosine pattern or uniform noise."""
    if kind == "smooth":
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), -1)
        vals = np.cos(0.3 * grid.sum(-1, keepdims=True) + 0.5 * np.arange(channels))
    else:
        vals = rng.uniform(-1.0, 1.0, size=(*spatial, channels))
    return vals.astype(np.float32)
