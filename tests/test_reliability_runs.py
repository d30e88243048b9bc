"""Bad settings and interrupted runs (issue 13): each case here was a traceback, a silently kept
stale file, or a duplicated log before the fix.

- every bad setting of the train / cross-validate stages is a ConfigError naming the key (the
  CLI turns it into one line and exit code 2: one subprocess run checks that path);
- changed split settings make the splits again (or stop, when the file was edited);
- temporary files of a killed process are removed when the folder is opened again;
- an unreadable newest checkpoint falls back to the one before it, and the steps trained again
  are logged to TensorBoard once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from experiments_fixtures import smoke_config
from omegaconf import OmegaConf

from crf_rnn_3d.datasets.errors import ConfigError, DataError
from crf_rnn_3d.experiments.prepare import prepare


@pytest.fixture(scope="module")
def smoke_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    cfg = smoke_config(root)
    prepare(cfg)
    return cfg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"fold": "abc"}, "fold"),
        ({"train": {"optimizer": {"learning_rate": "abc"}}}, "train.optimizer.learning_rate"),
        ({"train": {"loss": "focal"}}, "train.loss"),
        ({"train": {"log_every": 0}}, "train.log_every"),
        ({"crf": {"theta_alpha": -1}, "variant": "vnet_crf"}, "crf.theta_alpha"),
        ({"crf": {"num_iterations": 0}, "variant": "vnet_crf"}, "crf.num_iterations"),
    ],
)
def test_bad_train_setting_names_the_key(smoke_cfg, override, key) -> None:
    from crf_rnn_3d.experiments.train import train

    cfg = OmegaConf.merge(smoke_cfg, override)
    with pytest.raises(ConfigError, match=rf"^setting {key}: "):
        train(cfg)


@pytest.mark.parametrize("folds", [1, "abc", [0, "x"]])
def test_bad_folds_names_the_key(smoke_cfg, folds) -> None:
    from crf_rnn_3d.experiments.cross_validate import cross_validate

    cfg = OmegaConf.merge(smoke_cfg, {"folds": folds})
    with pytest.raises(ConfigError, match=r"^setting folds: "):
        cross_validate(cfg)


def test_bad_setting_on_the_command_line_is_one_line_and_exit_2(smoke_cfg) -> None:
    root = Path(smoke_cfg.output_root)
    proc = subprocess.run(
        [sys.executable, "-m", "crf_rnn_3d.experiments.train", "experiment=smoke",
         f"output_root={root}", "fold=abc", "progress=false"],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: setting fold: expected a whole number, found 'abc'"], proc.stderr


# ------------------------------------------------------------------------------------- splits


def _splits(cfg) -> list:
    return json.loads((Path(cfg.data.processed) / "splits.json").read_text())


def test_changed_split_settings_make_the_splits_again(tmp_path) -> None:
    cfg = smoke_config(tmp_path)
    prepare(cfg)
    assert len(_splits(cfg)) == 2
    changed = OmegaConf.merge(cfg, {"data": {"split": {"folds": 3}}})
    prepare(changed)
    splits = _splits(changed)
    assert len(splits) == 3  # before the fix: the 2-fold file was kept, exit 0
    assert sorted(c for s in splits for c in s["val"]) == sorted(
        splits[0]["train"] + splits[0]["val"]
    )
    reseeded = OmegaConf.merge(changed, {"data": {"split": {"seed": 7}}})
    prepare(reseeded)
    from crf_rnn_3d.datasets.splits import make_splits

    ids = sorted(c for s in _splits(reseeded) for c in s["val"])
    assert _splits(reseeded) == make_splits(ids, reseeded.data.split)


def test_edited_splits_with_other_settings_stop_the_run(tmp_path) -> None:
    cfg = smoke_config(tmp_path)
    prepare(cfg)
    path = Path(cfg.data.processed) / "splits.json"
    edited = _splits(cfg)
    edited[0]["train"], edited[1]["train"] = edited[1]["train"], edited[0]["train"]
    edited[0]["val"], edited[1]["val"] = edited[1]["val"], edited[0]["val"]
    path.write_text(json.dumps(edited))
    prepare(cfg)  # same settings: the user's edit is kept
    assert _splits(cfg) == edited
    with pytest.raises(DataError, match="edited since") as info:
        prepare(OmegaConf.merge(cfg, {"data": {"split": {"folds": 3}}}))
    assert str(path) in str(info.value)
    assert _splits(cfg) == edited  # and left as it was


def test_users_split_file_with_another_fold_count_is_refused(tmp_path) -> None:
    cfg = smoke_config(tmp_path)
    prepare(cfg)
    processed = Path(cfg.data.processed)
    (processed / "splits.json.settings.json").unlink()  # a file the user wrote
    with pytest.raises(DataError, match=r"3 folds \(data.split.folds\)"):
        prepare(OmegaConf.merge(cfg, {"data": {"split": {"folds": 3}}}))


# ------------------------------------------------------------------ what a kill -9 leaves


def test_temporaries_of_a_killed_process_are_removed(tmp_path) -> None:
    cfg = smoke_config(tmp_path)
    prepare(cfg)
    processed = Path(cfg.data.processed)
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    (processed / f".tmp-{dead}-Case00.npz").write_bytes(b"x" * 1000)
    (processed / f".tmp-{dead}-Case01").mkdir()
    alive = processed / f".tmp-{os.getppid()}-manifest.json"  # a live process's: kept
    alive.write_text("{}")
    prepare(cfg)
    assert not (processed / f".tmp-{dead}-Case00.npz").exists()
    assert not (processed / f".tmp-{dead}-Case01").exists()
    assert alive.exists()


def _logged_steps(folder: Path) -> list[int]:
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    steps = []
    for events in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(events)):
            event = event_pb2.Event.FromString(record.numpy())
            if any(v.tag == "train/loss" for v in event.summary.value):
                steps.append(int(event.step))
    return sorted(steps)


def test_unreadable_newest_checkpoint_falls_back_and_logs_once(smoke_cfg, capfd) -> None:
    from crf_rnn_3d.experiments.train import train

    cfg = OmegaConf.merge(smoke_cfg, {"train": {"steps": 4, "stop_after": 3, "seed": 5}})
    first = train(cfg, 0, "vnet")
    assert first.steps_done == 3
    assert _logged_steps(first.run_dir / "tensorboard") == [1, 2, 3]
    for data in (first.run_dir / "checkpoints").glob("ckpt-3.data-*"):
        data.write_bytes(data.read_bytes()[:20])  # truncated, as by a kill during the write
    cfg = OmegaConf.merge(cfg, {"train": {"stop_after": None}})
    second = train(cfg, 0, "vnet")
    assert "ckpt-3" in capfd.readouterr().err  # the warning names the unreadable checkpoint
    assert second.started_from == 2 and second.steps_done == 4 and second.complete
    assert _logged_steps(first.run_dir / "tensorboard") == [1, 2, 3, 4]  # step 3 once
    state = json.loads((first.run_dir / "state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert list((first.run_dir / "checkpoints").glob("ckpt-3.*.corrupt-*"))


def test_checkpoints_are_still_pruned_after_a_fallback(smoke_cfg, capfd) -> None:
    """After falling back from an unreadable checkpoint, the run keeps only
    ``keep_checkpoints`` of them again: the rewritten state keeps each checkpoint's time
    (without the times TensorFlow's manager treats the listed checkpoints as preserved and
    never deletes them)."""
    from crf_rnn_3d.experiments.train import train

    cfg = OmegaConf.merge(
        smoke_cfg,
        {"train": {"steps": 6, "stop_after": 4, "seed": 6, "checkpoint_every": 1,
                   "keep_checkpoints": 2}},
    )  # fmt: skip
    first = train(cfg, 0, "vnet")
    folder = first.run_dir / "checkpoints"

    def kept() -> list[int]:
        return sorted(int(p.name.split(".")[0][5:]) for p in folder.glob("ckpt-*.index"))

    assert kept() == [3, 4]
    for data in folder.glob("ckpt-4.data-*"):
        data.write_bytes(data.read_bytes()[:20])
    second = train(OmegaConf.merge(cfg, {"train": {"stop_after": None}}), 0, "vnet")
    assert "ckpt-4" in capfd.readouterr().err
    assert second.started_from == 3 and second.complete
    assert kept() == [5, 6]  # ckpt-3 pruned again; before the fix it stayed forever
