"""The servers of the peers ``bench/rpc.py`` compares meshkit with (their clients: :mod:`rpc_clients`).

``raw``
    The practical Python limit on asyncio: a ``zmq.asyncio`` ROUTER, one
    ``await`` per message, each handled inline (no task per message); the
    client is a ``zmq.asyncio`` DEALER.

Every peer answers the same ``echo(value)`` with a msgpack frame
``[id, method, args]`` in and ``[id, result]`` out (NATS carries the same
frame as its message body), so that only the transport and its driving
differ:

``raw_blocking``
    Plain blocking pyzmq: a ROUTER in a ``recv``/``send`` loop; the client is a
    blocking DEALER driven from a thread (one call at a time, or a window of
    ``inflight`` messages), no event loop anywhere.
``raw_batched``
    zmq.asyncio with batched draining: one ``await poll()`` per wake-up, then
    every message already queued is read with ``NOBLOCK`` on the same socket
    and each reply sent with ``NOBLOCK`` (a ROUTER or DEALER send does not
    block below the high-water mark). This is what one can reach on asyncio
    once the per-message ``await`` is gone.
``nats``
    NATS request/reply through a private ``nats-server`` (bound to
    ``127.0.0.1`` on a port it picks itself, ``-p -1``, read back from its
    ports file: never the machine's own NATS on 4222). The server process
    subscribes with ``nats-py`` and answers each message in its callback; the
    client awaits ``request`` (``inflight`` tasks when pipelined).
``meshkit_sync``
    :class:`meshkit.Client`, the blocking client, against the same meshkit
    server as ``meshkit``: one call at a time, and ``inflight`` threads
    sharing one client when pipelined.

``nats-py`` is a ``bench`` extra (``make bench-deps``): it is imported only
when the ``nats`` peer runs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from meshkit.testing import find_program

SUBJECT = "bench.echo"


def _answer(frame: bytes) -> bytes:
    request_id, _method, args = msgpack.unpackb(frame)
    answer: bytes = msgpack.packb([request_id, args[0]])
    return answer


# -- servers (child processes; each prints one line when it can take calls) ----------


async def _echo(value: Any) -> Any:
    """The raw side's handler: the same coroutine as ``BenchService.echo`` in ``rpc.py``."""
    return value


def serve_raw() -> int:
    """Serve ``echo`` on a zmq.asyncio ROUTER; print the endpoint; stop on SIGTERM."""

    async def serve() -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:0")
        print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
        handlers: dict[str, Callable[..., Awaitable[Any]]] = {"echo": _echo}
        pack, unpack = msgpack.packb, msgpack.unpackb

        async def loop() -> None:
            while True:
                identity, frame = await sock.recv_multipart()
                request_id, method, args = unpack(frame)
                result = await handlers[method](*args)
                await sock.send_multipart([identity, pack([request_id, result])])

        task = asyncio.ensure_future(loop())
        stop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            stop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        sock.close()
        ctx.term()

    asyncio.run(serve())
    return 0



def serve_blocking() -> int:
    """A blocking ROUTER on ``127.0.0.1:0``; print the endpoint; stop on SIGTERM."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(200):  # wake up now and then to see SIGTERM
            continue
        identity, frame = sock.recv_multipart()
        sock.send_multipart([identity, _answer(frame)])
    sock.close()
    ctx.term()
    return 0


def serve_batched() -> int:
    """A zmq.asyncio ROUTER that drains every queued message per wake-up; stop on SIGTERM."""

    async def serve() -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:0")
        print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
        plain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)  # the same socket, no futures

        async def loop() -> None:
            while True:
                await sock.poll()
                for _ in range(1024):  # bounded, so one busy peer cannot starve the loop
                    try:
                        identity, frame = plain.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    plain.send_multipart([identity, _answer(frame)], zmq.NOBLOCK)

        await _until_sigterm(loop())
        sock.close()
        ctx.term()

    asyncio.run(serve())
    return 0


def serve_nats(url: str) -> int:
    """Answer ``bench.echo`` requests on the NATS server at ``url``; print ``ready``."""
    import nats

    async def serve() -> None:
        nc = await nats.connect(url)

        async def on_request(msg: Any) -> None:
            await msg.respond(_answer(msg.data))

        await nc.subscribe(SUBJECT, cb=on_request)
        await nc.flush()
        print("ready", flush=True)
        await _until_sigterm(asyncio.get_running_loop().create_future())
        await nc.close()

    asyncio.run(serve())
    return 0


async def _until_sigterm(work: Any) -> None:
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


class NatsServer:
    """A private ``nats-server`` on ``127.0.0.1`` and a port it chose (``-p -1``), read back."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="meshkit-nats-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._log: Any = None

    def start(self, timeout: float = 10.0) -> NatsServer:
        self._log = open(self.dir / "nats.log", "wb")  # closed by stop()
        self.process = subprocess.Popen(
            [find_program("nats-server"), "-a", "127.0.0.1", "-p", "-1",
             "--ports_file_dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=self._log)
        ports = self.dir / f"nats-server_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout
        while not ports.exists() or not ports.read_text().strip():
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: "
                                   f"{(self.dir / 'nats.log').read_text()[-400:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nats-server wrote no ports file within {timeout} s")
            time.sleep(0.02)
        self.url = json.loads(ports.read_text())["nats"][0]
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log is not None:
            self._log.close()
