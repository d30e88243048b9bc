"""train.distribute=mirrored: data-parallel training over two logical CPU devices against one
device with the same global batch, the single-device path against a plain training loop, and
checkpoint / resume under the strategy.

TensorFlow fixes its devices when it first initialises them, and the test session already has,
so the training runs in a subprocess (this file run as a script) that splits the CPU into two
logical devices first. It writes each run's losses and final weights; the assertions are here.

Tolerances: one device against two replicas differ only in the order of float32 sums (the
gradient of a global batch of 2 is one sum on one device, two halves all-reduced on two), so
after 4 SGD steps the losses and weights agree to rtol 1e-5, atol 1e-6 (the differences seen
are about 1e-7). The single-device path and the reference loop run the same ops in the same
order: bit-identical. A resumed run repeats the uninterrupted one's ops: bit-identical too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
TRAIN = [
    f"train.steps={STEPS}",
    "train.batch_size=2",
    "train.checkpoint_every=1",
    "train.log_every=1",
    "train.image_every=100",
    "train.deterministic=true",
    "train.optimizer.name=sgd",
    "train.optimizer.learning_rate=0.05",
    "train.save_model=false",
    "~variants.vnet_crf_theta",
    "~variants.vnet_crf_theta_per_case",
]


def _weights(run: Path) -> dict[str, np.ndarray]:
    """The model's weights in the run's last checkpoint, by checkpoint key."""
    import tensorflow as tf

    folder = str(run / "checkpoints")
    reader = tf.train.load_checkpoint(folder)
    names = [
        n for n, _ in tf.train.list_variables(folder)
        if n.startswith("optimizer/_trainable_variables/")
    ]  # fmt: skip
    return {n: reader.get_tensor(n) for n in names}


# ------------------------------------------------------------------------ the subprocess


def _reference_run(cfg, variant: str) -> dict[str, np.ndarray]:
    """The training of a run written out plainly, with no strategy at all: seeded model and
    optimiser, the run's batch stream, tape, loss, apply. Returns the final weights under
    their checkpoint keys (the optimiser's list of trainable variables, by index)."""
    import keras
    import tensorflow as tf

    from crf_rnn_3d.experiments import common
    from crf_rnn_3d.experiments.model_io import build_model
    from crf_rnn_3d.experiments.train import (
        make_optimizer,
        seed_for,
        segmentation_loss,
        training_stream,
    )

    cases = common.fold_cases(cfg, 0)
    shape, spacing = common.manifest_shape_and_spacing(cfg, cases["train"])
    lut = tf.constant(common.label_lut(common.label_values(cfg)))
    keras.utils.set_random_seed(seed_for(cfg, 0))
    model = build_model(cfg, variant, shape, spacing)
    optimizer = make_optimizer(cfg["train"])
    optimizer.build(model.trainable_variables)
    loss_cfg = common.plain(cfg["train"])

    @tf.function
    def step(image, label):
        classes = tf.gather(lut, tf.cast(label, tf.int32))
        with tf.GradientTape() as tape:
            loss = segmentation_loss(classes, model(image, training=True), loss_cfg)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    batches = iter(training_stream(cfg, cases["train"], seed_for(cfg, 0), 0))
    for _ in range(STEPS):
        step(*next(batches))
    return {
        f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE": v.numpy()
        for i, v in enumerate(model.trainable_variables)
    }


def _worker(root: Path, resume: bool) -> None:
    """Runs in the subprocess: two logical CPUs, then the runs (with ``resume`` only the
    uninterrupted and the interrupted mirrored runs); writes ``root/out.json`` and
    ``root/reference.npz``."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, str(Path(__file__).parent))
    from experiments_fixtures import smoke_config

    from crf_rnn_3d.experiments.prepare import prepare
    from crf_rnn_3d.experiments.train import train

    def config(runs: str, *extra: str):
        return smoke_config(root, *TRAIN, f"runs_dir={root}/{runs}", *extra)

    prepare(config("runs"))
    out: dict = {"devices": [d.name for d in tf.config.list_logical_devices("CPU")]}
    mirrored = ["train.distribute=mirrored"]
    for name, extra in [("none", []), ("mirrored", mirrored)][int(resume) :]:
        result = train(config(name, *extra), 0, "vnet_crf")
        out[name] = {"run": str(result.run_dir), "history": result.history}
    if not resume:
        _fast_checks(root, config, out)
        return
    # interrupted after 2 of the 4 steps, then started again: resumes from its checkpoint
    first = train(config("resumed", *mirrored, "train.stop_after=2"), 0, "vnet_crf")
    again = train(config("resumed", *mirrored), 0, "vnet_crf")
    out["resumed"] = {
        "run": str(again.run_dir), "history": again.history, "complete": [first.complete,
        again.complete], "started_from": [first.started_from, again.started_from],
    }  # fmt: skip
    (root / "out.json").write_text(json.dumps(out))


def _fast_checks(root: Path, config, out: dict) -> None:
    """The reference loop, a batch the replicas do not divide, the run folder of each path."""
    from crf_rnn_3d.datasets.errors import ConfigError
    from crf_rnn_3d.experiments import common
    from crf_rnn_3d.experiments.train import train

    mirrored = ["train.distribute=mirrored"]
    reference = _reference_run(config("reference"), "vnet_crf")
    np.savez(root / "reference.npz", *[reference[k] for k in sorted(reference)])
    out["reference_keys"] = sorted(reference)
    try:
        train(config("odd", *mirrored, "train.batch_size=3"), 0, "vnet")
        out["odd_batch"] = "no error"
    except ConfigError as exc:
        out["odd_batch"] = str(exc)
    out["same_folder"] = common.run_dir(config("x"), 0, "vnet") == common.run_dir(
        config("x", *mirrored), 0, "vnet"
    )
    (root / "out.json").write_text(json.dumps(out))


# ------------------------------------------------------------------------------- the tests


def _run_worker(root: Path, *flags: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, __file__, str(root), *flags], cwd=ROOT, env=env, capture_output=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads((root / "out.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("distribute")
    return root, _run_worker(root)


def test_two_replicas_train_as_one_device_with_the_same_global_batch(runs):
    _, out = runs
    assert len(out["devices"]) == 2
    one, two = out["none"], out["mirrored"]
    assert [h["step"] for h in one["history"]] == list(range(1, STEPS + 1))
    assert [h["step"] for h in two["history"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [h["loss"] for h in two["history"]], [h["loss"] for h in one["history"]],
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    assert one["history"][-1]["loss"] < one["history"][0]["loss"]  # it trained
    a, b = _weights(Path(one["run"])), _weights(Path(two["run"]))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # one device and two replicas train the same run: the same folder (distribute is not part
    # of the run's identity)
    assert out["same_folder"] is True


def test_single_device_path_is_bit_identical_to_a_plain_loop(runs):
    root, out = runs
    reference = np.load(root / "reference.npz")
    trained = _weights(Path(out["none"]["run"]))
    assert sorted(trained) == out["reference_keys"]
    for i, name in enumerate(out["reference_keys"]):
        np.testing.assert_array_equal(trained[name], reference[f"arr_{i}"], err_msg=name)


@pytest.mark.slow  # a subprocess of its own: about 20 s on 2 busy cores
def test_mirrored_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    out = _run_worker(tmp_path, "--resume")
    resumed, whole = out["resumed"], out["mirrored"]
    assert resumed["complete"] == [False, True]
    assert resumed["started_from"] == [0, 2]
    assert resumed["history"] == whole["history"]
    a, b = _weights(Path(whole["run"])), _weights(Path(resumed["run"]))
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_a_batch_the_replicas_do_not_divide_is_a_config_error(runs):
    _, out = runs
    assert "train.batch_size" in out["odd_batch"] and "2 replicas" in out["odd_batch"]
    assert "3" in out["odd_batch"]


def test_unknown_distribute_setting_is_a_config_error(tmp_path):
    from experiments_fixtures import smoke_config

    from crf_rnn_3d.datasets.errors import ConfigError
    from crf_rnn_3d.experiments.train import check_settings

    with pytest.raises(ConfigError, match=r"train\.distribute"):
        check_settings(smoke_config(tmp_path, "train.distribute=horovod")["train"])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), resume="--resume" in sys.argv[2:])
