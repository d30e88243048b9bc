"""Proof of GPU placement without a GPU (`make check-gpu-ops`, docs/benchmarks.md).

Two steps, in two environments of the same TensorFlow version (2.21.0):

1. ``trace`` (the project's .venv, CPU build): traces a CrfRnn training step (forward and
   gradients, learnt widths so that the features' gradient is in it, and an inference call) and
   the TensorFlow part of a ``dense_crf`` call, with ``backend="tf"``, and writes every op of the
   traced graphs (nested functions included) to JSON: its type, its type attributes and, per
   argument, the dtype and static shape of each tensor.
2. ``registry`` (.venv-gpu, the GPU build, which installs and imports on a CPU-only machine):
   looks each op up in TensorFlow's kernel registry and checks that a GPU kernel exists for the
   dtypes used. A GPU kernel that keeps an argument in host memory is accepted only where the
   traced tensor is small (a scalar, or at most ``SMALL_HOST_ELEMENTS`` elements known at trace
   time, such as a shape or an axis); a large or unknown-sized tensor in host memory would be a
   copy between host and device on every call, which is what the check exists to rule out.

The op list comes from the traced graphs, not from a hand-kept list, so an op added to the TF
path is checked the next time this runs. Exit status: 0 when every op passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SMALL_HOST_ELEMENTS = 64
# Ops that exist only while a graph is built or that the runtime handles itself (no kernel of
# their own is looked up for them on the device).
STRUCTURAL = {"Placeholder", "NoOp"}
# Ops whose tensors are shapes, axes or reduction indices by definition (rank-sized vectors):
# TensorFlow keeps these in host memory on a GPU on purpose, whatever their traced length.
SHAPE_OPS = {"BroadcastGradientArgs", "ConcatOffset", "Shape", "ShapeN", "Size", "Rank"}
# Arguments that hold an axis, a shape or a count by definition (at most rank-many elements,
# whatever their traced length): in host memory on a GPU by TensorFlow's design.
METADATA_ARGS = {
    "axis",
    "dim",
    "dims",
    "shape",
    "multiples",
    "perm",
    "k",
    "num_segments",
    "begin",
    "end",
    "strides",
    "size",
    "paddings",
    "reduction_indices",
    "start",
    "limit",
    "delta",
    "s0",
    "s1",
}
# Ops whose output is no larger than their inputs' sizes (elementwise arithmetic with
# broadcasting, casts, slices, reshapes, concatenation, packing, gathers). Applied to shapes and
# axes only, they give shapes and axes again: e.g. a gradient's reduction axes, the outputs of
# BroadcastGradientArgs plus an offset, whose length is known only at run time but is at most
# the rank. Range, Fill, BroadcastTo and Tile are not here: from a scalar they make a tensor of
# any size.
SIZE_BOUNDED = {
    "AddV2",
    "Sub",
    "Mul",
    "Neg",
    "Maximum",
    "Minimum",
    "FloorDiv",
    "FloorMod",
    "Cast",
    "Identity",
    "StridedSlice",
    "Slice",
    "Reshape",
    "ExpandDims",
    "Squeeze",
    "ConcatV2",
    "Pack",
    "GatherV2",
    "Equal",
    "NotEqual",
    "Less",
    "LessEqual",
    "Greater",
    "GreaterEqual",
    "SelectV2",
}


# ---------------------------------------------------------------------------------------------
# 1. trace (needs the project installed, CPU build of TensorFlow)


def _arg_tensors(op: Any, args: Any, tensors: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """Maps each argument name of an op def onto the tensors it covers."""
    out: dict[str, list[dict[str, Any]]] = {}
    pos = 0
    for arg in args:
        if arg.number_attr:
            count = int(op.get_attr(arg.number_attr))
        elif arg.type_list_attr:
            count = len(op.get_attr(arg.type_list_attr))
        else:
            count = 1
        out[arg.name] = [
            {
                "name": t.name,
                "dtype": t.dtype.name,
                "shape": None if t.shape.rank is None else t.shape.as_list(),
            }
            for t in tensors[pos : pos + count]
        ]
        pos += count
    return out


def _type_attrs(op: Any) -> dict[str, Any]:
    from tensorflow.python.framework import dtypes

    attrs: dict[str, Any] = {}
    for name, value in op.node_def.attr.items():
        kind = value.WhichOneof("value")
        if kind == "type":
            attrs[name] = dtypes.as_dtype(value.type).name
        elif kind == "list" and len(value.list.type):
            attrs[name] = [dtypes.as_dtype(t).name for t in value.list.type]
    return attrs


def _function_names(op: Any) -> list[str]:
    names = []
    for value in op.node_def.attr.values():
        kind = value.WhichOneof("value")
        if kind == "func":
            names.append(value.func.name)
        elif kind == "list":
            names.extend(f.name for f in value.list.func)
    return names


def _nested_graph(graph: Any, name: str) -> Any:
    """The FuncGraph of a function called from ``graph`` (searched up the outer graphs)."""
    while graph is not None:
        function = graph._functions.get(name)  # TF keeps them only here
        if function is not None:
            return getattr(function, "graph", None) or getattr(function, "_graph", None)
        graph = getattr(graph, "outer_graph", None)
    return None


def graph_ops(graph: Any, where: str) -> list[dict[str, Any]]:
    """Every op of a traced graph and of the functions it calls, once per function."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    stack = [(graph, where)]
    while stack:
        current, label = stack.pop()
        for op in current.get_operations():
            op_def = op.op_def
            records.append(
                {
                    "type": op.type,
                    "name": op.name,
                    "where": label,
                    "attrs": _type_attrs(op),
                    "inputs": _arg_tensors(op, op_def.input_arg, list(op.inputs)),
                    "outputs": _arg_tensors(op, op_def.output_arg, list(op.outputs)),
                }
            )
            for name in _function_names(op):
                if name in seen:
                    continue
                seen.add(name)
                nested = _nested_graph(current, name)
                if nested is None:
                    raise RuntimeError(f"function {name} called by {op.name} was not found")
                stack.append((nested, f"{label}/{name}"))
    return records


def traced_graphs(backend: str = "tf") -> dict[str, Any]:
    """The graphs the GPU path runs: a CrfRnn training step and inference, and dense_crf's TF
    part, at small static sizes (3-D, two image channels, three classes, batch 2)."""
    import tensorflow as tf

    from crf_rnn_3d.crf import CrfRnn
    from crf_rnn_3d.crf import functional as mf

    shape = [2, 10, 9, 8]
    num_classes, channels = 3, 2
    unaries_spec = tf.TensorSpec([*shape, num_classes], tf.float32)
    image_spec = tf.TensorSpec([*shape, channels], tf.float32)
    layer = CrfRnn(
        spacing=[1.0, 1.0, 2.0],
        theta_alpha=4.0,
        theta_beta=0.5,
        theta_gamma=2.0,
        num_iterations=2,
        learn_theta=True,
        backend=backend,
    )
    layer.build([unaries_spec.shape, image_spec.shape])

    @tf.function(input_signature=[unaries_spec, image_spec])
    def train_step(unaries: tf.Tensor, image: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(unaries)
            logits = layer([unaries, image], training=True)
            loss = tf.reduce_mean(tf.nn.softmax(logits) * image[..., :1])
        return tape.gradient(loss, [unaries, *layer.trainable_variables])

    @tf.function(input_signature=[unaries_spec, image_spec])
    def inference(unaries: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
        return layer([unaries, image], training=False)

    single_unaries = tf.TensorSpec([1, *shape[1:], num_classes], tf.float32)
    single_image = tf.TensorSpec([1, *shape[1:], channels], tf.float32)
    graphs = {
        "CrfRnn training step": train_step.get_concrete_function().graph,
        "CrfRnn inference": inference.get_concrete_function().graph,
    }
    for normalisation in ("symmetric", "mean"):

        @tf.function(input_signature=[single_unaries, single_image])
        def dense(unaries: tf.Tensor, image: tf.Tensor, normalisation: str = normalisation):
            # what dense_crf runs after its NumPy checks (src/crf/dense_crf.py)
            settings = dict(
                spacing=[1.0, 1.0, 1.0],
                theta_alpha=5.0,
                theta_beta=[0.2, 0.2],
                theta_gamma=1.0,
                bilateral_weight=tf.fill([num_classes], 10.0),
                spatial_weight=tf.fill([num_classes], 3.0),
                compatibility=1.0 - tf.eye(num_classes),
                num_iterations=2,
                normalisation=normalisation,
            )
            if backend == "compiled":
                return mf.mean_field_inference(unaries, image, return_logits=False, **settings)
            logits = mf.mean_field(
                unaries,
                image,
                bilateral_filter="lattice",
                spatial_filter="separable",
                backend=backend,
                **settings,
            )
            return tf.nn.softmax(logits)

        graphs[f"dense_crf ({normalisation})"] = dense.get_concrete_function().graph
    return graphs


def trace(out: Path, backend: str) -> list[dict[str, Any]]:
    records = []
    for label, graph in traced_graphs(backend).items():
        records.extend(graph_ops(graph, label))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backend": backend, "ops": records}, indent=1))
    return records


# ---------------------------------------------------------------------------------------------
# 2. registry (any build of TensorFlow; the GPU build for device GPU)


def _small(tensor: dict[str, Any]) -> bool:
    shape = tensor["shape"]
    if shape is None or any(d is None for d in shape):
        return False
    count = 1
    for d in shape:
        count *= d
    return count <= SMALL_HOST_ELEMENTS


def registered_kernels(op_type: str, device: str) -> list[dict[str, Any]]:
    """The kernels of one op on one device type: their dtype constraints and host-memory args."""
    from tensorflow.python.framework import dtypes, kernels

    found = []
    for kernel in kernels.get_registered_kernels_for_op(op_type).kernel:
        # a DEFAULT kernel serves every device type (with its host-memory arguments)
        if kernel.device_type not in (device, "DEFAULT") or kernel.label:
            continue
        constraints = {
            c.name: {dtypes.as_dtype(t).name for t in c.allowed_values.list.type}
            for c in kernel.constraint
        }
        found.append({"constraints": constraints, "host_memory": list(kernel.host_memory_arg)})
    return found


def _fits(kernel: dict[str, Any], attrs: dict[str, Any]) -> bool:
    for name, allowed in kernel["constraints"].items():
        value = attrs.get(name)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not set(values) <= allowed:
            return False
    return True


def metadata_tensors(records: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(graph, tensor name) of every tensor that holds a shape, axes or a count by derivation:
    an output of a SHAPE_OPS op, or of a SIZE_BOUNDED op whose every input is such a tensor or
    small (:func:`_small`). Such a tensor has at most rank-many elements whatever its traced
    length, like a METADATA_ARGS argument. Within one graph (a function's inputs are not
    followed into its body: the rule errs towards reporting)."""
    found: set[tuple[str, str]] = set()
    changed = True
    while changed:
        changed = False
        for record in records:
            where = record["where"]
            outputs = [t for ts in record["outputs"].values() for t in ts if "name" in t]
            if not outputs or all((where, t["name"]) in found for t in outputs):
                continue
            inputs = [t for ts in record["inputs"].values() for t in ts]
            derived = record["type"] in SIZE_BOUNDED and all(
                _small(t) or (where, t.get("name")) in found for t in inputs
            )
            if record["type"] in SHAPE_OPS or derived:
                found.update((where, t["name"]) for t in outputs)
                changed = True
    return found


def check_op(
    record: dict[str, Any],
    device: str,
    registry: Any = registered_kernels,
    metadata: set[tuple[str, str]] | frozenset = frozenset(),
) -> str:
    """'' when the op runs on ``device`` without moving a large tensor through host memory, or
    a one-line reason why not. `metadata`: tensors known to hold shapes or axes
    (:func:`metadata_tensors`), which may stay in host memory whatever their traced length."""
    if record["type"] in STRUCTURAL:
        return ""
    tensors = {**record["inputs"], **record["outputs"]}
    strings = [t["dtype"] == "string" for ts in tensors.values() for t in ts]
    if strings and all(strings):
        return ""  # messages (of Assert): strings never live on a GPU, by design
    candidates = [k for k in registry(record["type"], device) if _fits(k, record["attrs"])]
    if not candidates:
        used = ", ".join(f"{k}={v}" for k, v in sorted(record["attrs"].items())) or "no dtypes"
        return f"no {device} kernel for {used}"
    if device == "CPU" or record["type"] in SHAPE_OPS:
        return ""  # host memory is the device's own memory on a CPU
    problems = []
    for kernel in candidates:
        large = [
            arg
            for arg in kernel["host_memory"]
            if arg not in METADATA_ARGS
            and any(
                not _small(t) and (record["where"], t.get("name")) not in metadata
                for t in tensors.get(arg, [])
            )
        ]
        if not large:
            return ""
        problems.append(large)
    args = ", ".join(sorted({a for p in problems for a in p}))
    return f"{device} kernel keeps large or unknown-sized {args} in host memory"


def check(
    records: list[dict[str, Any]], device: str, registry: Any = registered_kernels
) -> list[dict[str, Any]]:
    """One row per distinct (op type, dtypes): where it was seen and what the registry says."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    metadata = metadata_tensors(records)
    for record in records:
        dtypes_used = ", ".join(f"{k}={v}" for k, v in sorted(record["attrs"].items()))
        reason = check_op(record, device, registry, metadata)
        key = (record["type"], dtypes_used)
        row = rows.setdefault(
            key,
            {"type": record["type"], "dtypes": dtypes_used, "problem": "", "seen_in": set()},
        )
        row["seen_in"].add(record["where"].split("/")[0])
        if reason and not row["problem"]:
            row["problem"] = reason
    return sorted(rows.values(), key=lambda r: (r["problem"] == "", r["type"], r["dtypes"]))


def markdown(rows: list[dict[str, Any]], device: str, version: str) -> str:
    bad = [r for r in rows if r["problem"]]
    lines = [
        f"TensorFlow {version}, device type {device}: {len(rows)} distinct (op, dtypes) in the "
        f"traced graphs, {len(bad)} without a {device} kernel that keeps large tensors on it.",
        "",
        "| op | dtypes | result | traced in |",
        "|---|---|---|---|",
    ]
    for r in rows:
        result = r["problem"] or "ok"
        lines.append(
            f"| {r['type']} | {r['dtypes']} | {result} | {', '.join(sorted(r['seen_in']))} |"
        )
    return "\n".join(lines) + "\n"


def registry_main(ops_file: Path, device: str, out: Path | None) -> int:
    import tensorflow as tf

    data = json.loads(ops_file.read_text())
    rows = check(data["ops"], device)
    text = markdown(rows, device, tf.__version__)
    if out is not None:
        out.write_text(text)
    print(text)
    bad = [r for r in rows if r["problem"]]
    if bad:
        print(f"FAILED: {len(bad)} (op, dtypes) would not run on the {device} as traced")
        return 1
    print(f"passed: every op of the traced {data['backend']!r} path has a {device} kernel")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_trace = sub.add_parser("trace", help="trace the GPU path and write its ops as JSON")
    p_trace.add_argument("--out", type=Path, required=True)
    p_trace.add_argument("--backend", default="tf", choices=("tf", "compiled"))
    p_reg = sub.add_parser("registry", help="check traced ops against the kernel registry")
    p_reg.add_argument("ops", type=Path)
    p_reg.add_argument("--device", default="GPU")
    p_reg.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "trace":
        records = trace(args.out, args.backend)
        print(f"{len(records)} ops traced ({args.backend} path) -> {args.out}")
        return 0
    return registry_main(args.ops, args.device, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
