"""Every bad input gets a TensorFlow error naming the tensor and the problem, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from crf_rnn_3d.lattice_op import Lattice, _library, permutohedral_filter

InvalidArg = tf.errors.InvalidArgumentError


def feats(shape=(1, 5, 4, 3)) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def vals(shape=(1, 5, 4, 2)) -> np.ndarray:
    return np.random.default_rng(1).normal(size=shape).astype(np.float32)


def unknown_shape_filter(values, features):
    """Calls the ops inside a tf.function with unknown shapes, so the kernels' own checks run."""
    fn = tf.function(
        lambda v, f: permutohedral_filter(v, f),
        input_signature=[tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.float32)],
    )
    return fn(values, features)


@pytest.mark.parametrize("call", [lambda v, f: permutohedral_filter(v, f), unknown_shape_filter])
class TestShapes:
    def test_rank_below_three(self, call) -> None:
        with pytest.raises(InvalidArg, match=r"features must have shape \[batch, \*spatial"):
            call(vals((5, 2)), feats((5, 3)))

    def test_values_rank_below_three(self, call) -> None:
        with pytest.raises(InvalidArg, match=r"values must have shape \[batch, \*spatial"):
            call(vals((5, 2)), feats())

    def test_zero_feature_channels(self, call) -> None:
        with pytest.raises(InvalidArg, match="features has 0 channels"):
            call(vals(), feats((1, 5, 4, 0)))

    def test_zero_value_channels(self, call) -> None:
        with pytest.raises(InvalidArg, match="values has 0 channels"):
            call(vals((1, 5, 4, 0)), feats())

    def test_batch_mismatch(self, call) -> None:
        with pytest.raises(InvalidArg, match=r"values of shape .* do not match the lattice"):
            call(vals((2, 5, 4, 2)), feats())

    def test_spatial_mismatch_with_same_voxel_count(self, call) -> None:
        with pytest.raises(InvalidArg, match=r"values of shape .* do not match the lattice"):
            call(vals((1, 4, 5, 2)), feats())

    def test_empty_volume(self, call) -> None:
        with pytest.raises(InvalidArg, match="features has no voxels"):
            call(vals((1, 0, 4, 2)), feats((1, 0, 4, 3)))

    def test_nan_in_features(self, call) -> None:
        f = feats()
        f[0, 2, 1, 2] = np.nan
        with pytest.raises(InvalidArg, match=r"features contains NaN or Inf \(voxel 9, channel 2"):
            call(vals(), f)

    def test_inf_in_features(self, call) -> None:
        f = feats()
        f[0, 0, 0, 0] = -np.inf
        with pytest.raises(InvalidArg, match="features contains NaN or Inf"):
            call(vals(), f)

    def test_features_too_widely_spread(self, call) -> None:
        f = feats()
        f[0, 0, 0, 1] = 1e7
        with pytest.raises(InvalidArg, match=r"features channel 1 spans .* divided by the kernel"):
            call(vals(), f)


@pytest.mark.parametrize(
    ("values", "features", "name"),
    [
        (vals(), feats().astype(np.float64), "features must be float32, got float64"),
        (vals().astype(np.float64), feats(), "values must be float32, got float64"),
        (vals().astype(np.int32), feats(), "values must be float32, got int32"),
        (vals(), feats().astype(np.float16), "features must be float32, got float16"),
    ],
)
def test_wrong_dtype(values, features, name) -> None:
    with pytest.raises(InvalidArg, match=name):
        permutohedral_filter(values, features)


def test_lattice_too_large_for_memory(monkeypatch) -> None:
    """With a 1 MB budget, 3600 voxels scattered in 6 feature dimensions need about 25k lattice
    points (7 per voxel, 100 bytes each), more than fits beside their 390 kB of entries."""
    monkeypatch.setenv("CRF3D_LATTICE_MAX_BYTES", str(1_000_000))
    f = np.random.default_rng(2).normal(scale=50.0, size=(1, 60, 60, 6)).astype(np.float32)
    with pytest.raises(tf.errors.ResourceExhaustedError, match="use wider kernels"):
        Lattice(f)
    monkeypatch.setenv("CRF3D_LATTICE_MAX_BYTES", str(10_000))
    with pytest.raises(tf.errors.ResourceExhaustedError, match="bytes of lattice entries"):
        Lattice(f)
    monkeypatch.delenv("CRF3D_LATTICE_MAX_BYTES")
    assert Lattice(f).filter(np.ones((1, 60, 60, 1), np.float32)).shape == (1, 60, 60, 1)


def test_corrupted_lattice_tensors() -> None:
    lat = Lattice(feats())
    ops = _library.load()
    t = lat.tensors
    f = lat.features
    bad_index = tf.tensor_scatter_nd_update(
        t.vertex_index, [[0, 0, 0, 0]], [tf.shape(t.blur_neighbours)[1] + 5]
    )
    with pytest.raises(InvalidArg, match="out of range"):
        ops.crf3d_lattice_filter(vals(), f, bad_index, *t[1:])
    bad_nbrs = t.blur_neighbours + 10_000
    with pytest.raises(InvalidArg, match="out of range"):
        ops.crf3d_lattice_filter(vals(), f, t.vertex_index, t.vertex_weight, bad_nbrs, *t[3:])
    with pytest.raises(InvalidArg, match="splat_offsets must start at 0"):
        ops.crf3d_lattice_filter(vals(), f, *t[:3], t.splat_offsets + 1, *t[4:])
    bad_voxels = t.splat_voxels + tf.shape(t.splat_voxels)[0]
    with pytest.raises(InvalidArg, match="out of range"):
        ops.crf3d_lattice_filter(vals(), f, *t[:4], bad_voxels, t.splat_weights)
    with pytest.raises(InvalidArg, match=r"splat_voxels must have shape"):
        ops.crf3d_lattice_filter(vals(), f, *t[:4], t.splat_voxels[:-1], t.splat_weights)
    with pytest.raises(InvalidArg, match=r"splat_weights must have shape"):
        ops.crf3d_lattice_filter(vals(), f, *t[:5], t.splat_weights[:-1])
    with pytest.raises(InvalidArg, match=r"not the features this lattice was built from"):
        ops.crf3d_lattice_filter(vals(), f[..., :-1], *t)


def test_missing_library_is_named(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CRF3D_LATTICE_LIB", str(tmp_path / "nope.so"))
    _library.load.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="make build"):
            _library.load()
    finally:
        monkeypatch.delenv("CRF3D_LATTICE_LIB")
        _library.load.cache_clear()


def test_missing_crf_library_is_named(monkeypatch, tmp_path) -> None:
    """The CRF's op library goes through the same loader (crf_rnn_3d.lattice_op.loader)."""
    from crf_rnn_3d.crf import _ops

    monkeypatch.setenv("CRF3D_CRF_LIB", str(tmp_path / "nope.so"))
    _ops.load.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"CRF op library .*nope\.so.*CRF3D_CRF_LIB"):
            _ops.load()
    finally:
        monkeypatch.delenv("CRF3D_CRF_LIB")
        _ops.load.cache_clear()
