"""Optional export of every span over OTLP/HTTP, for a user who already runs a collector.

Configured per service with ``otlp_endpoint`` (``[services.<name>]`` or
``MESHKIT_<NAME>_OTLP_ENDPOINT``), e.g. ``http://127.0.0.1:4318/v1/traces``.
Needs the ``otlp`` extra (``pip install 'meshkit[otlp]'``: OpenTelemetry's
SDK and its OTLP/HTTP exporter); without it, a configured endpoint is a
:class:`~meshkit.errors.ConfigError` at start, never a silent no-op.

Spans keep their meshkit ids (the W3C ids, so a collector's trace is the
one ``meshkit trace`` shows), their kind, status and attributes; the
resource names ``service.name`` and ``service.instance.id``. Export runs in
the SDK's ``BatchSpanProcessor`` thread: the request path only appends to
its queue, which is bounded (:data:`QUEUE_SPANS`; past it, spans are dropped
by the SDK, never held).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .observer import Observer
from .spans import OK, Span

QUEUE_SPANS = 4096
BATCH_SPANS = 512
DELAY_MS = 500  # how long a span may wait for its batch


class OtlpExport:
    """Sends spans to ``endpoint``; :meth:`__call__` takes one (the :class:`~.observer.Observer`'s exporter)."""

    def __init__(self, endpoint: str, service: str, instance: str, host: str) -> None:
        try:
            from opentelemetry import trace as otel
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import ReadableSpan
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.status import Status, StatusCode
        except ImportError as exc:
            raise ConfigError(f"otlp_endpoint is set but the otlp extra is not installed "
                              f"(pip install 'meshkit[otlp]'): {exc}") from None
        self._otel = otel
        self._readable = ReadableSpan
        self._status_ok = Status(StatusCode.OK)
        self._status = Status
        self._error = StatusCode.ERROR
        self._kinds = {"server": otel.SpanKind.SERVER, "client": otel.SpanKind.CLIENT,
                       "internal": otel.SpanKind.INTERNAL, "producer": otel.SpanKind.PRODUCER,
                       "consumer": otel.SpanKind.CONSUMER}
        self._resource = Resource.create({"service.name": service, "service.instance.id": instance,
                                          "host.name": host})
        self._flags = otel.TraceFlags(otel.TraceFlags.SAMPLED)
        self.processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), max_queue_size=QUEUE_SPANS,
                                            schedule_delay_millis=DELAY_MS, max_export_batch_size=BATCH_SPANS)

    def _context(self, trace_id: str, span_id: str) -> Any:
        return self._otel.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=False,
                                      trace_flags=self._flags)

    def __call__(self, span: Span) -> None:
        start_ns = span.start_unix_us * 1000
        parent = self._context(span.trace_id, span.parent_id) if span.parent_id else None
        status = self._status_ok if span.status == OK else self._status(self._error, span.status)
        attrs: dict[str, Any] = dict(span.attrs or {})
        attrs["meshkit.status"] = span.status
        self.processor.on_end(self._readable(
            span.name, context=self._context(span.trace_id, span.span_id), parent=parent,
            resource=self._resource, attributes=attrs, kind=self._kinds.get(span.kind, self._otel.SpanKind.INTERNAL),
            status=status, start_time=start_ns, end_time=start_ns + span.duration_us * 1000))

    def close(self) -> None:
        """Send what is queued (within the SDK's timeout) and stop the export thread."""
        self.processor.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated


def start_export(observer: Observer) -> OtlpExport | None:
    """Export ``observer``'s spans if its options name an endpoint; the export (to close), or ``None``."""
    endpoint = observer.options.otlp_endpoint
    if not endpoint:
        return None
    export = OtlpExport(endpoint, observer.service, observer.instance, observer.host)
    observer.exporter = export
    return export
