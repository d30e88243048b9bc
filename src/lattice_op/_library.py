"""Loads the compiled lattice ops, which `pip install` (setup.py) builds into this package."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from types import ModuleType

from crf_rnn_3d.lattice_op.loader import load_op_library, op_library_path

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "_lattice_ops"
ENV_VAR = "CRF3D_LATTICE_LIB"


def library_path() -> Path:
    """Path of the compiled op library: $CRF3D_LATTICE_LIB, else the one inside this package."""
    return op_library_path(HERE, LIBRARY_NAME, ENV_VAR)


@cache
def load() -> ModuleType:
    """Loads the op library once and returns its generated Python module."""
    return load_op_library(library_path(), "lattice op", ENV_VAR)
