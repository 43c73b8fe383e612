"""Tracing and metrics every service shares (docs/observability.md).

Traces: one tracer provider per process, exported over OTLP/HTTP when ``telemetry.otlp_endpoint`` is set. One chunk
is one trace: ingest starts it (``ingest.encode``, where sampling is decided, ``telemetry.trace_sample_ratio``);
every later hop's span is a child of the hop before, whose W3C ``traceparent`` the chunk carries in its header
(``ChunkHeader.trace``: a tensor-link frame batches items of many chunks, so the context rides per item) and, where
the chunk crosses NATS, in the message headers too. Parent-based sampling after ingest.
Metrics: Prometheus, every name prefixed ``rheo_``, defined here once; no label ever takes a stream id.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Literal

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
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


# -- the numbers operators watch (docs/observability.md); stream ids go to spans and the API, never to labels --
_LATENCY_S = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
TTFF = Histogram("rheo_ttff_seconds", "stream went live (publisher connected, T2V started) → its first styled "
                 "part available at egress", buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300))
GLASS_TO_GLASS = Histogram("rheo_glass_to_glass_seconds", "capture time of a chunk's first frame → the LL-HLS part "
                           "carrying it available at egress", buckets=_LATENCY_S)
STAGE_CHUNK = Histogram("rheo_stage_chunk_seconds", "one pass of a chunk through a DiT stage: queue wait, forward "
                        "and link hand-off (stage: its index in the block map, capped)", ["stage"],
                        buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0))
DeadlineWhere = Literal["ingest", "dit", "decoder"]
DEADLINE_MISSES = Counter("rheo_deadline_misses_total", "chunks past their deadline: ingest (dropped before "
                          "publishing), dit (x0 not published in time), decoder (decoded late, still shown)",
                          ["where"])
OUTPUT_FPS = Histogram("rheo_stream_output_fps", "per-stream output frame rate at egress, one sample per live "
                       "stream every few seconds", buckets=(1, 2, 4, 6, 8, 10, 12, 15, 20, 24, 25, 30, 40, 50, 60))
MAX_STAGE_LABEL = 15
"""Stage indexes above this share one label (``"15+"``): the label set stays bounded whatever the block map."""


def stage_label(index: int) -> str:
    return str(index) if 0 <= index < MAX_STAGE_LABEL else f"{MAX_STAGE_LABEL}+"


def deadline_missed(where: DeadlineWhere, n: int = 1) -> None:
    DEADLINE_MISSES.labels(where=where).inc(n)


EXPORT_DRAIN_S = 3.0
"""Longest the span export at exit may take (a collector that is down must not hold up a SIGTERM)."""

def setup_tracing(service_name: str, otlp_endpoint: str | None = None, sample_ratio: float = 1.0) -> TracerProvider:
    """Install this process's tracer provider (OTLP/HTTP export when an endpoint is configured). Root spans (a
    chunk's ``ingest.encode``) are sampled at ``sample_ratio``; every other span follows its parent."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("telemetry.otlp_endpoint is set but opentelemetry-exporter-otlp-proto-http is not "
                        "installed; traces are not exported")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint,
                                                                             timeout=EXPORT_DRAIN_S)))
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


def shutdown_tracing(timeout_s: float = EXPORT_DRAIN_S) -> None:
    """Export what the batch processor still holds, for at most ``timeout_s`` (the SIGTERM path's last step)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return
    done = threading.Thread(target=provider.shutdown, name="otlp-flush", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        log.warning("spans not exported within %.0f s at exit; the rest are lost", timeout_s)


# -- one trace per chunk -------------------------------------------------------------------------------------
_W3C = TraceContextTextMapPropagator()
CHUNK_HEADER = "rheo-chunk"
"""NATS header naming the chunk (``<seq>``) whose trace a message's ``traceparent`` continues (decoder → egress)."""


def chunk_context(traceparent: str | None) -> otel_context.Context | None:
    """The context a chunk's ``trace`` names (None: the chunk carries none, or a malformed one)."""
    if not traceparent:
        return None
    ctx = _W3C.extract({"traceparent": traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def traceparent(span: trace.Span) -> str | None:
    """The W3C ``traceparent`` of ``span``, to carry with the chunk to the next hop (None: an invalid span)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def start_chunk_span(name: str, parent: str | None, attributes: Attributes = None,
                     start_time: int | None = None) -> trace.Span:
    """A span of a chunk's trace, child of the hop ``parent`` names; a no-op span when the chunk carries no trace
    (a hop never starts a trace of its own: sampling is decided once, at ingest). ``start_time`` in ns."""
    ctx = chunk_context(parent)
    if ctx is None:
        return trace.INVALID_SPAN
    return tracer().start_span(name, context=ctx, attributes=attributes, start_time=start_time)


def start_chunk_trace(name: str, attributes: Attributes = None) -> trace.Span:
    """The root span of a new chunk's trace (ingest): sampled here, at ``telemetry.trace_sample_ratio``."""
    return tracer().start_span(name, context=otel_context.Context(), attributes=attributes)


@contextlib.contextmanager
def in_chunk_trace(parent: str | None) -> Iterator[None]:
    """Run a block (a bus publish) as part of the chunk's trace: its spans and NATS headers continue ``parent``."""
    ctx = chunk_context(parent)
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)
