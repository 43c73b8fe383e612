"""Faults in the whole stack as real processes (``LocalStack``: nats-server, controller, 3 DiT stages, decoder,
egress, ingest, gateway): a DiT stage killed mid-stream, then nats-server restarted mid-stream.

A dead stage: the controller notices the heartbeat miss and publishes a ``failure`` block map over the survivors
(services/controller; static mode here, so no rebalance epoch interleaves). Ingest replays each stream's ring; the
stages rebuild the KV from it. What must hold (docs/recovery.md): the HLS output has no gap (CFR: the decoder
repeats the last frame meanwhile), styled output returns within 5 s, both streams recover, and with
``ingest.replay_chunks = B·L·(R − 1)`` every chunk shown equals the single-process reference's DiT output — decoded
in the same order as the decoder saw it, since the decoder skipped the chunks that died with the stage and its
causal VAE cache remembers that for ~30 chunks.

The two tests share one stack (starting it is most of their cost): the NATS restart runs on the survivors.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import av
import m3u8
import numpy as np
import pytest
import torch

from decoder.service import frames_from_decoded
from encoder.vae import StreamVAE
from ingest.replay import exact_replay_chunks, sink_chunks
from pipeline.loading import build_tiny_pipeline
from pipeline.pipeline import PipelineConfig
from pipeline.state import StreamSpec as PipelineStreamSpec
from proto.spec import RingConfig
from services.stack import LocalStack, Ports
from wan.tiny import make_tiny_vae

from .stackkit import create_stream, current_map, decoded, encoded, encoded_at, metric, publisher, shown_at, wait

# A short KV window (sink = the prepare chunk's 2 frames, 2 rolling frames) keeps the exact replay short:
# B·L·(R − 1) = 2·3·1 = 6 chunks. (Ingest's chunk clock uses the default window for RoPE refresh, which only
# matters after 50 latent frames; these streams are shorter.)
SIZE, FPS, STEPS, BLOCKS, WINDOW, SINK = 64, 8, 2, 3, 4, 2
REPLAY = exact_replay_chunks(WINDOW, SINK, BLOCKS, STEPS)
# adaptive sinks off: they would put data-dependent history frames into the sinks, which no bounded ring restores;
# deep queues everywhere: on a loaded CI machine nothing may be dropped, or the reference would not apply
MISS_S = 2.0  # the controller's heartbeat budget (a loaded CI node must not starve a live stage that long)
CONFIG_YAML = f"""
stream: {{slo_latency_ms: 120000}}
dit_stage: {{kv_window: {WINDOW}, sink: {SINK}, adaptive_threshold: null, max_queued_chunks: 64}}
ingest: {{replay_chunks: {REPLAY}, chunk_queue_depth: 64}}
decoder: {{max_queued_chunks: 64, ended_grace_s: 15}}
egress: {{ended_grace_s: 15, playlist_segments: 100}}
controller: {{mode: static, advisory: true, heartbeat_miss_s: {MISS_S}, heartbeat_dead_s: {MISS_S}}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    work = tmp_path_factory.mktemp("faults")
    (work / "rheo.yaml").write_text(CONFIG_YAML)
    # dit-1 is killed on purpose and stays down: these tests are about the failover over the survivors (a
    # restarted dit-1 would rejoin in a new epoch; its restart is tests/faults/test_supervision.py's subject)
    s = LocalStack(work, stages=3, ports=Ports.ephemeral(), no_restart={"dit-1"}, extra_env={
        "RHEO_CONFIG": str(work / "rheo.yaml"),
        "RHEO_INGEST__STREAM_LINGER_S": "1",
        "RHEO_INGEST__DEBUG_TAP_DIR": str(work / "tap-in"),
        "RHEO_DECODER__DEBUG_TAP_DIR": str(work / "tap-out"),
        "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2",
        "RHEO_EGRESS__SEGMENT_SECONDS": "1.0",
        "OMP_NUM_THREADS": "1",  # nine processes share two cores
    })
    try:
        s.start(timeout=300)
        yield s
    finally:
        codes = s.stop(timeout=60)  # a loaded 2-core machine can take over 10 s to exit nine interpreters
        assert all(c == 0 for name, c in codes.items() if name != "dit-1"), f"services did not exit cleanly: {codes}"
        assert not any(s.restarts.values()), f"services crashed and were restarted: {s.restarts}"


# -- helpers -------------------------------------------------------------------------------------------------------


def _create(stack: LocalStack, prompt: str, seed: int) -> dict:
    return create_stream(stack, SIZE, FPS, STEPS, prompt, seed)


def _publisher(stack: LocalStack, key: str, seconds: float) -> subprocess.Popen:
    return publisher(stack, key, FPS, seconds)


def _get(stack: LocalStack, path: str) -> bytes:
    with urllib.request.urlopen(stack.gateway_url + path, timeout=10) as r:
        return r.read()


def _hls_frames(stack: LocalStack, sid: str) -> tuple[list[float], int]:
    """Presentation times (s) of every frame of the stream's HLS output, decoded back, and the segment count."""
    playlist = m3u8.loads(_get(stack, f"{stack.playback(sid)}/index.m3u8").decode())
    assert playlist.is_endlist and playlist.segments
    init = _get(stack, f"{stack.playback(sid)}/init.mp4")
    times: list[float] = []
    for seg in playlist.segments:
        with av.open(io.BytesIO(init + _get(stack, f"{stack.playback(sid)}/{seg.uri}"))) as container:
            stream = container.streams.video[0]
            times += [float(f.pts * f.time_base) for f in container.decode(stream)]
    return times, len(playlist.segments)


def _reference_x0(frames_in: np.ndarray, seed: int, prompt: str) -> tuple[list[torch.Tensor], np.ndarray]:
    """The single-process StreamPipeline on the frames ingest tapped: the x0 of every chunk (what its VAE is
    asked to decode, in order) and its output frames."""
    pipe = build_tiny_pipeline(PipelineConfig(width=SIZE, height=SIZE, steps=STEPS, output="float",
                                              ring=RingConfig(kv_window=WINDOW, sink=SINK, adaptive_threshold=None)))
    x0s: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def recording_decode(state, latents):
        x0s.append(latents.clone())
        return decode(state, latents)

    pipe.vae.decode = recording_decode
    sid = pipe.open_stream(PipelineStreamSpec(prompt=prompt, seed=seed))
    return x0s, pipe.push(sid, frames_in)


def _check_equal_to_reference(stack: LocalStack, sid: str, seed: int, prompt: str, gap: tuple[int, int] | None,
                              last_before: int) -> None:
    """Every chunk shown equals the single-process reference's DiT output for it, decoded in the order the decoder
    saw the chunks; without a gap that is the plain StreamPipeline output."""
    tap_in = sorted((stack.workdir / "tap-in" / sid).glob("chunk_*.npy"))
    frames_in = np.concatenate([np.load(p) for p in tap_in])
    x0s, ref_frames = _reference_x0(frames_in, seed, prompt)
    seqs = [s for s in decoded(stack, sid) if s < len(x0s)]
    assert len([s for s in seqs if s > last_before]) >= 4, (seqs, last_before)  # enough output after recovery
    shown = {s: np.load(stack.workdir / "tap-out" / sid / f"{s}.npy") for s in seqs}
    vae = StreamVAE(make_tiny_vae(0))
    state = vae.new_state()
    worst = {}
    for s in seqs:
        want, _ = frames_from_decoded(vae.decode(state, x0s[s]))
        worst[s] = float(np.abs(shown[s] - want).max())
    assert max(worst.values()) <= 1e-5, {s: e for s, e in worst.items() if e > 1e-5}
    for s in seqs:
        a = 0 if s == 0 else 5 + 4 * (s - 1)
        plain = ref_frames[a: a + len(shown[s])]
        if gap is None or s < gap[0]:
            np.testing.assert_allclose(shown[s], plain, atol=1e-5, rtol=0)
        elif s == gap[1] + 1:  # negative control: the decoder's cache did skip chunks; the check can fail
            assert np.abs(shown[s] - plain).max() > 1e-3


# -- the tests -----------------------------------------------------------------------------------------------------


def test_a_killed_stage_is_rebuilt_by_replay(stack: LocalStack) -> None:
    streams = {"a": ("watercolour bars", 7), "b": ("ink bars", 8)}
    created = {name: _create(stack, prompt, seed) for name, (prompt, seed) in streams.items()}
    # publishers run until the test has seen enough (a loaded CI node may lag seconds behind real time)
    pubs = [_publisher(stack, c["stream_key"], seconds=120) for c in created.values()]
    try:
        ids = {name: c["id"] for name, c in created.items()}
        # past the ring's reach: chunks 2..n−REPLAY are not replayed, so exactness is the replay's doing
        warm = 1 + sink_chunks(SINK) + REPLAY + 2
        wait(lambda: all(len(decoded(stack, sid)) >= warm for sid in ids.values()), 90, f"{warm} chunks each")
        dit1 = next(p for p in stack.procs if p.name == "dit-1")
        assert dit1.popen is not None
        os.killpg(dit1.popen.pid, signal.SIGKILL)
        dit1.popen.wait()
        kill_shown = {name: decoded(stack, sid)[-1] for name, sid in ids.items()}
        killed_at = time.monotonic()
        # the controller declares dit-1 dead after its heartbeat budget; chunks sent to it meanwhile are lost
        wait(lambda: current_map(stack).reason == "failure", 30, "the controller's failure epoch")
        assert time.monotonic() - killed_at < MISS_S + 5.0
        new = current_map(stack)
        assert [s.stage_id for s in new.stages] == ["dit-0", "dit-2"]
        # every chunk encoded after this point is published after the failure map: live, under the new epoch
        last_encoded = {name: encoded(stack, sid)[-1] for name, sid in ids.items()}
        # styled output returns: chunks of the new epoch are shown
        for name, sid in ids.items():
            wait(lambda sid=sid, name=name: len([s for s in decoded(stack, sid) if s > last_encoded[name]]) >= 6, 90,
                  f"stream {name} back")
    finally:
        for p in pubs:
            p.terminate()
            p.wait(30)
    for sid in ids.values():
        wait(lambda sid=sid: stack.api("GET", f"/v1/streams/{sid}")["state"] == "ended", 60, "the stream to end")
        wait(lambda sid=sid: b"#EXT-X-ENDLIST" in _get(stack, f"{stack.playback(sid)}/index.m3u8"), 60, "EXT-X-ENDLIST")

    # ingest replayed each stream's ring: the prepare chunk, the sink chunk and the last REPLAY chunks
    assert metric(stack, "ingest", "rheo_ingest_chunks_replayed_total") == 2 * (1 + sink_chunks(SINK) + REPLAY)
    # the survivors dropped what the old epoch had in flight, and the decoder covered the gap with repeats
    assert metric(stack, "dit-2", "rheo_dit_stage_streams_reset_total") == 2  # kept its blocks, not their KV
    assert metric(stack, "decoder", "rheo_decoder_frames_total", kind="repeated") > 0
    for name, sid in ids.items():
        seqs = decoded(stack, sid)
        # within 5 s: the first chunk of the new epoch reaches the viewer at most 5 s later than chunks did before
        # the failure (latency from ingest's encode to the decoder's output; on a CI machine too loaded to keep
        # real time, both include the same backlog)
        latency = {s: shown_at(stack, sid, s) - encoded_at(stack, sid, s) for s in seqs}
        before = max(latency[s] for s in seqs if s <= kill_shown[name])
        first_new = min(s for s in seqs if s > last_encoded[name])
        assert latency[first_new] <= before + 5.0, (first_new, latency)
        # the chunks that died with the stage (if any were in flight) are one gap
        missing = sorted(set(range(seqs[-1] + 1)) - set(seqs))
        assert missing == list(range(missing[0], missing[-1] + 1)) if missing else True, missing
        # HLS: constant frame rate, no hole in the timeline (the decoder repeated frames through the gap)
        times, _ = _hls_frames(stack, sid)
        steps = np.diff(times)
        assert np.allclose(steps, 1 / FPS, atol=1e-3), sorted(set(np.round(steps, 4)))
        assert len(times) >= 4 * len(seqs)
    # equal to the reference (one stream: the single-process reference costs half a minute on a loaded CI node;
    # the other stream's recovery is the same code on the same stages)
    seqs = decoded(stack, ids["a"])
    missing = sorted(set(range(seqs[-1] + 1)) - set(seqs))
    _check_equal_to_reference(stack, ids["a"], streams["a"][1], streams["a"][0],
                              (missing[0], missing[-1]) if missing else None, last_encoded["a"])


def test_a_nats_restart_mid_stream_resumes_within_3_s(stack: LocalStack) -> None:
    created = _create(stack, "bars after a restart", 9)
    sid = created["id"]
    pub = _publisher(stack, created["stream_key"], seconds=120)
    try:
        wait(lambda: len(decoded(stack, sid)) >= 4, 90, "4 chunks")
        assert stack.nats is not None
        port = int(stack.nats.url.rsplit(":", 1)[1])
        stack.nats.stop()
        seen = decoded(stack, sid)[-1]
        stack.start_nats(port)  # same port, same JetStream store
        resumed = wait(lambda: decoded(stack, sid)[-1] > seen + 1, 30, "chunks after the restart")
        assert resumed <= 3.0, f"resumed {resumed:.1f}s after nats-server came back"
        # every service (the dead stage aside) reconnected, as its bus logs it
        alive = [p for p in stack.procs if p.name != "dit-1"]
        wait(lambda: all("reconnected" in p.log_tail(100_000) for p in alive), 10, "every service to reconnect")
        wait(lambda: decoded(stack, sid)[-1] > seen + 4, 60, "more chunks after the restart")
    finally:
        pub.terminate()
        pub.wait(30)
    # the stream table (JetStream KV, file storage) survived; the stream ends normally and its playlist closes
    wait(lambda: stack.api("GET", f"/v1/streams/{sid}")["state"] == "ended", 60, "the stream to end")
    wait(lambda: b"#EXT-X-ENDLIST" in _get(stack, f"{stack.playback(sid)}/index.m3u8"), 60, "EXT-X-ENDLIST")
    # the timeline goes on; video messages in flight inside nats-server when it stopped are lost (core NATS keeps
    # nothing), so the egress may skip those frames: a bounded jump, never a stall
    times, _ = _hls_frames(stack, sid)
    steps = np.diff(times)
    assert (steps > 0).all() and steps.max() <= 1.0, sorted(set(np.round(steps, 3)))
