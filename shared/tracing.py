"""OpenTelemetry set-up and W3C context carried in Kafka headers.

A service gets a tracer provider named after it. Spans go to an OTLP/HTTP
collector when OTEL_EXPORTER_OTLP_ENDPOINT is set, to a JSON-lines file when
NEURONS_TRACE_FILE is set (how the end-to-end test sees one trace across
processes), and to any extra exporter a test passes in.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from shared.settings import Settings

Headers = Sequence[tuple[str, bytes]]


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span; safe across processes (append)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name"),
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "attributes": {k: v for k, v in (span.attributes or {}).items()},
                    }
                )
            )
        with self._lock, self.path.open("a") as fh:
            fh.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:  # nothing held open between exports
        return None


def setup_tracing(
    service: str, settings: Settings, extra_exporters: Iterable[SpanExporter] = ()
) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": f"neurons-{service}"}))
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if settings.trace_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(settings.trace_file)))
    for exporter in extra_exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def inject_headers(ctx: otel_context.Context | None = None) -> list[tuple[str, bytes]]:
    carrier: dict[str, str] = {}
    inject(carrier, context=ctx)
    return [(k, v.encode()) for k, v in carrier.items() if k in ("traceparent", "tracestate")]


def span_headers(span: trace.Span) -> list[tuple[str, bytes]]:
    """The W3C headers naming ``span`` as the parent: what ``inject_headers`` writes while ``span`` is current."""
    ctx = span.get_span_context()
    if ctx == trace.INVALID_SPAN_CONTEXT:
        return []
    headers = [("traceparent", f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}".encode())]
    if ctx.trace_state:
        headers.append(("tracestate", ctx.trace_state.to_header().encode()))
    return headers


def extract_context(headers: Headers | None) -> otel_context.Context:
    carrier = {}
    for key, value in headers or ():
        if key in ("traceparent", "tracestate") and value is not None:
            carrier[key] = value.decode("latin-1")
    return extract(carrier)


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent")


def context_from_traceparent(traceparent: str | None) -> otel_context.Context:
    return extract({"traceparent": traceparent}) if traceparent else otel_context.Context()


@contextmanager
def continued(traceparent: str | None) -> Iterator[None]:
    """Work done later (a job's events, a soak's) stays in the trace that asked for it."""
    if not traceparent:
        yield
        return
    token = otel_context.attach(context_from_traceparent(traceparent))
    try:
        yield
    finally:
        otel_context.detach(token)


__all__ = [
    "JsonLinesSpanExporter",
    "setup_tracing",
    "inject_headers",
    "span_headers",
    "extract_context",
    "current_traceparent",
    "context_from_traceparent",
    "continued",
    "trace",
]
