"""The whole stack as real processes (``rheo up``'s LocalStack): RTMP in, HLS out, equal to the single-process pipeline.

One stack (private nats-server, controller, 3 DiT stages, decoder, egress, ingest, gateway) serves most of the
module; a 1-stage and a 2-stage (Self-Forcing ring) stack check the same equality.
A test pattern goes in over RTMP; the decoder's debug tap (frames before H.264) must equal what
``StreamPipeline`` makes from the very frames ingest tapped, for the same seed; the HLS playlist served through
the gateway ends with ``EXT-X-ENDLIST`` and decodes to the stream's size and rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import m3u8
import nats.errors
import numpy as np
import pytest
from prometheus_client import REGISTRY

from media.player import HLSJS_DEFAULT
from pipeline.loading import build_tiny_pipeline
from pipeline.pipeline import PipelineConfig
from pipeline.state import StreamSpec as PipelineStreamSpec
from proto import Heartbeat, LatentChunk, StreamEvent, StreamSpec, Subjects, decode
from proto.spec import RingConfig
from services import top
from services.bus import Bus, BusError
from services.config import NatsSettings
from services.stack import LocalStack, open_demo_stream, start_testpattern
from services.up import demo_stream
from support.browser import CHROMIUM, CHROMIUM_FLAGS, CURRENT_TIME, FRAME_HASH, NO_CHROMIUM, PLAYING
from support.hls_equality import (
    FPS,
    ROOT,
    SEED,
    SIZE,
    STEPS,
    check_rtmp_to_hls_equals_pipeline,
    http_get,
    publish,
    wait_for,
)
from support.otlp import OtlpReceiver, ReceivedSpan
from support.stackkit import running_stack


def test_rtmp_to_hls_equals_the_single_process_pipeline(stack: LocalStack) -> None:
    check_rtmp_to_hls_equals_pipeline(stack)


def _metric(stack: LocalStack, proc: str, sample: str) -> float:
    port = next(p.health_port for p in stack.procs if p.name == proc)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return 0.0


def _chunk_path(spans: list[ReceivedSpan], last: ReceivedSpan) -> list[ReceivedSpan]:
    """From ``last`` back to its trace's root through the parent links (root first); [] when a link is missing."""
    by_id = {s.span_id: s for s in spans if s.trace_id == last.trace_id}
    path = [last]
    while path[-1].parent_id:
        parent = by_id.get(path[-1].parent_id)
        if parent is None:
            return []
        path.append(parent)
    return path[::-1]


def test_one_chunk_is_one_trace_through_every_hop_and_the_latency_histograms_fill(
        stack: LocalStack, otlp: OtlpReceiver) -> None:
    """A chunk's spans, exported over OTLP by every service: one trace from ``ingest.encode`` (its root) through
    each stage's forward and link hop and the ring return, the decoder, to the egress part that carries it, each
    the child of the hop before. Egress's /metrics has time to first frame and glass-to-glass; each stage its
    chunk time. (Reads what the first test's stream left; publishes one of its own when run alone.)"""
    def paths() -> list[list[ReceivedSpan]]:
        spans = otlp.snapshot()
        return [p for p in (_chunk_path(spans, s) for s in spans if s.name == "egress.package") if p]

    if not paths():
        stream = stack.api("POST", "/v1/streams", {"prompt": "trace", "width": SIZE, "height": SIZE, "fps": FPS,
                                                   "steps": STEPS, "seed": SEED, "slo_latency_ms": 120000})
        publish(stack, stream["stream_key"], 2)
    wait_for(lambda: bool(paths()), 60, "a chunk's trace from ingest to egress")
    path = paths()[0]
    names = [s.name for s in path if not s.name.startswith("rheo.")]  # the bus's own spans sit between services
    hop = ["dit.stage[0].forward", "link.send", "dit.stage[1].forward", "link.send", "dit.stage[2].forward"]
    assert names == ["ingest.encode", *[*hop, "link.send"] * (STEPS - 1), *hop, "decoder.decode",
                     "egress.package"], names
    services = {s.name: s.service for s in path}
    assert services["ingest.encode"] == "rheo-ingest" and services["decoder.decode"] == "rheo-decoder"
    assert services["egress.package"] == "rheo-egress" and services["dit.stage[1].forward"] == "rheo-dit-stage"
    assert path[0].parent_id == "" and len({s.trace_id for s in path}) == 1
    seq = path[0].attributes["rheo.seq"]
    assert all(s.attributes.get("rheo.seq", seq) == seq for s in path)  # one chunk, every hop

    assert _metric(stack, "egress", "rheo_ttff_seconds_count") >= 1
    assert _metric(stack, "egress", "rheo_glass_to_glass_seconds_count") >= 1
    for i in range(3):
        assert _metric(stack, f"dit-{i}", f'rheo_stage_chunk_seconds_count{{stage="{i}"}}') >= 1

    # rheo top reads the same: the stream from the API, each stage (its ring index) from its /metrics
    metrics = [f"http://127.0.0.1:{p.health_port}/metrics" for p in stack.procs]
    snap = top.collect(stack.gateway_url, stack.api_token, metrics)
    assert not snap.errors and path[0].attributes["rheo.stream_id"] in {s["id"] for s in snap.streams}
    assert sorted((r.stage, r.position) for r in snap.stages.values()) == [("dit-0", "0"), ("dit-1", "1"),
                                                                           ("dit-2", "2")]
    assert all(r.micro_steps > 0 and r.chunk_ms for r in snap.stages.values())
    assert snap.totals["rheo_glass_to_glass_seconds"][1] >= 1


async def _latent_arrivals(stack: LocalStack, sid: str, key: str, seconds: float) -> tuple[float, dict]:
    """Publish the marker test pattern (it prints frame 0's capture time, t0) and watch the stream's latent chunks
    as the first stage's identity: (t0, {seq: (wire capture_time, arrival)})."""
    bus = await Bus.connect(stack.nats_settings("dit-stage"), name="latency-watch")
    seen: dict[int, tuple[float, float]] = {}

    async def on_latent(msg) -> None:
        chunk = decode(msg.data, LatentChunk)
        seen.setdefault(chunk.seq, (chunk.capture_time, time.time()))

    await bus.nc.subscribe(Subjects.stream_latent(sid), cb=on_latent)
    url = f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/{key}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest.testpattern", url, "--size", "64x64", "--fps", str(FPS), "--seconds",
        str(seconds), "--marker", stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    t0 = json.loads(await proc.stdout.readline())["t0"]
    assert await proc.wait() == 0
    await asyncio.sleep(1.0)  # the last chunks
    await bus.close()
    return t0, seen


def test_ingest_publishes_a_chunk_within_two_chunk_durations_of_its_capture(stack: LocalStack) -> None:
    """The latency budget's first hop at low load (docs/latency.md): from a chunk's first frame captured (the
    publisher's clock) to its latent on the bus is at most 2 chunk durations (gather 3 frames + decode, pacing,
    queue, encode), and the wire's ``capture_time`` is never before the real capture (ingest's pacer anchors it at
    the session's first frame's arrival, late by however long the session took to go live: docs/latency.md)."""
    created = stack.api("POST", "/v1/streams", {"prompt": "a test pattern in watercolour", "width": SIZE,
                                                "height": SIZE, "fps": FPS, "steps": STEPS, "seed": SEED,
                                                "slo_latency_ms": 120000})
    t0, seen = asyncio.run(_latent_arrivals(stack, created["id"], created["stream_key"], seconds=4.0))
    chunk_s = 4 / FPS
    steady = [(seq, *v) for seq, v in sorted(seen.items()) if seq >= 2]
    assert len(steady) >= 4, seen
    captured = {seq: t0 + (5 + 4 * (seq - 1)) / FPS for seq, _, _ in steady}  # first frames (prepare: 5)
    hops = sorted(arrived - captured[seq] for seq, _, arrived in steady)
    assert hops[len(hops) // 2] <= 2 * chunk_s, hops  # medians: a loaded machine may stall one chunk
    offsets = sorted(wire - captured[seq] for seq, wire, _ in steady)
    assert offsets[0] >= -1 / FPS, offsets


def test_self_forcing_and_a_non_default_ring_through_two_stages(tmp_path: Path) -> None:
    """The ring configured once (``dit_stage.*``: Self-Forcing cache mode, window 5, 2 sinks, RoPE refresh at 6,
    inside the stream) reaches ingest's chunk clock and every stage: the stack equals ``StreamPipeline`` on the
    same ring. Ingest clocking chunks by the default ring while the stages use this one was a real bug."""
    ring = RingConfig(kv_window=5, sink=2, t_refresh=6, cache_mode="self_forcing", context_noise=30.0)
    env = {"RHEO_DIT_STAGE__KV_WINDOW": "5", "RHEO_DIT_STAGE__SINK": "2", "RHEO_DIT_STAGE__T_REFRESH": "6",
           "RHEO_DIT_STAGE__CACHE_MODE": "self_forcing", "RHEO_DIT_STAGE__CONTEXT_NOISE": "30.0"}
    with running_stack(tmp_path, stages=2, env=env) as s:
        ref = check_rtmp_to_hls_equals_pipeline(s, ring)
    plain = build_tiny_pipeline(PipelineConfig(width=SIZE, height=SIZE, steps=STEPS, output="float"))
    sid = plain.open_stream(PipelineStreamSpec(prompt="a test pattern in watercolour", seed=SEED))
    other = plain.push(sid, ref.frames_in)
    assert np.abs(other[: len(ref.frames)] - ref.frames[: len(other)]).max() > 1e-3  # negative control: the ring


def _taps(stack: LocalStack, sid: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Ingest's tapped input chunks (uint8, in seq order) and the decoder's tapped output frames (float)."""
    tap_in = sorted((stack.workdir / "tap-in" / sid).glob("chunk_*.npy"))
    tap_out = sorted((stack.workdir / "tap-out" / sid).glob("*.npy"), key=lambda p: int(p.stem))
    assert [int(p.stem[6:]) for p in tap_in] == list(range(len(tap_in)))
    assert [int(p.stem) for p in tap_out] == list(range(len(tap_out)))
    return [np.load(p) for p in tap_in], np.concatenate([np.load(p) for p in tap_out])


def _live_change(stack: LocalStack, change: dict, seconds: float = 6.0,
                 prompt_version: int = 1) -> tuple[str, int, list[np.ndarray], np.ndarray]:
    """Publish the test pattern, PATCH ``change`` once a few chunks are in; (id, effective seq, chunks in, out)."""
    created = stack.api("POST", "/v1/streams", {"prompt": "first", "width": SIZE, "height": SIZE, "fps": FPS,
                                                "steps": STEPS, "seed": SEED, "slo_latency_ms": 120000})
    sid = created["id"]
    url = f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/{created['stream_key']}"
    publisher = subprocess.Popen([sys.executable, "-m", "ingest.testpattern", url, "--size", "64x64", "--fps",
                                  str(FPS), "--seconds", str(seconds)], cwd=ROOT)
    tapped = stack.workdir / "tap-in" / sid
    try:
        wait_for(lambda: len(list(tapped.glob("*.npy"))) >= 3, 60, "three chunks to be encoded")
        before = len(list(tapped.glob("*.npy")))
        patched = stack.api("PATCH", f"/v1/streams/{sid}", change)
        after = len(list(tapped.glob("*.npy")))
    finally:
        publisher.wait(60)
    assert patched["prompt_version"] == prompt_version
    effective = patched["effective_seq"]
    # the reported seq is the next chunk ingest takes (blend) or cuts from the frames (cut) when the change
    # comes: it takes effect within steps + 1 chunks of what was encoded by then
    assert isinstance(effective, int) and before <= effective <= after + STEPS + 1, (before, effective, after)
    wait_for(lambda: stack.api("GET", f"/v1/streams/{sid}")["state"] == "ended", 60, "the stream to end")
    wait_for(lambda: b"#EXT-X-ENDLIST" in http_get(stack, f"{stack.playback(sid)}/index.m3u8")[1], 90, "EXT-X-ENDLIST")
    chunks_in, frames_out = _taps(stack, sid)
    assert effective + 3 <= len(chunks_in)
    return sid, effective, chunks_in, frames_out


def _reference(chunks_in: list[np.ndarray], change_at: int | None, **set_prompt: object) -> np.ndarray:
    """StreamPipeline on the same input chunks, with ``set_prompt("second", ...)`` before chunk ``change_at``."""
    pipe = build_tiny_pipeline(PipelineConfig(width=SIZE, height=SIZE, steps=STEPS, output="float"))
    sid = pipe.open_stream(PipelineStreamSpec(prompt="first", seed=SEED))
    out = []
    for seq, frames in enumerate(chunks_in):
        if seq == change_at:
            pipe.set_prompt(sid, "second", **set_prompt)  # type: ignore[arg-type]
        out.append(pipe.push(sid, frames))
    return np.concatenate(out)


def _chunk_frames(seq: int) -> slice:
    """Output frames of chunk ``seq`` of a stream's first segment (5 for the prepare chunk, then 4)."""
    start = 0 if seq == 0 else 5 + 4 * (seq - 1)
    return slice(start, start + (5 if seq == 0 else 4))


def test_live_prompt_change_takes_effect_at_the_reported_seq(stack: LocalStack) -> None:
    """PATCH a new prompt mid-stream: the decoder's frames equal StreamPipeline's with the same change applied
    before the reported chunk (which proves the seq and that nothing else changed); they equal the no-change
    output before it and differ from it at every chunk from it on (negative control)."""
    _, effective, chunks_in, frames_out = _live_change(stack, {"prompt": "second", "mode": "blend",
                                                                "blend_chunks": 1})
    _assert_change_at(frames_out, effective, _reference(chunks_in, effective, mode="blend", chunks=1),
                      _reference(chunks_in, None))


def _assert_change_at(frames_out: np.ndarray, effective: int, ref: np.ndarray, other: np.ndarray,
                      chunks: int | None = None) -> None:
    """The output equals ``ref``; before chunk ``effective`` it equals ``other`` too, and from it on (for
    ``chunks`` chunks, default: every whole chunk out) it differs from ``other`` at every chunk."""
    n = min(len(ref), len(frames_out))
    last = (n - 5) // 4  # the last whole output chunk
    assert last >= effective + 1, (n, effective)
    np.testing.assert_allclose(frames_out[:n], ref[:n], atol=1e-5, rtol=0)
    change = _chunk_frames(effective).start
    np.testing.assert_allclose(frames_out[:change], other[:change], atol=1e-5, rtol=0)
    for seq in range(effective, min(last, effective + chunks - 1 if chunks else last) + 1):
        assert np.abs(frames_out[_chunk_frames(seq)] - other[_chunk_frames(seq)]).max() > 1e-3, seq


def test_live_cut_restarts_the_warm_up_as_the_single_process_pipeline_does(stack: LocalStack) -> None:
    """PATCH with ``mode: cut`` (the API's default): the chunks already cut finish under the old prompt, then
    ingest, every DiT stage and the decoder start a new segment (fresh caches, a 5-frame prepare chunk at the
    reported seq, the segment's seed). The decoder's frames equal StreamPipeline's ``set_prompt(mode="cut")``
    before that chunk, and differ from the no-change output from there on (negative control)."""
    _, effective, chunks_in, frames_out = _live_change(stack, {"prompt": "second"})
    assert len(chunks_in[effective]) == 5 and all(len(c) == 4 for c in chunks_in[effective + 1 :])
    ref = _reference(chunks_in, effective, mode="cut")
    unchanged = _reference(chunks_in, None)
    n = min(len(ref), len(frames_out))
    change = _chunk_frames(effective).start
    assert n >= change + 5 + 4, (n, change)
    np.testing.assert_allclose(frames_out[:n], ref[:n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(frames_out[:change], unchanged[:change], atol=1e-5, rtol=0)
    for a in range(change, min(n, len(unchanged)) - 3, 4):
        assert np.abs(frames_out[a : a + 4] - unchanged[a : a + 4]).max() > 1e-3, a


def test_live_steps_and_noise_changes_equal_the_single_process_pipeline(stack: LocalStack) -> None:
    """PATCH ``steps`` 2 → 3, then ``noise_scale`` 0.8 → 0.6 with a new ``seed`` (same segment: its noise from that
    chunk on), then ``steps`` 3 → 1 on one live stream (a steps change used to freeze the stream: every later chunk
    a bad_shape drop at the first stage while the API said live). Each reports the seq it takes effect at; the
    decoder's frames equal ``StreamPipeline`` on the same input chunks with ``set_params`` applied before those seqs,
    and differ from the unchanged stream after the first."""
    created = stack.api("POST", "/v1/streams", {"prompt": "first", "width": SIZE, "height": SIZE, "fps": FPS,
                                                "steps": STEPS, "seed": SEED, "slo_latency_ms": 120000})
    sid = created["id"]
    url = f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/{created['stream_key']}"
    publisher = subprocess.Popen([sys.executable, "-m", "ingest.testpattern", url, "--size", "64x64", "--fps",
                                  str(FPS), "--seconds", "10"], cwd=ROOT)
    tapped = stack.workdir / "tap-in" / sid
    changes = [{"steps": 3}, {"noise_scale": 0.6, "seed": SEED + 7}, {"steps": 1}]  # a new seed, no new segment
    effective: list[int] = []
    try:
        for change in changes:
            wanted = 3 + (effective[-1] if effective else 0)
            wait_for(lambda n=wanted: len(list(tapped.glob("*.npy"))) >= n, 60, f"{wanted} chunks to be encoded")
            patched = stack.api("PATCH", f"/v1/streams/{sid}", change)
            assert isinstance(patched["effective_seq"], int)
            effective.append(patched["effective_seq"])
    finally:
        publisher.wait(60)
    assert effective == sorted(effective) and len(set(effective)) == 3, effective
    wait_for(lambda: stack.api("GET", f"/v1/streams/{sid}")["state"] == "ended", 60, "the stream to end")
    wait_for(lambda: b"#EXT-X-ENDLIST" in http_get(stack, f"{stack.playback(sid)}/index.m3u8")[1], 90, "EXT-X-ENDLIST")
    chunks_in, frames_out = _taps(stack, sid)
    assert effective[-1] + 3 <= len(chunks_in)
    assert len(chunks_in[effective[0]]) == len(chunks_in[effective[2]]) == 5  # new segments' prepare chunks

    pipe = build_tiny_pipeline(PipelineConfig(width=SIZE, height=SIZE, steps=STEPS, output="float"))
    ref_id = pipe.open_stream(PipelineStreamSpec(prompt="first", seed=SEED))
    ref = []
    for seq, frames in enumerate(chunks_in):
        if seq in effective:
            pipe.set_params(ref_id, **changes[effective.index(seq)])  # type: ignore[arg-type]
        ref.append(pipe.push(ref_id, frames))
    want = np.concatenate(ref)
    n = min(len(want), len(frames_out))
    assert n >= _chunk_frames(effective[-1]).start + 5 + 4, (n, effective)
    np.testing.assert_allclose(frames_out[:n], want[:n], atol=1e-5, rtol=0)
    unchanged = _reference(chunks_in, None)
    change, m = _chunk_frames(effective[0]).start, min(n, len(unchanged))
    assert np.abs(frames_out[change:m] - unchanged[change:m]).max() > 1e-3  # negative control


def test_live_blend_over_four_chunks_equals_the_single_process_pipeline(stack: LocalStack) -> None:
    """PATCH a `blend` over 4 chunks: ingest stamps the next chunks with (new version, old version, j/4) and the
    first DiT stage lerps the two embeddings; the decoder's frames equal StreamPipeline's ``set_prompt(mode=
    "blend", chunks=4)`` before the reported chunk, and differ from an instant switch (negative control)."""
    _, effective, chunks_in, frames_out = _live_change(stack, {"prompt": "second", "mode": "blend",
                                                                "blend_chunks": 4}, seconds=8.0)
    _assert_change_at(frames_out, effective, _reference(chunks_in, effective, mode="blend", chunks=4),
                      _reference(chunks_in, effective, mode="blend", chunks=1), chunks=3)


def test_a_t2v_stream_plays_in_hls_and_equals_the_single_process_pipeline(stack: LocalStack) -> None:
    """A stream created with ``t2v: true`` has no publisher: ingest starts it from the stream table and makes its
    noise-only chunks on the chunk clock. Its HLS segments decode to the spec's size while it is live; the
    decoder's frames equal ``StreamPipeline.generate`` with the same seed, prompt and latent frames per chunk;
    deleting the stream ends it."""
    prompt = "a watercolour sea"
    created = stack.api("POST", "/v1/streams", {"prompt": prompt, "width": SIZE, "height": SIZE, "fps": FPS,
                                                "steps": STEPS, "seed": SEED, "t2v": True, "t2v_frames": 2,
                                                "slo_latency_ms": 120000})
    sid = created["id"]
    tapped = stack.workdir / "tap-out" / sid
    wait_for(lambda: len(list(tapped.glob("*.npy"))) >= 4, 180, "four T2V chunks decoded")

    def segments() -> list:
        status, body = http_get(stack, f"{stack.playback(sid)}/index.m3u8")
        return m3u8.loads(body.decode()).segments if status == 200 else []

    wait_for(lambda: len(segments()) >= 2, 60, "two HLS segments")
    _, init = http_get(stack, f"{stack.playback(sid)}/init.mp4")
    decoded = 0
    for seg in segments():
        _, data = http_get(stack, f"{stack.playback(sid)}/{seg.uri}")
        with av.open(io.BytesIO(init + data)) as container:
            for frame in container.decode(container.streams.video[0]):
                assert (frame.width, frame.height) == (SIZE, SIZE)
                decoded += 1
    assert decoded >= 2 * FPS  # two 1 s segments

    stack.api("DELETE", f"/v1/streams/{sid}")
    _, frames_out = _taps_out(stack, sid)
    pipe = build_tiny_pipeline(PipelineConfig(width=SIZE, height=SIZE, steps=STEPS, output="float",
                                              t2v_latent_frames=2))
    ref = pipe.generate(pipe.open_stream(PipelineStreamSpec(prompt=prompt, seed=SEED, t2v=True)), len(frames_out))
    n = min(len(ref), len(frames_out))
    assert n >= 5 + 8 * 2, (len(ref), len(frames_out))
    np.testing.assert_allclose(frames_out[:n], ref[:n], atol=1e-5, rtol=0)
    other = build_tiny_pipeline(PipelineConfig(width=SIZE, height=SIZE, steps=STEPS, output="float"))
    one_frame = other.generate(other.open_stream(PipelineStreamSpec(prompt=prompt, seed=SEED, t2v=True)), n)
    assert np.abs(frames_out[5:n] - one_frame[5:n]).max() > 1e-3  # negative control: latent frames per chunk


def _taps_out(stack: LocalStack, sid: str) -> tuple[int, np.ndarray]:
    """The decoder's tapped frames of a stream, once they stop growing: (chunks, frames in seq order)."""
    tapped = stack.workdir / "tap-out" / sid
    counts: list[int] = []

    def settled() -> bool:
        counts.append(len(list(tapped.glob("*.npy"))))
        return len(counts) > 10 and len(set(counts[-10:])) == 1

    wait_for(settled, 120, "the decoder's output to settle")
    paths = sorted(tapped.glob("*.npy"), key=lambda p: int(p.stem))
    assert [int(p.stem) for p in paths] == list(range(len(paths)))
    return len(paths), np.concatenate([np.load(p) for p in paths])


def test_the_up_stack_plays_moving_video_in_chromium(stack: LocalStack) -> None:
    """``rheo up --testpattern`` (its demo stream and publisher, on this module's stack), watched as its printed
    player URL in headless Chromium: the video plays, its currentTime advances and the picture changes."""
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    if not HLSJS_DEFAULT.is_file():
        pytest.skip(f"hls.js missing at {HLSJS_DEFAULT} (scripts/fetch-hlsjs.sh)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) not installed")
    created = open_demo_stream(stack, "a test pattern in watercolour", weights=False)
    publisher = start_testpattern(created["publish_url"])
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page()
                page.goto(stack.gateway_url + created["player_path"])
                page.wait_for_function(PLAYING, timeout=30000)
                time.sleep(1.0)  # hls.js settles onto its live-sync position first
                t0, frame0, wall0 = page.evaluate(CURRENT_TIME), page.evaluate(FRAME_HASH), time.monotonic()
                time.sleep(4.0)
                t1, frame1, wall1 = page.evaluate(CURRENT_TIME), page.evaluate(FRAME_HASH), time.monotonic()
                errors = page.evaluate("window.report.errors")
            finally:
                browser.close()
    finally:
        publisher.terminate()
        publisher.wait(10)
    assert t1 - t0 >= 0.5 * (wall1 - wall0), (t0, t1, wall1 - wall0, errors)
    assert frame1 != frame0, "the picture did not change"
    assert not [e for e in errors if e.startswith("FATAL")], errors


async def _forge(stack: LocalStack, sid: str) -> int:
    """The forgeries of issue #13 from identities without the permission; returns the refusals the server sent."""
    denied = "rheo_bus_permission_denied_total"
    before = REGISTRY.get_sample_value(denied, {"op": "publish"}) or 0.0
    assert stack.nats is not None
    with pytest.raises(BusError):  # nothing anonymous
        await Bus.connect(NatsSettings(url=stack.nats.url, initial_connect_attempts=1), name="anonymous")
    egress = await Bus.connect(stack.nats_settings("egress"), name="forger-egress")
    try:
        await egress.publish(Subjects.stream_event(sid), StreamEvent(stream_id=sid, kind="ended", at=time.time()))
        await egress.publish(Subjects.stream_x0("ghost"), b"RH" + b"\x00" * 64)
        with contextlib.suppress(nats.errors.TimeoutError):
            await egress.request(Subjects.admission(), StreamSpec(stream_id="ghost", width=64, height=64, fps=8,
                                                                  steps=1, prompt="p"), timeout=1.0)
        await egress.publish(Subjects.heartbeat("dit-stage", "dit-1"),
                             Heartbeat(member_id="dit-1", role="dit-stage", epoch=0, sent_at=time.time(), ready=True))
        await egress.nc.flush()
        for _ in range(100):
            if (REGISTRY.get_sample_value(denied, {"op": "publish"}) or 0.0) - before >= 4:
                break
            await asyncio.sleep(0.05)
    finally:
        await egress.close()
    return int((REGISTRY.get_sample_value(denied, {"op": "publish"}) or 0.0) - before)


def test_rheo_up_reopens_its_demo_stream_with_the_same_key(stack: LocalStack, tmp_path: Path) -> None:
    """A restarted ``rheo up`` (same state folder) finds its demo stream in the table and hands out the same
    stream key and OBS settings, with the prompt asked for now; ``--fresh`` (no saved demo) makes a new one."""
    state: dict = {}
    first = demo_stream(stack, state, tmp_path, "a first prompt", weights=False)
    again = demo_stream(stack, json.loads(json.dumps(state)), tmp_path, "a second prompt", weights=False)
    assert (again["id"], again["stream_key"], again["publish_url"]) == (first["id"], first["stream_key"],
                                                                      first["publish_url"])
    assert again["player_path"].startswith("/player/index.html?src=/hls/" + first["id"])
    assert stack.api("GET", f"/v1/streams/{first['id']}")["spec"]["prompt"] == "a second prompt"
    other = demo_stream(stack, {}, tmp_path, "a first prompt", weights=False)
    assert other["id"] != first["id"] and other["stream_key"] != first["stream_key"]
    for sid in (first["id"], other["id"]):
        stack.api("DELETE", f"/v1/streams/{sid}")


def test_forged_bus_messages_leave_a_live_stream_untouched(stack: LocalStack) -> None:
    """A forged ``ended``, a ghost stream's x0, an admission request and a stage's heartbeat, each from a role
    that may not send it: the server refuses all four, the live stream stays live and its styled output keeps
    flowing, and no service of the stack was ever refused anything (the derived permissions fit the code)."""
    created = stack.api("POST", "/v1/streams", {"prompt": "forged", "width": SIZE, "height": SIZE, "fps": FPS,
                                                "steps": STEPS, "seed": SEED, "slo_latency_ms": 120000})
    sid = created["id"]
    pub = subprocess.Popen([sys.executable, "-m", "ingest.testpattern",
                            f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/{created['stream_key']}", "--size", "96x64",
                            "--fps", str(FPS), "--seconds", "120"], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    out = stack.workdir / "tap-out" / sid
    shown = lambda: len(list(out.glob("*.npy")))  # noqa: E731
    try:
        wait_for(lambda: shown() >= 2 and stack.api("GET", f"/v1/streams/{sid}")["state"] == "live", 120,
              "styled output of the live stream")
        assert asyncio.run(_forge(stack, sid)) == 4
        before = shown()
        wait_for(lambda: shown() >= before + 2, 60, "styled output after the forgeries")
        assert stack.api("GET", f"/v1/streams/{sid}")["state"] == "live"
    finally:
        pub.terminate()
        pub.wait(10)
    stack.api("DELETE", f"/v1/streams/{sid}")  # the deletion path too must stay within the permissions
    assert stack.nats is not None and "Publish Violation" in stack.nats.log_tail(200_000)
    for p in stack.procs:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.health_port}/metrics", timeout=5) as r:
            refused = [line for line in r.read().decode().splitlines()
                       if line.startswith("rheo_bus_permission_denied_total{") and not line.endswith(" 0.0")]
        assert not refused, (p.name, refused)


def test_ingest_and_decoder_run_their_vae_through_the_batcher(stack: LocalStack) -> None:
    """The streams above went through one batched VAE call per loop turn (encoder/batching.py) in both processes."""
    for name, op in (("ingest", "encode"), ("decoder", "decode")):
        proc = next(p for p in stack.procs if p.name == name)
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.health_port}/metrics", timeout=5) as r:
            lines = r.read().decode().splitlines()
        count = [float(line.rsplit(" ", 1)[1]) for line in lines
                 if line.startswith(f'rheo_vae_batch_chunks_count{{op="{op}"}}')]
        assert count and count[0] > 0, (name, count)


def test_a_stage_link_refuses_a_peer_without_the_key(stack: LocalStack) -> None:
    """Reaching a stage's link port is not enough (docs/security.md): the stage challenges first and closes a peer
    that answers with the unkeyed wire instead of the key's proof, before reading a frame."""
    port = int(next(p for p in stack.procs if p.name == "dit-1").env["RHEO_DIT_STAGE__LINK_PORT"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert sock.recv(8) == b"RHEOLNK2"
        sock.sendall(struct.pack("<QQQ", 64, 1, 1) + bytes(64))  # a frame prefix where the proof belongs
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(4096):
                pass


def test_bad_keys_are_refused_and_the_api_and_playback_need_tokens(stack: LocalStack) -> None:
    url = f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/not-a-key"
    out = subprocess.run([sys.executable, "-m", "ingest.testpattern", url, "--seconds", "1"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    req = urllib.request.Request(stack.gateway_url + "/v1/streams")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401
    assert json.loads(e.value.read())["detail"].startswith("a valid API token")

    # playback needs the signed URL the API returns: on the gateway and directly on the egress port alike
    sid = stack.api("POST", "/v1/streams", {"prompt": "p", "width": SIZE, "height": SIZE})["id"]
    signed = stack.playback(sid)
    egress = f"http://127.0.0.1:{stack.ports.egress}"
    for url, code in [(f"{stack.gateway_url}/hls/{sid}/index.m3u8", 401), (f"{egress}/hls/{sid}/index.m3u8", 401),
                      (f"{egress}/hls/{sid}/1.AAAAAAAAAAAAAAAAAAAAAA/init.mp4", 403),
                      (f"{egress}{signed}/../../x/index.m3u8".replace("/../..", "/..%2f.."), 400)]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == code, (url, e.value.read())
    with pytest.raises(urllib.error.HTTPError) as e:  # signed, not playing yet: the egress does not know it
        urllib.request.urlopen(f"{egress}{signed}/index.m3u8", timeout=10)
    assert e.value.code == 404
