"""Logging the CRF's kernel widths while training (for ``CrfRnn(learn_theta=True)``).

Two ways in:

- a custom training loop that already writes TensorBoard summaries calls
  :func:`log_theta_summaries` inside its ``with writer.as_default():`` block, at the steps where
  it logs the loss;
- ``model.fit`` takes :class:`ThetaLogger` as a callback: it puts the widths into the epoch's
  ``logs`` (so a ``keras.callbacks.TensorBoard`` listed after it, the History and a CSVLogger
  record them) and, given a ``log_dir``, writes them as summaries itself, per epoch or every n
  batches.

Scalar names: ``<prefix>/<layer name>/theta_alpha`` (mm), ``.../theta_beta_<c>`` (image units,
one per reference channel c) and ``.../theta_gamma`` (mm).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from crf_rnn_3d.crf.layer import CrfRnn


def crf_layers(model: Any) -> list[CrfRnn]:
    """Every CrfRnn in `model` (a layer or model, nested models included), each once, in the
    order met."""
    found: list[CrfRnn] = []
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, CrfRnn):
            found.append(obj)
            return
        children = list(getattr(obj, "layers", None) or [])
        flatten = getattr(obj, "_flatten_layers", None)  # sub-layers held as attributes
        if callable(flatten):
            children += list(flatten(include_self=False, recursive=False))
        for child in children:
            walk(child)

    walk(model)
    return found


def theta_scalars(model: Any, prefix: str = "crf") -> dict[str, float]:
    """The kernel widths of every CrfRnn in `model` as flat {name: value}, names as in the
    module docstring (theta_alpha, theta_gamma in mm; theta_beta_<c> in image units)."""
    scalars: dict[str, float] = {}
    for layer in crf_layers(model):
        values = layer.theta_values()
        base = f"{prefix}/{layer.name}"
        scalars[f"{base}/theta_alpha"] = float(values["theta_alpha"])
        for c, beta in enumerate(values["theta_beta"]):
            scalars[f"{base}/theta_beta_{c}"] = float(beta)
        scalars[f"{base}/theta_gamma"] = float(values["theta_gamma"])
    return scalars


def log_theta_summaries(model: Any, step: int, prefix: str = "crf") -> dict[str, float]:
    """Writes the widths of every CrfRnn in `model` as tf.summary scalars at `step` to the
    default summary writer (call it inside ``with writer.as_default():``); returns them."""
    scalars = theta_scalars(model, prefix)
    for name, value in scalars.items():
        tf.summary.scalar(name, value, step=int(step))
    return scalars


class ThetaLogger(keras.callbacks.Callback):
    """Keras callback recording the CRF's kernel widths during ``fit``.

    Args:
      log_dir: folder for a summary writer of its own (e.g. ``<tensorboard dir>/crf_theta``);
        None to only add the widths to the epoch's logs.
      every_n_batches: also write summaries every n training batches (needs log_dir); None
        for once per epoch.
      prefix: first part of the scalar names.

    Raises:
      ValueError: every_n_batches < 1, or every_n_batches without log_dir.
    """

    def __init__(
        self, log_dir: str | None = None, every_n_batches: int | None = None, prefix: str = "crf"
    ) -> None:
        super().__init__()
        if every_n_batches is not None:
            if isinstance(every_n_batches, bool) or int(every_n_batches) < 1:
                raise ValueError(
                    f"every_n_batches must be an integer >= 1, got {every_n_batches!r}"
                )
            if log_dir is None:
                raise ValueError("every_n_batches needs log_dir (where to write), got None")
        self.log_dir = log_dir
        self.every_n_batches = every_n_batches
        self.prefix = prefix
        self._writer: Any = None
        self._batches = 0

    def _write(self, step: int) -> None:
        if self.log_dir is None:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        with self._writer.as_default():
            log_theta_summaries(self.model, step, self.prefix)
        self._writer.flush()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._batches += 1
        if self.every_n_batches is not None and self._batches % self.every_n_batches == 0:
            self._write(self._batches)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs.update(theta_scalars(self.model, self.prefix))
        if self.every_n_batches is None:
            self._write(epoch)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
