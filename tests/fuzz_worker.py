"""Runs fuzz cases of the lattice op and the CRF layer, one JSON case per stdin line, one JSON
answer per stdout line (tests/test_fuzz_ops.py drives it in a subprocess, so that a crash of
the compiled op is seen as the death of this process, not of pytest).

A case (every key required):
  op:       "lattice" (Lattice(features).filter), "permutohedral" (permutohedral_filter),
            "separable" (separable_filter with Gaussian taps), "crf" (CrfRnn called on
            [unaries, image]) or "crf_fused" (the same with fused_inference=True)
  batch, spatial, f, c: B, the spatial shape (entries may be 0), F feature (or image) channels
            and C value channels (the CRF's classes)
  dtype:    "float16" | "float32" | "float64" | "int32", the dtype of every array input
  width:    kernel width: features are divided by it; the Gaussian taps' sigma; every theta of
            the CRF
  bad:      null or [input name, "nan" | "inf" | "-inf", "one" | "all"]: a non-finite value
            placed in that input ("features", "values", "taps", "unaries", "image")
  mismatch: null or "spatial" | "batch" | "rank" | "taps": the second input (values, image;
            for "taps" the separable filter's number of tap sequences) gets a wrong shape
  reverse:  the lattice filter's adjoint; seed: of the random inputs

An answer: {"status": "ok", "shape", "expected_shape", "finite", "dtype"} or
{"status": "error", "type", "documented", "message"}; documented is true for the errors the
API documents (tf.errors.InvalidArgumentError, ResourceExhaustedError, ValueError, TypeError).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from crf_rnn_3d.crf import CrfRnn
from crf_rnn_3d.lattice_op import (
    Lattice,
    gaussian_taps,
    permutohedral_filter,
    separable_filter,
)

DOCUMENTED = (
    tf.errors.InvalidArgumentError,
    tf.errors.ResourceExhaustedError,
    ValueError,
    TypeError,
)


def _place(array: np.ndarray, kind: str, where: str, rng: np.random.Generator) -> np.ndarray:
    value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
    array = array.astype(np.float64)
    if array.size == 0:
        return array
    if where == "all":
        array[...] = value
    else:
        array.flat[int(rng.integers(array.size))] = value
    return array


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int32":
        # NaN/Inf have no integer form; what reaches the op is whatever numpy makes of them,
        # silenced: the op must still answer with finite numbers or a documented error.
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(array, nan=0, posinf=2**31 - 1, neginf=-(2**31)).astype(np.int32)
    return array.astype(dtype)


def build_inputs(case: dict) -> dict[str, np.ndarray]:
    """The case's arrays (in the case's dtype), keyed by input name."""
    rng = np.random.default_rng(case["seed"])
    batch, spatial = case["batch"], list(case["spatial"])
    shape = [batch, *spatial]
    grid = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in spatial), indexing="ij")
    positions = np.stack(grid, axis=-1) if spatial else np.zeros([0])
    first = rng.normal(size=[*shape, case["f"]])
    if case["op"] in ("lattice", "permutohedral") and spatial:
        # positions and intensities, divided by the width (the layer's own features)
        pos = np.broadcast_to(positions, [batch, *spatial, len(spatial)])
        first = np.concatenate([pos, first], axis=-1)[..., : case["f"]] / case["width"]
    second_shape = [*shape, case["c"]]
    mismatch = case["mismatch"]
    if mismatch == "spatial":
        second_shape[1] += 1
    elif mismatch == "batch":
        second_shape[0] += 1
    elif mismatch == "rank":
        second_shape.insert(1, 2)
    second = rng.uniform(-1.0, 1.0, size=second_shape)
    if case["op"] in ("lattice", "permutohedral"):
        arrays = {"features": first, "values": second}
    elif case["op"] == "separable":
        arrays = {"values": second}
    else:
        arrays = {"unaries": second * 3.0, "image": first}
    bad = case["bad"]
    if bad is not None and bad[0] in arrays:
        arrays[bad[0]] = _place(arrays[bad[0]], bad[1], bad[2], rng)
    return {name: _cast(arr, case["dtype"]) for name, arr in arrays.items()}


def run_case(case: dict) -> dict:
    op = case["op"]
    if op == "_abort":  # the harness's own check: a crash must be seen as one
        os.abort()
    arrays = build_inputs(case)
    if op == "lattice":
        out = Lattice(arrays["features"]).filter(arrays["values"], reverse=case["reverse"])
        expected = arrays["values"].shape
    elif op == "permutohedral":
        out = permutohedral_filter(arrays["values"], arrays["features"], reverse=case["reverse"])
        expected = arrays["values"].shape
    elif op == "separable":
        values = arrays["values"]
        axes = list(case["spatial"]) + (["extra"] if case["mismatch"] == "taps" else [])
        taps = []
        for n in axes:
            length = n if isinstance(n, int) else 1
            taps.append(gaussian_taps(case["width"], 4.0, length))
        if case["bad"] is not None and case["bad"][0] == "taps" and taps:
            value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[case["bad"][1]]
            taps[0] = tf.constant([value] * len(taps[0]), tf.float64)
        out = separable_filter(values, taps)
        expected = values.shape
    else:
        layer = CrfRnn(
            theta_alpha=case["width"],
            theta_beta=case["width"],
            theta_gamma=case["width"],
            num_iterations=2,
            fused_inference=op == "crf_fused",
        )
        out = layer([arrays["unaries"], arrays["image"]], training=False)
        expected = arrays["unaries"].shape
    result = np.asarray(out.numpy() if hasattr(out, "numpy") else out)
    return {
        "status": "ok",
        "shape": list(result.shape),
        "expected_shape": list(expected),
        "finite": bool(np.all(np.isfinite(result))),
        "dtype": str(result.dtype),
    }


def answer(case: dict) -> dict:
    try:
        return run_case(case)
    except Exception as err:  # reported to the test, which judges it
        message = str(getattr(err, "message", "") or err)
        return {
            "status": "error",
            "type": f"{type(err).__module__}.{type(err).__qualname__}",
            "documented": isinstance(err, DOCUMENTED),
            "message": " ".join(message.split())[:2000],
            "traceback_tail": traceback.format_exc().strip().splitlines()[-1][:500],
        }


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(answer(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
