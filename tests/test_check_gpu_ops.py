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
    (x,) = cumsum["inputs"]["x"]
    assert (x["dtype"], x["shape"]) == ("float32", [None])
    assert x["name"].endswith(":0")  # the producer's output, for metadata_tensors
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


def test_shape_arithmetic_of_unknown_length_is_metadata_per_voxel_integers_are_not(check):
    """The gradient of an einsum with broadcast batch axes adds an offset to the reduction axes
    that BroadcastGradientArgs returns: an int32 AddV2 of unknown traced length, but at most
    rank-many elements (it feeds Sum's reduction_indices). The check once reported it as a large
    tensor in host memory; derived from shapes only, it is metadata. An int32 AddV2 on
    tf.range(size), computed from the same kind of scalar, is per element and still reported."""

    @tf.function(input_signature=[tf.TensorSpec([2, None, 3], tf.float32)])
    def fn(x):
        w = tf.ones([3, 3])
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = tf.einsum("...k,lk->...l", x, w)
        per_element = tf.range(tf.size(x)) + 1
        return tape.gradient(y, [x, w]), per_element

    records = check.graph_ops(fn.get_concrete_function().graph, "fn")

    def registry(op_type, device):  # int32 arithmetic in host memory, as in the GPU build
        if op_type == "AddV2":
            return [{"constraints": {"T": {"int32"}}, "host_memory": ["x", "y", "z"]}]
        return [{"constraints": {}, "host_memory": []}]

    adds = [r for r in records if r["type"] == "AddV2" and r["attrs"]["T"] == "int32"]
    grad_adds = [r for r in adds if "einsum" in r["name"]]
    range_adds = [r for r in adds if "einsum" not in r["name"]]
    assert grad_adds and len(range_adds) == 1
    # each alone: unknown length, so reported without the derivation
    assert all("host memory" in check.check_op(r, "GPU", registry) for r in adds)
    metadata = check.metadata_tensors(records)
    assert all(check.check_op(r, "GPU", registry, metadata) == "" for r in grad_adds)
    assert "host memory" in check.check_op(range_adds[0], "GPU", registry, metadata)
    rows = [r for r in check.check(records, "GPU", registry) if r["type"] == "AddV2"]
    assert len(rows) == 1 and "host memory" in rows[0]["problem"]
