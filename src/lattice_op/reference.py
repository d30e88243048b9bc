"""Float64 brute-force Gaussian filter: the independent reference for tests and benchmarks."""

from __future__ import annotations

import numpy as np


def exact_gaussian_filter(
    values: np.ndarray,
    features: np.ndarray,
    rows: np.ndarray | None = None,
    chunk: int = 512,
) -> np.ndarray:
    """Exact sum_j exp(-|f_i - f_j|^2 / 2) v_j in float64, O(N^2) work.

    Args:
      values: [N, C] values.
      features: [N, F] features (already divided by the kernel widths).
      rows: optional indices i at which to evaluate (default: all N).
      chunk: rows evaluated at a time (bounds memory at chunk * N).

    Returns:
      float64 [len(rows), C], the self term included.
    """
    v = np.asarray(values, dtype=np.float64)
    f = np.asarray(features, dtype=np.float64)
    idx = np.arange(f.shape[0]) if rows is None else np.asarray(rows)
    sq = np.einsum("ij,ij->i", f, f)
    out = np.empty((idx.shape[0], v.shape[1]), dtype=np.float64)
    for start in range(0, idx.shape[0], chunk):
        sel = idx[start : start + chunk]
        d2 = sq[sel, None] + sq[None, :] - 2.0 * f[sel] @ f.T
        out[start : start + chunk] = np.exp(-0.5 * np.maximum(d2, 0.0)) @ v
    return out


def exact_normalised_filter(
    values: np.ndarray, features: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """Exact Gaussian-weighted average: filter(values) / filter(ones), float64 [len(rows), C]."""
    v = np.asarray(values, dtype=np.float64)
    stacked = np.concatenate([v, np.ones((v.shape[0], 1))], axis=1)
    out = exact_gaussian_filter(stacked, features, rows)
    return out[:, :-1] / out[:, -1:]
