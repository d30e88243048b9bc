"""train.precision: the V-Net with the CRF head trains a few steps under each Keras dtype policy
(float32, mixed_float16 with loss scaling, mixed_bfloat16), the head and the logits staying in
float32; a CrfRnn layer made under a mixed policy computes its mean field in float32.

Independent references: the float32 run (same seed, same first batch) for the first loss of the
mixed runs, to half-precision tolerance (float16 keeps 11 significant bits, bfloat16 8: 1e-2
relative covers both on a loss of about 2); the float32 layer for the mixed-policy layer.

The runs train in a subprocess (this file run as a script) with TF_ENABLE_ONEDNN_OPTS=0: with
TensorFlow's oneDNN CPU kernels on (its default on x86), mixed_bfloat16 training of the V-Net
gave NaN losses in 4 of 6 runs here, at random, and never with them off (docs/training.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from experiments_fixtures import smoke_config

from crf_rnn_3d.crf import CrfRnn
from crf_rnn_3d.datasets.errors import ConfigError
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.model_io import build_model, restore_model
from crf_rnn_3d.experiments.prepare import prepare
from crf_rnn_3d.experiments.train import check_settings, make_optimizer, seed_for, train

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
HALF = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
TRAIN = ["train.steps=3", "train.log_every=1", "train.checkpoint_every=3", "train.save_model=false"]


def _worker(root: Path) -> None:
    """In the subprocess: one vnet_crf run of each policy; their histories to root/out.json."""
    prepare(smoke_config(root, *TRAIN))
    out = {}
    for precision in PRECISIONS:
        result = train(smoke_config(root, *TRAIN, f"train.precision={precision}"), 0, "vnet_crf")
        out[precision] = {"complete": result.complete, "history": result.history}
    (root / "out.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """{precision: (cfg, the run's complete flag and history)} of the runs of :func:`_worker`."""
    root = tmp_path_factory.mktemp("precision")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
    done = subprocess.run(
        [sys.executable, __file__, str(root)], cwd=Path(__file__).parents[1], env=env,
        capture_output=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads((root / "out.json").read_text())
    return {p: (smoke_config(root, *TRAIN, f"train.precision={p}"), out[p]) for p in PRECISIONS}


def _initial(cfg) -> keras.Model:
    cases = common.fold_cases(cfg, 0)
    shape, spacing = common.manifest_shape_and_spacing(cfg, cases["train"])
    keras.utils.set_random_seed(seed_for(cfg, 0))
    return build_model(cfg, "vnet_crf", shape, spacing)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_policy_trains_with_the_head_in_float32(trained, precision):
    cfg, result = trained[precision]
    losses = [h["loss"] for h in result["history"]]
    assert result["complete"] and len(losses) == 3
    assert np.all(np.isfinite(losses)), losses
    reference = [h["loss"] for h in trained["float32"][1]["history"]]
    np.testing.assert_allclose(losses[0], reference[0], rtol=1e-2)  # same weights, same batch

    model = restore_model(cfg, 0, "vnet_crf")
    before = _initial(cfg)
    pairs = zip(model.get_weights(), before.get_weights(), strict=True)
    changed = [not np.array_equal(a, b) for a, b in pairs]
    assert sum(changed) >= len(changed) - 2, changed  # trained: (nearly) every weight moved

    head = model.get_layer("crf")
    assert head.compute_dtype == "float32" and head.dtype_policy.name == "float32"
    assert head.weights and all(w.dtype == "float32" for w in head.weights)
    assert all(w.dtype == "float32" for w in model.weights)  # variables: float32 everywhere
    conv = model.get_layer("down0_conv0")
    assert conv.compute_dtype == HALF.get(precision, "float32")
    image = tf.random.normal([1, *model.input_shape[1:]], seed=1)
    assert model(image).dtype == tf.float32


def test_float16_uses_loss_scaling_and_the_others_do_not(trained):
    for precision in PRECISIONS:
        optimizer = make_optimizer(trained[precision][0]["train"])
        scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        assert scaled == (precision == "mixed_float16"), precision


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_crf_layer_under_a_mixed_policy_computes_in_float32(policy):
    rng = np.random.default_rng(3)
    half = HALF[policy]
    unaries = tf.cast(rng.normal(size=(1, 6, 7, 5, 3)), half)
    image = tf.cast(rng.normal(size=(1, 6, 7, 5, 2)), half)
    settings = {"theta_alpha": 2.0, "theta_gamma": 1.5, "num_iterations": 3}
    mixed = CrfRnn(dtype=policy, **settings)([unaries, image])
    plain = CrfRnn(**settings)([tf.cast(unaries, tf.float32), tf.cast(image, tf.float32)])
    assert mixed.dtype == half and plain.dtype == tf.float32
    # the float32 result rounded once to the half type (plus the weights 1.0, exact in both)
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[half]
    np.testing.assert_allclose(
        tf.cast(mixed, tf.float32).numpy(), plain.numpy(), rtol=eps, atol=eps
    )


def test_unknown_precision_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.precision"):
        check_settings(smoke_config(tmp_path, "train.precision=float64")["train"])
    with pytest.raises(ConfigError, match=r"train\.precision"):
        build_model(smoke_config(tmp_path, "train.precision=half"), "vnet", (8, 16, 16, 1),
                    (6.0, 6.0, 6.0))  # fmt: skip


def test_precision_is_part_of_a_runs_identity_but_float32_keeps_old_folders(tmp_path):
    default = smoke_config(tmp_path)
    assert "precision" not in common.run_identity(default, 0, "vnet")["train"]
    assert "distribute" not in common.run_identity(default, 0, "vnet")["train"]
    assert common.run_dir(smoke_config(tmp_path, "train.precision=float32"), 0, "vnet") == (
        common.run_dir(default, 0, "vnet")
    )
    assert common.run_dir(smoke_config(tmp_path, "train.precision=mixed_float16"), 0, "vnet") != (
        common.run_dir(default, 0, "vnet")
    )


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
