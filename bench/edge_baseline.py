"""The baseline of ``bench/edge.py``: the one-process asyncio JSON-lines server users run today.

One process holds every client connection and answers every request itself,
as the Stratum server meshkit splits up does: no HAProxy, no gateway, no mesh
hop. It speaks the subset of the gateway's protocol (``docs/gateway.md``)
that the edge benchmark uses, so that the same client code drives both:

==================  ==============  ===================================================
method              params          result
==================  ==============  ===================================================
``echo.echo``       ``[value]``     ``value``
``mesh.hello``      none            ``{"gateway": "baseline"}``
``mesh.subscribe``  ``[topic]``     the connection's subscriptions; later
                                    ``bench.publish`` calls on ``topic`` reach it
``bench.publish``   ``[topic, p]``  how many connections ``p`` was written to, each as
                                    ``{"jsonrpc": "2.0", "method": topic, "params": p}``
==================  ==============  ===================================================

Requests on one connection are answered in order, inline (the handler is
cheap; a task per request is what a gateway pays for concurrency). Bounds, as
for the gateway: a line longer than :data:`MAX_LINE` closes the connection,
and a client with more than :data:`MAX_OUTPUT` bytes unsent is dropped as a
slow consumer, so no client can grow this process's memory without a bound.

Run it as ``python bench/edge_baseline.py [--host H]``: it binds port 0,
prints ``host:port`` on stdout and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

MAX_LINE = 16384  # as the gateway's max_line
MAX_OUTPUT = 1024 * 1024  # as the gateway's max_output
MAX_SUBSCRIPTIONS = 64

_dumps = json.JSONEncoder(separators=(",", ":")).encode


class _UnknownMethod(Exception):
    """The request names a method this server does not have (JSON-RPC -32601)."""


class BaselineServer:
    """The server: :meth:`start` binds, :attr:`address` is what it got, :meth:`close` stops."""

    def __init__(self) -> None:
        self._server: asyncio.base_events.Server | None = None
        self._subscribers: dict[str, set[asyncio.StreamWriter]] = {}
        self.address: tuple[str, int] = ("", 0)
        self.dropped = 0  # slow consumers and over-long lines

    async def start(self, host: str = "127.0.0.1") -> BaselineServer:
        """Listen on ``host`` and a kernel-chosen port; :attr:`address` holds it afterwards."""
        self._server = await asyncio.start_server(self._serve, host, 0, limit=MAX_LINE + 1,
                                                  backlog=4096)
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        topics: set[str] = set()
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_LINE: no way to resynchronise cheaply
                    self.dropped += 1
                    break
                if not line:
                    break
                if line.strip():
                    self._send(writer, self._answer(line, writer, topics))
        except ConnectionError:
            pass
        finally:
            for topic in topics:
                self._subscribers.get(topic, set()).discard(writer)
            writer.close()

    def _answer(self, line: bytes, writer: asyncio.StreamWriter, topics: set[str]) -> bytes:
        try:
            request = json.loads(line)
            method, params, rid = request["method"], request.get("params", []), request.get("id")
        except (ValueError, TypeError, KeyError):
            return _dumps({"jsonrpc": "2.0", "id": None,
                           "error": {"code": -32700, "message": "parse error"}}).encode() + b"\n"
        try:
            result = self._call(method, params, writer, topics)
        except _UnknownMethod:
            return _dumps({"jsonrpc": "2.0", "id": rid,
                           "error": {"code": -32601, "message": "method not found"}}).encode() + b"\n"
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            return _dumps({"jsonrpc": "2.0", "id": rid, "error": {
                "code": -32602, "message": f"bad request: {type(exc).__name__}"}}).encode() + b"\n"
        return _dumps({"jsonrpc": "2.0", "id": rid, "result": result}).encode() + b"\n"

    def _call(self, method: str, params: Any, writer: asyncio.StreamWriter, topics: set[str]) -> Any:
        if method == "echo.echo":
            return params[0]
        if method == "mesh.hello":
            return {"gateway": "baseline"}
        if method == "mesh.subscribe":
            topic = params[0]
            if not isinstance(topic, str) or len(topics) >= MAX_SUBSCRIPTIONS:
                raise ValueError("topic")
            topics.add(topic)
            self._subscribers.setdefault(topic, set()).add(writer)
            return sorted(topics)
        if method == "bench.publish":
            topic, payload = params
            return self.publish(str(topic), payload)
        raise _UnknownMethod

    def publish(self, topic: str, payload: Any) -> int:
        """Write ``payload`` as a ``topic`` notification to every subscriber; how many got it."""
        data = _dumps({"jsonrpc": "2.0", "method": topic, "params": payload}).encode() + b"\n"
        sent = 0
        for writer in list(self._subscribers.get(topic, ())):
            sent += self._send(writer, data)
        return sent

    def _send(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        if writer.is_closing():
            return False
        if writer.transport.get_write_buffer_size() > MAX_OUTPUT:
            self.dropped += 1
            writer.close()  # a slow consumer: drop it rather than buffer without a bound
            return False
        writer.write(data)
        return True


async def _main(host: str) -> None:
    server = await BaselineServer().start(host)
    print(f"{server.address[0]}:{server.address[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Newer Pythons wait for every connection in wait_closed(); a benchmark's
    # clients may still be connected, so give it a moment and then just exit.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.close(), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The edge benchmark's one-process baseline server.")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
