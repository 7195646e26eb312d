"""``meshkit ejections [SERVICE] [--json]``: what each instance's calls have ejected, and its retry budget.

Outlier ejection and the retry budget are per caller (docs/failover.md), so
the state lives in each instance's client: this command asks every
instance (of ``SERVICE``, or all) for it with the framework call
``_mesh.failover`` and prints one row per instance it has failures or
ejections on record for (``CALLER`` is the asking instance), then each
caller's retries allowed and refused. An instance that does not answer is
listed as such; that is no error (exit status 0), a registry that does not
answer is (1).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import MeshError
from ..untrusted import clip
from .mesh import registry_choice
from .output import EXIT_OK, format_table


def add_commands(sub: Any) -> None:
    """Register ``ejections`` on the ``meshkit`` parser."""
    cmd = sub.add_parser("ejections", help="instances each caller has ejected, and its retry budget",
                         description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    cmd.add_argument("service", nargs="?", help="ask only the instances of this service")
    cmd.add_argument("--json", action="store_true", help="one JSON object: caller id -> its report")
    cmd.add_argument("--timeout", type=float, default=2.0, help="seconds per instance (default 2)")
    cmd.set_defaults(func=cmd_ejections)


def gather(client: Any, service: str | None, timeout: float) -> dict[str, dict[str, Any]]:
    """Each instance's ``_mesh.failover`` report by ``service:id``; ``{"error": ...}`` where it did not answer."""
    reports: dict[str, dict[str, Any]] = {}
    for record in sorted(client.instances(), key=lambda r: r.key):
        if service is not None and record.service != service:
            continue
        try:
            reports[record.key] = client.call_instance(record.instance_id, "_mesh.failover", timeout=timeout)
        except MeshError as exc:
            reports[record.key] = {"error": clip(str(exc))}
    return reports


def render(reports: dict[str, dict[str, Any]]) -> str:
    """The two tables ``meshkit ejections`` prints."""
    rows = [["CALLER", "INSTANCE", "HEALTH", "FAILURES", "EJECTIONS", "EJECTED FOR"]]
    budget = [["CALLER", "RETRIES", "REFUSED", "AVAILABLE"]]
    for caller, report in reports.items():
        if "error" in report:
            budget.append([caller, "-", "-", f"no answer: {report['error']}"])
            continue
        for row in report.get("instances", []):
            rows.append([caller, str(row["key"]), str(row["health"]), str(row["failures"]),
                         str(row["ejections"]), f"{row['ejected_for']:.1f}s" if row["ejected_for"] else "-"])
        retries = report.get("retries", {})
        budget.append([caller, str(retries.get("allowed", "-")), str(retries.get("refused", "-")),
                       str(retries.get("available", "-"))])
    ejected = format_table(rows) if len(rows) > 1 else "no instance has failures on record"
    return ejected + "\n\n" + format_table(budget)


def cmd_ejections(args: argparse.Namespace) -> int:
    from ..blocking import Client

    settings = registry_choice(args).settings
    with Client(settings) as client:
        reports = gather(client, args.service, args.timeout)
    print(json.dumps(reports) if args.json else render(reports))
    return EXIT_OK
