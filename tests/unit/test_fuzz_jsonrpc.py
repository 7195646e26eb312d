"""Property tests of the gateway's JSON-RPC handling of one line (no network, no sleeps).

Whatever a client puts on a line (any bytes, any JSON value, request-shaped
objects with odd ids and params, batches of them) the connection answers
with well-formed JSON-RPC, or with nothing when nothing is owed (a blank
line, notifications), never lets an exception escape, takes bounded time,
and sends an answer whose size is bounded by the line's.

The example budget comes from the hypothesis profile (``HYPOTHESIS_PROFILE``),
not from here.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit.gateway import GatewayOptions, jsonrpc
from meshkit.gateway.connection import Connection
from meshkit.gateway.jsonrpc import Request, RpcError
from meshkit.metrics import Metrics

pytestmark = pytest.mark.fuzz

OPTIONS = GatewayOptions(max_inflight=8, max_output=256 * 1024)
# Per item: the envelope, an error message quoting at most a clipped method name.
_PER_ITEM = 600


class FakeTransport:
    """Enough of an asyncio transport for a connection: collects what it writes."""

    def __init__(self) -> None:
        self.closing = False
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


async def route(conn: Connection, request: Request) -> Any:
    """What the gateway's router does with a request, minus the mesh: echo, or the same errors."""
    target = jsonrpc.split_method(request.method)
    if target is None or target[0] != "echo":
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, f"unknown service {request.method[:120]!r}")
    return {"method": target[1], "params": request.params}


def handle(line: bytes) -> tuple[bytes, jsonrpc.Line | None, float]:
    """Feed ``line`` to a fresh connection; return what it wrote, the parse, and the time taken."""

    async def main() -> bytes:
        transport = FakeTransport()
        conn = Connection("gw-1", options=OPTIONS, call=route, metrics=Metrics("", "", "gateway"),
                          peer="127.0.0.1:1")
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.handle_line(line)
        while conn._tasks:
            await asyncio.wait(set(conn._tasks), timeout=2.0)
        for _ in range(100):  # answers batched while others were in flight go out at the next turn
            if not conn._pending:
                break
            await asyncio.sleep(0)
        return bytes(transport.data)

    started = time.monotonic()
    out = asyncio.run(main())
    return out, jsonrpc.parse_line(line, OPTIONS.max_batch), time.monotonic() - started


def check_answer(doc: Any) -> None:
    assert isinstance(doc, dict) and doc.get("jsonrpc") == "2.0" and "id" in doc, doc
    rid = doc["id"]
    assert rid is None or (isinstance(rid, (str, int, float)) and not isinstance(rid, bool))
    assert ("result" in doc) != ("error" in doc), doc
    if "error" in doc:
        error = doc["error"]
        assert isinstance(error["code"], int) and isinstance(error["message"], str)
        assert isinstance(error["data"], dict) and isinstance(error["data"]["code"], str)


def check(line: bytes) -> None:
    out, parsed, took = handle(line)
    assert took < 5.0, f"{took:.1f} s for one line"
    if not out:
        # Nothing owed: a blank line, or only notifications (which never get an answer).
        assert parsed is None or all(isinstance(i, Request) and i.notification for i in parsed.items)
        return
    assert out.endswith(b"\n") and out.count(b"\n") == 1, "one line answers one line"
    answer = json.loads(out)  # strict JSON: no NaN, no Infinity
    if isinstance(answer, list):
        assert parsed is not None and parsed.batch and answer
        for doc in answer:
            check_answer(doc)
        assert len(out) <= max(OPTIONS.max_output, _PER_ITEM * len(answer) + 2 * len(line))
    else:
        check_answer(answer)
        # Echoing params and id at most doubles the line; errors quote a clipped text.
        assert len(out) <= _PER_ITEM + 2 * len(line)


# -- strategies ---------------------------------------------------------------------------

huge_ints = st.integers(min_value=-(10**400), max_value=10**400)
scalars = st.none() | st.booleans() | huge_ints | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=6), max_leaves=30)
ids = scalars | st.lists(scalars, max_size=2) | st.dictionaries(st.text(max_size=3), scalars, max_size=2)
methods = st.sampled_from(["mesh.hello", "mesh.ping", "mesh.subscribe", "mesh.unsubscribe", "mesh.nope",
                           "echo.x", "other.y", "nodot", "", ".x", "echo."]) | st.text(max_size=300)
requests = st.fixed_dictionaries(
    {"method": methods},
    optional={"jsonrpc": st.sampled_from(["2.0", "1.0", 2, None]), "id": ids,
              "params": json_values, "extra": json_values},
)
items = requests | json_values


def dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@given(st.binary(max_size=2048).map(lambda b: b.replace(b"\n", b" ")))
@settings(deadline=None)
def test_any_bytes(line: bytes) -> None:
    check(line)


@given(json_values)
@settings(deadline=None)
def test_any_json_value(value: Any) -> None:
    check(dump(value))


@given(requests)
@settings(deadline=None)
def test_request_shaped_objects(doc: dict[str, Any]) -> None:
    check(dump(doc))


@given(st.lists(items, max_size=80))
@settings(deadline=None)
def test_batches(batch: list[Any]) -> None:
    check(dump(batch))


@given(st.sampled_from([b"1e400", b"-1e400", b"1" * 5000, b"-0", b"1E-400", b"0.0e99999", b'"\\ud800"',
                        b"[" * 3000 + b"]" * 3000, b"{}", b"[]", b"true", b'"\\u0000"']),
       st.sampled_from([b'{"method":"echo.x","id":%s}', b'{"method":"echo.x","params":[%s],"id":1}',
                        b"[%s]", b'[{"method":"mesh.ping","id":%s},{"method":"echo.x","id":1}]', b"%s"]))
@settings(deadline=None)
def test_odd_numbers_and_nesting(value: bytes, template: bytes) -> None:
    check(template % value)


@given(st.text(max_size=200), st.sampled_from(["utf-16", "utf-16-le", "utf-32", "utf-8-sig", "latin-1", "cp1252"]))
@settings(deadline=None)
def test_other_encodings(text: str, encoding: str) -> None:
    doc = json.dumps({"jsonrpc": "2.0", "method": "echo.x", "params": [text], "id": 1}, ensure_ascii=False)
    try:
        line = doc.encode(encoding)
    except UnicodeEncodeError:
        return
    line = line.replace(b"\n", b" ")
    check(line)
    if encoding in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):  # latin-1 may be valid UTF-8
        out, _parsed, _took = handle(line)
        assert json.loads(out)["error"]["code"] == jsonrpc.PARSE_ERROR
