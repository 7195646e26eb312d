"""What ``meshkit trace|inspect|stats|tap`` print: waterfalls and tables (pure functions of the answers).

A waterfall, one line per span, children indented under their parent::

    trace 4bf92f3577b34da6a3ce929d0e0e4736: 4 spans, 3 services, 12.4 ms
      OFFSET  DURATION  STATUS  SPAN                          SERVICE  INSTANCE      |
       0.0ms    12.4ms  ok      handle                        gateway  ab12cd@h1     |██████████████|
       0.3ms    11.2ms  ok        cart.add                    gateway  ab12cd@h1     | █████████████|
       0.5ms    10.8ms  ok          add                       cart     9f00aa@h2     | ████████████ |
       0.9ms     8.1ms  ok            sql query='select 1'    cart     9f00aa@h2     |  ████████    |

Offsets are from the earliest span; clocks of different hosts are only as
close as NTP keeps them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..untrusted import clip

BAR = 30


def ms(us: float | None) -> str:
    if us is None:
        return "-"
    if us >= 1_000_000:
        return f"{us / 1_000_000:.2f}s"
    return f"{us / 1000:.1f}ms"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _walk(nodes: Iterable[dict[str, Any]], depth: int = 0) -> Iterable[tuple[int, dict[str, Any]]]:
    for node in nodes:
        yield depth, node
        yield from _walk(node.get("children", ()), depth + 1)


def attrs_text(attrs: dict[str, Any], limit: int = 80) -> str:
    return clip(" ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in attrs.items()), limit)


def waterfall(trace_id: str, tree: list[dict[str, Any]], missing: dict[str, str] | None = None) -> str:
    """The waterfall of a :func:`meshkit.observe.query.trace` answer (see the module doc)."""
    lines = list(_walk(tree))
    if not lines:
        return f"trace {trace_id}: no spans found (instances keep recent spans only; see docs/observability.md)"
    start = min(s["start_unix_us"] for _, s in lines)
    end = max(s["start_unix_us"] + s["duration_us"] for _, s in lines)
    total = max(1, end - start)
    services = {s["service"] for _, s in lines}
    head = f"trace {trace_id}: {len(lines)} spans, {len(services)} services, {ms(total)}"
    rows = [("OFFSET", "DURATION", "STATUS", "SPAN", "SERVICE", "INSTANCE", "")]
    for depth, s in lines:
        left = int((s["start_unix_us"] - start) / total * BAR)
        width = max(1, int(s["duration_us"] / total * BAR))
        bar = "|" + (" " * left + "█" * width).ljust(BAR)[:BAR] + "|"
        label = "  " * depth + s["name"]
        if s["kind"] == "internal" and s.get("attrs"):
            label += " " + attrs_text(s["attrs"], 60)
        elif s.get("attrs", {}).get("error"):
            label += " " + attrs_text({"error": s["attrs"]["error"]}, 60)
        rows.append((ms(s["start_unix_us"] - start), ms(s["duration_us"]), s["status"], label, s["service"],
                     f"{s['instance'][:6]}@{s['host']}", bar))
    out = [head, table(rows)]
    for instance, why in sorted((missing or {}).items()):
        out.append(f"(instance {instance} did not answer: {why})")
    return "\n".join(out)


def span_list(spans: list[dict[str, Any]]) -> str:
    """Spans (from ``trace --slow/--errors``) one per line, with their trace ids."""
    if not spans:
        return "no spans kept"
    rows = [("TRACE", "WHEN", "DURATION", "STATUS", "SERVICE", "SPAN", "INSTANCE")]
    for s in spans:
        when = time.strftime("%H:%M:%S", time.localtime(s["start_unix_us"] / 1_000_000))
        rows.append((s["trace_id"], when, ms(s["duration_us"]), s["status"], s["service"], s["name"],
                     s["instance"]))
    return table(rows)


def stats_table(answer: dict[str, Any]) -> str:
    """``meshkit stats``: one line per service and method, like ``linkerd top``."""
    rows = [("SERVICE", "METHOD", "KIND", "INST", "CALLS", "RATE/S", "ERRORS", "ERR%", "P50", "P99", "INFLIGHT")]
    for r in answer["methods"]:
        rate = "-" if r["rate"] is None else f"{r['rate']:.1f}"
        rows.append((r["service"], r["method"], r["kind"], str(r["instances"]), str(r["calls"]), rate,
                     str(r["errors"]), f"{100 * r['error_rate']:.1f}", ms(r["p50_us"]), ms(r["p99_us"]),
                     str(r["in_flight"])))
    out = [table(rows)]
    for instance, why in sorted(answer["missing"].items()):
        out.append(f"(instance {instance} did not answer: {why})")
    return "\n".join(out)


def event_line(event: dict[str, Any]) -> str:
    """One tap event on one line."""
    when = time.strftime("%H:%M:%S", time.localtime(event["start_unix_us"] / 1_000_000))
    meta = " ".join(f"{k}={v}" for k, v in event.get("meta", {}).items())
    args = f" args={event['args']}" if "args" in event else ""
    return (f"{when} {event['service']}.{event['name']} {event['kind']} {event['status']} "
            f"{ms(event['duration_us'])} trace={event['trace_id']} inst={event.get('instance', '')[:12]}"
            f"{' ' + meta if meta else ''}{args}")


def inspect_text(got: dict[str, Any]) -> str:
    """``meshkit inspect``: info, stats, in-flight calls, recent and failed spans of one instance."""
    info = got["info"]
    out = [f"{info['service']} {info['instance']} v{info['version'] or '-'} on {info['host']} pid {info['pid']}"
           f"  state {info['state']}  up {info['uptime_s']:.0f}s  endpoint {info['endpoint']}",
           f"in flight {info['in_flight']}  held {info['held']}  spans kept {info['spans']['kept']} "
           f"({info['spans']['bytes']} bytes)  taps {info['taps_open']}  log {info['log']['level']}"
           f"{' rules ' + str(info['log']['rules']) if info['log']['rules'] else ''}",
           "methods: " + ", ".join(m["signature"] + (" [idempotent]" if m["idempotent"] else "")
                                   for m in info["methods"]),
           "subscriptions: " + (", ".join(info["subscriptions"]) or "-"),
           "periodic: " + (", ".join(f"{p['name']} every {p['interval_s']}s" for p in info["periodic"]) or "-")
           + f"  failures {info['periodic_failures']}"]
    for crash in info["recent_crashes"][-5:]:
        out.append(f"  crash {time.strftime('%H:%M:%S', time.localtime(crash['unix']))} {crash['task']}: "
                   f"{crash['type']}: {crash['message']}")
    rows = [("METHOD", "CALLS", "ERRORS", "LAST ERROR", "INFLIGHT")]
    for name, c in sorted({**got["stats"]["methods"], **got["stats"]["pushes"]}.items()):
        last = c["last_error"]
        rows.append((name, str(c["calls"]), str(sum(c["errors"].values())),
                     clip(f"{last['code']}: {last['message']}", 60) if last else "-", str(c["in_flight"])))
    out += ["", table(rows), "", "in flight now:"]
    out += [f"  {c['method']} from {c['caller']} for {c['age_ms']}ms trace={c['trace_id']}"
            for c in got["inflight"]] or ["  (none)"]
    out += ["", "recent spans:", span_list(list(reversed(got["spans"]))), "", "recent failures:",
            span_list(got["errors"])]
    return "\n".join(out)
