"""Permutohedral-lattice Gaussian filtering for any number of dimensions and channels.

Public API (every caller, benchmarks included, uses exactly this):
  Lattice(features)                   build once from features [B, *spatial, F]
  Lattice.filter(values, reverse)     filter values [B, *spatial, C] over it
  permutohedral_filter(values, features)  the one-shot form
  separable_filter(values, taps)      separable (e.g. Gaussian) filter of a grid, zero outside
  gaussian_taps(sigma, truncate, n)   the taps of one axis of a truncated Gaussian
  BACKENDS, resolve_backend           the backend switch ("auto", "compiled", "tf") that every
                                      filtering entry point takes as backend=
  check_lattice_copies                the accuracy setting's check (Lattice(lattice_copies=))
"""

from crf_rnn_3d.lattice_op._common import check_lattice_copies
from crf_rnn_3d.lattice_op.backend import BACKENDS, resolve_backend
from crf_rnn_3d.lattice_op.lattice import Lattice, LatticeTensors, permutohedral_filter
from crf_rnn_3d.lattice_op.separable import gaussian_taps, separable_filter

__all__ = [
    "BACKENDS",
    "Lattice",
    "LatticeTensors",
    "check_lattice_copies",
    "gaussian_taps",
    "permutohedral_filter",
    "resolve_backend",
    "separable_filter",
]
