"""Tracing and metrics every service shares.

Traces: one tracer provider per process; the trace context of a chunk travels in NATS headers (W3C
``traceparent``) and the tensor link's frame headers, so one chunk is one trace across services.
Metrics: Prometheus, every name prefixed ``rheo_``, defined here once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import Counter, Histogram

log = logging.getLogger("rheo.telemetry")

# Every label value is chosen by code, never taken from a message or a subject: a subject is reported by its
# channel (a ``proto.CHANNELS`` name, or "other"), so an attacker's distinct subjects add no series.
BUS_MALFORMED = Counter(
    "rheo_bus_malformed_messages_total", "messages dropped because they failed to decode", ["channel"]
)
BUS_HANDLER_ERRORS = Counter(
    "rheo_bus_handler_errors_total", "messages whose handler raised (message dropped, stream unaffected)", ["channel"]
)
BUS_DROPPED = Counter(
    "rheo_bus_dropped_messages_total", "messages dropped before decoding (services/dispatch.py): oversize, "
    "bad_subject, lane_full, newcomers_full, unsubscribed, slow_consumer", ["channel", "reason"]
)
BUS_PUBLISHED_BYTES = Counter("rheo_bus_published_bytes_total", "payload bytes published", ["channel"])
BUS_KV_RECREATED = Counter("rheo_bus_kv_recreated_total", "KV buckets found lost (NATS store wiped) and created "
                           "again", ["bucket"])
BUS_OVERSIZE = Counter("rheo_bus_oversize_publish_total", "publishes refused for exceeding max_payload")
BUS_PERMISSION_DENIED = Counter("rheo_bus_permission_denied_total", "publishes/subscriptions of this service the "
                                "NATS server refused (permissions violation)", ["op"])
CREDIT_WAIT = Histogram(
    "rheo_bus_credit_wait_seconds", "time a bulk publisher waited for credit",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
)


def setup_tracing(service_name: str, otlp_endpoint: str | None = None) -> TracerProvider:
    """Install this process's tracer provider (OTLP/HTTP export when an endpoint is configured)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("telemetry.otlp_endpoint is set but opentelemetry-exporter-otlp-proto-http is not "
                        "installed; traces are not exported")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str = "rheo") -> trace.Tracer:
    return trace.get_tracer(name)


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (added to any given)."""
    out = dict(headers or {})
    propagate.inject(out)
    return out


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message's headers carry (empty context when none)."""
    return propagate.extract(dict(headers or {}))
