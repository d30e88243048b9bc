"""Loads the compiled lattice ops, which `pip install` (setup.py) builds into this package."""

from __future__ import annotations

import importlib.machinery
import os
from functools import cache
from pathlib import Path
from types import ModuleType

import tensorflow as tf

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "_lattice_ops"


def library_path() -> Path:
    """Path of the compiled op library: $CRF3D_LATTICE_LIB, else the one inside this package."""
    override = os.environ.get("CRF3D_LATTICE_LIB")
    if override:
        return Path(override)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = HERE / f"{LIBRARY_NAME}{suffix}"
        if candidate.is_file():
            return candidate
    return HERE / f"{LIBRARY_NAME}{importlib.machinery.EXTENSION_SUFFIXES[0]}"


@cache
def load() -> ModuleType:
    """Loads the op library once and returns its generated Python module."""
    path = library_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the compiled lattice op library {path} does not exist: install the package with "
            "`pip install .` (or `make build` in a clone), or set CRF3D_LATTICE_LIB to a "
            "compiled copy"
        )
    try:
        return tf.load_op_library(str(path))
    except tf.errors.NotFoundError as exc:
        raise ImportError(
            f"the lattice op library {path} does not load into TensorFlow {tf.__version__}: it "
            "is built for TensorFlow 2.21; reinstall crf-rnn-3d against the TensorFlow you use "
            f"({exc.message.splitlines()[0]})"
        ) from exc
