"""Memory of the TF-op path's filters inside a traced training step (backend "tf", the path a
GPU takes), read from TensorFlow's own CPU allocator (tf.config.experimental.get_memory_info):
how much a traced forward + backward holds per filter call, against the size of the volumes
it must hold.

These are counts of bytes, not timings: for a given graph TensorFlow allocates the same
tensors on every run. The bounds below are a small multiple of what the step must keep (each
call's input and output for the backward pass), far below what the earlier forms held:
- the lattice filter's blur and slice as while loops kept about 100 bytes per voxel of every
  call alive to the end of the step (measured at the PROMISE12 phantom size: a traced
  CrfRnn step grew by about 370 MiB per mean-field iteration);
- the separable filter's gradient through TensorFlow's own derivative of its 2r + 1 shifted
  slices summed 2r + 1 zero-padded volumes at once (a 580 MiB peak for one PROMISE12-sized
  filter, against 83 MiB for the compiled op);
- on the step's first run, constant folding evaluated each NaN check's index range (the
  BraTS-sized CrfRnn step's first run peaked past 16 GiB).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from crf_rnn_3d.datasets.phantoms import grid_features, grid_values
from crf_rnn_3d.lattice_op import Lattice, separable_filter
from crf_rnn_3d.lattice_op.separable import gaussian_taps

SPATIAL = (24, 64, 64)  # 98,304 voxels: one float32 channel is 384 KiB
CHANNELS = 2
VOLUME = int(np.prod(SPATIAL)) * CHANNELS * 4  # bytes of one [1, *spatial, C] float32 tensor


def _peak_bytes(step, x: tf.Tensor, first: bool = False) -> int:
    """The allocator's peak above what was held before, over one run of a traced step: after
    a first run that traces it, or (first=True) that first run itself, which also
    instantiates the graph (TensorFlow's constant folding evaluates what it can there)."""
    if not first:
        step(x)
    tf.config.experimental.reset_memory_stats("CPU:0")
    held = tf.config.experimental.get_memory_info("CPU:0")["current"]
    float(tf.reduce_sum(step(x)))
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - held


def _chain_step(filter_fn, calls: int):
    """d/dx sum(sin(A sin(A ... x))): each call's input and output kept for the backward."""

    @tf.function
    def step(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = x
            for _ in range(calls):
                y = tf.sin(filter_fn(y))
            loss = tf.reduce_sum(y)
        return tape.gradient(loss, x)

    return step


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(3)
    features = grid_features(SPATIAL, 4, rng)[None].astype(np.float32)
    values = grid_values(SPATIAL, CHANNELS, "random", rng)[None].astype(np.float32)
    return tf.constant(features), tf.constant(values)


def test_traced_lattice_filter_holds_little_per_call(volume):
    """Five chained TF-path lattice filters against one: each further call may add at most
    three volumes (its input, its output and the sine's input are what the backward needs);
    the while-loop form added about six."""
    features, values = volume
    lattice = Lattice(features, backend="tf")
    one = _peak_bytes(_chain_step(lattice.filter, 1), values)
    five = _peak_bytes(_chain_step(lattice.filter, 5), values)
    per_call = (five - one) / 4
    assert per_call <= 3 * VOLUME, (per_call / VOLUME, one, five)


def test_first_traced_run_holds_little_per_checked_call(volume):
    """The same on the first run of the step, the one that instantiates its graph: each filter
    checks its values for NaN (check_finite) and locates the first bad entry only on failure,
    but the location's index range, formed from the static shape, was evaluated by constant
    folding for every check at once (about 7 volumes per call here)."""
    features, values = volume
    lattice = Lattice(features, backend="tf")
    one = _peak_bytes(_chain_step(lattice.filter, 1), values, first=True)
    five = _peak_bytes(_chain_step(lattice.filter, 5), values, first=True)
    per_call = (five - one) / 4
    assert per_call <= 3 * VOLUME, (per_call / VOLUME, one, five)


def test_traced_separable_filter_peak_is_a_few_volumes(volume):
    """One TF-path separable filter of 2r + 1 = 25 taps per axis, forward and backward: the
    peak stays within a few volumes (padded copies included), not one per tap."""
    _, values = volume
    taps = [gaussian_taps(3.0, 4.0, n) for n in SPATIAL]
    assert len(taps[1]) == 25
    peak = _peak_bytes(_chain_step(lambda v: separable_filter(v, taps, backend="tf"), 1), values)
    assert peak <= 8 * VOLUME, peak / VOLUME


def test_separable_fixed_taps_gradient_equals_compiled(volume):
    """Taps given as numbers (no gradient to them on the TF path): the values' gradient is
    still the compiled op's adjoint."""
    _, values = volume
    taps = [gaussian_taps(1.5, 4.0, n) for n in SPATIAL]
    taps[1] = [t * (1.0 + 0.05 * k) for k, t in enumerate(taps[1])]  # asymmetric
    upstream = tf.sin(3.0 * values)

    def gradient(backend):
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = tf.reduce_sum(upstream * separable_filter(values, taps, backend=backend))
        return tape.gradient(loss, values).numpy()

    want, got = gradient("compiled"), gradient("tf")
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
