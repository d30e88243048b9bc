"""`make bench`'s summary (scripts/bench_all.py): one table of every figure the README quotes,
each our time or memory over the peer's from the same run, beside the goal it is held to.

Each part's runner writes its own JSON (scripts/bench_crf.py pydensecrf --json, scripts/
bench_lattice.py --out, ...); the functions here only read those dicts, so they are tested on
dicts made by hand (tests/test_bench_summary.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One figure: ours and the peer's (seconds, MiB or a fraction), their ratio and the goal."""

    part: str
    case: str
    figure: str
    ours: float
    peer: float | None
    unit: str
    goal: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.peer is None or self.peer == 0:
            return None
        return self.ours / self.peer


def _at_most(limit: float) -> Callable[[float | None], bool | None]:
    return lambda r: None if r is None else r <= limit


def _row(
    part: str, case: str, figure: str, ours: float, peer: float | None, unit: str, goal: float
) -> Row:
    """A ratio row held to `ratio <= goal`."""
    row = Row(part, case, figure, ours, peer, unit, f"<= {goal:g}x")
    return Row(**{**row.__dict__, "met": _at_most(goal)(row.ratio)})


def dense_crf_rows(two: Mapping, one: Mapping | None = None) -> list[Row]:
    """dense_crf against pydensecrf2 (scripts/bench_crf.py pydensecrf --json): the median total
    time with TensorFlow's default threads (goal 0.25x) and with one thread (goal 0.5x, from
    `one`, a run with --threads 1), the peak memory (goal: at most the peer's) and the labels'
    agreement with pydensecrf2 in its mode (goal: at least 99.9%)."""
    rows = []
    for case, r in two["cases"].items():
        peer_s = statistics.median(r["seconds"]["pydensecrf2"])
        for mode in ("ours-pydensecrf-mode", "ours-default-mode"):
            if mode not in r["seconds"]:
                continue
            label = mode.removeprefix("ours-")
            ours_s = statistics.median(r["seconds"][mode])
            rows.append(_row("dense_crf", case, f"time, {label}", ours_s, peer_s, "s", 0.25))
            if one is not None and case in one["cases"] and mode in one["cases"][case]["seconds"]:
                o = one["cases"][case]
                rows.append(
                    _row(
                        "dense_crf",
                        case,
                        f"time, {label}, 1 thread",
                        statistics.median(o["seconds"][mode]),
                        statistics.median(o["seconds"]["pydensecrf2"]),
                        "s",
                        0.5,
                    )
                )
            rows.append(
                _row(
                    "dense_crf",
                    case,
                    f"peak memory, {label}",
                    r["peak_mib"][mode],
                    r["peak_mib"]["pydensecrf2"],
                    "MiB",
                    1.0,
                )
            )
        agree = r["agreement"].get("ours-pydensecrf-mode")
        if agree is not None:
            rows.append(
                Row(
                    "dense_crf",
                    case,
                    "labels equal to pydensecrf2's, pydensecrf mode",
                    agree,
                    None,
                    "fraction",
                    ">= 0.999",
                    agree >= 0.999,
                )
            )
    return rows


def lattice_rows(results: Mapping) -> list[Row]:
    """The lattice op against pydensecrf2 (scripts/bench_lattice.py's JSON): a build and 10
    filter calls against its setup and 5-iteration inference (goal 0.5x), and peak memory."""
    rows = []
    for case, r in results["references"].items():
        ours, peer = r.get("ours"), r.get("dcrf")
        if not ours or not peer:
            continue
        figure = "build + 10 filters vs setup + inference(5)"
        rows.append(_row("lattice op", case, figure, ours["crf_s"], peer["total_s"], "s", 0.5))
        rows.append(
            _row(
                "lattice op",
                case,
                "peak memory",
                ours["rss_increase_mib"],
                peer["rss_increase_mib"],
                "MiB",
                1.0,
            )
        )
        one = r.get("threads_1")
        if one:
            rows.append(
                Row(
                    "lattice op",
                    case,
                    "speed-up 1 -> 2 threads (build + 10 filters)",
                    one["crf_s"] / ours["crf_s"],
                    None,
                    "x",
                    ">= 1.8",
                    one["crf_s"] / ours["crf_s"] >= 1.8,
                )
            )
    return rows


def accuracy_rows(results: Mapping, setting: str = "copies=2", min_features: int = 7) -> list[Row]:
    """The lattice's error against the exact filter (scripts/bench_accuracy.py's JSON), for
    F >= min_features: the default's and `setting`'s relative L2 error over pydensecrf2's on the
    same case (goal for the setting: at most 0.5x), and the setting's time over the default's
    (goal: at most 2x)."""
    rows = []
    for r in results["errors"]:
        if r["F"] < min_features or "pydensecrf2" not in r["error"]:
            continue
        case = f"{r['case']}, F = {r['F']}, {r['values']} values"
        peer = r["error"]["pydensecrf2"]
        rows.append(Row("accuracy", case, "error, default", r["error"]["default"], peer, "rel. L2"))
        rows.append(
            _row("accuracy", case, f"error, {setting}", r["error"][setting], peer, "rel. L2", 0.5)
        )
    for r in results["cost"]:
        if r["F"] < min_features:
            continue
        rows.append(
            _row(
                "accuracy",
                f"F = {r['F']}, {r['voxels']:,} voxels",
                f"time, {setting} (build + 10 filters)",
                r["seconds"][setting],
                r["seconds"]["default"],
                "s",
                2.0,
            )
        )
    return rows


def train_rows(results: Mapping) -> list[Row]:
    """A CrfRnn forward + backward in a traced training step (scripts/bench_crf_train.py --json):
    time and peak memory with recompute on over recompute off (goal for the memory: at most
    0.5x)."""
    steps = {(s["case"], s["backend"], s["recompute"]): s for s in results["steps"]}
    rows = []
    for (case, backend, recompute), on in steps.items():
        off = steps.get((case, backend, False))
        if not recompute or off is None or "seconds" not in on or "seconds" not in off:
            continue
        where = f"{case}, {backend}, {results['iterations']} iterations"
        figure = "CrfRnn fwd + bwd, recompute on / off"
        memory = f"peak memory, {figure}"
        rows.append(
            _row("CRF training", where, memory, on["peak_mib"], off["peak_mib"], "MiB", 0.5)
        )
        time_on, time_off = on["seconds"], off["seconds"]
        rows.append(Row("CRF training", where, f"time, {figure}", time_on, time_off, "s"))
    return rows


def _number(x: float, unit: str = "") -> str:
    if unit == "fraction":  # label agreement: 0.99999 must not round to 1
        return f"{100 * x:.3f}%"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.4g}"


def markdown(rows: list[Row], header: Mapping[str, object]) -> str:
    """The summary table: one line per figure, the ratio in bold, and whether its goal is met."""
    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines.append("")
    head = "| part | case | figure | ours | peer | ratio | goal | met |"
    lines += [head, "|" + "---|" * 8]
    for r in rows:
        unit = "" if r.unit == "fraction" else f" {r.unit}"
        peer = "-" if r.peer is None else f"{_number(r.peer, r.unit)}{unit}"
        ratio = "-" if r.ratio is None else f"**{r.ratio:.2f}x**"
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        lines.append(
            f"| {r.part} | {r.case} | {r.figure} | {_number(r.ours, r.unit)}{unit} | {peer} "
            f"| {ratio} | {r.goal} | {met} |"
        )
    return "\n".join(lines) + "\n"
