"""Namespace hosts for benchmarks: a thin front to :mod:`meshkit.testing.hosts`.

Usage (from the project root, as root)::

    .venv/bin/python bench/hosts.py run 3 -- CMD ARGS...   # build 3 hosts, run CMD, remove them
    .venv/bin/python bench/hosts.py clean                  # remove networks left by crashed runs

``run`` runs ``CMD`` in the machine's own namespace with ``MESHKIT_TEST_HOSTS``
set to a JSON list of ``{"name", "netns", "address"}`` (one per host), so the
command can start processes on a host with ``ip netns exec NETNS ...`` and
send traffic only between those addresses; the hosts are removed when it
exits, or on Ctrl-C. A benchmark written in Python uses :func:`hosts`
instead. Nothing here contacts any address from the machine's own namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence

from meshkit.testing.hosts import HostNetwork, clean_leftovers


@contextlib.contextmanager
def hosts(count: int) -> Iterator[HostNetwork]:
    """``count`` namespace hosts for the duration of the ``with`` block (always removed)."""
    net = HostNetwork.create(count)
    try:
        yield net
    finally:
        net.close()


def describe(net: HostNetwork) -> str:
    """The hosts as the JSON put in ``MESHKIT_TEST_HOSTS``."""
    return json.dumps([{"name": h.name, "netns": h.netns, "address": h.address} for h in net.hosts])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build COUNT hosts, run a command, remove the hosts")
    run.add_argument("count", type=int)
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    sub.add_parser("clean", help="remove networks left by runs that crashed")
    return parser


def command_of(args: argparse.Namespace) -> list[str]:
    """The command after ``--`` (argparse keeps the ``--`` in some Python versions, not others)."""
    argv = list(args.argv)
    return argv[1:] if argv[:1] == ["--"] else argv


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "clean":
        for name in clean_leftovers():
            print(f"removed {name}")
        return 0
    command = command_of(args)
    if not command:
        print("run needs a command after --", file=sys.stderr)
        return 2
    with hosts(args.count) as net:
        print(describe(net), file=sys.stderr)
        env = {"MESHKIT_TEST_HOSTS": describe(net)}
        try:
            return subprocess.run(command, env={**os.environ, **env}, check=False).returncode
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
