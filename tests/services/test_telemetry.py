"""Telemetry every service shares: OTLP export of a chunk's trace (sampled once, at its root), a bounded export at
exit, and the per-stream numbers egress and the decoder take (time to first frame, glass-to-glass, output FPS)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from decoder.tracing import OutputTraces
from egress.observe import FPS_WINDOW_S, EgressObserver
from proto import LatentChunk, StreamEvent, VideoUnit
from services import telemetry
from support.otlp import OtlpReceiver

ROOT = Path(__file__).resolve().parents[2]

# a process as `rheo <service>` sets one up: a chunk's root span at ingest, a child the way the next hop makes it
# (from the traceparent the chunk carries), then the exit path's flush
_SCRIPT = """
import json, sys, time
from services import telemetry
telemetry.setup_tracing("rheo-test", sys.argv[1], float(sys.argv[2]))
root = telemetry.start_chunk_trace("ingest.encode", {"rheo.seq": 1})
root.end()
child = telemetry.start_chunk_span("dit.stage[0].forward", telemetry.traceparent(root))
child.end()
none = telemetry.start_chunk_span("decoder.decode", None)  # a chunk without a trace: no span
none.end()
t0 = time.monotonic()
telemetry.shutdown_tracing()
print(json.dumps({"exit_s": time.monotonic() - t0, "recording": [root.is_recording(), child.is_recording()]}))
"""


def _run(endpoint: str, ratio: float) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, endpoint, str(ratio)], capture_output=True, text=True,
                         timeout=60, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.close()


def test_a_chunk_trace_is_exported_over_otlp_at_exit_and_sampling_is_decided_at_its_root(
        receiver: OtlpReceiver) -> None:
    _run(receiver.endpoint, 1.0)
    spans = {s.name: s for s in receiver.snapshot()}
    assert set(spans) == {"ingest.encode", "dit.stage[0].forward"}  # the batch processor's spans, flushed at exit
    root, child = spans["ingest.encode"], spans["dit.stage[0].forward"]
    assert root.service == "rheo-test" and root.parent_id == "" and root.attributes["rheo.seq"] == 1
    assert child.trace_id == root.trace_id and child.parent_id == root.span_id

    receiver.spans.clear()
    out = _run(receiver.endpoint, 0.0)
    assert out["recording"] == [False, False]  # not sampled at the root: the next hop follows
    assert receiver.snapshot() == []


def test_the_export_at_exit_is_bounded_when_the_collector_hangs() -> None:
    with socket.socket() as hung:  # accepts connections (the backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        t0 = time.monotonic()
        out = _run(f"http://127.0.0.1:{hung.getsockname()[1]}/v1/traces", 1.0)
    assert out["exit_s"] < telemetry.EXPORT_DRAIN_S + 1.5
    assert time.monotonic() - t0 < 30


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_egress_takes_ttff_glass_to_glass_and_output_fps_per_stream_without_a_stream_label() -> None:
    obs = EgressObserver()
    before = {n: _sample(n + "_count") for n in ("rheo_ttff_seconds", "rheo_glass_to_glass_seconds",
                                                 "rheo_stream_output_fps")}
    g2g_sum = _sample("rheo_glass_to_glass_seconds_sum")
    obs.event(StreamEvent(stream_id="s", kind="live", at=100.0))
    unit = VideoUnit(pts=0, keyframe=True, data=b"\0", capture_time=101.0)
    obs.part("s", [unit] * 4, now=103.0)  # the first part: 3 s after going live, 2 s after capture
    obs.part("s", [unit.model_copy(update={"capture_time": None})] * 4, now=103.0 + FPS_WINDOW_S)
    assert _sample("rheo_ttff_seconds_count") == before["rheo_ttff_seconds"] + 1  # only the first part
    assert _sample("rheo_glass_to_glass_seconds_count") == before["rheo_glass_to_glass_seconds"] + 1
    assert _sample("rheo_glass_to_glass_seconds_sum") == pytest.approx(g2g_sum + 2.0)
    assert _sample("rheo_stream_output_fps_count") == before["rheo_stream_output_fps"] + 1
    assert obs.fps["s"] == pytest.approx(4 / FPS_WINDOW_S) and obs.latency["s"].median(103.0) == (2.0, 1)
    obs.ended("s")
    assert not obs.fps and not obs.latency and not obs._rates
    families = {m.name: m for m in REGISTRY.collect()}
    for name in ("rheo_ttff_seconds", "rheo_glass_to_glass_seconds", "rheo_stream_output_fps"):
        assert all(set(s.labels) <= {"le"} for s in families[name].samples)  # never a stream label


def test_the_decoder_sends_a_chunks_trace_with_the_message_holding_its_first_frame(span_exporter) -> None:
    traces = OutputTraces()
    root = telemetry.start_chunk_trace("ingest.encode")
    root.end()
    chunk = LatentChunk(stream_id="s", seed=0, fps=8.0, seq=5, epoch=0, latent_start=4, rope_start=4,
                        capture_time=50.125, deadline=time.time() + 60, prompt_version=0, noise_scale=0.5,
                        timesteps=[700, 500], latent=__import__("torch").zeros(1, 4, 2, 2),
                        trace=telemetry.traceparent(root))
    misses = _sample("rheo_deadline_misses_total", {"where": "decoder"})
    span = traces.start(chunk)
    traces.decoded(chunk, span)
    assert _sample("rheo_deadline_misses_total", {"where": "decoder"}) == misses  # in time
    frame = VideoUnit(pts=0, keyframe=True, data=b"\0", capture_time=50.0)
    assert traces.carried([frame]) == (None, None)  # not its first frame
    trace, headers = traces.carried([frame, frame.model_copy(update={"capture_time": 50.125})])
    assert headers == {telemetry.CHUNK_HEADER: "5"}
    assert trace == telemetry.traceparent(span) and span.parent.span_id == root.get_span_context().span_id
    assert traces.carried([frame.model_copy(update={"capture_time": 50.125})]) == (None, None)  # once


def test_stage_labels_are_bounded() -> None:
    assert [telemetry.stage_label(i) for i in (0, 14, 15, 99)] == ["0", "14", "15+", "15+"]
