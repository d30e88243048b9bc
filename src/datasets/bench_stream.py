"""Measures the tf.data pipeline on a prepared cache: seconds a case and peak memory.

    python -m crf_rnn_3d.datasets.bench_stream data=synthetic_brats cases=6 training=true passes=2

Arguments are Hydra-style overrides of the prepare app's config plus ``cases`` (how many of the
cached cases, in sorted order), ``training`` (augment and shuffle) and ``passes``. Prints one
line; peak RSS is the process's (``resource.getrusage``), TensorFlow included.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping

from hydra import compose, initialize_config_module

from crf_rnn_3d import CONFIG_MODULE
from crf_rnn_3d.datasets import cache
from crf_rnn_3d.datasets.tfdata import make_dataset


def measure(data_cfg: Mapping, n_cases: int, training: bool, passes: int) -> dict:
    """Streams ``n_cases`` cached cases ``passes`` times; returns seconds a case and peak RSS."""
    manifest = cache.load_manifest(data_cfg.processed) or {"cases": {}}
    ids = sorted(manifest["cases"])[:n_cases]
    ds = make_dataset(data_cfg.processed, ids, data_cfg.loader, training=training)
    start, n = time.perf_counter(), 0
    for _ in range(passes):
        for image, _label in ds:
            n += int(image.shape[0])
    return {
        "cases": len(ids),
        "elements": n,
        "seconds_per_case": (time.perf_counter() - start) / max(n, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str]) -> None:
    own = {"cases": "2", "training": "false", "passes": "2"}
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in own:
            own[key] = value
        else:
            overrides.append(arg)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    result = measure(
        cfg.data, int(own["cases"]), own["training"].lower() == "true", int(own["passes"])
    )
    print(
        f"{cfg.data.name}: {result['cases']} cases, training={own['training']}, "
        f"{result['elements']} elements, {result['seconds_per_case']:.2f} s a case, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
