"""The ingest service: RTMP publishers and T2V streams in, latent chunks and prompt embeddings out (``rheo ingest``).

One process owns everything a stream has before the DiT: the chunk source (the RTMP session, pacer and chunker of
``ingest.server``; for a text-to-video stream the chunk clock of ``ingest.t2v``), the Stream-VAE encoder cache,
the motion-aware noise EMA and the umT5 prompt encoder. Raw frames never leave it. Per stream it keeps one
``ingest.stream.IngestStream`` (state and behaviour, movable), created when the stream starts and dropped when it
ends. This module is what the service listens to and what it publishes:

- in: RTMP ``publish`` (authorised against the stream table, ``services.streams``; a refusal reaches the client
  as the ``onStatus`` description); the stream table itself, watched for T2V streams (no publisher: a T2V record
  not live elsewhere starts here, its deletion ends it) and for publishers whose key no longer opens their stream
  (rotated or deleted: ``RtmpServer.revoke`` ends them); ``rheo.stream.<id>.prompt`` and ``.spec`` requests from
  the gateway; the block map (epoch, failure replays).
- ``rheo.stream.<id>.latent``: one ``LatentChunk`` per chunk, through a ``CreditWindow``: the *clean* latent
  (``[F, C, h, w]``, fp32), the motion-adapted noise scale and the timesteps, exactly as ``StreamPipeline`` hands
  its ring a chunk; T2V: zeros under noise scale 1 and the step list. Mid-blend chunks carry ``blend_from`` and
  ``blend_alpha``; the first stage lerps the two versions' embeddings.
- ``rheo.stream.<id>.prompt``: a ``PromptUpdate`` with the embedding of the prompt's real tokens, at start and for
  every accepted change, also kept in the ``rheo-prompts`` KV bucket (``<stream id>.<version>``) for stages that
  join late. A gateway request (no embedding) is answered with ``Ack(ref=<seq of the first chunk under it>)``.
- ``rheo.stream.<id>.event``: ``StreamEvent`` ``live`` at start, ``ended`` (with the last published seq) at end.

Recovery (docs/recovery.md): when the block map moves to a ``failure`` epoch, every live stream's replay ring is
republished, in order and through the same credit window, with ``replay=True``, before any further live chunk.
See docs/ingest-service.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from nats.aio.msg import Msg
from prometheus_client import Counter

from encoder.batching import ChunkBatcher
from encoder.prompt import trim_padding
from ingest.admission import ask_admission, unservable
from ingest.drops import count_drop
from ingest.liveness import Health, LivenessPolicy, StreamLiveness, stall_bound_s
from ingest.models import IngestModels, largest_messages, max_prompt_tokens
from ingest.pacing import RawChunk
from ingest.replay import sink_chunks, window_chunks
from ingest.rings import RingEpochs, ring_of
from ingest.rtmp_stream import Decision, RtmpStream, StreamShape
from ingest.server import RtmpServer
from ingest.status import StatusWriter, reservation_ahead, start_session
from ingest.stream import CHUNKS_DROPPED, ChunkSource, EncodeJob, IngestStream, encode_chunks
from ingest.t2v import T2VSource
from proto import (
    ACTIVE_STATES,
    BLOCKMAP_KEYS,
    Ack,
    BlockMap,
    Buckets,
    Error,
    IngestStatus,
    PromptUpdate,
    ProtocolError,
    StreamEvent,
    StreamOutput,
    StreamRecord,
    StreamSpec,
    Subjects,
    decode,
)
from proto.clock import ChunkClock
from proto.spec import RingConfig
from services import telemetry
from services.bus import KV, CreditWindow
from services.config import Settings
from services.epochs import wait_prepared
from services.runtime import Service, ServiceStartError, main, watch_keys
from services.streams import StreamNotFound, StreamTable, ingest_silent

if TYPE_CHECKING:
    from ingest.whip import WhipServer

__all__ = ["CHUNKS_DROPPED", "IngestModels", "IngestService", "IngestStream", "largest_messages",
           "max_prompt_tokens"]

log = logging.getLogger("rheo.ingest")

LATENT_CREDIT_RESET_S = 5.0
"""No latent credit for this long: the first stage restarted or never came; forget the outstanding bytes (a chunk
of a slow but live stage just misses its deadline)."""

STREAM_REPAIRS = Counter("rheo_ingest_stream_repairs_total",
                         "streams whose styled output stalled, repaired with a new warm-up segment")
STREAM_STATES = Counter("rheo_ingest_stream_states_total", "stream health changes, by the state entered", ["state"])
LIVENESS_TICK_S = 0.5
REPLAY_ACKS = Counter("rheo_ingest_replay_acks_total", "failure epochs waited for before replaying, by how the wait "
                      "ended (acknowledged, timeout, superseded)", ["result"])
RING_MOVES = Counter("rheo_ingest_ring_moves_total", "live streams that followed a new ring assignment (a new segment "
                     "there)")
PROMPT_REQUESTS = Counter("rheo_ingest_prompt_requests_total", "prompt change requests, by result", ["result"])

_DRAIN_WAIT_S = 2.0  # longest a SIGTERM drain waits for queued chunks before cancelling the stream tasks
_PROMPT_KEYS_KEPT = 3  # the version in force, a blend's source, and the one chunks in flight may still use


class _Claimed(Exception):
    """A T2V stream is already live (served by another ingest)."""


class _KeyRotated(Exception):
    """The key a publisher presented was rotated away while its publish was being admitted."""


class IngestService(Service):
    role = "ingest"

    def __init__(self, settings: Settings, member_id: str | None = None) -> None:
        super().__init__(settings, member_id)
        self.models: IngestModels | None = None
        self.rtmp: RtmpServer | None = None
        self.whip: WhipServer | None = None
        self.table: StreamTable | None = None
        self.status: StatusWriter | None = None
        self.live: dict[str, IngestStream] = {}
        self.checks.update({"models": False, "rtmp": False})
        self._prompts: KV | None = None
        self._specs: dict[str, StreamSpec] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._t2v: dict[str, T2VSource] = {}
        self._watches: list[asyncio.Task[None]] = []
        self._blockmaps: KV | None = None
        self.rings = RingEpochs()
        """Each ring's epoch and latest failure epoch (ingest/rings.py): chunks enter their stream's ring."""
        self._background: set[asyncio.Task[None]] = set()
        # Model work (VAE encode, umT5) runs on one thread: the event loop keeps serving RTMP and NATS, and one
        # stream's chunks are encoded strictly in order.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-model")
        # every stream's chunk ready in one loop turn is encoded by one VAE call (encoder/batching.py)
        self._encoder: ChunkBatcher[EncodeJob, tuple[torch.Tensor, float]] = ChunkBatcher(
            self._encode_batch, self._compute, settings.encoder.batch_window_ms / 1000.0, "encode")
        self.ring: RingConfig = settings.dit_stage.ring()
        """The ring the stages run (the one the controller's block map carries): chunks are clocked by it."""

    def max_send_bytes(self) -> int:
        return max(largest_messages(self.settings))

    @property
    def states(self) -> dict[str, IngestStream]:
        return dict(self.live)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        assert self.bus is not None
        loop = asyncio.get_running_loop()
        self.table = await StreamTable.open(self.bus)
        self.status = StatusWriter(self.table, self.member_id, self.settings.ingest.status_interval_s)
        self._watches.append(asyncio.create_task(self.status.run(self.live.values), name="stream-status"))
        self._prompts = await self.bus.kv(Buckets.PROMPTS, replicas=self.settings.nats.kv_replicas)
        self._blockmaps = await self.bus.kv(Buckets.BLOCKMAP, replicas=self.settings.nats.kv_replicas)
        self._watches.append(asyncio.create_task(watch_keys(self._blockmap_kv, BLOCKMAP_KEYS, self._on_blockmap,
                                                            what="ingest: block maps"), name="blockmap-watch"))
        self.models = await loop.run_in_executor(self._compute, IngestModels.load, self.settings.model,
                                                 self.settings.encoder)
        stream = self.settings.stream
        await loop.run_in_executor(self._compute, self.models.warm_up, self.work, (stream.height, stream.width))
        if self.settings.model.model_dir is None:
            log.warning("NO MODEL WEIGHTS (model.model_dir unset): ingest runs the tiny RANDOM VAE and umT5")
        self.checks["models"] = True
        slo = self.settings.stream.slo_latency_ms / 1000.0
        self.rtmp = RtmpServer(self.settings.ingest, self.authorise, latency_budget_s=slo,
                               on_stream_start=self._on_rtmp_start, on_stream_end=self._on_rtmp_end)
        await self.rtmp.start()
        if self.settings.ingest.whip_port is not None:  # WebRTC publishers: the same streams (docs/whip.md)
            try:
                from ingest.whip import WhipServer  # aiortc loads only where WHIP is on
            except ImportError as e:
                raise ServiceStartError(f"ingest.whip_port is set, but WHIP cannot load: {e} (install aiortc, or "
                                        "unset ingest.whip_port to take RTMP publishers only)") from e

            self.whip = WhipServer(self.rtmp, self.settings.lifecycle.http_host)
            await self.whip.start()
        self.checks["rtmp"] = True
        self._watches.append(asyncio.create_task(watch_keys(self._table_kv, "s.*", self._on_record,
                                                            what="ingest: stream table"), name="t2v-watch"))
        self._watches.append(asyncio.create_task(self._watch_liveness(), name="liveness"))
        log.info("ingest: %s; RTMP on :%d", self.models.description, self.rtmp.port)

    async def drain(self) -> None:
        """Stop taking streams, finish the chunks already queued, announce every stream's end."""
        for t in self._watches:  # first: a T2V stream ending here must not start again here
            t.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
        if self.whip is not None:
            await self.whip.close()
        if self.rtmp is not None:
            await self.rtmp.close()  # ends every RTMP stream: their queues close, their tasks finish and clean up
        for source in list(self._t2v.values()):
            source.close()
        tasks = list(self._tasks.values())
        log.info("ingest: RTMP closed; finishing %d streams (at most %.0f s)", len(tasks), _DRAIN_WAIT_S)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_DRAIN_WAIT_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for t in self._background:
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._compute.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _blockmap_kv(self) -> KV:
        assert self._blockmaps is not None
        return self._blockmaps

    async def _table_kv(self) -> KV:
        assert self.table is not None
        return self.table.kv

    async def _on_blockmap(self, _key: str, value: bytes | None, _revision: int) -> None:
        """Track each ring's block-map epoch: every chunk enters its ring under the epoch current at publish."""
        assert self._blockmaps is not None
        if value is None:
            return
        try:
            bm = decode(value, BlockMap, self._blockmaps.limits)
        except ProtocolError as e:
            log.warning("ignored a malformed block map in %s: %s", Buckets.BLOCKMAP, e)
            return
        newer, failure = self.rings.on_map(bm)
        self.epoch = self.rings.latest()
        if newer and bm.ring != self.ring:
            log.error("block map epoch %d: the stages run ring %s, this ingest clocks chunks by %s: "
                      "configure dit_stage the same for every service", bm.epoch, bm.ring, self.ring)
        if failure:
            acked = asyncio.create_task(self._acknowledged(bm), name=f"epoch-{bm.epoch}-ack")  # one for all streams
            self._background.add(acked)
            acked.add_done_callback(self._background.discard)
            for stream in [s for s in self.live.values() if s.ring_id == bm.ring_id]:  # that ring's streams
                self._spawn(stream.replay_under(bm.epoch, functools.partial(self._replaying, stream), ready=acked),
                            f"replay-{stream.stream_id}")

    async def _acknowledged(self, bm: BlockMap) -> None:
        """Replays wait for every stage of the failure map to announce it (``services.epochs``): a replay sent
        while a stage still reloads or re-subscribes would race its block-map watch. Bounded: then replay anyway."""
        assert self._blockmaps is not None
        t0 = time.monotonic()
        timeout = self.settings.ingest.replay_ack_timeout_s
        missing = await wait_prepared(self._blockmaps, bm, timeout_s=timeout,
                                      still=lambda: self.rings.failure(bm.ring_id) == bm.epoch)
        if self.rings.failure(bm.ring_id) != bm.epoch:
            REPLAY_ACKS.labels(result="superseded").inc()
        elif missing:
            REPLAY_ACKS.labels(result="timeout").inc()
            log.warning("failure epoch %d: %s did not announce it within %.1f s; replaying anyway", bm.epoch,
                        ", ".join(missing), timeout)
        else:
            REPLAY_ACKS.labels(result="acknowledged").inc()
            log.info("failure epoch %d acknowledged by every stage after %.2f s; replaying", bm.epoch,
                     time.monotonic() - t0)

    def _replaying(self, stream: IngestStream) -> int | None:
        """The failure epoch a live stream's replay is for; None once it is no longer live here. Only a newer
        failure epoch (which replays again) supersedes a replay: a join or rebalance right after the failure (a
        stage falsely failed under load, back a second later) moves the rebuilt KV online, and a replay abandoned
        for it would leave every stream without state."""
        return self.rings.failure(stream.ring_id) if self.live.get(stream.stream_id) is stream else None

    # -- admission ----------------------------------------------------------------------------------------------

    async def authorise(self, app: str, stream_key: str, metadata: dict[str, Any]) -> Decision:
        """RTMP ``publish``: the key must open a stream in the table whose spec this ingest can serve."""
        if self._draining:
            return Decision(False, "ingest is shutting down; reconnect")
        assert self.table is not None
        try:
            record = await self.table.lookup_key(stream_key)
        except Exception as e:
            log.warning("stream table lookup failed: %s", e)
            return Decision(False, f"stream table unavailable ({type(e).__name__}); retry")
        if record is None:
            return Decision(False, "unknown stream key", bad_key=True)
        spec = record.spec
        if spec.t2v:
            return Decision(False, f"stream {spec.stream_id}: a text-to-video stream takes no input video")
        problem = await self._refusal(spec)
        if problem:
            return Decision(False, f"stream {spec.stream_id}: {problem}")
        try:
            first = await self._new_session(spec, record.key_hash)
        except _KeyRotated:
            return Decision(False, "unknown stream key", bad_key=True)
        except Exception as e:
            log.warning("stream %s: seq reservation failed: %s", spec.stream_id, e)
            return Decision(False, f"stream table unavailable ({type(e).__name__}); retry")
        self._specs[spec.stream_id] = spec
        return Decision(True, stream_id=spec.stream_id, shape=StreamShape(spec.width, spec.height, spec.fps),
                        first=first, key_hash=record.key_hash)

    async def _new_session(self, spec: StreamSpec, key_hash: str) -> tuple[int, int]:
        """Reserve the (seq, segment) a new RTMP session of ``spec``'s stream starts at, above everything any
        earlier session published (``ingest.status``). A publisher resuming a lingering session keeps its numbering
        (the reservation just goes unused); one coming back after its session ended here waits for that session to
        finish its queue first, so the reservation it reads is final. The reservation also checks that the record
        still holds ``key_hash``: a rotation while the publish was admitted must not let the old key in after the
        table watch already looked for its publisher."""
        assert self.table is not None and self.rtmp is not None
        sid = spec.stream_id
        lingering = self.rtmp.streams.get(sid)
        previous = self._tasks.get(sid)
        if previous is not None and (lingering is None or lingering.ended):
            await asyncio.wait({previous}, timeout=_DRAIN_WAIT_S)
        ahead = reservation_ahead(spec, self.settings.ingest.status_interval_s)
        first: list[tuple[int, int]] = []

        def reserve(r: StreamRecord) -> StreamRecord:
            if not hmac.compare_digest(r.key_hash, key_hash):
                raise _KeyRotated(sid)
            first.clear()
            r, start = start_session(r, ahead)
            first.append(start)
            return r

        await self.table.update(sid, reserve)
        return first[0]

    async def _refusal(self, spec: StreamSpec, wait_queued: bool = True) -> str:
        """Why ``spec`` cannot start here ("" when it can): its size, its prompt, or the controller's answer (an RTMP
        publish waits while the controller queues it; a T2V start does not: docs/scheduling.md)."""
        wait = self.settings.controller.admission_queue_max_wait_s + 5 if wait_queued else 0.0
        return (unservable(self.settings, spec) or self._prompt_problem(spec.prompt)
                or await ask_admission(self.bus, spec, self.settings.ingest.admission_timeout_s,
                                       self.settings.ingest.admission_without_controller, wait))

    # -- streams ------------------------------------------------------------------------------------------------

    def _on_rtmp_start(self, rtmp: RtmpStream) -> None:
        spec = self._specs.pop(rtmp.stream_id, None)
        if spec is None:  # cannot happen: the authoriser ran just before
            log.error("stream %s started without an authorised spec; closing it", rtmp.stream_id)
            rtmp.queue.close()
            return
        self._start(rtmp, spec)

    def _on_rtmp_end(self, rtmp: RtmpStream) -> None:
        log.info("stream %s: publisher gone for good (%d chunks queued to finish)", rtmp.stream_id, len(rtmp.queue))

    async def _on_record(self, key: str, value: bytes | None, _revision: int) -> None:
        """The stream table changed: a T2V stream not live anywhere starts here; a deleted one ends; a publisher
        whose key no longer opens its stream ends."""
        assert self.table is not None
        sid = key.removeprefix("s.")
        if value is None:
            source = self._t2v.get(sid)
            if source is not None:
                log.info("stream %s was deleted; ending it", sid)
                source.close()
            await self._revoke(sid, None)
            return
        try:
            record = decode(value, StreamRecord, self.table.kv.limits)
        except ProtocolError as e:
            log.warning("ignored a malformed stream record %s: %s", key, e)
            return
        await self._revoke(sid, record.key_hash)
        live = self.live.get(sid)
        if live is not None and ring_of(record) != live.ring_id:
            self._spawn(self._follow_ring(live, ring_of(record)), f"ring-{sid}")
        spec = record.spec
        if not spec.t2v or sid in self._t2v or self._served_elsewhere(record) or self._draining:
            return
        problem = await self._refusal(spec, wait_queued=False)
        if problem:
            log.warning("stream %s (text-to-video) cannot start here: %s", sid, problem)
            return
        source = T2VSource(sid, spec.clock(self.ring), spec.fps, self.settings.ingest.chunk_queue_depth,
                           spec.slo.max_latency_ms / 1000.0)
        self._t2v[sid] = source
        self._start(source, spec, t2v=True)

    async def _revoke(self, sid: str, key_hash: str | None) -> None:
        """End the stream's publisher when ``key_hash`` (the record's; None: deleted) is not its key's. The watch may
        run behind (a T2V start waits for admission): a mismatch is confirmed against the table as it is now, so a
        rotation seen late never ends the publisher that already came back with the new key."""
        assert self.rtmp is not None and self.table is not None
        if key_hash is not None and self.rtmp.revoked(sid, key_hash) is not None:
            try:
                key_hash = (await self.table.get(sid)).key_hash
            except StreamNotFound:
                key_hash = None
        kind = self.rtmp.revoke(sid, key_hash)
        if kind is not None:
            log.info("stream %s: publisher ended (%s)", sid, kind)

    async def _latent_window(self, sid: str, ring_id: str) -> CreditWindow:
        return await self.bus.credit_window(Subjects.stream_latent(sid, ring_id),  # type: ignore[union-attr]
                                            self.settings.nats.credit_window_bytes,
                                            reset_after_s=LATENT_CREDIT_RESET_S).start()

    async def _follow_ring(self, stream: IngestStream, ring_id: str) -> None:
        """The controller moved the stream to another ring (its ring was lost or drains): its chunks go there from
        now, starting with a new warm-up segment (the old ring's state of it cannot move; ingest/rings.py)."""
        async with stream.publishing:  # between two chunks: none is half-published into the old ring
            if stream.ring_id == ring_id or self.live.get(stream.stream_id) is not stream:
                return
            old, stream.window = stream.window, await self._latent_window(stream.stream_id, ring_id)
            moved_from, stream.ring_id = stream.ring_id, ring_id
        if old is not None:
            await old.close()
        RING_MOVES.inc()
        why = f"moved from ring {moved_from} to ring {ring_id}"
        self._repair(stream, stream.liveness.repaired(time.monotonic(), why) if stream.liveness is not None
                     else Health("recovering", why, repair=True))

    def _served_elsewhere(self, record: StreamRecord) -> bool:
        """A session runs and its ingest still writes its checkpoint (a crashed ingest's T2V stream is taken over:
        its record says live for ever)."""
        return record.state in ACTIVE_STATES and ingest_silent(
            record, self.settings.ingest.status_interval_s, time.time()) is None

    def _start(self, source: ChunkSource, spec: StreamSpec, t2v: bool = False) -> None:
        sid = spec.stream_id
        previous = self._tasks.get(sid)
        task = asyncio.create_task(self._run_stream(source, spec, previous, t2v), name=f"ingest-{sid}")
        self._tasks[sid] = task
        task.add_done_callback(lambda t: self._tasks.pop(sid, None) if self._tasks.get(sid) is t else None)

    async def _go_live(self, source: ChunkSource, spec: StreamSpec, t2v: bool) -> IngestStream:
        """Claim the record (``live``), subscribe to the stream's requests, announce it and its first prompt."""
        assert self.bus is not None and self.table is not None
        sid = spec.stream_id
        first = [source.first]

        def claim(r: StreamRecord) -> StreamRecord:
            if t2v and self._served_elsewhere(r):
                raise _Claimed(sid)
            if t2v:  # a T2V source starts once live: its session's first chunk is reserved here
                r, first[0] = start_session(r, reservation_ahead(spec, self.settings.ingest.status_interval_s))
            status = IngestStatus(member=self.member_id, segment=first[0][1], at=time.time())
            return r.model_copy(update={"state": "live", "state_reason": "", "ingest": status})

        record = await self.table.update(sid, claim)
        spec = record.spec if not unservable(self.settings, record.spec) and record.spec.t2v == spec.t2v else spec
        stream = IngestStream.new(spec, record.prompt_version, *self.replay_depth(), first=first[0])
        stream.reserved_seq, stream.reserved_segment = record.next_seq, record.next_segment
        stream.record, stream.table_born = record, await self.table.kv.incarnation()
        stream.attach(source)
        if isinstance(source, RtmpStream):  # the publisher's AAC, passed through to egress (ingest/audio.py)
            audio_subject, bus = Subjects.stream_audio(sid), self.bus
            source.audio.sink = lambda m: bus.publish(audio_subject, m)
        stream.ring_id = ring_of(record)
        stream.window = await self._latent_window(sid, stream.ring_id)
        self.live[sid] = stream
        self.streams.add(sid)
        stream.subs.append(await self.bus.subscribe(
            Subjects.stream_prompt(sid), lambda m, raw: self._on_prompt(stream, m, raw), expected=PromptUpdate))
        stream.subs.append(await self.bus.subscribe(
            Subjects.stream_spec(sid), lambda m, raw: self._on_spec(stream, m, raw), expected=StreamSpec))
        stream.liveness = StreamLiveness(self.liveness_policy(spec), time.monotonic())
        stream.subs.append(await self.bus.subscribe(
            Subjects.stream_output(sid), lambda m, _raw: self._on_output(stream, m), expected=StreamOutput))
        stream.subs.append(await self.bus.subscribe(
            Subjects.stream_error(sid), lambda m, _raw: self._on_error(stream, m), expected=Error))
        await self.bus.publish(Subjects.stream_event(sid), StreamEvent(stream_id=sid, kind="live", at=time.time()))
        await self._announce_prompt(stream, PromptUpdate(stream_id=sid, version=record.prompt_version,
                                                         prompt=spec.prompt))
        if isinstance(source, T2VSource):
            source.start(first[0])
        log.info("stream %s live (%s %dx%d @ %g fps, %d steps, prompt v%d) from seq %d, segment %d", sid,
                 "T2V" if t2v else "RTMP", spec.width, spec.height, spec.fps, spec.steps, record.prompt_version,
                 *first[0])
        return stream

    async def _run_stream(self, source: ChunkSource, spec: StreamSpec, previous: asyncio.Task | None,
                          t2v: bool) -> None:
        """One stream's life: go live, turn every chunk into a latent chunk in order, announce the end."""
        if previous is not None:  # a new session of the same stream waits for the old one's clean-up
            await asyncio.gather(previous, return_exceptions=True)
        sid = spec.stream_id
        stream: IngestStream | None = None
        try:
            stream = await self._go_live(source, spec, t2v)
        except _Claimed:
            log.info("stream %s (text-to-video) is live elsewhere; not starting it here", sid)
            source.queue.close()
        except StreamNotFound:
            log.warning("stream %s was deleted before it went live; refusing its media", sid)
            source.queue.close()
        except Exception:
            log.exception("stream %s: could not go live; its media is dropped", sid)
            source.queue.close()
        try:
            while (raw := await source.queue.get()) is not None:
                if stream is None:
                    count_drop("not_live")
                    continue
                await self._process(stream, raw, ending=source.queue.closed)
        finally:
            if isinstance(source, T2VSource):
                source.close()
                if self._t2v.get(sid) is source:
                    del self._t2v[sid]
            elif self.rtmp is not None and self.rtmp.streams.get(sid) is source:
                self.rtmp._end_stream(source)  # a failed start: stop taking media for it
            if isinstance(source, RtmpStream):
                await source.audio.close()
            if stream is not None:
                await self._end(stream)

    async def _end(self, stream: IngestStream) -> None:
        assert self.bus is not None and self.table is not None
        sid = stream.stream_id
        for sub in stream.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if stream.window is not None:
            await stream.window.close()
        last = stream.last_seq if stream.last_seq is not None else 0
        stream.drop_log.flush(force=True)
        try:
            with contextlib.suppress(StreamNotFound):  # the table first: whoever hears the event reads "ended"
                assert self.status is not None
                # an RTMP publisher's unclean close (e.g. no frames for ingest.frame_timeout_s) says why it ended
                reason = getattr(stream.source, "end_reason", "")
                await self.status.write(stream, state="ended", state_reason=reason)
            await self.bus.publish(Subjects.stream_event(sid), StreamEvent(stream_id=sid, kind="ended", seq=last,
                                                                           at=time.time()))
            if self._prompts is not None:
                for key in stream.prompt_keys:
                    with contextlib.suppress(Exception):
                        await self._prompts.delete(key)
        except Exception as e:
            log.warning("stream %s: end not fully announced: %s", sid, e)
        finally:
            if self.live.get(sid) is stream:
                del self.live[sid]
                self.streams.discard(sid)
        log.info("stream %s ended after chunk %d (%d published, dropped: %s)", sid, last, stream.published,
                 dict(stream.dropped) or "none")

    # -- chunks -------------------------------------------------------------------------------------------------

    async def _process(self, stream: IngestStream, raw: RawChunk, ending: bool = False) -> None:
        """Encode one chunk and publish it, or drop it with a counted, logged reason (this stream only).

        A chunk is encoded even when it is already late, so the VAE cache and the motion EMA stay those of the
        whole stream; only once the stream has ended (``ending``) is a late chunk dropped unencoded.
        """
        if not stream.begin(raw):
            return
        spec = stream.spec  # the parameters this chunk is encoded under (a live change applies from the next)
        deadline = raw.capture_time + stream.spec.slo.max_latency_ms / 1000.0
        if ending and time.time() > deadline:
            stream.drop("deadline", f"chunk {raw.seq}: past its deadline after the stream ended")
            return
        span = telemetry.start_chunk_trace("ingest.encode", {"rheo.stream_id": stream.stream_id, "rheo.seq": raw.seq})
        try:  # batched with the other streams' ready chunks (_encode_batch: watchdog, work meter)
            latent, scale = await self._encoder.submit(EncodeJob(stream, raw, spec, self.settings.ingest.debug_tap_dir))
        except Exception as e:
            stream.drop("encode_error", f"chunk {raw.seq}: {type(e).__name__}: {e}")
            return
        finally:
            span.end()  # the root of the chunk's trace (docs/observability.md)
        assert self.status is not None
        if not await self.status.reserve(stream, raw.seq, raw.segment):
            stream.drop("unreserved", f"chunk {raw.seq}: its seq could not be reserved in the stream table first")
            return
        async with stream.publishing:  # a replay in progress goes first; the epoch is the one current at publish
            await stream.publish(stream.chunk(raw, latent, scale, deadline, self.rings.epoch(stream.ring_id),
                                              self.clock_of(stream),
                                              telemetry.traceparent(span)))

    def _encode_batch(self, jobs: list[EncodeJob]) -> list[tuple[torch.Tensor, float] | Exception]:
        """Model thread: one batch; a stuck encode fails /healthz, its time is what admission counts per
        megapixel-frame (T2V: none)."""
        assert self.models is not None
        mpx = sum(0.0 if j.spec.t2v else j.raw.frames.size / 3e6 for j in jobs)
        with self.watchdog.busy("vae_encode", mpx=mpx):
            return encode_chunks(self.models.vae, jobs)

    def clock_of(self, stream: IngestStream) -> ChunkClock:
        """The stream's chunk clock on the configured ring (latent and RoPE starts)."""
        return stream.spec.clock(self.ring)

    def replay_depth(self) -> tuple[int, int]:
        """(K, sink chunks) of every stream's replay ring: ``ingest.replay_chunks``, or the rolling KV window."""
        ring = self.ring
        depth = self.settings.ingest.replay_chunks
        if depth is None:
            depth = window_chunks(ring.kv_window, ring.sink, ring.clock())
        return depth, sink_chunks(ring.sink, ring.clock())

    # -- liveness -----------------------------------------------------------------------------------------------

    def liveness_policy(self, spec: StreamSpec) -> LivenessPolicy:
        cfg = self.settings.ingest
        bound = stall_bound_s(spec.slo.max_latency_ms / 1000.0, spec.clock(self.ring).output_frames(1) / spec.fps,
                              cfg.liveness_floor_s)
        return LivenessPolicy(stall_s=bound, max_repairs=cfg.liveness_max_repairs, failed_retry_s=cfg.liveness_retry_s)

    async def _on_output(self, stream: IngestStream, out: StreamOutput) -> None:
        if stream.liveness is not None and out.stream_id == stream.stream_id:
            stream.liveness.output(out.seq, out.decoded, time.monotonic())

    async def _on_error(self, stream: IngestStream, err: Error) -> None:
        """The first stage asks for a new segment: it has no state for the stream (docs/recovery.md)."""
        if err.code != "unprepared" or err.stream_id != stream.stream_id or stream.liveness is None:
            return
        health = stream.liveness.stage_lost(time.monotonic())
        if health is not None:
            self._repair(stream, health)

    def _repair(self, stream: IngestStream, health: Health) -> None:
        """A new warm-up segment: its prepare chunk recreates the stream's state on every stage and in the decoder,
        whatever wedged it; the record says why."""
        seq = stream.source.cut() if stream.source is not None else stream.next_seq
        STREAM_REPAIRS.inc()
        STREAM_STATES.labels(state=health.state).inc()
        log.warning("stream %s %s: %s (new segment from chunk %d)", stream.stream_id, health.state, health.reason, seq)
        self._spawn(self._write_health(stream, health.state, health.reason), f"health-{stream.stream_id}")

    async def _watch_liveness(self) -> None:
        """Every live stream's output against what it published: a stalled stream gets a new warm-up segment (which
        recreates its state on every stage and in the decoder, whatever wedged it); its state says so."""
        while True:
            await asyncio.sleep(LIVENESS_TICK_S)
            now = time.monotonic()
            for stream in list(self.live.values()):
                if stream.liveness is None:
                    continue
                was = stream.liveness.state
                health = stream.liveness.check(now)
                if health.repair:
                    self._repair(stream, health)
                elif health.state != was:
                    STREAM_STATES.labels(state=health.state).inc()
                    log.info("stream %s %s%s", stream.stream_id, health.state,
                             f": {health.reason}" if health.reason else "")
                    self._spawn(self._write_health(stream, health.state, health.reason), f"health-{stream.stream_id}")

    async def _write_health(self, stream: IngestStream, state: str, reason: str) -> None:
        """The stream's health into its record, for the API (a stream ended meanwhile keeps ``ended``)."""
        assert self.status is not None
        try:
            await self.status.write(stream, state=state, state_reason=reason)
        except Exception as e:
            log.warning("stream %s: state %s not written to the stream table: %s", stream.stream_id, state, e)

    # -- prompts and live parameters ----------------------------------------------------------------------------

    def _prompt_problem(self, prompt: str) -> str:
        """Why ``prompt``'s embedding cannot be published (empty: it can); tokenizing only, milliseconds."""
        assert self.models is not None
        limit = max_prompt_tokens(self.settings)
        n = self.models.prompt.token_count(prompt)
        if n <= limit:
            return ""
        return (f"the prompt has {n} tokens; at most {limit} fit one message at this model's embedding precision "
                f"(nats.max_send_bytes {self.settings.nats.max_send_bytes}): shorten it")

    async def _embed(self, prompt: str) -> torch.Tensor:
        """The prompt's real tokens ``[L, D]``: the zero padding to text_len is left to the DiT (lossless)."""
        assert self.models is not None
        enc = self.models.prompt
        loop = asyncio.get_running_loop()
        emb = await loop.run_in_executor(self._compute, enc.encode, prompt)
        return trim_padding(emb[0]).contiguous().cpu()  # [1, text_len, D] → [L, D]

    async def _announce_prompt(self, stream: IngestStream, update: PromptUpdate) -> PromptUpdate:
        """Encode, publish the update with its embedding, keep it in the prompts bucket for late joiners (with the
        versions a blend or chunks in flight may still use)."""
        assert self.bus is not None
        embedded = PromptUpdate(stream_id=update.stream_id, version=update.version, prompt=update.prompt,
                                mode=update.mode, blend_chunks=update.blend_chunks,
                                embedding=await self._embed(update.prompt))
        await self.bus.publish(Subjects.stream_prompt(update.stream_id), embedded)
        if self._prompts is not None:
            key = f"{update.stream_id}.{update.version}"
            try:
                await self._prompts.put(key, embedded)
                stream.prompt_keys.append(key)
                while len(stream.prompt_keys) > _PROMPT_KEYS_KEPT:
                    await self._prompts.delete(stream.prompt_keys.pop(0))
            except Exception as e:
                log.warning("stream %s: prompt v%d not stored in %s: %s", update.stream_id, update.version,
                            Buckets.PROMPTS, e)
        return embedded

    async def _on_prompt(self, stream: IngestStream, update: PromptUpdate, msg: Msg) -> None:
        """A prompt change request (from the gateway): answer with the chunk seq it takes effect at."""
        assert self.bus is not None
        if update.embedding is not None:
            return  # an update already encoded (our own republish): for the DiT stages, not for us
        sid = stream.stream_id
        problem = ""
        if update.stream_id != sid:
            code, problem = "bad_request", f"update for {update.stream_id!r} sent to {sid!r}"
        elif too_long := self._prompt_problem(update.prompt):
            code, problem = "prompt_too_long", too_long
        elif update.version <= stream.prompt_version:
            code, problem = "stale_prompt_version", (f"version {update.version} is not newer than the "
                                                     f"{stream.prompt_version} in force")
        if problem:
            PROMPT_REQUESTS.labels(result="refused").inc()
            await self.bus.respond(msg, Error(code=code, stream_id=sid, message=problem))
            return
        try:
            await self._announce_prompt(stream, update)
        except Exception as e:
            PROMPT_REQUESTS.labels(result="failed").inc()
            log.warning("stream %s: prompt v%d failed: %s: %s", sid, update.version, type(e).__name__, e)
            await self.bus.respond(msg, Error(code="prompt_failed", stream_id=sid,
                                              message=f"{type(e).__name__}: {e}"))
            return
        effective = stream.next_seq
        if update.version > stream.prompt_version:  # a concurrent newer change may have won meanwhile
            effective = stream.accept_prompt(update.version, update.prompt, update.mode, update.blend_chunks)
        PROMPT_REQUESTS.labels(result="accepted").inc()
        log.info("stream %s: prompt v%d (%s over %d chunks) from chunk %d", sid, update.version, update.mode,
                 update.blend_chunks, effective)
        await self.bus.respond(msg, Ack(ref=str(effective), detail=f"prompt version {update.version}"))

    async def _on_spec(self, stream: IngestStream, spec: StreamSpec, msg: Msg) -> None:
        """A live parameter change (from the gateway): answered with the chunk seq it takes effect at.

        The noise scale (motion controller s_init) and the seed apply from the next chunk encoded (the seed: the
        DiT's noise draws of that chunk on, ``dit_stage/admission.py``); a new step count starts
        a new warm-up segment (``IngestStream.accept_spec``). Size, rate and mode are fixed for the session; the
        prompt changes through its own request (versions). A spec published without a reply (the gateway's
        announcement of a new stream) is not a request."""
        assert self.bus is not None
        if not msg.reply:
            return
        sid = stream.stream_id
        if spec.stream_id != sid:
            await self.bus.respond(msg, Error(code="bad_request", stream_id=sid,
                                              message=f"spec for {spec.stream_id!r} sent to {sid!r}"))
            return
        kept = ("width", "height", "fps", "t2v", "t2v_frames", "prompt")
        new = spec.model_copy(update={k: getattr(stream.spec, k) for k in kept})
        problem = unservable(self.settings, new)
        if problem:
            log.warning("stream %s: spec change refused: %s", sid, problem)
            await self.bus.respond(msg, Error(code="bad_spec", stream_id=sid, message=problem))
            return
        effective = stream.accept_spec(new)
        log.info("stream %s: %d steps, noise scale %g, seed %d from chunk %d", sid, new.steps,
                 new.noise.noise_scale, new.seed, effective)
        await self.bus.respond(msg, Ack(ref=str(effective), detail=f"{new.steps} steps, noise scale "
                                                                   f"{new.noise.noise_scale:g}, seed {new.seed}"))


if __name__ == "__main__":
    code = main(IngestService)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is drained and closed; skip tearing down torch/diffusers/transformers modules, which alone
    # takes seconds on a loaded node and would eat the SIGTERM budget.
    os._exit(code)
