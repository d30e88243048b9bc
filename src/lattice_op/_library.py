"""Loads the compiled lattice ops (build/libcrf3d_lattice.so, made by `make build`)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from types import ModuleType

import tensorflow as tf

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIBRARY = REPO_ROOT / "build" / "libcrf3d_lattice.so"


def library_path() -> Path:
    """Path of the compiled op library: $CRF3D_LATTICE_LIB, else build/libcrf3d_lattice.so."""
    return Path(os.environ.get("CRF3D_LATTICE_LIB", DEFAULT_LIBRARY))


@cache
def load() -> ModuleType:
    """Loads the op library once and returns its generated Python module."""
    path = library_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the lattice op library {path} does not exist: run `make build` in {REPO_ROOT} "
            "(or set CRF3D_LATTICE_LIB to a compiled copy)"
        )
    return tf.load_op_library(str(path))
