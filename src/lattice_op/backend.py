"""Which implementation runs the lattice and separable filters: the backend switch.

    "compiled"  the C++ ops of this package (CPU kernels only: src/lattice_op/tf_op, and any
                compiled op built on them);
    "tf"        the same lattice and filters written with TensorFlow's own ops only
                (src/lattice_op/tf_lattice.py), which TensorFlow runs on any device, GPUs
                included;
    "auto"      the compiled kernels on the CPU, the TensorFlow ops when the computation runs
                on a GPU (:func:`resolve_backend` states the rule).

Every entry point that filters takes ``backend=`` with these names: ``Lattice``,
``permutohedral_filter`` and ``separable_filter`` here, and the layers built on them.
"""

from __future__ import annotations

import tensorflow as tf

BACKENDS = ("auto", "compiled", "tf")


def check_backend(backend: object) -> str:
    """`backend` itself when it is one of BACKENDS, else a ValueError naming the choices."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def gpu_visible() -> bool:
    """True when TensorFlow sees at least one GPU (a logical GPU device)."""
    return bool(tf.config.list_logical_devices("GPU"))


def _device_type(name: str | None) -> str | None:
    """ "CPU", "GPU", ... of a device name ("/job:.../device:GPU:0", "/GPU:0"); None if empty."""
    if not name:
        return None
    kind = tf.DeviceSpec.from_string(name).device_type
    return kind.upper() if kind else None


def scope_device_type() -> str | None:
    """The device type that the innermost ``tf.device`` scope names, or None outside one."""
    if tf.executing_eagerly():
        from tensorflow.python.eager import context  # no public accessor of the eager scope

        return _device_type(context.context().device_name)
    # in a graph, a new op carries the device of the enclosing scope ('' outside every scope)
    return _device_type(tf.constant(0.0, name="device_probe").device)


def tensor_device_type(tensor: object) -> str | None:
    """The device type an eager tensor lives on; None for symbolic tensors and non-tensors."""
    if (
        isinstance(tensor, tf.Tensor)
        and hasattr(tensor, "numpy")
        and not tf.is_symbolic_tensor(tensor)
    ):
        return _device_type(tensor.device)
    return None


def resolve_backend(backend: str, tensor: object = None) -> str:
    """The concrete backend ("compiled" or "tf") that `backend` means here.

    "compiled" and "tf" are returned as they are. "auto" follows one rule, in this order:
      1. no GPU visible to TensorFlow (:func:`gpu_visible`)        -> "compiled";
      2. inside a ``tf.device`` scope: a CPU device               -> "compiled",
         any other device (a GPU)                                 -> "tf";
      3. eagerly, with an eager `tensor` (the features or values being filtered): on a CPU
                                                                  -> "compiled", else "tf";
      4. otherwise (a graph, e.g. inside ``tf.function``, where the placer puts ops on the GPU
         by default, or no tensor given)                          -> "tf".
    The compiled kernels have no GPU kernel: "auto" never sends them a computation meant for a
    GPU, and on a machine without one it never leaves them.
    """
    check_backend(backend)
    if backend != "auto":
        return backend
    if not gpu_visible():
        return "compiled"
    scope = scope_device_type()
    if scope is not None:
        return "compiled" if scope == "CPU" else "tf"
    if tf.executing_eagerly():
        placed = tensor_device_type(tensor)
        if placed is not None:
            return "compiled" if placed == "CPU" else "tf"
    return "tf"
