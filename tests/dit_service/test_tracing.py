"""One trace per chunk through the DiT ring: each stage's forward and each link hop of a chunk is a span of the trace
ingest started, each the child of the hop before, and the finished chunk names the last one (the decoder's parent)."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services import telemetry

from .helpers import CONFIG, chunk_message, latents, prompt, run_ring, workers


def test_a_chunks_spans_chain_through_every_stage_and_the_ring_return(span_exporter: InMemorySpanExporter) -> None:
    span_exporter.clear()
    ring = workers(3)
    ring[0].add_prompt("s", 0, prompt(0))
    roots = {}
    for c, z in enumerate(latents(0, 2, (4, 4))):
        root = roots[c] = telemetry.start_chunk_trace("ingest.encode", {"rheo.seq": c})
        root.end()
        assert ring[0].add_chunk(chunk_message("s", c, z).model_copy(update={"trace": telemetry.traceparent(root)}))
    untraced = chunk_message("u", 0, latents(1, 1, (4, 4))[0])  # no trace: no spans, none invented
    ring[0].add_prompt("u", 0, prompt(1))
    assert ring[0].add_chunk(untraced)
    finished = {(f.stream_id, f.seq): f for f in run_ring(ring)}
    spans = span_exporter.get_finished_spans()
    assert {(s.attributes or {}).get("rheo.stream_id") for s in spans} <= {"s", None}

    by_id = {s.context.span_id: s for s in spans}
    for c, root in roots.items():
        # walk back from the span the finished chunk names to the root: the chain is the chunk's path
        ctx = telemetry.chunk_context(finished[("s", c)].trace)
        assert ctx is not None
        span_id = telemetry.trace.get_current_span(ctx).get_span_context().span_id
        chain = []
        while span_id != root.get_span_context().span_id:
            assert span_id in by_id, f"chunk {c}: a hop's parent is not a span of its trace; path {chain}"
            span = by_id[span_id]
            assert span.context.trace_id == root.get_span_context().trace_id
            chain.append(span.name)
            span_id = span.parent.span_id if span.parent else None
        hop = ["dit.stage[0].forward", "link.send", "dit.stage[1].forward", "link.send", "dit.stage[2].forward"]
        want = [*hop, "link.send"] * (CONFIG.steps - 1) + hop  # a ring return between denoising steps
        assert list(reversed(chain)) == want, (c, list(reversed(chain)))
