"""Property-based fuzzing: any valid shape and feature scale gives a finite output."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from crf_rnn_3d.lattice_op import Lattice


@settings(max_examples=60, deadline=None)
@given(
    spatial=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    batch=st.integers(1, 2),
    num_f=st.integers(1, 8),
    channels=st.integers(1, 6),
    log_scale=st.floats(-3.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
    reverse=st.booleans(),
)
def test_no_crash_and_finite_output(spatial, batch, num_f, channels, log_scale, seed, reverse):
    rng = np.random.default_rng(seed)
    shape = (batch, *spatial)
    features = (rng.normal(size=(*shape, num_f)) * 10.0**log_scale).astype(np.float32)
    values = rng.uniform(-1, 1, size=(*shape, channels)).astype(np.float32)
    lat = Lattice(features)
    out = lat.filter(values, reverse=reverse).numpy()
    assert out.shape == values.shape
    assert np.all(np.isfinite(out))
    # Every voxel gets at least its own contribution: the filter of ones is positive.
    ones = lat.filter(np.ones((*shape, 1), np.float32)).numpy()
    assert np.all(ones > 0)
