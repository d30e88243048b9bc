"""The one pydensecrf2 driver of the benchmarks: Krähenbühl's DenseCRF with Potts kernels on
given features, timed step by step.

pydensecrf2 (import name ``pydensecrf``) is optional and only needed here; it is imported when
a function runs, with an error saying how to install it when it is missing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

INSTALL_HINT = "pip install -r requirements-bench.txt (make bench-lattice / bench-crf do this)"


def _densecrf() -> Any:
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:
        raise ImportError(f"pydensecrf2 is not installed: {INSTALL_HINT}") from err
    return dcrf


def unary_from_probabilities(probs: np.ndarray, clip: float = 1e-8) -> np.ndarray:
    """-log max(p, clip) as pydensecrf wants it: probs [*spatial, L] -> float32 [L, N]."""
    labels = probs.shape[-1]
    flat = probs.reshape(-1, labels).T
    return np.ascontiguousarray(-np.log(np.maximum(flat, clip)), dtype=np.float32)


def features_of(volume_features: np.ndarray) -> np.ndarray:
    """Kernel features [*spatial, F] (already divided by the kernel widths) -> float32 [F, N]."""
    f = volume_features.shape[-1]
    return np.ascontiguousarray(volume_features.reshape(-1, f).T, dtype=np.float32)


def run_densecrf(
    unary: np.ndarray,
    kernels: Sequence[tuple[str, np.ndarray, float]],
    iterations: int,
) -> tuple[np.ndarray, dict[str, float]]:
    """Mean-field inference of pydensecrf2's DenseCRF.

    Args:
      unary: float32 [L, N] unary energies (e.g. :func:`unary_from_probabilities`).
      kernels: (name, features float32 [F, N] divided by the widths, Potts weight) per pairwise
        kernel; diagonal kernel, symmetric normalisation (pydensecrf's defaults).
      iterations: mean-field iterations.

    Returns:
      q [L, N] float32 (the marginals) and the seconds: ``setup_<name>_s`` per kernel,
      ``setup_s`` (construction, unary and all kernels), ``inference_s``, ``total_s``.
    """
    dcrf = _densecrf()
    labels, n = unary.shape
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    crf = dcrf.DenseCRF(int(n), int(labels))
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    for name, features, weight in kernels:
        start = time.perf_counter()
        crf.addPairwiseEnergy(
            np.ascontiguousarray(features, dtype=np.float32),
            compat=float(weight),
            kernel=dcrf.DIAG_KERNEL,
            normalization=dcrf.NORMALIZE_SYMMETRIC,
        )
        times[f"setup_{name}_s"] = time.perf_counter() - start
    t_setup = time.perf_counter()
    q = np.asarray(crf.inference(int(iterations)), dtype=np.float32)
    t_end = time.perf_counter()
    times.update(setup_s=t_setup - t0, inference_s=t_end - t_setup, total_s=t_end - t0)
    return q, times


def dense_crf_pydensecrf(
    probs: np.ndarray,
    image: np.ndarray,
    spacing: Sequence[float],
    settings: dict[str, Any],
) -> tuple[np.ndarray, dict[str, float]]:
    """pydensecrf2 with its usual recipe on a volume, kernel widths in mm: unary_from_softmax
    (-log max(p, 1e-5)), a spatial kernel of theta_gamma / spacing voxels per axis (weight
    w_spatial) and a bilateral one of theta_alpha / spacing voxels and theta_beta image units
    (weight w_bilateral), ``iterations`` mean-field steps.

    Args:
      probs: [*spatial, L] probabilities; image: [*spatial, M] float32; spacing: mm per axis.
      settings: theta_alpha, theta_beta, theta_gamma, w_bilateral, w_spatial, iterations.

    Returns:
      q [*spatial, L] float32 and the seconds of :func:`run_densecrf`.
    """
    _densecrf()
    from pydensecrf.utils import (
        create_pairwise_bilateral,
        create_pairwise_gaussian,
        unary_from_softmax,
    )

    shape, classes = probs.shape[:-1], probs.shape[-1]
    unary = unary_from_softmax(np.moveaxis(probs, -1, 0))
    # pydensecrf works in voxels: per-axis widths theta / spacing give kernels in mm
    gamma = [settings["theta_gamma"] / s for s in spacing]
    alpha = [settings["theta_alpha"] / s for s in spacing]
    kernels = [
        ("spatial", create_pairwise_gaussian(gamma, shape), settings["w_spatial"]),
        (
            "bilateral",
            create_pairwise_bilateral(alpha, settings["theta_beta"], image, chdim=image.ndim - 1),
            settings["w_bilateral"],
        ),
    ]
    q, times = run_densecrf(unary, kernels, settings["iterations"])
    return np.moveaxis(q.reshape((classes, *shape)), 0, -1), times
