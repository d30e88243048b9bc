"""Float64 NumPy brute-force mean field of the fully connected CRF: the tests' reference.

Written from the equations (Krahenbuhl & Koltun 2011, Zheng et al. 2015), sharing no code with
src/crf: dense N x N kernels built from explicit pairwise distances in millimetres.
"""

from __future__ import annotations

import numpy as np


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def dense_kernels(
    image: np.ndarray,
    spacing: tuple[float, ...],
    theta_alpha: float,
    theta_beta: tuple[float, ...],
    theta_gamma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Appearance and smoothness kernels [N, N] of one image [*spatial, M]."""
    spatial = image.shape[:-1]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), -1)
    pos = grid.reshape(-1, len(spatial)).astype(np.float64) * np.asarray(spacing)
    inten = image.reshape(-1, image.shape[-1]).astype(np.float64)
    dpos = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    dint = (((inten[:, None, :] - inten[None, :, :]) / np.asarray(theta_beta)) ** 2).sum(-1)
    appearance = np.exp(-dpos / (2 * theta_alpha**2) - dint / 2)
    smoothness = np.exp(-dpos / (2 * theta_gamma**2))
    return appearance, smoothness


def mean_field_reference(
    unaries: np.ndarray,
    image: np.ndarray,
    spacing: tuple[float, ...],
    theta_alpha: float,
    theta_beta: tuple[float, ...],
    theta_gamma: float,
    w1: np.ndarray,
    w2: np.ndarray,
    mu: np.ndarray,
    iterations: int,
    normalisation: str = "mean",
) -> np.ndarray:
    """Refined logits [B, *spatial, K] for unaries [B, *spatial, K] and image [B, *spatial, M]."""
    out = np.empty(unaries.shape, dtype=np.float64)
    num_k = unaries.shape[-1]
    for b in range(unaries.shape[0]):
        u = unaries[b].reshape(-1, num_k).astype(np.float64)
        kernels = dense_kernels(image[b], spacing, theta_alpha, theta_beta, theta_gamma)
        filters = []
        for kern in kernels:
            row = kern.sum(axis=1)
            if normalisation == "mean":
                filters.append(kern / row[:, None])
            else:
                n = 1.0 / np.sqrt(row)
                filters.append(n[:, None] * kern * n[None, :])
        logits = u
        for _ in range(iterations):
            q = _softmax(logits)
            message = np.zeros_like(q)
            for i in range(num_k):
                message[:, i] = w1[i] * (filters[0] @ q[:, i]) + w2[i] * (filters[1] @ q[:, i])
            pairwise = np.zeros_like(q)
            for i in range(num_k):
                for j in range(num_k):
                    pairwise[:, i] += mu[i, j] * message[:, j]
            logits = u - pairwise
        out[b] = logits.reshape(unaries.shape[1:])
    return out


def pydensecrf_reference(
    probabilities: np.ndarray,
    image: np.ndarray,
    theta_alpha: float,
    theta_beta: tuple[float, ...],
    theta_gamma: float,
    w_bilateral: float,
    w_spatial: float,
    iterations: int,
    clip: float = 1e-5,
) -> np.ndarray:
    """pydensecrf's inference written out literally, in float64 with exact kernels: unary
    U = -log(max(p, clip)); Q = softmax(-U); each step Q = softmax(-U - sum_m P_m Q), where each
    Potts pairwise term applies -w_m * n K_m (n Q) (compat=w, NORMALIZE_SYMMETRIC with
    n = 1 / sqrt(K_m 1)); positions in voxels. probabilities [*spatial, K], image [*spatial, M];
    returns Q [*spatial, K]."""
    num_k = probabilities.shape[-1]
    unary = -np.log(np.clip(probabilities.reshape(-1, num_k).astype(np.float64), clip, 1.0))
    spacing = (1.0,) * (image.ndim - 1)
    kernels = dense_kernels(image, spacing, theta_alpha, theta_beta, theta_gamma)
    q = _softmax(-unary)
    for _ in range(iterations):
        energy = -unary
        for kern, w in zip(kernels, (w_bilateral, w_spatial), strict=True):
            n = 1.0 / np.sqrt(kern.sum(axis=1))
            pairwise = -w * (n[:, None] * (kern @ (n[:, None] * q)))
            energy = energy - pairwise
        q = _softmax(energy)
    return q.reshape(probabilities.shape)
