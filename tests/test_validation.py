"""train.validation (src/experiments/validation.py): the monitor Dice curve against Dice counted
with NumPy on the same checkpoints' predictions, the training unchanged by the monitor, holdout
taking the cases out of the training stream, select=best keeping the step with the highest
logged value (not the last), resume, and the settings' errors.

Tolerances: the CSV holds 6 decimals, so the curve matches the NumPy Dice to 1e-6; weights and
curves of runs that run the same ops in the same order (the monitor on or off, resumed or not,
``train.deterministic=true``) are compared bit for bit or to rtol 1e-5 as in
tests/test_experiments_resume.py.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from experiments_fixtures import smoke_config
from omegaconf import OmegaConf

from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.experiments import common, validation
from crf_rnn_3d.experiments import train as train_module
from crf_rnn_3d.experiments.evaluate import evaluate
from crf_rnn_3d.experiments.model_io import build_model, restore_model
from crf_rnn_3d.experiments.prepare import prepare
from crf_rnn_3d.experiments.train import seed_for, train

TRAIN = [
    "train.checkpoint_every=1",
    "train.keep_checkpoints=10",
    "train.log_every=1",
    "train.image_every=100",
    "train.deterministic=true",
    "train.optimizer.name=sgd",
    "train.optimizer.learning_rate=0.05",
    "train.save_model=false",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validation")
    prepare(smoke_config(root))
    return root


def config(root: Path, runs: str, *extra: str):
    return smoke_config(root, *TRAIN, f"runs_dir={root}/{runs}", *extra)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ckpt_weights(cfg, variant: str, path: str) -> dict[str, np.ndarray]:
    """The model weights a checkpoint holds (a regular or a best one), by the model's paths."""
    cases = common.fold_cases(cfg, 0)["train"]
    model = build_model(cfg, variant, *common.manifest_shape_and_spacing(cfg, cases))
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return {w.path: np.asarray(w) for w in model.weights}


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    out: dict[int, float] = {}
    for e in events.Tensors(tag):
        assert e.step not in out, f"{tag} logged twice at step {e.step}"
        out[e.step] = float(tf.make_ndarray(e.tensor_proto))
    return out


def numpy_dice(pred: np.ndarray, true: np.ndarray) -> float:
    inter = np.logical_and(pred, true).sum()
    total = pred.sum() + true.sum()
    return 1.0 if total == 0 else 2.0 * inter / total


# --------------------------------------------------------------------------- the curve


def test_monitor_curve_is_the_numpy_dice_of_each_checkpoint(root):
    steps = 3
    cfg = config(root, "curve", f"train.steps={steps}", "train.validation.cases=2")
    result = train(cfg, 0, "vnet_crf")
    rows = read_csv(result.run_dir / validation.MONITOR_CSV)
    cases = common.fold_cases(cfg, 0)["train"]
    monitored = validation.choose_cases(cases, 2, seed_for(cfg, 0), holdout=False)
    assert sorted({r["case"] for r in rows}) == sorted(monitored) == sorted(cases)
    assert {r["set"] for r in rows} == {"monitor_training_cases"}
    assert sorted({int(r["step"]) for r in rows}) == list(range(1, steps + 1))

    shape, spacing = common.manifest_shape_and_spacing(cfg, cases)
    model = build_model(cfg, "vnet_crf", shape, spacing)
    manifest = cache.load_manifest(common.processed_dir(cfg))
    volumes = {
        c: cache.read_case(common.processed_dir(cfg) / manifest["cases"][c]["file"])[:2]
        for c in monitored
    }
    per_step: dict[int, list[float]] = {}
    for step in range(1, steps + 1):
        path = str(result.run_dir / "checkpoints" / f"ckpt-{step}")
        tf.train.Checkpoint(model=model).restore(path).expect_partial()
        for case, (image, label) in volumes.items():
            logits = model(image[None].astype(np.float32), training=False).numpy()[0]
            pred = np.argmax(logits, -1) == 1  # class 1 is label value 1, the prostate
            expected = numpy_dice(pred, label == 1)
            (row,) = [r for r in rows if int(r["step"]) == step and r["case"] == case]
            assert row["region"] == "prostate"
            assert float(row["dice"]) == pytest.approx(expected, abs=1e-6), (step, case)
            per_step.setdefault(step, []).append(expected)
    means = {s: float(np.mean(v)) for s, v in per_step.items()}
    assert result.monitor == pytest.approx(means, abs=1e-6)
    board = result.run_dir / "tensorboard"
    for tag in ("monitor_training_cases/dice_prostate", "monitor_training_cases/dice_mean"):
        assert tensorboard_scalars(board, tag) == pytest.approx(means, abs=1e-6)

    # the monitor changes nothing in the training: same folder, same weights bit for bit
    off = config(root, "curve", f"train.steps={steps}", "train.validation.cases=0")
    assert common.run_dir(off, 0, "vnet_crf") == result.run_dir
    quiet = train(config(root, "quiet", f"train.steps={steps}", "train.validation.cases=0"),
                  0, "vnet_crf")  # fmt: skip
    assert not (quiet.run_dir / validation.MONITOR_CSV).exists()
    a = ckpt_weights(cfg, "vnet_crf", str(result.run_dir / "checkpoints" / f"ckpt-{steps}"))
    b = ckpt_weights(cfg, "vnet_crf", str(quiet.run_dir / "checkpoints" / f"ckpt-{steps}"))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --------------------------------------------------------------------------- holdout


def test_holdout_takes_the_cases_out_of_the_training_stream(root, monkeypatch):
    seen: list[list[str]] = []
    original = train_module.training_stream

    def recording(cfg, case_ids, seed, start):
        seen.append(list(case_ids))
        return original(cfg, case_ids, seed, start)

    monkeypatch.setattr(train_module, "training_stream", recording)
    cases = common.fold_cases(config(root, "x"), 0)["train"]
    kept = train(config(root, "kept", "train.steps=1", "train.validation.cases=1"), 0, "vnet")
    held = train(
        config(root, "held", "train.steps=1", "train.validation.cases=1",
               "train.validation.holdout=true"), 0, "vnet",
    )  # fmt: skip
    (monitored,) = validation.choose_cases(cases, 1, seed_for(config(root, "x"), 0), True)
    assert seen[0] == cases  # the monitor alone: the cases stay in training
    assert seen[1] == [c for c in cases if c != monitored] and monitored not in seen[1]
    held_rows = read_csv(held.run_dir / validation.MONITOR_CSV)
    assert {r["case"] for r in held_rows} == {monitored}
    assert {r["set"] for r in held_rows} == {"validation_holdout"}
    assert {r["set"] for r in read_csv(kept.run_dir / validation.MONITOR_CSV)} == {
        "monitor_training_cases"
    }
    assert kept.run_dir.name != held.run_dir.name  # holdout is another run
    with pytest.raises(ConfigError, match=r"train\.validation\.cases.*one left to train on"):
        train(config(root, "all", "train.steps=1", "train.validation.cases=2",
                     "train.validation.holdout=true"), 0, "vnet")  # fmt: skip


# --------------------------------------------------------------------------- select=best


def test_select_best_keeps_the_step_with_the_highest_logged_value(root, monkeypatch):
    scripted = iter([0.2, 0.7, 0.4, 0.9, 0.5])  # best at step 4 of 5, not the last

    def scores(self):
        value = next(scripted)
        return {case: {"prostate": value} for case, _, _ in self.cases}

    monkeypatch.setattr(validation.Monitor, "scores", scores)
    cfg = config(root, "best", "train.steps=5", "train.keep_checkpoints=2",
                 "train.validation.cases=1", "train.validation.select=best")  # fmt: skip
    result = train(cfg, 0, "vnet")
    rows = read_csv(result.run_dir / validation.MONITOR_CSV)
    logged = {int(r["step"]): float(r["dice"]) for r in rows}
    assert logged == pytest.approx({1: 0.2, 2: 0.7, 3: 0.4, 4: 0.9, 5: 0.5})
    best_step = max(logged, key=logged.get)
    record = json.loads((result.run_dir / "best" / "best.json").read_text())
    assert record["step"] == best_step == 4 and record["dice"] == pytest.approx(0.9)
    # the earlier best (step 2) is gone: the kept regular checkpoints (4, 5) only need step 4
    assert sorted(p.name for p in (result.run_dir / "best").glob("*.index")) == ["ckpt-4.index"]
    # regular checkpoints 4 and 5 are kept: the best checkpoint holds step 4's weights
    best = ckpt_weights(cfg, "vnet", str(result.run_dir / "best" / "ckpt-4"))
    regular = ckpt_weights(cfg, "vnet", str(result.run_dir / "checkpoints" / "ckpt-4"))
    last = ckpt_weights(cfg, "vnet", str(result.run_dir / "checkpoints" / "ckpt-5"))
    assert best.keys() == regular.keys() and len(best) > 5
    for name in best:
        np.testing.assert_array_equal(best[name], regular[name], err_msg=name)
    assert any(not np.array_equal(best[n], last[n]) for n in best)

    monkeypatch.undo()
    evaluation = evaluate(cfg, 0, "vnet")
    saved = json.loads((evaluation.run_dir / "evaluation.json").read_text())
    assert saved["checkpoint"] == {"select": "best", "step": 4, "dice": pytest.approx(0.9)}
    restored = {w.path: np.asarray(w) for w in restore_model(cfg, 0, "vnet").weights}
    assert restored.keys() == best.keys()
    for name in best:
        np.testing.assert_array_equal(restored[name], best[name], err_msg=name)


def test_select_best_without_a_best_checkpoint_names_the_file(root):
    cfg = config(root, "nobest", "train.steps=1", "train.validation.cases=1",
                 "train.validation.select=best")  # fmt: skip
    run = train(cfg, 0, "vnet").run_dir
    assert restore_model(cfg, 0, "vnet") is not None
    (run / "best" / "best.json").unlink()
    with pytest.raises(DataError, match=r"best[/\\]best\.json"):
        restore_model(cfg, 0, "vnet")


# --------------------------------------------------------------------------- resume


def test_resume_with_the_monitor_records_what_an_uninterrupted_run_does(root):
    extra = ["train.steps=4", "train.checkpoint_every=2", "train.validation.cases=2",
             "train.validation.select=best"]  # fmt: skip
    whole = train(config(root, "whole", *extra), 0, "vnet_crf")
    cfg = config(root, "cut", *extra)
    first = train(OmegaConf.merge(cfg, {"train": {"stop_after": 3}}), 0, "vnet_crf")
    assert first.steps_done == 3 and not first.complete
    # as if killed before the checkpoint of step 3: only step 2's checkpoint is left
    folder = first.run_dir / "checkpoints"
    for part in folder.glob("ckpt-3.*"):
        part.unlink()
    tf.compat.v1.train.update_checkpoint_state(
        str(folder), "ckpt-2", ["ckpt-2"], all_model_checkpoint_timestamps=[time.time()]
    )
    assert 3 in {int(r["step"]) for r in read_csv(first.run_dir / validation.MONITOR_CSV)}
    again = train(cfg, 0, "vnet_crf")
    assert again.started_from == 2 and again.complete
    a = read_csv(whole.run_dir / validation.MONITOR_CSV)
    b = read_csv(again.run_dir / validation.MONITOR_CSV)
    assert [(r["step"], r["case"]) for r in a] == [(r["step"], r["case"]) for r in b]
    np.testing.assert_allclose([float(r["dice"]) for r in b], [float(r["dice"]) for r in a],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    best_a = json.loads((whole.run_dir / "best" / "best.json").read_text())
    best_b = json.loads((again.run_dir / "best" / "best.json").read_text())
    assert best_a["step"] == best_b["step"]
    tag = "monitor_training_cases/dice_mean"
    assert sorted(tensorboard_scalars(again.run_dir / "tensorboard", tag)) == [1, 2, 3, 4]


# --------------------------------------------------------------------------- settings


def test_cases_are_drawn_from_the_seed():
    ids = [f"Case{i:02d}" for i in range(10)]
    picks = {s: validation.choose_cases(list(reversed(ids)), 3, s, False) for s in range(6)}
    for seed, picked in picks.items():
        assert picked == validation.choose_cases(ids, 3, seed, False)  # order of the list
        assert picked == sorted(picked) and len(set(picked)) == 3 and set(picked) <= set(ids)
    assert len({tuple(p) for p in picks.values()}) > 1


@pytest.mark.parametrize(
    ("validation_cfg", "setting"),
    [
        ({"select": "first"}, r"train\.validation\.select"),
        ({"cases": -1}, r"train\.validation\.cases"),
        ({"every": 0}, r"train\.validation\.every"),
        ({"holdout": "yes"}, r"train\.validation\.holdout"),
        ({"cases": 0, "holdout": True}, r"train\.validation\.holdout"),
        ({"cases": 0, "select": "best"}, r"train\.validation\.select"),
    ],
)
def test_bad_validation_settings_name_the_key(validation_cfg, setting):
    train_cfg = {"log_every": 5, "validation": {"cases": 2, **validation_cfg}}
    with pytest.raises(ConfigError, match=setting):
        validation.settings(train_cfg)


def test_identity_changes_only_when_the_result_does(root):
    base = config(root, "id")
    same = config(root, "id", "train.validation.cases=1", "train.validation.every=7")
    assert common.run_dir(base, 0, "vnet") == common.run_dir(same, 0, "vnet")
    for extra in ("train.validation.holdout=true", "train.validation.select=best"):
        assert common.run_dir(config(root, "id", extra), 0, "vnet") != common.run_dir(
            base, 0, "vnet"
        ), extra
    best = config(root, "id", "train.validation.select=best")
    best_every = config(root, "id", "train.validation.select=best", "train.validation.every=7")
    assert common.run_dir(best, 0, "vnet") != common.run_dir(best_every, 0, "vnet")


# --------------------------------------------------------------------------- mirrored

MIRRORED = ["train.steps=3", "train.batch_size=2", "train.checkpoint_every=1",
            "train.log_every=1", "train.deterministic=true", "train.save_model=false",
            "train.validation.cases=2", "train.validation.select=best"]  # fmt: skip


def _mirrored_worker(root: Path) -> None:
    """Runs in a subprocess (this file as a script): two logical CPUs, the run on one device
    and under train.distribute=mirrored; writes each one's monitor curve and best record."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    prepare(smoke_config(root, *MIRRORED))
    out = {}
    for name, extra in [("none", []), ("mirrored", ["train.distribute=mirrored"])]:
        cfg = smoke_config(root, *MIRRORED, f"runs_dir={root}/{name}", *extra)
        result = train(cfg, 0, "vnet_crf")
        best = json.loads((result.run_dir / "best" / "best.json").read_text())
        out[name] = {"monitor": result.monitor, "best": best}
    (root / "out.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_monitor_under_mirrored_replicas_matches_one_device(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env,
                          capture_output=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    one, two = out["none"], out["mirrored"]
    assert sorted(one["monitor"]) == sorted(two["monitor"]) == ["1", "2", "3"]
    for step, value in one["monitor"].items():  # weights agree to ~1e-7 (test_distribute.py)
        assert two["monitor"][step] == pytest.approx(value, abs=1e-6), step
    assert one["best"]["step"] == two["best"]["step"]


if __name__ == "__main__":
    _mirrored_worker(Path(sys.argv[1]))
