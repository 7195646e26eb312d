"""Stratum clients for the multi-host stack test, run on a namespace host as a script.

``python hostminers.py OUT STOP ADDRESS:PORT COUNT [TAG [CHURN]]`` opens COUNT
connections to HAProxy at ADDRESS:PORT, one thread each. Every connection
asks ``mesh.hello`` (which gateway holds it), subscribes and authorizes, then
calls ``mining.extranonce.subscribe`` (a mesh call from the gateway to a share
checker on any host that, unlike ``mining.authorize``, needs no Redis) about
ten times a second until STOP exists (90 s at most). Each
event is one JSON line in OUT (times are ``time.monotonic()``, which every
namespace shares). With CHURN, a connection is closed and opened again
after every CHURN calls (a steady stream of new connections for HAProxy to
place):

* ``{"k": "call", "c", "gw", "s", "e", "ok", "err"}`` — one call and its answer;
* ``{"k": "push", "c", "gw", "t", "m"}`` — a push (``mining.notify``) received;
* ``{"k": "lost", "c", "gw", "t", "why"}`` — the connection broke (EOF, an
  error, or no answer within :data:`ANSWER_TIMEOUT`); the thread reconnects;
* ``{"k": "hello", "c", "gw", "t"}`` — a (re)connection and its gateway;
* ``{"k": "auth", "c", "gw", "s", "e", "ok", "err"}`` — its subscribe and authorize (which need Redis).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any

ANSWER_TIMEOUT = 3.0
SETUP_TIMEOUT = 10.0  # subscribe and authorize wait for Redis (a failover takes seconds)
RUN_FOR = 90.0


class Lost(Exception):
    pass


class Connection:
    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=ANSWER_TIMEOUT)
        self.buf = b""
        self.next_id = 1

    def request(self, method: str, params: list[Any], on_push: Any, timeout: float = ANSWER_TIMEOUT) -> Any:
        rid = self.next_id
        self.next_id += 1
        self.sock.sendall(json.dumps({"id": rid, "method": method, "params": params}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            doc = self._line(deadline)
            if doc.get("id") == rid:
                return doc
            if doc.get("method"):
                on_push(doc["method"])

    def _line(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Lost("no answer")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise Lost("no answer") from None
            except OSError as exc:
                raise Lost(type(exc).__name__) from None
            if not chunk:
                raise Lost("eof")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def close(self) -> None:
        self.sock.close()


def client(index: int, address: str, stop: str, out: Any, lock: threading.Lock, tag: str, churn: int) -> None:
    name = f"{tag}{index}"
    deadline = time.monotonic() + RUN_FOR

    def write(**fields: Any) -> None:
        with lock:
            out.write(json.dumps({"c": name, **fields}) + "\n")

    while not os.path.exists(stop) and time.monotonic() < deadline:
        held: dict[str, str | None] = {"gw": None}  # the gateway of the current connection
        try:
            conn = Connection(address)
        except OSError as exc:
            write(k="refused", t=time.monotonic(), why=type(exc).__name__)
            time.sleep(0.2)
            continue
        try:
            def push(method: str, held: dict[str, str | None] = held) -> None:
                write(k="push", gw=held["gw"], t=time.monotonic(), m=method)

            gateway = held["gw"] = conn.request("mesh.hello", [], push)["result"]["gateway"]
            write(k="hello", gw=gateway, t=time.monotonic())
            # Both keep the connection's state in Redis (the extranonce counter, the workers).
            started = time.monotonic()
            subscribed = conn.request("mining.subscribe", ["hostminers/1"], push, SETUP_TIMEOUT)
            authorized = conn.request("mining.authorize", [f"{name}.rig", "x"], push, SETUP_TIMEOUT)
            write(k="auth", gw=gateway, s=started, e=time.monotonic(),
                  ok=subscribed.get("error") is None and authorized.get("result") is True,
                  err=subscribed.get("error") or authorized.get("error"))
            calls = 0
            while not os.path.exists(stop) and time.monotonic() < deadline and (not churn or calls < churn):
                calls += 1
                started = time.monotonic()
                answer = conn.request("mining.extranonce.subscribe", [], push)
                write(k="call", gw=gateway, s=started, e=time.monotonic(), ok=answer.get("result") is True,
                      err=answer.get("error"))
                time.sleep(0.1)
        except (Lost, OSError, KeyError, TypeError) as exc:
            write(k="lost", gw=held["gw"], t=time.monotonic(), why=str(exc)[:80])
            time.sleep(0.2)  # as a real miner backs off: a reconnect storm would hit the gateways' connect_rate
        finally:
            conn.close()


def main(out_path: str, stop: str, address: str, count: int, tag: str, churn: int) -> int:
    lock = threading.Lock()
    with open(out_path, "a", buffering=1) as out:
        threads = [threading.Thread(target=client, args=(i, address, stop, out, lock, tag, churn), daemon=True)
                   for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "m",
                  int(sys.argv[6]) if len(sys.argv) > 6 else 0))
