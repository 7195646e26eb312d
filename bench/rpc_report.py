"""The report of ``bench/rpc.py``: medians, ratios to raw, the targets, a table, profiles."""

from __future__ import annotations

import os
import platform
import pstats
import statistics
import sys
from typing import Any

import msgpack
import zmq

import meshkit

TARGETS = {"seq_p50": ("<=", 1.3), "pipelined": (">=", 0.8), "big": (">=", 0.8)}
Runs = dict[str, dict[str, list[float]]]


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model or platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "meshkit": meshkit.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# (label, per-system key, ratio key, format); a ratio is always meshkit / raw.
METRICS = (
    ("seq p50 (us)", "seq_p50_us", "seq_p50", "{:.0f}"),
    ("seq p99 (us)", "seq_p99_us", "seq_p99", "{:.0f}"),
    ("pipelined (calls/s)", "pipelined_calls_s", "pipelined", "{:,.0f}"),
    ("64 KiB echo (MB/s one way)", "big_MBps", "big", "{:,.1f}"),
)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def summarize(runs: Runs, cpu: Runs) -> dict[str, Any]:
    """Medians per system, and meshkit/raw ratios checked against the targets."""
    result: dict[str, Any] = {}
    for system, values in runs.items():
        result[system] = {k: _median(v) for k, v in values.items() if v}
        result[system]["cpu_us_per_call"] = {k: _median(v) for k, v in cpu[system].items()}
    if "raw" in result and "meshkit" in result:
        raw, mk = result["raw"], result["meshkit"]
        ratios = {r: mk[k] / raw[k] for _, k, r, _ in METRICS if k in raw and k in mk}
        result["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
        # The same ratios taken per repeat (the two systems ran back to back)
        # and then the median: steadier when the machine's load drifts.
        result["paired_ratios"] = {
            r: round(statistics.median(m / w for m, w in zip(runs["meshkit"][k], runs["raw"][k],
                                                              strict=True)), 3)
            for _, k, r, _ in METRICS if runs["raw"][k] and runs["meshkit"][k]
        }
        result["targets"] = {k: f"{op} {bound}" for k, (op, bound) in TARGETS.items()}
        result["meets_targets"] = {
            k: (ratios[k] <= bound if op == "<=" else ratios[k] >= bound)
            for k, (op, bound) in TARGETS.items() if k in ratios
        }
    if "raw" in result:
        raw = result["raw"]
        result["vs_raw"] = {
            system: {r: round(result[system][k] / raw[k], 3) for _, k, r, _ in METRICS
                     if k in raw and k in result[system] and raw[k]}
            for system in runs if system != "raw"}
    return result


def format_table(summary: dict[str, Any], systems: list[str], workloads: list[str]) -> str:
    """One row per system: medians, CPU per call (client+server) and the ratios to raw."""
    metrics = [m for m in METRICS if m[1] in summary[systems[0]]]
    head = ["", *(label for label, *_ in metrics), *(f"CPU/call {w} (us)" for w in workloads)]
    if "vs_raw" in summary:
        head += ["seq p50 x raw", "pipelined x raw"]
    rows = [tuple(head)]
    for system in systems:
        figures = summary[system]
        row = [system, *(fmt.format(figures[key]) for _, key, _, fmt in metrics)]
        c = figures["cpu_us_per_call"]
        row += [f"{c[w + '_client']:.0f}+{c[w + '_server']:.0f}" for w in workloads]
        if "vs_raw" in summary:
            ratio = summary["vs_raw"].get(system, {})
            row += [f"{ratio[k]:.2f}x" if k in ratio else "" for k in ("seq_p50", "pipelined")]
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    if "ratios" in summary:
        lines.append("meshkit / raw (medians; paired per repeat) against the targets:")
        for label, _, ratio_key, _ in metrics:
            target = ""
            if ratio_key in TARGETS:
                op, bound = TARGETS[ratio_key]
                target = f"  target {op} {bound}x {'ok' if summary['meets_targets'][ratio_key] else 'MISSED'}"
            lines.append(f"  {label:<28} {summary['ratios'][ratio_key]:.2f}x "
                         f"(paired {summary['paired_ratios'][ratio_key]:.2f}x){target}")
    return "\n".join(lines)


def print_profile(path: str, title: str, limit: int) -> None:
    print(f"\n== {title}: {path} (top {limit} by own time) ==", file=sys.stderr)
    stats = pstats.Stats(path, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(limit)
