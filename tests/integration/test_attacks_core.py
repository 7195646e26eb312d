"""Attacks on a service's router from a raw peer: bounded answers, bounded memory, bounded logs.

Each test starts real service processes, attacks one instance from a bare
DEALER (:class:`rawpeer.RawPeer`) and checks what the instance answered,
what it logged (its log file) and how much memory it took (its RSS), while a
well-behaved client keeps being served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest
from rawpeer import RawPeer

from meshkit import Client, wire
from meshkit.testing import ServiceProcess, wait_until

pytestmark = pytest.mark.integration

ECHO = "services.echo:Echo"
SINK = "tests.integration.services.sink:Sink"
MIB = 1024 * 1024


def log_lines(proc: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(proc.log_path).read_text().splitlines() if line.startswith("{")]


def rss(proc: ServiceProcess) -> int:
    return int(psutil.Process(proc.pid).memory_info().rss)


def collect(raw: RawPeer, count: int, timeout: float) -> list[tuple[wire.Header, Any]]:
    """``count`` answers (or fewer, if the deadline passes first), decoded."""
    got: list[tuple[wire.Header, Any]] = []

    def more() -> bool:
        while len(got) < count:
            frames = raw.recv(0.05)
            if frames is None:
                return False
            got.append((wire.decode_header(frames[0]), wire.unpack(frames[1])))
        return True

    try:
        wait_until(more, timeout, f"{count} answers")
    except TimeoutError:
        pass
    return got


def until_pong(raw: RawPeer, timeout: float = 30) -> list[tuple[wire.Header, Any]]:
    """Every answer that comes before the PONG to a PING sent now.

    One connection's messages are read in order and refusals are answered at
    once, so the PONG follows every refusal of what was sent before it.
    """
    raw.send(wire.encode_ping(2**64 - 1))
    got: list[tuple[wire.Header, Any]] = []

    def ponged() -> bool:
        while (frames := raw.recv(0.05)) is not None:
            header = wire.decode_header(frames[0])
            if header.kind == wire.PONG and header.id == 2**64 - 1:
                return True
            got.append((header, wire.unpack(frames[1])))
        return False

    wait_until(ponged, timeout, "the PONG after the answers")
    return got


def codes(answers: list[tuple[wire.Header, Any]]) -> list[str]:
    return [body["code"] if header.kind == wire.ERROR else wire.KIND_NAMES[header.kind] for header, body in answers]


def test_four_mib_names_get_short_errors_and_short_rare_log_lines(start_service, zmq_ctx) -> None:
    # Headers up to 16 MiB allowed on purpose, so the names reach the checks
    # that echo them (with the default 64 KiB bound they stop earlier).
    [echo] = start_service(ECHO, env={"MESHKIT_MAX_HEADER_SIZE": str(16 * MIB),
                                      "MESHKIT_MAX_NAME_LENGTH": str(16 * MIB)})
    huge = "x" * (4 * MIB)
    attacks = {
        "unknown_method": [1, wire.CALL, 0, "echo", huge, 2000, None, None],
        "unknown_service": [1, wire.CALL, 0, huge, "echo", 2000, None, None],
        "unsupported_version": [huge, wire.CALL, 0, "echo", "echo", 2000, None, None],
    }
    with RawPeer(zmq_ctx, echo.record.endpoint) as raw:
        for code, items in attacks.items():
            for i in range(10):
                items[2] = 1000 + i
                header, body = raw.answer([wire.pack(items), wire.pack([[1], {}])], timeout=10)
                assert (header.id, body["code"]) == (1000 + i, code)
                assert len(body["message"]) < 400, body["message"][:100]
        assert raw.call("echo", "echo", ["still here"]) == "still here"
    rejected = [line for line in log_lines(echo) if line["event"].startswith("rejected a message")]
    assert 1 <= len(rejected) <= len(attacks)  # one per cause per interval, not one per message
    assert all(len(json.dumps(line)) < 1000 for line in rejected)
    assert Path(echo.log_path).stat().st_size < 64 * 1024


def test_a_thousand_big_pushes_do_not_grow_the_subscriber_past_its_bound(start_service, mesh_client: Client,
                                                                          zmq_ctx) -> None:
    # 1,000 x 512 KiB grew a subscriber by 525 MiB: the queue bound counted messages.
    # Sent in bursts of 25, each followed by a PING whose PONG says the burst
    # was read: what is measured is what meshkit holds, not libzmq's receive
    # pipe (bounded in messages, not bytes: see docs/protocol.md, "Receiver
    # limits"), which fills when the instance's loop falls behind the network.
    bound = 16 * MIB
    [sink] = start_service(SINK, env={"MESHKIT_MAX_QUEUED_PUSH_BYTES": str(bound)})
    payload = wire.pack(b"p" * (512 * 1024))
    with RawPeer(zmq_ctx, sink.record.endpoint) as raw:
        raw.call("sink", "ping")
        before = rss(sink)
        peak = before
        refused: list[tuple[wire.Header, Any]] = []
        for burst in range(40):
            for i in range(burst * 25, burst * 25 + 25):
                raw.send([wire.PushMessage(f"jobs.{i}", b"").frames(i, 5000)[0], payload])
            refused += until_pong(raw)
            peak = max(peak, rss(sink))
        assert set(codes(refused)) == {"overloaded"}
        growth = peak - before
        print(f"\nRSS {before / MIB:.0f} MiB -> peak {peak / MIB:.0f} MiB (+{growth / MIB:.0f} MiB) "
              f"for 1000 x 512 KiB pushes, {len(refused)} refused, bound {bound // MIB} MiB")
        assert growth < bound + 64 * MIB
        queued = 1000 - len(refused)
        assert mesh_client.call("sink", "release") == 0
        acks = collect(raw, queued, timeout=30)
        assert codes(acks) == ["ACK"] * queued
        assert mesh_client.call("sink", "handled") == queued


def test_a_call_flood_is_answered_overloaded_while_a_good_client_is_served(start_service, mesh_client: Client,
                                                                           zmq_ctx) -> None:
    # 100,000 calls in flight from one raw peer took +339 MiB: nothing bounded them.
    per_peer = 500
    [sink] = start_service(SINK, env={"MESHKIT_MAX_CALLS_PER_PEER": str(per_peer)})
    flood = 5000
    with RawPeer(zmq_ctx, sink.record.endpoint) as raw:
        before = rss(sink)
        for i in range(flood):
            raw.send(wire.encode_call(i, "sink", "wait", [], {}, 30_000, None, None))
        refused = until_pong(raw)
        assert codes(refused) == ["overloaded"] * (flood - per_peer)
        assert "in flight" in refused[0][1]["message"]
        for _ in range(20):
            assert mesh_client.call("sink", "ping", timeout=5) == "pong"
        grown = rss(sink) - before
        print(f"\n{flood} calls from one peer: {len(refused)} refused, RSS +{grown / MIB:.1f} MiB")
        assert grown < 64 * MIB
        mesh_client.call("sink", "release")
        replies = collect(raw, per_peer, timeout=30)
        assert codes(replies) == ["REPLY"] * per_peer


def test_full_push_queue_is_logged_once_per_episode_with_a_count(start_service, mesh_client: Client,
                                                                zmq_ctx) -> None:
    # The warning was logged for every refused push: 10,002 lines for one burst.
    [sink] = start_service(SINK, env={"MESHKIT_MAX_QUEUED_PUSHES": "10"})
    burst = 2000
    with RawPeer(zmq_ctx, sink.record.endpoint) as raw:
        for i in range(burst):
            raw.send([wire.PushMessage("jobs.new", b"").frames(i, 5000)[0], wire.pack(i)])
        refused = until_pong(raw)
        assert codes(refused) == ["overloaded"] * (burst - 10)
        mesh_client.call("sink", "release")
        assert codes(collect(raw, 10, timeout=10)) == ["ACK"] * 10
        header, _ = raw.answer([wire.PushMessage("jobs.new", b"").frames(burst, 5000)[0], wire.pack(0)])
        assert header.kind == wire.ACK

    def episode_logged() -> bool:
        return any("refused meanwhile" in line["event"] for line in log_lines(sink))

    wait_until(episode_logged, 5, "the end of the episode in the log")
    lines = [line for line in log_lines(sink) if "push" in line["event"]]
    assert [line["event"].split(":")[0] for line in lines] == [
        "refusing pushes until they drain",
        f"push queue of one connection takes pushes again; {burst - 10} were refused meanwhile",
    ]
    assert lines[1]["refused"] == burst - 10
