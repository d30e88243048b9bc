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
