"""Bad input at a service's router: clear errors back, and nobody else notices.

Garbage is sent from bare DEALER sockets and raw TCP connections to a live
``echo`` instance while real calls run against it the whole time; not one of
those may fail, and the instance must stay up and serving.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from loadgen import Load
from rawpeer import RawPeer

import meshkit
from meshkit import Client, wire
from meshkit.wire import pack

pytestmark = pytest.mark.integration

ECHO = "services.echo:Echo"
MAX_SIZE = 64 * 1024
ARGS = pack([[1], {}])


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return value


def call_header(id: int, *, version: Any = 1, kind: Any = wire.CALL, target: Any = "echo",
                name: Any = "echo", timeout_ms: Any = 2000, traceparent: Any = None,
                meta: Any = None) -> bytes:
    return pack([version, kind, id, target, name, timeout_ms, traceparent, meta])


# (frames, expected error code, expected id in the answer)
ANSWERED: list[tuple[str, list[bytes], str, int]] = [
    # Random bytes after 0xc1 (never used in MessagePack): they may not
    # happen to start a header whose id is readable.
    ("random bytes, one frame", [b"\xc1" + os.urandom(63)], "bad_request", 0),
    ("valid header, no body", [call_header(11)], "bad_request", 11),  # the id is readable
    ("three frames", [call_header(12), ARGS, b"extra"], "bad_request", 12),
    ("five frames", [b"\xc1" + os.urandom(7) for _ in range(5)], "bad_request", 0),
    ("empty frames", [b"", b""], "bad_request", 0),
    ("header not MessagePack", [b"\xc1\xc1garbage", ARGS], "bad_request", 0),
    ("header a map", [pack({"version": 1}), ARGS], "bad_request", 0),
    ("header too short", [pack([1, 1]), ARGS], "bad_request", 0),
    ("id negative", [pack([1, 1, -5, "echo", "echo", None, None, None]), ARGS], "bad_request", 0),
    ("id a string", [pack([1, 1, "7", "echo", "echo", None, None, None]), ARGS], "bad_request", 0),
    ("version 2", [call_header(21, version=2), ARGS], "unsupported_version", 21),
    ("version a string", [call_header(22, version="1"), ARGS], "unsupported_version", 22),
    ("unknown kind", [pack([1, 99, 23]), b"\xc0"], "bad_request", 23),
    ("CALL with 9 items", [pack([1, 1, 24, "echo", "echo", None, None, None, 0]), ARGS],
     "bad_request", 24),
    ("body not MessagePack", [call_header(25), b"\xc1"], "bad_request", 25),
    ("body a map", [call_header(26), pack({"args": [1]})], "bad_request", 26),
    ("body args not an array", [call_header(27), pack([1, {}])], "bad_request", 27),
    ("body kwargs keys not str", [call_header(28), pack([[], {1: 2}])], "bad_request", 28),
    ("meta values not str", [call_header(29, meta={"conn": 1}), ARGS], "bad_request", 29),
    ("meta an array", [call_header(30, meta=["conn"]), ARGS], "bad_request", 30),
    ("timeout negative", [call_header(31, timeout_ms=-5), ARGS], "bad_request", 31),
    ("timeout a string", [call_header(32, timeout_ms="soon"), ARGS], "bad_request", 32),
    ("traceparent an int", [call_header(33, traceparent=5), ARGS], "bad_request", 33),
    ("method name empty", [call_header(34, name=""), ARGS], "bad_request", 34),
    ("target not a str", [call_header(35, target=7), ARGS], "bad_request", 35),
    ("another service", [call_header(36, target="other"), ARGS], "unknown_service", 36),
    ("unknown method", [call_header(37, name="nosuch"), ARGS], "unknown_method", 37),
    ("bad arguments", [call_header(38), pack([[1, 2, 3], {}])], "bad_arguments", 38),
    ("deadline already 0", [call_header(39, timeout_ms=0), ARGS], "deadline_exceeded", 39),
    ("push, unknown topic", [wire.PushMessage("nobody", b"").frames(40, 1000)[0], b"\xc0"],
     "unknown_method", 40),
    ("push, body not MessagePack",
     [wire.PushMessage("echo.events", b"").frames(41, 1000)[0], b"\xc1"], "bad_request", 41),
    # Nested past what repr() survives: the message used to be dropped unanswered.
    ("version 1,000 deep", [call_header(42, version=nested(1000)), ARGS], "unsupported_version", 42),
    ("kind 1,000 deep", [call_header(43, kind=nested(1000)), ARGS], "bad_request", 43),
    ("kind past the decoder's depth",
     [b"\x98\x01" + b"\x91" * 3000 + b"\x01" + pack(44) + call_header(0)[4:], ARGS], "bad_request", 44),
    ("header then garbage", [call_header(45) + b"\xc1", ARGS], "bad_request", 45),
    ("method name over 256 characters", [call_header(46, name="m" * 257), ARGS], "bad_request", 46),
    ("header over 64 KiB", [call_header(47, meta={"k": "v" * 65_536}), ARGS], "bad_request", 47),
]

TCP_GARBAGE: list[tuple[str, bytes]] = [
    ("connect and close", b""),
    ("random bytes", os.urandom(4096)),
    ("HTTP request", b"GET / HTTP/1.1\r\nHost: mesh\r\n\r\n"),
    ("ZMTP signature, then garbage", b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + os.urandom(512)),
    ("ZMTP greeting, unknown mechanism",
     b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"BOGUS".ljust(20, b"\x00") + b"\x00" * 32),
    ("a megabyte of zeros", b"\x00" * (1 << 20)),
]


def tcp_garbage(host: str, port: int, payload: bytes) -> None:
    with socket.create_connection((host, port), timeout=2.0) as sock:
        try:
            sock.sendall(payload)
            sock.settimeout(0.3)
            while sock.recv(65536):  # whatever the server says, until it hangs up or goes quiet
                pass
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass


def test_garbage_gets_errors_and_hurts_nobody(start_service, mesh_client: Client, zmq_ctx) -> None:
    [echo] = start_service(ECHO, env={"MESHKIT_MAX_MESSAGE_SIZE": str(MAX_SIZE)})
    endpoint = echo.record.endpoint
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    load = Load()
    load.add("echo", lambda: mesh_client.call("echo", "echo", [b"v" * 100]), threads=2)
    load.add("sleep", lambda: mesh_client.call("echo", "sleep", [0.01]))
    with load, RawPeer(zmq_ctx, endpoint) as raw:
        load.wait_for_calls(20)

        for what, frames, code, request_id in ANSWERED:
            header, body = raw.answer(frames)
            assert (header.kind, header.id, body.get("code")) == (wire.ERROR, request_id, code), what
            assert body["message"] and len(body["message"]) < 400, what

        # Answers sent to a server are dropped without a word; the PONG to the
        # PING sent after them is the next thing back.
        raw.send(wire.encode_reply(50, "stray"))
        raw.send(wire.encode_ack(51))
        raw.send(wire.encode_pong(52, "up", 0))
        raw.send(wire.encode_error(53, "bad_request", "stray"))
        header, body = raw.answer(wire.encode_ping(54))
        assert (header.kind, header.id, body) == (wire.PONG, 54, ["up", body[1]])

        # A traceparent that is not one starts a new trace: never a failure.
        header, body = raw.answer([call_header(55, traceparent="not-a-traceparent"), ARGS])
        assert (header.kind, body) == (wire.REPLY, 1)

        # Over the size limit: ZeroMQ drops it (and that connection) unseen.
        with RawPeer(zmq_ctx, endpoint) as big:
            big.send([call_header(56), pack([[b"x" * (2 * MAX_SIZE)], {}])])
            assert big.recv(0.5) is None

        for _what, payload in TCP_GARBAGE:
            tcp_garbage(host, int(port), payload)

        load.wait_for_calls(50)
        assert raw.call("echo", "echo", ["still here"]) == "still here"

    assert echo.running()
    assert load.count() > 100
    assert not load.failures(), [f"{o.label}: {o.error!r}" for o in load.failures()]
    with RawPeer(zmq_ctx, endpoint) as fresh:
        assert fresh.call("echo", "echo", [b"x" * (MAX_SIZE // 2)]) == b"x" * (MAX_SIZE // 2)
    # A request just inside the router's allowance whose answer is not.
    with pytest.raises(meshkit.MessageTooLargeError):
        mesh_client.call("echo", "echo", [b"x" * (MAX_SIZE + 100)])
    log = Path(echo.log_path).read_text()
    assert "unsupported_version" in log and "rejected a message" in log
    assert "Traceback" not in log
