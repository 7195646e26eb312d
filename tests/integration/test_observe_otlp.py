"""Span export over OTLP/HTTP to a real local receiver (an HTTP server this test runs, recording what it gets)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from meshkit import HandlerError
from meshkit.testing import wait_until
from meshkit.trace import TraceContext

pytestmark = pytest.mark.integration

B = "tests.integration.services.traced:TraceB"


class Receiver(ThreadingHTTPServer):
    """Records every OTLP/HTTP export request body posted to ``/v1/traces``."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    def spans(self) -> list[Any]:
        found = []
        for body in list(self.bodies):
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    found.extend((attrs, span) for span in scope.spans)
        return found


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.paths.append(self.path)
        self.server.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_spans_are_exported_with_their_trace_ids(start_service: Any, mesh_client: Any, receiver: Receiver) -> None:
    port = receiver.server_address[1]
    [b] = start_service(B, env={"MESHKIT_TRACE_B_OTLP_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces"})
    root = TraceContext.new_root()
    assert mesh_client.call("trace-b", "lookup", ["c5"], traceparent=root.traceparent()) == "found:c5"
    with pytest.raises(HandlerError, match="exported failure"):
        mesh_client.call("trace-b", "fail", ["exported failure"])

    def ours() -> list[Any]:
        return [(attrs, s) for attrs, s in receiver.spans() if s.trace_id.hex() == root.trace_id]

    wait_until(lambda: len(ours()) == 2 and any(s.name == "fail" for _, s in receiver.spans()), 10,
               "the spans to reach the receiver")
    by_name = {s.name: (attrs, s) for attrs, s in ours()}
    attrs, server = by_name["lookup"]
    _, sql = by_name["sql"]
    assert attrs["service.name"] == "trace-b" and attrs["service.instance.id"] == b.record.instance_id
    assert server.parent_span_id.hex() == root.span_id and sql.parent_span_id == server.span_id
    assert server.kind == server.SPAN_KIND_SERVER and sql.kind == sql.SPAN_KIND_INTERNAL
    assert {a.key: a.value.string_value for a in sql.attributes}["query"] == \
        "select * from orders where customer = 'c5'"
    assert server.end_time_unix_nano > server.start_time_unix_nano
    [failed] = [s for _, s in receiver.spans() if s.name == "fail"]
    assert failed.status.code == failed.status.STATUS_CODE_ERROR and failed.status.message == "handler_error"
    assert set(receiver.paths) == {"/v1/traces"}
