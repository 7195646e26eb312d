"""Instructions per call, counted: a figure the machine's load cannot move.

Usage (from the project root; needs ``valgrind``, which ``make bench-deps``
installs)::

    .venv/bin/python bench/instructions.py                  # 64 KiB echoes
    .venv/bin/python bench/instructions.py --size 16        # small ones
    PYTHONPATH=/path/to/other/tree .venv/bin/python bench/instructions.py   # another build

Wall-clock and CPU-time figures on a shared 2-core machine swing by ±20%
between runs, which hides a change of a few percent. This counts what the
code does instead: one meshkit service and one :class:`meshkit.AsyncClient`
in one process (``meshkit.testing.ServiceHarness`` on the system clock,
uvloop, an ``ipc://`` socket, ``--inflight`` echoes in flight), run under
``valgrind --tool=callgrind`` twice, with ``--calls`` and with twice as many
calls. The difference between the two runs' totals, divided by ``--calls``,
is the instructions per call, every thread counted (the loop, libzmq's I/O
threads) and start-up cancelled out; ``memcpy``'s share says how many copies
of the payload a call makes. Kernel time (system calls, wake-ups) is not
counted: ``strace -f -c`` of the same harness counts the system calls.

Under valgrind the threads are serialised and run about 50 times slower, so
the harness's calls get a generous deadline; the counts vary by well under
1% between runs of one build (docs/performance.md, "64 KiB calls").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

_COLLECTED = re.compile(r"Collected : (\d+)")
_MEMCPY = re.compile(r"^\s*([\d,]+) .*memcpy", re.MULTILINE)


def harness(size: int, calls: int, inflight: int) -> None:
    """Run ``calls`` echoes of ``size`` bytes, ``inflight`` at a time, in this process (the measured part)."""
    import asyncio

    import uvloop

    import meshkit
    from meshkit.clock import SYSTEM_CLOCK
    from meshkit.testing import ServiceHarness

    class Bench(meshkit.Service):
        name = "bench"
        version = "1.0"

        @meshkit.rpc
        async def echo(self, value):  # type: ignore[no-untyped-def]  # unannotated: no typed-argument check
            return value

    payload = os.urandom(size)

    async def main() -> None:
        async with ServiceHarness(Bench, clock=SYSTEM_CLOCK) as running:
            client = running.client

            async def worker(n: int) -> None:
                for _ in range(n):
                    if await client.call("bench", "echo", [payload], timeout=600) != payload:
                        raise SystemExit("echo returned something else")

            await asyncio.gather(*(worker(calls // inflight) for _ in range(inflight)))

    uvloop.run(main())


def count(size: int, calls: int, inflight: int) -> tuple[int, int]:
    """``(instructions, memcpy instructions)`` of one harness run under callgrind."""
    with tempfile.TemporaryDirectory(prefix="meshkit-instructions-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
             "--harness", "--size", str(size), "--calls", str(calls), "--inflight", str(inflight)],
            capture_output=True, text=True, check=False)
        found = _COLLECTED.search(run.stderr)
        if run.returncode != 0 or found is None:
            raise SystemExit(f"the harness failed under valgrind (exit {run.returncode}):\n{run.stderr[-2000:]}")
        annotated = subprocess.run(["callgrind_annotate", "--inclusive=no", out], capture_output=True,
                                   text=True, check=True).stdout
        memcpy = sum(int(m.replace(",", "")) for m in _MEMCPY.findall(annotated))
        return int(found.group(1)), memcpy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=65536, help="payload bytes (65536)")
    parser.add_argument("--calls", type=int, default=320, help="calls in the shorter run (320); the longer has twice")
    parser.add_argument("--inflight", type=int, default=64, help="calls in flight (64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--harness", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.harness:
        harness(args.size, args.calls, args.inflight)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing: run `make bench-deps` (Debian: apt-get install valgrind)")
    if args.calls % args.inflight:
        raise SystemExit("--calls must be a multiple of --inflight")
    import meshkit

    short = count(args.size, args.calls, args.inflight)
    long = count(args.size, 2 * args.calls, args.inflight)
    per_call = (long[0] - short[0]) / args.calls
    memcpy = (long[1] - short[1]) / args.calls
    result = {"meshkit": os.path.dirname(os.path.dirname(meshkit.__file__)), "size": args.size,
              "calls": args.calls, "inflight": args.inflight, "instructions_per_call": round(per_call),
              "memcpy_instructions_per_call": round(memcpy)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"meshkit from {result['meshkit']}; {args.size}-byte echoes, {args.inflight} in flight, "
          f"{args.calls} and {2 * args.calls} calls under callgrind")
    print(f"instructions per call  {per_call:12,.0f}")
    print(f"  of them in memcpy    {memcpy:12,.0f}")


if __name__ == "__main__":
    main()
