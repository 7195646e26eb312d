"""A blocking newline-delimited JSON-RPC client for the gateway tests, and its fixture."""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

_WAIT = 10.0


class LineClient:
    """A blocking newline-delimited JSON-RPC client (what ``nc`` does, with bookkeeping)."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=_WAIT)
        self.buf = b""
        self.ids = itertools.count(1)
        self.pushes: list[dict[str, Any]] = []
        self.answers: dict[Any, dict[str, Any]] = {}

    def send(self, data: bytes | dict[str, Any]) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")

    def request(self, method: str, params: Any = None) -> int:
        rid = next(self.ids)
        doc: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            doc["params"] = params
        self.send(doc)
        return rid

    def line(self, timeout: float = _WAIT) -> bytes:
        """The next line, or b"" at EOF."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return b""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def recv(self, timeout: float = _WAIT) -> dict[str, Any]:
        line = self.line(timeout)
        assert line, "the gateway closed the connection"
        doc: dict[str, Any] = json.loads(line)
        return doc

    def answer(self, rid: Any, timeout: float = _WAIT) -> dict[str, Any]:
        """The answer to request ``rid``; pushes and other answers met on the way are kept."""
        deadline = time.monotonic() + timeout
        while rid not in self.answers:
            doc = self.recv(max(0.01, deadline - time.monotonic()))
            if "method" in doc:
                self.pushes.append(doc)
            else:
                self.answers[doc.get("id")] = doc
        return self.answers.pop(rid)

    def call(self, method: str, params: Any = None, timeout: float = _WAIT) -> dict[str, Any]:
        return self.answer(self.request(method, params), timeout)

    def push(self, timeout: float = _WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.pushes:
            doc = self.recv(max(0.01, deadline - time.monotonic()))
            if "method" in doc:
                self.pushes.append(doc)
            else:
                self.answers[doc.get("id")] = doc
        return self.pushes.pop(0)

    def closed(self, timeout: float = _WAIT) -> bool:
        try:
            return self.line(timeout) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def line_clients() -> Iterator[Callable[[str], LineClient]]:
    """Body of a ``clients`` fixture: ``clients(address)`` connects; all are closed afterwards."""
    made: list[LineClient] = []

    def connect(address: str) -> LineClient:
        client = LineClient(address)
        made.append(client)
        return client

    yield connect
    for client in made:
        client.close()


def error_code(answer: dict[str, Any]) -> int:
    """The JSON-RPC error code of an answer (which must be an error)."""
    assert "error" in answer, answer
    code: int = answer["error"]["code"]
    return code
