"""The ingest service over real RTMP and a real nats-server: chunks, prompts, refusals, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
from media_io.mediakit import RawRtmp, free_port, publish_pyav

from encoder.prompt import PromptEncoder, trim_padding
from encoder.vae import StreamVAE
from ingest.service import (
    CHUNKS_DROPPED,
    IngestService,
    IngestStream,
    largest_messages,
    max_prompt_tokens,
)
from proto import (
    CHANNELS,
    SLO,
    Ack,
    Assignment,
    BlockMap,
    Buckets,
    Error,
    Heartbeat,
    LatentChunk,
    PromptUpdate,
    StageAssignment,
    StreamEvent,
    StreamSpec,
    Subjects,
    blockmap_key,
)
from proto.clock import ChunkClock
from proto.spec import chunk_timesteps
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.streams import StreamNotFound, StreamTable, new_stream_id
from support.sync import running
from wan.tiny import make_tiny_t5, make_tiny_tokenizer, make_tiny_vae

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
LATENCY_MS = 60000.0  # a loaded 2-core CI machine must not turn these tests into deadline-drop tests


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ingest(nats_settings: NatsSettings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IngestService]:
    settings = Settings(
        nats=nats_settings,
        telemetry={"metrics_port": 0},
        lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2},
        ingest={"rtmp_host": "127.0.0.1", "rtmp_port": 0, "chunk_queue_depth": 32, "stream_linger_s": 0.3,
                "replay_chunks": 3, "debug_tap_dir": tmp_path_factory.mktemp("tap"),
                "admission_without_controller": "admit",  # no controller here
                "frame_timeout_s": 3.0},
    )
    async with running(IngestService(settings, member_id="ingest-test")) as service:
        yield service


class Recorder:
    """Everything a stream's subjects carry, as the DiT stages would see it."""

    def __init__(self) -> None:
        self.chunks: list[LatentChunk] = []
        self.events: list[StreamEvent] = []
        self.prompts: list[PromptUpdate] = []

    async def attach(self, bus: Bus, sid: str, ring_id: str = "0") -> None:
        async def on_chunk(m: LatentChunk, _raw) -> None:
            self.chunks.append(m)

        async def on_event(m: StreamEvent, _raw) -> None:
            self.events.append(m)

        async def on_prompt(m: PromptUpdate, _raw) -> None:
            self.prompts.append(m)

        await bus.subscribe(Subjects.stream_latent(sid, ring_id), on_chunk, expected=LatentChunk, credit=True)
        await bus.subscribe(Subjects.stream_event(sid), on_event, expected=StreamEvent)
        await bus.subscribe(Subjects.stream_prompt(sid), on_prompt, expected=PromptUpdate)
        await bus.nc.flush()

    def ended(self) -> bool:
        return any(e.kind == "ended" for e in self.events)


_CREATED: list[tuple[StreamTable, str]] = []


@pytest.fixture(autouse=True)
async def _forget_streams(bus: Bus) -> AsyncIterator[None]:
    """Leave the session's shared stream table as it was (other suites list it)."""
    yield
    while _CREATED:
        table, sid = _CREATED.pop()
        with contextlib.suppress(StreamNotFound):
            await table.delete(sid)


async def new_stream(bus: Bus, prompt: str, latency_ms: float = LATENCY_MS) -> tuple[StreamTable, StreamSpec, str]:
    table = await StreamTable.open(bus)
    spec = StreamSpec(stream_id=new_stream_id(), width=SIZE, height=SIZE, fps=16.0, steps=2, prompt=prompt,
                      slo=SLO(max_latency_ms=latency_ms))
    _, key = await table.create(spec)
    _CREATED.append((table, spec.stream_id))
    return table, spec, key


def tiny_prompt_encoder() -> PromptEncoder:
    return PromptEncoder(make_tiny_t5(0), make_tiny_tokenizer(), max_length=16)


def reference_noise(taps: list[np.ndarray]) -> list[float]:
    """SDv2's compute_noise_scale_and_step written out (s_init 0.8, range 0.1, EMA 0.1, sigma 0.2)."""
    scales, s_prev, last = [], 0.8, None
    for frames in taps:
        x = torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]
        if last is None:
            s = 0.8
        else:
            w = torch.cat([last, x], dim=2)
            d = float((((w[:, :, 1:] - w[:, :, :-1]) ** 2).mean(dim=(0, 1, 3, 4)).sqrt().max() / 0.2).clamp(0, 1))
            s = (0.8 - 0.1 * d) * (1 - 0.1) + s_prev * 0.1
        scales.append(s)
        s_prev, last = s, x[:, :, -1:]
    return scales


async def test_rtmp_clip_becomes_latent_chunks(ingest: IngestService, bus: Bus, eventually) -> None:
    table, spec, key = await new_stream(bus, "a red cat")
    sid = spec.stream_id
    rec = Recorder()
    await rec.attach(bus, sid)
    # 21 frames = chunk 0 (5 frames) + 4 chunks of 4; 96x64 is scaled to cover 64x64 and centre-cropped
    result = await publish_pyav(f"rtmp://127.0.0.1:{ingest.rtmp.port}/live/{key}", 21, 16, "96x64", "--realtime")
    assert result.report.get("ok"), result.report
    await eventually(rec.ended, timeout=20)

    assert [e.kind for e in rec.events] == ["live", "ended"]
    assert [c.seq for c in rec.chunks] == [0, 1, 2, 3, 4]
    assert rec.events[-1].seq == 4
    assert (await table.get(sid)).state == "ended"
    blockmap = await (await bus.kv(Buckets.BLOCKMAP)).get_message(blockmap_key("0"), BlockMap)
    epoch = blockmap.epoch if blockmap is not None else 0

    clock = ChunkClock()
    for c in rec.chunks:
        assert tuple(c.latent.shape) == (clock.latent_frames(c.seq), 4, SIZE // 8, SIZE // 8)
        assert c.latent.dtype == torch.float32
        assert (c.latent_start, c.rope_start) == (clock.latent_start(c.seq), clock.rope_start(c.seq))
        assert c.stream_id == sid and c.epoch == epoch and c.prompt_version == 0
        # capture time of the chunk's first frame; deadline = its last frame + the 1 s SLO
        last_frame = c.capture_time + (clock.input_frames(c.seq) - 1) / 16
        assert c.deadline == pytest.approx(last_frame + LATENCY_MS / 1000, abs=1e-6)

    # the same shaped frames through a fresh, identically built tiny VAE give the same latents
    taps = [np.load(ingest.settings.ingest.debug_tap_dir / sid / f"chunk_{c:06d}.npy") for c in range(5)]
    assert [t.shape[0] for t in taps] == [5, 4, 4, 4, 4]
    vae, wrong = StreamVAE(make_tiny_vae(0)), StreamVAE(make_tiny_vae(1))
    state, wrong_state = vae.new_state(), wrong.new_state()
    worst, control = 0.0, 0.0
    for c, frames in zip(rec.chunks, taps, strict=True):
        px = torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]
        expected = vae.encode(state, px)[0].transpose(0, 1)
        worst = max(worst, float((c.latent - expected).abs().max()))
        control = max(control, float((c.latent - wrong.encode(wrong_state, px)[0].transpose(0, 1)).abs().max()))
    assert worst <= 1e-5, worst
    assert control > 1e-2, control  # negative control: another VAE is told apart

    scales = reference_noise(taps)
    assert scales[0] == 0.8 and any(s < 0.8 for s in scales[1:])  # the barcode moves: motion lowers s
    for c, s in zip(rec.chunks, scales, strict=True):
        assert c.noise_scale == pytest.approx(s, abs=1e-7)
        assert c.timesteps == [int(1000 * c.noise_scale) - 100, 500]
    assert rec.chunks[0].timesteps == [700, 500]

    # the prompt went out once, with its embedding, before any chunk; the bucket copy is gone with the stream
    assert [(p.version, p.prompt) for p in rec.prompts] == [(0, "a red cat")]
    assert torch.equal(rec.prompts[0].embedding, trim_padding(tiny_prompt_encoder().encode("a red cat")[0]))
    assert await (await bus.kv(Buckets.PROMPTS)).get(f"{sid}.0") is None


async def test_wrong_key_is_refused_with_a_reason(ingest: IngestService, bus: Bus, eventually) -> None:
    table, spec, _ = await new_stream(bus, "a dog")
    before = await table.get(spec.stream_id)
    client = await RawRtmp.open(ingest.rtmp.port)
    client.connect_and_publish("not-a-key-of-any-stream")
    answer = await client.read_until_closed()
    client.close()
    assert b"NetStream.Publish.BadName" in answer and b"unknown stream key" in answer
    await eventually(lambda: any("unknown stream key" in r for _, r in ingest.rtmp.refusals))
    assert await table.get(spec.stream_id) == before  # state, revision-visible fields untouched
    assert ingest.rtmp.stats.refused["bad_key"] >= 1  # counts toward the address's key-guess limit


async def test_a_publisher_without_frames_is_closed_and_the_record_says_why(ingest: IngestService, bus: Bus,
                                                                            eventually) -> None:
    """Past ``ingest.frame_timeout_s`` without a video frame the session is closed; the ended record says why."""
    table, spec, key = await new_stream(bus, "a silent cat")
    rec = Recorder()
    await rec.attach(bus, spec.stream_id)
    client = await RawRtmp.open(ingest.rtmp.port)
    client.connect_and_publish(key)
    assert b"NetStream.Publish.Start" in await client.read_until(b"NetStream.Publish.Start")
    await client.read_until_closed(timeout=15)
    client.close()
    await eventually(rec.ended, timeout=20)
    record = await table.get(spec.stream_id)
    assert record.state == "ended" and "no video frame for 3 s" in record.state_reason


async def _live_publisher(ingest: IngestService, bus: Bus, sid: str, key: str,
                          eventually) -> tuple[Recorder, asyncio.Task]:
    """A PyAV publisher of ``sid`` (25 s of frames, in real time) whose chunks already flow."""
    rec = Recorder()
    await rec.attach(bus, sid)
    publisher = asyncio.create_task(publish_pyav(f"rtmp://127.0.0.1:{ingest.rtmp.port}/live/{key}", 400, 16, "64x64",
                                                 "--realtime"))
    await eventually(lambda: len(rec.chunks) >= 1, timeout=30)
    return rec, publisher


async def test_a_rotated_key_ends_its_publisher_who_comes_back_with_the_new_one(ingest: IngestService, bus: Bus,
                                                                               eventually) -> None:
    """Rotating the key a live publisher authenticated with closes it at once, counted ``key_revoked``; the ended
    record says why. The old key is then refused, the new one publishes. Negative control: an unrelated change of
    the record (a prompt update) ends nothing."""
    table, spec, key = await new_stream(bus, "a leaked key")
    sid, refused = spec.stream_id, ingest.rtmp.stats.refused
    revoked = refused["key_revoked"]
    rec, publisher = await _live_publisher(ingest, bus, sid, key, eventually)
    try:
        await table.update(sid, lambda r: r.model_copy(update={
            "spec": r.spec.model_copy(update={"prompt": "another prompt"}), "prompt_version": r.prompt_version + 1}))
        await asyncio.sleep(1.0)  # the table watch sees a change within milliseconds
        assert not publisher.done() and ingest.rtmp.streams[sid].publishing and refused["key_revoked"] == revoked

        _, new = await table.rotate_key(sid)
        await eventually(lambda: refused["key_revoked"] == revoked + 1, timeout=10)
        async with asyncio.timeout(30):
            result = await publisher  # its connection was closed under it
        assert '"ok": false' in result.stdout, result
    finally:
        publisher.cancel()
    await eventually(rec.ended, timeout=20)
    record = await table.get(sid)
    assert record.state == "ended" and "stream key was rotated" in record.state_reason

    client = await RawRtmp.open(ingest.rtmp.port)
    client.connect_and_publish(key)
    answer = await client.read_until_closed()
    client.close()
    assert b"unknown stream key" in answer
    result = await publish_pyav(f"rtmp://127.0.0.1:{ingest.rtmp.port}/live/{new}", 21, 16, "64x64", "--realtime")
    assert result.report.get("ok"), result.report
    await eventually(lambda: [e.kind for e in rec.events] == ["live", "ended", "live", "ended"], timeout=20)
    assert refused["key_revoked"] == revoked + 1


async def test_deleting_a_stream_ends_its_publisher(ingest: IngestService, bus: Bus, eventually) -> None:
    """A live publisher of a deleted stream is closed at once, counted ``stream_deleted``, and the stream ends."""
    table, spec, key = await new_stream(bus, "a stream about to go")
    deleted = ingest.rtmp.stats.refused["stream_deleted"]
    rec, publisher = await _live_publisher(ingest, bus, spec.stream_id, key, eventually)
    try:
        await table.delete(spec.stream_id)
        await eventually(lambda: ingest.rtmp.stats.refused["stream_deleted"] == deleted + 1, timeout=10)
        async with asyncio.timeout(30):
            result = await publisher
        assert '"ok": false' in result.stdout, result
    finally:
        publisher.cancel()
    await eventually(rec.ended, timeout=20)
    # the end event goes out before the stream's task has finished and left ``live``
    await eventually(lambda: spec.stream_id not in ingest.live, timeout=10)


@pytest.mark.parametrize("mode", ["blend", "cut"])
async def test_prompt_request_is_acked_with_the_next_seq(ingest: IngestService, bus: Bus, eventually,
                                                         mode: str) -> None:
    """The ack names the first chunk under the new prompt. ``blend``: the next chunk taken from the queue.
    ``cut``: the next chunk cut from the frames, which starts a new warm-up segment (a 5-frame prepare chunk,
    latent and RoPE positions from 0 again, seqs counting on)."""
    _, spec, key = await new_stream(bus, "a cat")
    sid = spec.stream_id
    rec = Recorder()
    await rec.attach(bus, sid)
    url = f"rtmp://127.0.0.1:{ingest.rtmp.port}/live/{key}"
    publisher = asyncio.create_task(publish_pyav(url, 45, 16, "64x64", "--realtime"))  # 11 chunks, ~2.8 s
    await eventually(lambda: len(rec.chunks) >= 2, timeout=20)

    malformed = ingest.bus.stats.malformed
    await bus.nc.publish(Subjects.stream_prompt(sid), b"\x00garbage")
    await bus.nc.publish(Subjects.stream_prompt(sid), Ack(ref="not a prompt").encode())
    await eventually(lambda: ingest.bus.stats.malformed >= malformed + 2)

    seen = len(rec.chunks)
    reply = await bus.request(Subjects.stream_prompt(sid), PromptUpdate(stream_id=sid, version=1, prompt="a dog",
                                                                        mode=mode), timeout=5)
    assert isinstance(reply, Ack) and reply.ref.isdigit(), reply
    effective = int(reply.ref)
    stale = await bus.request(Subjects.stream_prompt(sid), PromptUpdate(stream_id=sid, version=1, prompt="x"),
                              timeout=5)
    assert isinstance(stale, Error) and stale.code == "stale_prompt_version"

    assert (await publisher).report.get("ok")
    await eventually(rec.ended, timeout=20)
    seqs = [c.seq for c in rec.chunks]
    assert seqs == list(range(11 if mode == "blend" else 10))  # 45 frames: 5 + 4·10, or 5 + 4·(e−1) + 5 + 4·…
    assert seen <= effective <= seqs[-1]
    assert all(c.prompt_version == (1 if c.seq >= effective else 0) for c in rec.chunks)
    start = effective if mode == "cut" else 0
    for c in rec.chunks:
        assert c.segment == (1 if mode == "cut" and c.seq >= effective else 0)
        local = c.seq - (start if c.seq >= start else 0)
        assert (c.latent_start, c.latent.shape[0]) == ((0, 2) if local == 0 else (local + 1, 1)), c.seq
    embedded = [p for p in rec.prompts if p.embedding is not None]
    assert [(p.version, p.prompt) for p in embedded] == [(0, "a cat"), (1, "a dog")]  # the stale one never is
    # only the prompt's real tokens travel; zero-padded back they are exactly the encoder's [text_len, D]
    enc = tiny_prompt_encoder()
    full = enc.encode("a dog")[0]
    sent = embedded[1].embedding
    assert sent.shape == (enc.token_count("a dog"), full.shape[1])
    assert torch.equal(torch.nn.functional.pad(sent, (0, 0, 0, len(full) - len(sent))), full)


def test_the_largest_prompt_message_fits_the_payload_budget() -> None:
    """A PromptUpdate carries the prompt's real tokens only; the largest one that may be published is what the
    startup size check counts. bf16 umT5: all 512 tokens fit (4 MiB); fp32: a 512-token embedding alone is 8 MiB,
    so prompts are capped (longer ones refused, never cast or cut)."""
    def settings(dtype: str) -> Settings:
        return Settings(model={"model_dir": "/nonexistent", "device": "cpu", "dtype": dtype})

    budget = Settings().nats.max_send_bytes
    assert max_prompt_tokens(settings("bfloat16")) == 512
    assert 300 < max_prompt_tokens(settings("float32")) < 512
    for dtype in ("bfloat16", "float32"):
        _, prompt = largest_messages(settings(dtype))
        assert max_prompt_tokens(settings(dtype)) * 4096 * (2 if dtype == "bfloat16" else 4) < prompt <= budget


async def test_chunks_past_their_deadline_are_dropped_and_counted(ingest: IngestService, bus: Bus,
                                                                  eventually) -> None:
    _, spec, key = await new_stream(bus, "a sky", latency_ms=1.0)
    rec = Recorder()
    await rec.attach(bus, spec.stream_id)
    before = {r: CHUNKS_DROPPED.labels(reason=r)._value.get() for r in ("deadline", "segment_unprepared")}
    busy = threading.Event()
    ingest._compute.submit(busy.wait, 30)  # the model thread is busy: chunks queue up and age
    try:
        result = await publish_pyav(f"rtmp://127.0.0.1:{ingest.rtmp.port}/live/{key}", 21, 16, "64x64",
                                    "--realtime")
        assert result.report.get("ok"), result.report
        await asyncio.sleep(1.0)  # pacer capture times may run ahead of the wall clock by the first frame's delay
    finally:
        busy.set()
    await eventually(rec.ended, timeout=20)
    assert rec.chunks == [] and [e.kind for e in rec.events] == ["live", "ended"]
    # the prepare chunk missed its deadline: the rest of its segment cannot run without it
    assert {r: CHUNKS_DROPPED.labels(reason=r)._value.get() - n for r, n in before.items()} == {
        "deadline": 1, "segment_unprepared": 4}


def test_stream_state_round_trips_with_a_bounded_replay_ring() -> None:
    spec = StreamSpec(stream_id="s1", width=SIZE, height=SIZE, fps=16.0, steps=2, prompt="p")
    state = IngestStream.new(spec, prompt_version=2, replay_chunks=3, replay_head=1)
    vae = StreamVAE(make_tiny_vae(0))
    frames = torch.rand(1, 3, 5, SIZE, SIZE) * 2 - 1
    vae.encode(state.vae, frames)
    for seq in range(7):
        state.replay.add(LatentChunk(stream_id="s1", seed=0, fps=16.0, seq=seq, epoch=0, latent_start=seq,
                                     rope_start=seq,
                                        capture_time=1.0, deadline=2.0, prompt_version=2, noise_scale=0.8,
                                        timesteps=chunk_timesteps(2, 0.8), latent=torch.randn(1, 4, 8, 8)))
    state.next_seq, state.last_seq = 7, 6
    state.steps_from.append((9, 3))  # a steps change from the segment starting at chunk 9
    assert state.accept_spec(spec.model_copy(update={"seed": 42})) == 7  # a seed change: from the next chunk
    state.drop("deadline")
    back = IngestStream.from_bytes(state.to_bytes())
    # the prepare chunk and the sink chunk, then the last 3
    assert [c.seq for c in back.replay] == [0, 1, 4, 5, 6] and back.replay.depth == 3
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(state.replay, back.replay, strict=True))
    assert back.spec == spec.model_copy(update={"seed": 42})
    assert (back.prompt_version, back.next_seq, back.last_seq) == (2, 7, 6)
    assert back.dropped == {"deadline": 1} and back.vae.frames_encoded == 5
    assert back.steps_from == [(0, 2), (9, 3)] and (back.steps_of(8), back.steps_of(9)) == (2, 3)
    assert back.seeds_from == [(0, 0), (7, 42)] and (back.seed_of(6), back.seed_of(7)) == (0, 42)
    # the restored VAE cache continues the stream exactly like the original
    more = torch.rand(1, 3, 4, SIZE, SIZE) * 2 - 1
    assert torch.equal(vae.encode(state.vae, more), vae.encode(back.vae, more))


async def test_sigterm_mid_stream_exits_cleanly(nats_settings: NatsSettings, bus: Bus, eventually) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RHEO_NATS__URL": nats_settings.url,
           "RHEO_TELEMETRY__METRICS_PORT": "0", "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1",
           "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2", "RHEO_INGEST__RTMP_HOST": "127.0.0.1",
           "RHEO_INGEST__RTMP_PORT": str(port), "RHEO_INGEST__ADMISSION_WITHOUT_CONTROLLER": "admit"}
    proc = subprocess.Popen([sys.executable, "-m", "ingest.service"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        beats: list[Heartbeat] = []

        async def on_beat(hb: Heartbeat, _raw) -> None:
            beats.append(hb)

        await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat)
        deadline = time.monotonic() + 90
        while not any(b.ready and b.member_id.endswith(f"-{proc.pid}") for b in beats):
            assert time.monotonic() < deadline and proc.poll() is None, "ingest never became ready"
            await asyncio.sleep(0.05)
        _, spec, key = await new_stream(bus, "a fish")
        rec = Recorder()
        await rec.attach(bus, spec.stream_id)
        publisher = asyncio.create_task(publish_pyav(f"rtmp://127.0.0.1:{port}/live/{key}", 160, 16, "64x64",
                                                     "--realtime"))
        await eventually(lambda: len(rec.chunks) >= 2, timeout=30)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert time.monotonic() - started < 5.0
        await eventually(rec.ended, timeout=2)  # the stream's end was announced before exit
        assert rec.events[-1].seq == rec.chunks[-1].seq
        await asyncio.wait_for(publisher, 30)  # the publisher sees the connection go and exits
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in out, out


async def test_live_steps_change_starts_a_new_segment(ingest: IngestService, bus: Bus, eventually) -> None:
    """A steps change cannot join the running segment (one KV slot per step): ingest answers the seq of the next
    segment's prepare chunk, chunks before it keep 2 timesteps, from it on 3; the noise scale applies from the
    next chunk (the new segment's first chunk is labelled with the new s_init exactly)."""
    _, spec, key = await new_stream(bus, "a cat")
    sid = spec.stream_id
    rec = Recorder()
    await rec.attach(bus, sid)
    url = f"rtmp://127.0.0.1:{ingest.rtmp.port}/live/{key}"
    publisher = asyncio.create_task(publish_pyav(url, 45, 16, "64x64", "--realtime"))
    await eventually(lambda: len(rec.chunks) >= 2, timeout=20)
    changed = spec.model_copy(update={"steps": 3, "noise": spec.noise.model_copy(update={"noise_scale": 0.7})})
    reply = await bus.request(Subjects.stream_spec(sid), changed, timeout=5)
    assert isinstance(reply, Ack) and reply.ref.isdigit(), reply
    effective = int(reply.ref)
    assert (await publisher).report.get("ok")
    await eventually(rec.ended, timeout=20)
    assert [c.seq for c in rec.chunks] == list(range(10))  # 45 frames: 5 + 4·(e−1) + 5 + 4·…
    assert 2 <= effective <= 9
    for c in rec.chunks:
        new = c.seq >= effective
        assert (c.segment, len(c.timesteps)) == ((1, 3) if new else (0, 2)), c.seq
        assert c.timesteps == chunk_timesteps(3 if new else 2, c.noise_scale)
        local = c.seq - (effective if new else 0)
        assert (c.latent_start, c.latent.shape[0]) == ((0, 2) if local == 0 else (local + 1, 1)), c.seq
    assert rec.chunks[effective].noise_scale == 0.7
    assert all(c.noise_scale <= 0.7 + 1e-6 for c in rec.chunks[effective:])


async def test_chunks_are_clocked_by_the_configured_ring(nats_settings: NatsSettings, bus: Bus,
                                                         eventually) -> None:
    """Regression: ingest clocked every stream by the default ring (kv_window 6, t_refresh 50) whatever
    dit_stage configured, so past the refresh point a chunk's RoPE start disagreed with the stages' window."""
    settings = Settings(nats=nats_settings, telemetry={"metrics_port": 0},
                        lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2},
                        ingest={"rtmp_host": "127.0.0.1", "rtmp_port": 0, "chunk_queue_depth": 32,
                                "admission_without_controller": "admit"},
                        dit_stage={"kv_window": 8, "t_refresh": 9})
    clock = ChunkClock(kv_window=8, t_refresh=9)
    async with running(IngestService(settings, member_id="ingest-ring")) as service:
        _, spec, key = await new_stream(bus, "a cat")
        rec = Recorder()
        await rec.attach(bus, spec.stream_id)
        url = f"rtmp://127.0.0.1:{service.rtmp.port}/live/{key}"
        assert (await publish_pyav(url, 45, 16, "64x64", "--realtime")).report.get("ok")
        await eventually(rec.ended, timeout=20)
    assert [c.seq for c in rec.chunks] == list(range(11))
    assert [c.rope_start for c in rec.chunks] == [clock.rope_start(c) for c in range(11)]
    assert [c.rope_start for c in rec.chunks] != [ChunkClock().rope_start(c) for c in range(11)]


async def test_a_t2v_stream_runs_from_the_table_with_a_blend_until_deleted(ingest: IngestService, bus: Bus,
                                                                           eventually) -> None:
    """A T2V record has no publisher: ingest starts it from the stream table and emits noise-only chunks (zeros,
    noise scale 1, the step list) on its chunk clock at the spec's rate, exactly spaced by their output frames.
    A `blend` over 4 chunks stamps the next 3 with (new version, old version, j/4); a key rotation changes nothing;
    deleting the record ends it."""
    table = await StreamTable.open(bus)
    spec = StreamSpec(stream_id=new_stream_id(), width=SIZE, height=SIZE, fps=16.0, steps=2, prompt="a cat",
                      t2v=True, t2v_frames=2, slo=SLO(max_latency_ms=LATENCY_MS))
    sid = spec.stream_id
    rec = Recorder()
    await rec.attach(bus, sid)
    await table.create(spec)
    _CREATED.append((table, sid))
    await eventually(lambda: len(rec.chunks) >= 2, timeout=20)
    assert (await table.get(sid)).state == "live"
    await table.rotate_key(sid)  # no publisher: a new key changes nothing for it (one session, no gap below)
    reply = await bus.request(Subjects.stream_prompt(sid), PromptUpdate(stream_id=sid, version=1, prompt="a dog",
                                                                        mode="blend", blend_chunks=4), timeout=5)
    assert isinstance(reply, Ack) and reply.ref.isdigit(), reply
    effective = int(reply.ref)
    await eventually(lambda: len(rec.chunks) >= effective + 5, timeout=30)
    prompts = await bus.kv(Buckets.PROMPTS)
    assert await prompts.get(f"{sid}.0") is not None  # the blend's source stays for late joiners
    await table.delete(sid)
    await eventually(rec.ended, timeout=20)

    assert [e.kind for e in rec.events] == ["live", "ended"]
    assert [c.seq for c in rec.chunks] == list(range(len(rec.chunks)))
    clock = ChunkClock.t2v(2)
    f = ingest.models.vae.spatial_factor
    for c in rec.chunks:
        assert tuple(c.latent.shape) == (2, ingest.models.vae.z_dim, SIZE // f, SIZE // f)
        assert not c.latent.any() and c.noise_scale == 1.0 and c.timesteps == [700, 500]
        assert (c.latent_start, c.rope_start) == (clock.latent_start(c.seq), clock.rope_start(c.seq))
    # chunk c+1 begins output_frames(c) / fps after chunk c (5 frames for the first, then 8)
    gaps = [b.capture_time - a.capture_time for a, b in zip(rec.chunks, rec.chunks[1:], strict=False)]
    assert gaps == pytest.approx([clock.output_frames(c) / 16.0 for c in range(len(gaps))], abs=1e-6)
    stamps = [(c.prompt_version, c.blend_from, c.blend_alpha) for c in rec.chunks]
    assert stamps[:effective] == [(0, None, 1.0)] * effective
    assert stamps[effective:effective + 4] == [(1, 0, 0.25), (1, 0, 0.5), (1, 0, 0.75), (1, None, 1.0)]
    assert all(s == (1, None, 1.0) for s in stamps[effective + 4:])


async def test_a_stream_follows_its_ring(ingest: IngestService, bus: Bus, eventually) -> None:
    """Chunks go into the ring the stream is placed on, clocked by that ring's epoch; moved to another ring (its
    ring lost), the stream's chunks go there from a new warm-up segment (its prepare chunk first), none twice."""
    blockmaps = await bus.kv(Buckets.BLOCKMAP)
    await blockmaps.put(blockmap_key("1"), BlockMap(epoch=7, num_blocks=2, ring_id="1", stages=[
        StageAssignment(stage_id="dit-1", block_start=0, block_end=2)]))
    table = await StreamTable.open(bus)
    spec = StreamSpec(stream_id=new_stream_id(), width=SIZE, height=SIZE, fps=16.0, steps=2, prompt="a cat",
                      t2v=True, t2v_frames=2, slo=SLO(max_latency_ms=LATENCY_MS))
    sid = spec.stream_id
    ring0, ring1 = Recorder(), Recorder()
    await ring0.attach(bus, sid)
    await ring1.attach(bus, sid, "1")
    try:
        await table.create(spec)
        _CREATED.append((table, sid))
        await eventually(lambda: len(ring0.chunks) >= 2 and ingest.rings.epoch("1") == 7, timeout=20)
        assert not ring1.chunks
        moved_to = Assignment(ring_id="1", decoder="", egress="", version=2)
        await table.update(sid, lambda r: r.model_copy(update={"assignment": moved_to}))
        await eventually(lambda: len(ring1.chunks) >= 2, timeout=20)
        moved = len(ring0.chunks)
        await asyncio.sleep(0.5)
        assert len(ring0.chunks) == moved  # nothing into the old ring any more
        first = ring1.chunks[0]
        assert first.latent_start == 0 and first.segment > ring0.chunks[0].segment  # a new warm-up segment
        assert all(c.epoch == 7 for c in ring1.chunks)
        seqs = [c.seq for c in ring0.chunks + ring1.chunks]
        assert seqs == sorted(set(seqs))  # each chunk into one ring, once
        reason = [""]

        async def said() -> bool:
            reason[0] = (await table.get(sid)).state_reason
            return "moved from ring 0 to ring 1" in reason[0]

        deadline = time.monotonic() + 10
        while not await said():  # the record says why the stream recovers
            assert time.monotonic() < deadline, reason
            await asyncio.sleep(0.05)
    finally:
        await blockmaps.delete(blockmap_key("1"))


def test_a_blend_is_stamped_per_chunk_and_survives_a_move() -> None:
    """(version, blend_from, alpha) per chunk: j/N for the j-th chunk after the change, plain from the N-th; a blend
    at a segment's first chunk just replaces the prompt; the schedule moves with the stream."""
    spec = StreamSpec(stream_id="s1", width=SIZE, height=SIZE, fps=16.0, steps=2, prompt="p")
    stream = IngestStream.new(spec, prompt_version=0, replay_chunks=3)
    assert stream.accept_prompt(1, "q", "blend", 4) == 0 and stream.prompt_of(0) == (1, None, 1.0)
    stream.next_seq = 5
    assert stream.accept_prompt(2, "r", "blend", 3) == 5
    back = IngestStream.from_bytes(stream.to_bytes())
    for s in (stream, back):
        assert [s.prompt_of(q) for q in range(4, 9)] == [(1, None, 1.0), (2, 1, 1 / 3), (2, 1, 2 / 3),
                                                         (2, None, 1.0), (2, None, 1.0)]
    stream.next_seq = 9
    assert stream.accept_prompt(3, "s", "blend", 1) == 9 and stream.prompt_of(9) == (3, None, 1.0)


def test_whip_on_without_aiortc_exits_at_once_saying_why(nats_settings: NatsSettings, tmp_path: Path) -> None:
    """ingest.whip_port set where aiortc cannot load (the first GPU machine's packages): ingest must exit with the
    reason, not hang with its KV watches retrying on a drained connection while its supervisor waits for ready."""
    shim = tmp_path / "shim" / "aiortc"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("No module named \'aiortc\' (this test hides it)")\n')
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}:{ROOT}", "RHEO_NATS__URL": nats_settings.url,
           "RHEO_TELEMETRY__METRICS_PORT": "0", "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1",
           "RHEO_INGEST__RTMP_HOST": "127.0.0.1", "RHEO_INGEST__RTMP_PORT": str(free_port()),
           "RHEO_INGEST__WHIP_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "ingest.service"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "ingest.whip_port is set, but WHIP cannot load" in out and "this test hides it" in out
    assert "watch failed" not in out
