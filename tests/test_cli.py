"""crf_rnn_3d.experiments.cli: the one command-line wrapper of the stages."""

from __future__ import annotations

import pytest

from crf_rnn_3d.datasets.errors import ConfigError, DataError, DatasetNotFoundError
from crf_rnn_3d.experiments import cli


def _raise(exc: BaseException):
    def stage(cfg: object) -> None:
        raise exc

    return stage


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError("train.steps", "a positive integer", 0),
        DataError("/data/splits.json", "a JSON list of folds", "JSONDecodeError('x')"),
        DatasetNotFoundError("data set not found under /nowhere;\n  download it from there"),
    ],
)
def test_user_error_exits_2_with_one_line(exc, capsys):
    shown = []
    with pytest.raises(SystemExit) as info:
        cli.run_stage(_raise(exc), {}, show=shown.append)
    assert info.value.code == 2 and shown == []
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ")
    assert err.split() == ["error:", *str(exc).split()]  # the message, whitespace folded


def test_model_setting_error_is_a_user_error_once_the_model_is_loaded(capsys):
    from crf_rnn_3d.models.vnet import VNetConfigError

    assert VNetConfigError in cli.user_errors()
    with pytest.raises(SystemExit) as info:
        cli.run_stage(_raise(VNetConfigError("levels", "an integer >= 1", 0)), {})
    assert info.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: setting model.levels: expected an integer >= 1, found 0\n"
    )


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("train"), ValueError("x")])
def test_other_exceptions_propagate_with_their_traceback(exc, capsys):
    with pytest.raises(type(exc)) as info:
        cli.run_stage(_raise(exc), {})
    assert info.value is exc
    assert capsys.readouterr().err == ""


def test_result_is_shown_and_returned():
    shown = []
    assert cli.run_stage(lambda cfg: cfg["x"] + 1, {"x": 41}, show=shown.append) == 42
    assert shown == [42]
    assert cli.run_stage(lambda cfg: "no show", {}) == "no show"


def test_fail_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.fail("first line\n   second line")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: first line second line\n"


# ---- overrides Hydra cannot parse or apply: one line and exit code 2 too (issue 13)


PARSE = "error: command line: Error parsing override"
UNKNOWN = "error: command line: Could not override"


@pytest.mark.parametrize(
    ("stage", "override", "expected"),
    [
        ("prepare", "data.split.folds", f"{PARSE} 'data.split.folds'"),
        ("prepare", "data.split.fold=3", f"{UNKNOWN} 'data.split.fold'."),
        ("prepare", "data=nope", "error: command line: In 'config': Could not find 'data/nope'"),
        ("postprocess", "crf.theta_alpha", f"{PARSE} 'crf.theta_alpha'"),
        ("postprocess", "crf.theta=3", f"{UNKNOWN} 'crf.theta'."),
    ],
)
def test_unparsable_or_unknown_override_is_one_line_and_exit_2(
    tmp_path, stage, override, expected
) -> None:
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", f"crf_rnn_3d.experiments.{stage}", override],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # Hydra wrote no run folder
