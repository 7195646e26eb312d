"""Micro-benchmark: what typed arguments and call limits cost per call, on the server's path.

Usage (from the project root)::

    .venv/bin/python bench/typed.py            # a table (a few seconds)
    .venv/bin/python bench/typed.py --json     # one JSON object

Measured in this process, with no network, so the figures are the added CPU
per call, not a round trip:

``check_*``
    :meth:`meshkit.signature.ArgumentTypes.apply` alone, per call: exact
    types (``n: int, s: str`` given an int and a str: the ``type(v) is t``
    fast path), a conversion (an int for a ``float``, a list for a
    ``tuple[int, int]``), a ``list[int]`` of 100 items, a dataclass from a map.
``invoke_*``
    :func:`meshkit.invoke.invoke` of an ``async def`` handler, per call,
    untyped vs typed (two ints), and with the server's :class:`CallLimits`
    (a service gate that only counts, plus a ``max_concurrency`` method gate).

The baseline each figure is compared with is in the same run (the untyped
handler, the raw ``msgspec.convert`` call). Each figure is the best of
``--repeats`` runs of ``--calls`` calls (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec

from meshkit.config import Settings
from meshkit.handlers import HandlerTable, rpc
from meshkit.invoke import invoke
from meshkit.limits import CallLimits
from meshkit.signature import ArgumentTypes


@dataclasses.dataclass
class Point:
    x: float
    y: float


def typed(n: int, s: str) -> None: ...
def converted(ratio: float, pair: tuple[int, int]) -> None: ...
def many(values: list[int]) -> None: ...
def structured(at: Point) -> None: ...


class Handlers:
    @rpc
    async def free(self, a, b):  # type: ignore[no-untyped-def]
        return a

    @rpc
    async def typed(self, a: int, b: int) -> int:
        return a

    @rpc(max_concurrency=64)
    async def gated(self, a: int, b: int) -> int:
        return a


def best_us(fn: Callable[[], None], calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


async def best_invoke_us(call: Callable[[], Any], calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            await call()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


async def invoke_figures(calls: int, repeats: int) -> dict[str, float]:
    table = HandlerTable.collect(Handlers())
    limits = CallLimits("bench", table, Settings(), instance_id="bench")
    executor = ThreadPoolExecutor(1)
    m = table.methods
    args: list[Any] = [1, 2]
    kwargs: dict[str, Any] = {}
    return {
        "invoke_untyped_us": await best_invoke_us(
            lambda: invoke(m["free"], args, kwargs, None, executor), calls, repeats),
        "invoke_typed_us": await best_invoke_us(
            lambda: invoke(m["typed"], args, kwargs, None, executor), calls, repeats),
        "invoke_typed_limits_us": await best_invoke_us(
            lambda: invoke(m["typed"], args, kwargs, None, executor, limits=limits, cost=100), calls, repeats),
        "invoke_typed_gated_us": await best_invoke_us(
            lambda: invoke(m["gated"], args, kwargs, None, executor, limits=limits, cost=100), calls, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    n, r = opts.calls, opts.repeats
    t_typed, t_conv = ArgumentTypes.of(typed), ArgumentTypes.of(converted)
    t_many, t_struct = ArgumentTypes.of(many), ArgumentTypes.of(structured)
    hundred = list(range(100))
    figures = {
        "check_exact_us": best_us(lambda: t_typed.apply([5, "x"], {}), n, r),
        "check_converted_us": best_us(lambda: t_conv.apply([2, [1, 2]], {}), n, r),
        "check_list100_us": best_us(lambda: t_many.apply([hundred], {}), n, r),
        "check_dataclass_us": best_us(lambda: t_struct.apply([{"x": 1.0, "y": 2.0}], {}), n, r),
        "msgspec_convert_int_us": best_us(lambda: msgspec.convert(5, int, strict=True), n, r),
        **asyncio.run(invoke_figures(n, r)),
    }
    with open("/proc/loadavg") as f:
        figures_out: dict[str, Any] = {"loadavg": f.read().split()[:3], **{k: round(v, 3) for k, v in figures.items()}}
    if opts.json:
        print(json.dumps(figures_out))
        return
    for key, value in figures_out.items():
        print(f"{key:28} {value}")


if __name__ == "__main__":
    main()
