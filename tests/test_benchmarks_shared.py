"""The pieces both benchmark scripts share: the benchmark phantoms (src/datasets/phantoms.py),
the memory probe and the pydensecrf2 driver (src/benchmarks/). The phantoms were checked
bit-identical to the scripts' former generators (quick and full sizes) when they moved; here
their documented properties are checked against values computed independently."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from crf_rnn_3d.benchmarks import memory
from crf_rnn_3d.benchmarks.pydensecrf import features_of, run_densecrf, unary_from_probabilities
from crf_rnn_3d.datasets import phantoms


def test_memory_probe_sees_a_fresh_allocation() -> None:
    mib = 256

    def allocate() -> int:
        block = np.ones(mib * 2**20 // 8)  # touched, so resident
        return int(block.size)

    size, seconds, peak = memory.measure(allocate)
    assert size == mib * 2**20 // 8 and seconds >= 0.0
    assert mib * 0.9 <= peak <= mib * 3
    assert memory.peak_mib() >= memory.status_mib("VmRSS") > 0


def test_pydensecrf_inputs_hand_checked() -> None:
    probs = np.array([[[0.25, 0.75], [1.0, 0.0]]], np.float32)  # [1, 2, L=2]
    unary = unary_from_probabilities(probs, clip=1e-8)
    assert unary.dtype == np.float32 and unary.shape == (2, 2)
    np.testing.assert_allclose(unary[:, 0], [math.log(4.0), -math.log(0.75)], rtol=1e-6)
    np.testing.assert_allclose(unary[:, 1], [0.0, -math.log(1e-8)], rtol=1e-6)
    feats = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # [*spatial, F = 4]
    np.testing.assert_array_equal(features_of(feats), feats.reshape(6, 4).T)


@pytest.mark.skipif(
    importlib.util.find_spec("pydensecrf") is not None, reason="pydensecrf2 is installed"
)
def test_pydensecrf_missing_says_how_to_install() -> None:
    with pytest.raises(ImportError, match=r"requirements-bench\.txt"):
        run_densecrf(np.zeros((2, 4), np.float32), [], 1)


def test_lattice_bench_reference_properties() -> None:
    shape = (8, 24, 20)
    theta = phantoms.LATTICE_BENCH_THETA
    for name, channels in (("promise", 1), ("brats", 4)):
        ref = phantoms.lattice_bench_reference(name, shape)
        again = phantoms.lattice_bench_reference(name, shape)
        for key in ref:
            np.testing.assert_array_equal(ref[key], again[key])  # deterministic
        spacing = phantoms.LATTICE_BENCH_SPACING[name]
        np.testing.assert_array_equal(ref["spacing"], spacing)
        image = ref["image"].astype(np.float64)
        assert image.shape == (*shape, channels)
        if name == "promise":  # z-scored over the volume
            assert abs(image.mean()) < 1e-4 and image.std() == pytest.approx(1.0, abs=1e-4)
        # positions: voxel index * spacing from the first voxel, divided by the widths
        pos = np.stack(np.indices(shape), -1) * np.array(spacing)
        np.testing.assert_allclose(ref["spatial"][0], pos / theta["gamma_mm"], rtol=1e-5)
        bilateral = ref["bilateral"][0]
        assert bilateral.shape == (*shape, 3 + channels)
        np.testing.assert_allclose(bilateral[..., :3], pos / theta["alpha_mm"], rtol=1e-5)
        np.testing.assert_allclose(
            bilateral[..., 3:], image / theta["beta_zscore"], rtol=1e-5, atol=1e-5
        )
        for key, labels in (("probs2", 2), ("probs5", 5)):
            probs = ref[key][0].astype(np.float64)
            assert probs.shape == (*shape, labels) and probs.min() >= 0
            np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert phantoms.LATTICE_BENCH_LABELS == {"promise": 2, "brats": 5}


def test_poor_network_probabilities() -> None:
    labels = np.zeros((10, 24, 24), np.int64)
    labels[3:8, 6:18, 6:18] = 1
    rng = np.random.default_rng(0)
    probs = phantoms.poor_network_probabilities(labels, (2.0, 1.0, 1.0), 2, rng)
    assert probs.shape == (10, 24, 24, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    agree = np.mean(probs.argmax(-1) == labels)
    assert 0.6 < agree < 1.0  # mostly right, not perfect: a poor network


def test_crf_bench_case_promise() -> None:
    image, labels, spacing, classes, probs = phantoms.crf_bench_case("promise", 0)
    assert image.shape == (63, 200, 200, 1) and labels.shape == (63, 200, 200)
    assert spacing == pytest.approx((2.0, 1.0, 1.0)) and classes == 2
    assert image.dtype == np.float32 and probs.dtype == np.float32
    assert image.astype(np.float64).std() == pytest.approx(1.0, rel=1e-4)  # unit std channel
    assert set(np.unique(labels)) == {0, 1}
    np.testing.assert_allclose(probs.astype(np.float64).sum(-1), 1.0, atol=1e-4)
