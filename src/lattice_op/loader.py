"""Finding and loading a compiled TensorFlow op library that the build (setup.py) put inside a
package folder: one place for every compiled library of the project (the lattice ops here, and
those of packages built on them)."""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path
from types import ModuleType

import tensorflow as tf


def op_library_path(folder: Path, name: str, env_var: str) -> Path:
    """``$env_var`` if set, else ``folder/<name><extension suffix>`` (the first that exists,
    or the usual one when none does)."""
    override = os.environ.get(env_var)
    if override:
        return Path(override)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return folder / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[0]}"


def load_op_library(path: Path, what: str, env_var: str) -> ModuleType:
    """Loads the op library at ``path`` (``what`` names it in errors).

    Raises:
      FileNotFoundError: it does not exist (says how to build it, or ``env_var``).
      ImportError: it does not load into this TensorFlow (built for another version).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"the compiled {what} library {path} does not exist: install the package with "
            f"`pip install .` (or `make build` in a clone), or set {env_var} to a compiled copy"
        )
    try:
        return tf.load_op_library(str(path))
    except tf.errors.NotFoundError as exc:
        raise ImportError(
            f"the {what} library {path} does not load into TensorFlow {tf.__version__}: it is "
            "built for TensorFlow 2.21; reinstall crf-rnn-3d against the TensorFlow you use "
            f"({exc.message.splitlines()[0]})"
        ) from exc
