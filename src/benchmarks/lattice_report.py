"""scripts/bench_lattice.py's report: the machine description and the Markdown tables that
docs/benchmarks.md quotes, from its results dict (one entry per reference and part)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path


def machine() -> dict:
    """The machine and the versions a result was measured with (CPU, cores, memory, load,
    Python, TensorFlow, pydensecrf2)."""
    info = {"python": platform.python_version(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    info["load_avg_at_start"] = os.getloadavg()
    for dist in ("tensorflow-cpu", "tensorflow", "pydensecrf2"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    """The Markdown tables of docs/benchmarks.md from a bench_lattice results dict (the JSON
    written to results/bench_lattice/): per reference, the CRF-shaped comparison with
    pydensecrf2, threads, the filter kernel against TensorFlow ops and size scaling."""
    lines = []
    refs = results["references"]
    t = results["threads"]
    lines.append(
        f"#### Per reference (our op with {t} intra-op threads unless stated; "
        "pydensecrf2 is single-threaded)\n"
    )
    head = (
        "| reference | shape | F | voxels | lattice points (per voxel) | lattice MiB | build s "
        "| filter C=2 s | filter C=5 s | peak RSS increase MiB | max err | RMS err |"
    )
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in refs.items():
        o = r.get("ours", {})
        e = r.get("error", {})
        lines.append(
            f"| {name} | {' x '.join(map(str, r['shape']))} | {o.get('features', '-')} "
            f"| {r['voxels']:,} | {o.get('lattice_points', 0):,} "
            f"({_f(o.get('points_per_voxel'), '.2f')}) | {_f(o.get('lattice_mib'), '.0f')} "
            f"| {_f(o.get('build_s'), '.2f')} | {_f(o.get('filter_c2_s'), '.2f')} "
            f"| {_f(o.get('filter_c5_s'), '.2f')} | {_f(o.get('rss_increase_mib'), '.0f')} "
            f"| {_f(e.get('max_error'), '.2e')} | {_f(e.get('rms_error'), '.2e')} |"
        )
    lines.append("")
    lines.append("#### CRF-shaped comparison with pydensecrf2\n")
    head = (
        "| reference | labels | ours: build + 10 filters s | pydensecrf2: setup s | "
        "inference(5) s | total s | peak RSS increase MiB (ours / theirs) | ratio ours/theirs "
        "| goal <= 0.5 | ours, both kernels s | ratio, both kernels |"
    )
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in refs.items():
        o, d = r.get("ours"), r.get("dcrf")
        if not o or not d:
            continue
        ratio = o["crf_s"] / d["total_s"]
        ratio_both = o["crf_both_s"] / d["total_s"]
        lines.append(
            f"| {name} | {r['labels']} | {o['crf_s']:.2f} | {d['setup_s']:.2f} "
            f"| {d['inference5_s']:.2f} | {d['total_s']:.2f} "
            f"| {o['rss_increase_mib']:.0f} / {d['rss_increase_mib']:.0f} | **{ratio:.2f}** "
            f"| {'met' if ratio <= 0.5 else 'NOT met'} | {o['crf_both_s']:.2f} "
            f"| {ratio_both:.2f} |"
        )
    lines.append("")
    if any("threads_1" in r for r in refs.values()):
        lines.append("#### Threads (our op)\n")
        head = (
            "| reference | threads | build s | filter C=2 s | filter C=5 s | build + 10 filters s "
            "| ratio to pydensecrf2 | speed-up 1 -> 2 (build + 10 filters) |"
        )
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for name, r in refs.items():
            one = r.get("threads_1")
            two = r.get("ours")
            d = r.get("dcrf")
            for label, o in (("1", one), (str(t), two)):
                if not o:
                    continue
                ratio = f"{o['crf_s'] / d['total_s']:.2f}" if d else "-"
                speed = f"{one['crf_s'] / two['crf_s']:.2f}x" if (one and two and o is two) else ""
                lines.append(
                    f"| {name} | {label} | {o['build_s']:.2f} | {o['filter_c2_s']:.3f} "
                    f"| {o['filter_c5_s']:.3f} | {o['crf_s']:.2f} | {ratio} | {speed} |"
                )
        lines.append("")
    tfops = {name: r["tfops"] for name, r in refs.items() if "tfops" in r}
    if tfops:
        lines.append(
            "#### Filter kernel: our C++ kernel against the same filter in TensorFlow ops "
            "(gather, segment_sum) on the same lattice tensors\n"
        )
        head = (
            "| reference | C | threads | C++ kernel s | TF ops s | TF ops / kernel "
            "| max relative difference |"
        )
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for name, r in tfops.items():
            lines.append(
                f"| {name} | {r['channels']} | {r['threads']} | {r['kernel_filter_s']:.3f} "
                f"| {r['tf_ops_filter_s']:.3f} | {r['tf_ops_over_kernel']:.1f}x "
                f"| {r['max_relative_difference']:.1e} |"
            )
        lines.append("")
    sc = results.get("scaling")
    if sc:
        lines.append(
            f"#### Size scaling (crops of the promise reference, {sc['threads']} threads, C = 2)\n"
        )
        head = (
            "| crop (z x y x x) | voxels | lattice points | build s | filter s "
            "| build ns/voxel | filter ns/voxel |"
        )
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for s in sc["sizes"]:
            lines.append(
                f"| {' x '.join(map(str, s['shape']))} | {s['voxels']:,} "
                f"| {s['lattice_points']:,} | {s['build_s']:.3f} | {s['filter_c2_s']:.3f} "
                f"| {s['build_ns_per_voxel']:.0f} | {s['filter_ns_per_voxel']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)
