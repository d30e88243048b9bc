"""The GPU-placement check (scripts/check_gpu_ops.py, `make check-gpu-ops`): its graph walk and
its registry rules, against graphs and kernel lists built by hand here. The GPU build's registry
itself is only read by `make check-gpu-ops` (a large download), not in `make test`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tensorflow as tf

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_gpu_ops.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_gpu_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(op_type, attrs, inputs=None, outputs=None):
    return {
        "type": op_type,
        "where": "test",
        "attrs": attrs,
        "inputs": inputs or {},
        "outputs": outputs or {},
    }


def _tensor(dtype, shape):
    return {"dtype": dtype, "shape": shape}


def test_graph_walk_reaches_ops_inside_loops_and_branches(check):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def fn(x):
        def body(i, acc):
            return i + 1, acc + tf.math.cumsum(x)

        _, out = tf.while_loop(lambda i, acc: i < 3, body, [tf.constant(0), tf.zeros_like(x)])
        return tf.cond(tf.reduce_sum(out) > 0, lambda: tf.math.cumprod(out), lambda: out)

    records = check.graph_ops(fn.get_concrete_function().graph, "fn")
    types = {r["type"] for r in records}
    assert {"Cumsum", "Cumprod"} <= types  # only inside the loop body and a branch
    cumsum = next(r for r in records if r["type"] == "Cumsum")
    assert cumsum["attrs"]["T"] == "float32"
    assert cumsum["inputs"]["x"] == [_tensor("float32", [None])]
    assert cumsum["where"].startswith("fn/")


def test_no_kernel_for_the_dtype_is_reported(check):
    def registry(op_type, device):
        return [{"constraints": {"T": {"float32", "int64"}}, "host_memory": []}]

    assert check.check_op(_record("Unique", {"T": "int64"}), "GPU", registry) == ""
    reason = check.check_op(_record("Unique", {"T": "int16"}), "GPU", registry)
    assert reason == "no GPU kernel for T=int16"
    assert "no GPU kernel" in check.check_op(_record("Foo", {}), "GPU", lambda *a: [])


def test_large_tensors_in_host_memory_are_reported_small_ones_and_axes_are_not(check):
    def registry(op_type, device):
        return [{"constraints": {"T": {"int32"}}, "host_memory": ["x", "y", "z", "axis"]}]

    small = _record(
        "AddV2",
        {"T": "int32"},
        {"x": [_tensor("int32", [5])], "y": [_tensor("int32", [])]},
        {"z": [_tensor("int32", [5])]},
    )
    assert check.check_op(small, "GPU", registry) == ""
    large = _record(
        "AddV2",
        {"T": "int32"},
        {"x": [_tensor("int32", [2, 64, 64])], "y": [_tensor("int32", [])]},
        {"z": [_tensor("int32", [2, 64, 64])]},
    )
    assert "x, z in host memory" in check.check_op(large, "GPU", registry)
    unknown = _record("AddV2", {"T": "int32"}, {"x": [_tensor("int32", [None])]})
    assert "host memory" in check.check_op(unknown, "GPU", registry)
    # an axis argument is rank-sized by definition, whatever its traced length
    axis = _record("Cumsum", {"T": "int32"}, {"axis": [_tensor("int32", [None])]})
    assert check.check_op(axis, "GPU", registry) == ""
    # a CPU's host memory is its own memory
    assert check.check_op(large, "CPU", registry) == ""


def test_a_kernel_without_host_memory_wins_over_one_with(check):
    def registry(op_type, device):
        return [
            {"constraints": {"T": {"int32"}}, "host_memory": ["x"]},
            {"constraints": {}, "host_memory": []},
        ]

    large = _record("Identity", {"T": "int32"}, {"x": [_tensor("int32", [4096])]})
    assert check.check_op(large, "GPU", registry) == ""


def test_the_cpu_registry_has_every_op_of_the_compiled_path(check):
    """Against the real registry of this (CPU) build: the compiled path's ops, Crf3d kernels
    included, all have CPU kernels, and the check says so; the rules above are what differ on
    a GPU."""
    records = []
    for label, graph in check.traced_graphs("compiled").items():
        records.extend(check.graph_ops(graph, label))
    types = {r["type"] for r in records}
    assert {"Crf3dLatticeBuild", "Crf3dLatticeFilter", "Crf3dMeanField"} <= types
    rows = check.check(records, "CPU")
    assert [r for r in rows if r["problem"]] == []


def test_the_tf_path_uses_no_compiled_op(check):
    records = []
    for label, graph in check.traced_graphs("tf").items():
        records.extend(check.graph_ops(graph, label))
    compiled = sorted({r["type"] for r in records if r["type"].startswith("Crf3d")})
    assert compiled == []
    assert {"CrfRnn training step", "dense_crf (mean)"} <= {
        r["where"].split("/")[0] for r in records
    }
