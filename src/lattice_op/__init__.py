"""Permutohedral-lattice Gaussian filtering for any number of dimensions and channels.

Public API (benchmarks and the CRF call exactly this):
  Lattice(features)                   build once from features [B, *spatial, F]
  Lattice.filter(values, reverse)     filter values [B, *spatial, C] over it
  permutohedral_filter(values, features)  the one-shot form
"""

from src.lattice_op.lattice import Lattice, LatticeTensors, permutohedral_filter

__all__ = ["Lattice", "LatticeTensors", "permutohedral_filter"]
