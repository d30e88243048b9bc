"""The CRF's compiled op: all mean-field iterations of a fixed-weight CRF in one kernel
(``Crf3dMeanField``, C++ in src/crf/csrc/mean_field.cc over the lattice core), for inference.

Loaded from the op library ``crf_rnn_3d.crf._crf_ops`` that `pip install` (setup.py) builds into
this package; it links the lattice core itself and takes the lattice as the six tensors of
:class:`crf_rnn_3d.lattice_op.LatticeTensors`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import ModuleType

import tensorflow as tf

from crf_rnn_3d.lattice_op import LatticeTensors
from crf_rnn_3d.lattice_op.loader import load_op_library, op_library_path

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "_crf_ops"
ENV_VAR = "CRF3D_CRF_LIB"
NORMALISATIONS = ("mean", "symmetric")


def library_path() -> Path:
    """Path of the compiled CRF op library: $CRF3D_CRF_LIB, else the one inside this package."""
    return op_library_path(HERE, LIBRARY_NAME, ENV_VAR)


@cache
def load() -> ModuleType:
    """Loads the CRF op library once and returns its generated Python module."""
    return load_op_library(library_path(), "CRF op", ENV_VAR)


def fused_mean_field(
    unaries: tf.Tensor,
    lattice_tensors: LatticeTensors | Sequence[tf.Tensor],
    bilateral_weight: tf.Tensor,
    spatial_weight: tf.Tensor,
    compatibility: tf.Tensor,
    spatial_taps: Sequence[Sequence[float]],
    num_iterations: int,
    normalisation: str = "mean",
    output_logits: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Every mean-field iteration of a fixed-weight CRF in one compiled kernel (no gradient).

    Args:
      unaries: float32 [B, *spatial, K] unary logits.
      lattice_tensors: the bilateral lattice of the same voxels (``Lattice(features).tensors``).
      bilateral_weight, spatial_weight: float32 [K] (w1, w2); compatibility: float32 [K, K] mu.
      spatial_taps: one sequence of 2 r_a + 1 numbers per spatial axis, the separable spatial
        kernel (entry o + r_a weighs the voxel o further along axis a), normalised by its own
        filter of ones inside the kernel.
      num_iterations: >= 1; normalisation: "mean" or "symmetric".
      output_logits: also return the refined logits (else an empty vector in their place).

    Returns:
      (logits, probabilities): float32 [B, *spatial, K] after the last iteration (logits is a
      [0] vector with ``output_logits=False``).

    Raises:
      ValueError: a bad normalisation, or taps of even length or not finite.
      tf.errors.InvalidArgumentError: shapes that do not fit, NaN or Inf in unaries or weights.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    flat, radii = [], []
    for axis, axis_taps in enumerate(spatial_taps):
        values = [float(t) for t in axis_taps]
        if len(values) % 2 != 1 or not all(math.isfinite(t) for t in values):
            raise ValueError(
                f"fused_mean_field: spatial axis {axis} needs an odd number (2 r + 1) of finite "
                f"taps, got {values}"
            )
        flat += values
        radii.append(len(values) // 2)
    return load().crf3d_mean_field(
        unaries,
        *lattice_tensors,
        tf.cast(bilateral_weight, tf.float32),
        tf.cast(spatial_weight, tf.float32),
        tf.cast(compatibility, tf.float32),
        tf.constant(flat, tf.float32, shape=[len(flat)]),
        tf.constant(radii, tf.int32, shape=[len(radii)]),
        num_iterations=int(num_iterations),
        normalisation=normalisation,
        output_logits=bool(output_logits),
    )


@tf.RegisterGradient("Crf3dMeanField")
def _mean_field_gradient(op: tf.Operation, *grads: tf.Tensor) -> list[tf.Tensor | None]:
    raise LookupError(
        "mean_field_inference (the Crf3dMeanField op) is inference-only and has no gradient; "
        "train with mean_field or the CrfRnn layer"
    )
