"""The one command-line wrapper of every stage (prepare, train, evaluate, cross-validate, report,
post-process): run a plain function of the config, show its result, and turn a user error (a
bad setting or file) into one line on stderr and exit code 2. Anything else is a bug and keeps
its traceback.

    @hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        run_stage(train, cfg, show=lambda result: print(result.run_dir))
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from crf_rnn_3d.datasets.errors import ConfigError, DataError, DatasetNotFoundError

T = TypeVar("T")

# Errors that name a setting or a file the user gave. The model's own setting error is added
# when the model module is loaded: a stage that never imported it cannot have raised it.
BASE_USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, DatasetNotFoundError)
MODEL_MODULE = "crf_rnn_3d.models.vnet"


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types reported as one line with exit code 2."""
    model = sys.modules.get(MODEL_MODULE)
    extra = (model.VNetConfigError,) if model is not None else ()
    return BASE_USER_ERRORS + extra


def fail(message: str) -> None:
    """Prints ``error: <message>`` (one line) to stderr and exits with code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def run_stage(stage: Callable[..., T], cfg: object, show: Callable[[T], None] | None = None) -> T:
    """Runs ``stage(cfg)``; a user error exits 2 with one line, otherwise ``show(result)``."""
    try:
        result = stage(cfg)
    except user_errors() as exc:
        fail(str(exc))
    if show is not None:
        show(result)
    return result
