"""The one command-line wrapper of every stage (prepare, train, evaluate, cross-validate, report,
post-process): run a plain function of the config, show its result, and turn a user error (a
bad setting or file) into one line on stderr and exit code 2. Anything else is a bug and keeps
its traceback.

    @hydra_app("config")          # @hydra.main on the packaged configs, overrides checked first
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


def check_overrides(config_name: str, overrides: list[str]) -> None:
    """Composes ``config_name`` with the command line's overrides once before Hydra runs the
    app, so that an override Hydra cannot parse (``crf.theta_alpha`` without a value) or apply
    (a key the config does not have) is one line and exit code 2, like every other user error,
    instead of Hydra's own report and exit code 1. Sweeps (``fold=0,1,2``) are parsed but not
    composed (Hydra's launcher expands them)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from crf_rnn_3d import CONFIG_MODULE

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        fail(f"command line: {_first_sentence(exc)}")
    plain_overrides = [o.input_line for o in parsed if not o.is_sweep_override()]
    if GlobalHydra.instance().is_initialized():
        return  # inside another Hydra app (tests): leave the composition to it
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            compose(config_name, overrides=plain_overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        fail(f"command line: {_first_sentence(exc)}")
    finally:
        GlobalHydra.instance().clear()


def _first_sentence(exc: BaseException) -> str:
    """The first two lines of Hydra's message (what failed, and its hint), as one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(exc).__name__


def hydra_app(config_name: str) -> Callable:
    """``@hydra.main`` on the packaged configs, with :func:`check_overrides` first: the
    decorator of every stage's ``main``."""
    import functools

    import hydra

    from crf_rnn_3d import CONFIG_PATH

    def wrap(task: Callable) -> Callable:
        app = hydra.main(config_path=CONFIG_PATH, config_name=config_name, version_base="1.3")(task)

        @functools.wraps(task)
        def entry(cfg_passthrough: object = None) -> object:
            if cfg_passthrough is not None:
                return app(cfg_passthrough)
            from hydra._internal.utils import get_args_parser

            args, _ = get_args_parser().parse_known_args()
            if not (args.help or args.hydra_help or args.info or args.shell_completion):
                check_overrides(config_name, list(args.overrides))
            return app()

        return entry

    return wrap
