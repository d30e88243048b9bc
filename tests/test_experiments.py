"""Training, evaluation and report pieces (src/experiments/), against hand-computed values."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from experiments_fixtures import compose_config, smoke_config

from crf_rnn_3d.datasets.errors import ConfigError
from crf_rnn_3d.experiments import common
from crf_rnn_3d.experiments.evaluate import dice_score, region_dice
from crf_rnn_3d.experiments.model_io import build_model
from crf_rnn_3d.experiments.prepare import prepare
from crf_rnn_3d.experiments.report_stats import paired_tests
from crf_rnn_3d.experiments.train import (
    hard_dice,
    learning_rate,
    make_optimizer,
    seed_for,
    segmentation_loss,
    soft_dice_loss,
    training_stream,
)


@pytest.fixture(scope="module")
def smoke_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    cfg = smoke_config(root)
    prepare(cfg)
    return cfg


# ------------------------------------------------------------------------- losses, metrics


def test_soft_dice_loss_hand_values():
    # one case, 4 voxels, 2 classes: foreground probabilities p, labels g
    p1 = np.array([0.9, 0.2, 0.6, 0.0], np.float32)
    probs = np.stack([1 - p1, p1], -1).reshape(1, 1, 2, 2, 2)
    labels = np.array([1, 0, 1, 1], np.int32).reshape(1, 1, 2, 2)
    # |P G| = 0.9 + 0.6 = 1.5, |P| = 1.7, |G| = 3; smooth 1: 1 - (3 + 1) / (4.7 + 1)
    got = float(soft_dice_loss(tf.constant(labels), tf.constant(probs), smooth=1.0))
    assert got == pytest.approx(1 - 4 / 5.7, abs=1e-6)


def test_segmentation_loss_ce_and_combination():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 2, 3, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 2, 3, 3)).astype(np.int32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, labels[..., None], -1).mean()
    cfg = {"loss": "ce", "ce_weight": 1.0, "dice_weight": 1.0, "dice_smooth": 1.0}
    assert float(segmentation_loss(labels, logits, cfg)) == pytest.approx(ce, rel=1e-5)
    probs = np.exp(logp)
    onehot = np.eye(3)[labels][..., 1:]
    inter = (probs[..., 1:] * onehot).sum((1, 2, 3))
    denom = probs[..., 1:].sum((1, 2, 3)) + onehot.sum((1, 2, 3))
    dice = 1 - ((2 * inter + 1) / (denom + 1)).mean()
    both = {**cfg, "loss": "dice_ce", "ce_weight": 0.5, "dice_weight": 2.0}
    assert float(segmentation_loss(labels, logits, both)) == pytest.approx(
        0.5 * ce + 2.0 * dice, rel=1e-5
    )
    with pytest.raises(ConfigError, match=r"train\.loss"):
        segmentation_loss(labels, logits, {**cfg, "loss": "focal"})


def test_hard_dice_and_dice_score_hand_values():
    true = np.array([[1, 1, 0, 0]], np.int32).reshape(1, 1, 1, 4)
    logits = np.zeros((1, 1, 1, 4, 2), np.float32)
    logits[0, 0, 0, [0, 2], 1] = 1.0  # predicts voxels 0 and 2
    assert float(hard_dice(tf.constant(true), tf.constant(logits))) == pytest.approx(0.5)
    assert dice_score([1, 0, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.5)
    assert dice_score([0, 0], [0, 0], empty=1.0) == 1.0
    assert dice_score([1, 0], [0, 0]) == 0.0


def test_region_dice_brats_regions():
    pred = np.array([0, 1, 2, 4, 4, 0])
    true = np.array([0, 1, 2, 3, 4, 2])
    regions = {"whole": [1, 2, 3, 4], "core": [1, 3, 4], "enhancing": [4]}
    got = region_dice(pred, true, regions)
    # whole: pred {1,2,3,4} true {1,2,3,4,5}: 2*4/(4+5); core: pred {1,3,4} true {1,3,4}: 1
    # enhancing: pred {3,4} true {4}: 2*1/3
    assert got == pytest.approx({"whole": 8 / 9, "core": 1.0, "enhancing": 2 / 3})


def test_paired_tests_hand_values():
    base = np.array([0.5, 0.6, 0.7])
    other = base + np.array([0.1, 0.2, 0.3])
    out = paired_tests(base, other, alpha=0.05)
    t = 0.2 / (0.1 / math.sqrt(3))
    assert out["mean_difference"] == pytest.approx(0.2)
    assert out["t"] == pytest.approx(t)
    # Student t with 2 dof: two-sided p = 1 - t / sqrt(t^2 + 2); t_0.975(2) = 4.302653
    assert out["p_ttest"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-6)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert out["ci_low"] == pytest.approx(0.2 - half, abs=1e-6)
    assert out["ci_high"] == pytest.approx(0.2 + half, abs=1e-6)
    # Wilcoxon, n = 3, all differences positive: exact two-sided p = 2 / 2^3
    assert out["w"] == 0.0 and out["p_wilcoxon"] == pytest.approx(0.25)
    same = paired_tests(base, base)
    assert math.isnan(same["p_ttest"]) and math.isnan(same["p_wilcoxon"])


# ------------------------------------------------------------------------- optimiser


def test_schedules_and_optimisers():
    cfg = compose_config(["train.steps=100", "train.optimizer.learning_rate=0.1"])
    tcfg = common.plain(cfg.train)
    sched = learning_rate(tcfg)  # cosine to alpha * lr
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(50)) == pytest.approx(0.1 * (0.01 + 0.99 * 0.5), rel=1e-5)
    assert float(sched(100)) == pytest.approx(0.001, rel=1e-4)
    tcfg["schedule"]["name"] = "constant"
    tcfg["optimizer"]["name"] = "sgd"
    opt = make_optimizer(tcfg)
    assert isinstance(opt, keras.optimizers.SGD) and opt.momentum == pytest.approx(0.9)
    tcfg["optimizer"]["name"] = "rmsprop"
    with pytest.raises(ConfigError, match=r"train\.optimizer\.name"):
        make_optimizer(tcfg)


# ------------------------------------------------------------------------- configs


def test_presets_compose_with_the_papers_settings():
    promise = compose_config(["experiment=promise_cv"])
    assert promise.data.name == "promise12" and promise.train.steps == 8000
    assert promise.data.split.scheme == "kfold" and promise.data.split.folds == 5
    assert promise.model.levels == 4 and promise.model.kernel_size == 5
    assert promise.report.paper.prostate.vnet.mean == 0.767
    brats = compose_config(["experiment=brats_holdout"])
    assert brats.data.name == "brats2015" and brats.train.steps == 18700
    assert brats.data.split.scheme == "holdout"
    assert brats.report.paper.core.vnet_crf.mean == 0.482
    demo = compose_config(["experiment=demo"])
    assert demo.data.split.folds == 5 and demo.name == "demo"


def test_one_output_root_for_runs_reports_and_hydra():
    from experiments_fixtures import CONFIGS
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    def composed(*overrides: str):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # as a running app has it (resolves hydra:)
        return cfg

    cfg = composed("experiment=smoke")
    assert cfg.output_root == "results"
    assert (cfg.runs_dir, cfg.reports_dir) == ("results/runs", "results/reports")
    assert cfg.hydra.run.dir.startswith("results/hydra/")
    assert cfg.hydra.sweep.dir.startswith("results/hydra/multirun/smoke/")
    assert (cfg.data.root, cfg.data.processed) == ("results/smoke_data/raw",
                                                   "results/smoke_data/processed")  # fmt: skip
    assert str(common.run_dir(cfg, 0, "vnet")).startswith("results/runs/smoke/smoke_promise/fold0-")
    moved = composed("experiment=smoke", "output_root=/scratch/x")
    assert (moved.runs_dir, moved.reports_dir) == ("/scratch/x/runs", "/scratch/x/reports")
    assert moved.hydra.run.dir.startswith("/scratch/x/hydra/")
    assert moved.data.processed == "/scratch/x/smoke_data/processed"
    assert common.run_dir(moved, 0, "vnet").name == common.run_dir(cfg, 0, "vnet").name
    one = composed("output_root=/a", "reports_dir=/b/reports")  # each part on its own
    assert (one.runs_dir, one.reports_dir) == ("/a/runs", "/b/reports")
    HydraConfig.instance().cfg = None


def test_run_dir_identity():
    cfg = compose_config(["experiment=demo"])
    a = common.run_dir(cfg, 0, "vnet")
    assert a != common.run_dir(cfg, 1, "vnet") != common.run_dir(cfg, 0, "vnet_crf")
    same = compose_config(["experiment=demo", "train.checkpoint_every=7", "train.progress=false",
                           "data.root=/elsewhere", "train.stop_after=3"])  # fmt: skip
    assert common.run_dir(same, 0, "vnet") == a
    other = compose_config(["experiment=demo", "train.steps=301"])
    assert common.run_dir(other, 0, "vnet") != a
    # the CRF settings are part of the identity of the variant that uses them only
    crf = compose_config(["experiment=demo", "crf.theta_alpha=5"])
    assert common.run_dir(crf, 0, "vnet") == a
    assert common.run_dir(crf, 0, "vnet_crf") != common.run_dir(cfg, 0, "vnet_crf")
    with pytest.raises(ConfigError, match="variant"):
        common.run_dir(cfg, 0, "unet")


def test_variant_with_learnt_theta_overrides_only_its_crf():
    cfg = compose_config(["experiment=promise_cv"])
    assert list(cfg.variants) == ["vnet", "vnet_crf", "vnet_crf_theta", "vnet_crf_theta_per_case"]
    assert common.variant_crf(cfg, "vnet") is None
    assert common.variant_crf(cfg, "vnet_crf")["learn_theta"] is False
    learnt = common.variant_crf(cfg, "vnet_crf_theta")
    assert learnt["learn_theta"] is True
    assert {k: v for k, v in learnt.items() if k != "learn_theta"} == {
        k: v for k, v in common.variant_crf(cfg, "vnet_crf").items() if k != "learn_theta"
    }
    assert common.run_dir(cfg, 0, "vnet_crf_theta") != common.run_dir(cfg, 0, "vnet_crf")
    bad = compose_config(
        ["experiment=promise_cv", "+variants.vnet_crf_theta.crf_overrides.learn_thetas=true"]
    )
    with pytest.raises(ConfigError, match=r"crf_overrides\.learn_thetas"):
        common.variant_crf(bad, "vnet_crf_theta")


def test_label_lut_maps_values_to_class_indices():
    lut = common.label_lut([0, 1, 2, 4])
    np.testing.assert_array_equal(lut, [0, 1, 2, -1, 3])
    with pytest.raises(ConfigError, match=r"data\.labels"):
        common.label_values({"data": {"labels": [1, 2]}})


# ------------------------------------------------------------------------- seeds, data order


def test_variants_of_a_fold_share_initialisation(smoke_cfg):
    shape, spacing = common.manifest_shape_and_spacing(
        smoke_cfg, common.fold_cases(smoke_cfg, 0)["train"]
    )
    weights = {}
    for variant in ("vnet", "vnet_crf"):
        keras.utils.set_random_seed(seed_for(smoke_cfg, 0))
        model = build_model(smoke_cfg, variant, shape, spacing)
        weights[variant] = {w.path: np.asarray(w) for w in model.weights}
    crf_only = set(weights["vnet_crf"]) - set(weights["vnet"])
    assert crf_only and all(p.startswith("crf/") for p in crf_only)
    for path, value in weights["vnet"].items():
        np.testing.assert_array_equal(value, weights["vnet_crf"][path], err_msg=path)
    keras.utils.set_random_seed(seed_for(smoke_cfg, 1))
    other = build_model(smoke_cfg, "vnet", shape, spacing)
    assert not np.array_equal(np.asarray(other.weights[0]), weights["vnet"][other.weights[0].path])


def test_training_stream_is_a_function_of_the_seed_and_resumes(smoke_cfg):
    cases = common.fold_cases(smoke_cfg, 0)["train"]
    full = [x.numpy() for x, _ in training_stream(smoke_cfg, cases, 5, 0).take(5)]
    again = [x.numpy() for x, _ in training_stream(smoke_cfg, cases, 5, 0).take(5)]
    tail = [x.numpy() for x, _ in training_stream(smoke_cfg, cases, 5, 3).take(2)]
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(full[3:], tail, strict=True):
        np.testing.assert_array_equal(a, b)
    other = [x.numpy() for x, _ in training_stream(smoke_cfg, cases, 6, 0).take(5)]
    assert any(not np.array_equal(a, b) for a, b in zip(full, other, strict=True))
    assert full[0].shape[0] == smoke_cfg.train.batch_size


def test_missing_data_set_stops_at_once_with_where_to_get_it(tmp_path):
    from crf_rnn_3d.datasets.errors import DatasetNotFoundError
    from crf_rnn_3d.experiments.cross_validate import cross_validate

    cfg = compose_config(
        [
            "experiment=promise_cv",
            f"data.root={tmp_path}/none",
            f"data.processed={tmp_path}/p",
            f"runs_dir={tmp_path}/runs",
            f"reports_dir={tmp_path}/results",
        ]
    )
    with pytest.raises(DatasetNotFoundError, match=r"promise12\.grand-challenge\.org"):
        cross_validate(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_unreadable_checkpoint_names_the_file(smoke_cfg):
    from omegaconf import OmegaConf

    from crf_rnn_3d.datasets.errors import DataError
    from crf_rnn_3d.experiments.train import train

    cfg = OmegaConf.merge(smoke_cfg, {"train": {"steps": 4, "stop_after": 2, "seed": 99}})
    first = train(cfg, 0, "vnet")
    assert first.steps_done == 2 and not first.complete
    for data in (first.run_dir / "checkpoints").glob("*.data-*"):
        data.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"ckpt-2.*delete the run folder"):
        train(cfg, 0, "vnet")
