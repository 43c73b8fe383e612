"""The DiT stage service (``rheo dit-stage``): one contiguous block range of the DiT in the stream-batch ring.

Wiring (docs/dit-ring.md):

- the block map comes from JetStream KV (``rheo-blockmap``, key ``current``) and is watched; the stage finds its
  range by ``dit_stage.stage_id`` and loads exactly those blocks;
- its tensor-link listener is advertised in ``rheo-endpoints`` (key = stage id); a ``LinkSender`` goes to the next
  stage in the map, the last stage's to the first (ring returns);
- the first stage subscribes to latent chunks (credit window) and prompt updates carrying an embedding; every
  stage listens for stream events to free a stream's state when it ends;
- the last stage publishes finished x0 chunks on ``rheo.stream.<id>.x0`` through a credit window per stream.

The ring mechanism itself is ``dit_stage.worker.StageWorker`` (transport-free, unit-tested); this module only
moves its inputs and outputs. Forwards run in a worker thread so the event loop keeps draining NATS and the link
(a stage that stopped reading its listener could deadlock the ring through backpressure).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Gauge, Histogram

from dit_stage.loading import find_causal_checkpoint, load_dit
from dit_stage.micro_step import StageOutput, SwitchStep
from dit_stage.model import CausalWanDiT, make_tiny_dit
from dit_stage.switching import EpochChange
from dit_stage.timed import make_stage_worker
from dit_stage.worker import StageWorker
from proto import (
    CHANNELS,
    BlockMap,
    Buckets,
    EpochSwitch,
    LatentChunk,
    Message,
    PromptUpdate,
    ProtocolError,
    RingReturn,
    ShardMove,
    ShardMoveEnd,
    StageItems,
    StagePrompt,
    StageStats,
    StreamEvent,
    Subjects,
    stage_prepared_key,
)
from services.bus import KV, CreditTimeout, CreditWindow
from services.config import Settings
from services.link import LinkListener, LinkSender
from services.rebalance import joins_online, offline_reason, stage_moves
from services.runtime import Service, ServiceStartError, main
from wan.device import resolve_device, resolve_dtype

__all__ = ["BLOCKMAP_KEY", "DitStageService", "load_stage_model", "slice_stage"]

log = logging.getLogger("rheo.dit_stage")

T = TypeVar("T")

BLOCKMAP_KEY = "current"
OUTPUT_QUEUE = 8
"""Finished chunks queued per stream for publishing before the oldest is dropped."""
EARLY_QUEUE = 256
"""Inputs of a block-map epoch this stage has not applied yet, held until it has (the oldest dropped beyond)."""
LINK_POLL_S = 0.5
"""How often a link send blocked on a dead peer checks whether the next stage changed."""

_MS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
DROPPED = Counter("rheo_dit_stage_dropped_total", "items or messages a DiT stage dropped", ["stage", "reason"])
MICRO_STEPS = Counter("rheo_dit_stage_micro_steps_total", "micro-steps a DiT stage ran", ["stage"])
COMPUTE = Histogram("rheo_dit_stage_compute_seconds", "compute time of one micro-step", ["stage"], buckets=_MS)
BLOCK_COMPUTE = Histogram("rheo_dit_stage_block_seconds", "compute time of one block in one micro-step (CUDA events "
                          "on GPU, wall clock on CPU)", ["stage", "block"], buckets=_MS)
EXTRA_COMPUTE = Histogram("rheo_dit_stage_extra_seconds", "non-block compute of one micro-step (patch embed, time "
                          "embedding, head, x0)", ["stage"], buckets=_MS)
QUEUE_WAIT = Histogram("rheo_dit_stage_queue_wait_seconds", "mean wait of a micro-step's items at the first stage",
                       ["stage"], buckets=_MS)
LINK_TIME = Histogram("rheo_dit_stage_link_seconds", "time to hand one tensor-link frame to the link (send) or to "
                      "read it from the socket (recv)", ["stage", "direction"], buckets=_MS)
BATCH_ITEMS = Histogram("rheo_dit_stage_batch_items", "items in one micro-step", ["stage"],
                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
BATCH_STREAMS = Histogram("rheo_dit_stage_batch_streams", "streams in one micro-step", ["stage"],
                          buckets=(1, 2, 3, 4, 6, 8, 12, 16))
KV_BYTES = Gauge("rheo_dit_stage_kv_bytes", "KV-cache bytes a stage holds for a stream", ["stage", "stream"])
FREE_MEMORY = Gauge("rheo_dit_stage_free_memory_bytes", "free memory of the stage's device", ["stage"])
EPOCH = Gauge("rheo_dit_stage_epoch", "block-map epoch the stage runs", ["stage"])
SWITCHES = Counter("rheo_dit_stage_epoch_switches_total", "block-map epoch switches", ["stage", "kind"])
MOVED_BYTES = Counter("rheo_dit_stage_shard_move_bytes_total", "KV-shard bytes moved at online switches",
                      ["stage", "direction"])
STREAMS_RESET = Counter("rheo_dit_stage_streams_reset_total",
                        "streams whose state a failure epoch discarded (ingest replays them)", ["stage"])
REPLAYED = Counter("rheo_dit_stage_replayed_chunks_total", "replayed chunks finished, not published", ["stage"])
FINISHED = Counter("rheo_dit_stage_finished_chunks_total", "x0 chunks published by the last stage", ["stage"])


def slice_stage(full: CausalWanDiT, block_range: tuple[int, int]) -> CausalWanDiT:
    """Blocks [a, b) of ``full`` as a stage model with identical weights (embeddings/head as the range needs)."""
    stage = CausalWanDiT(full.config, block_range, fp32_modulation=full.fp32_modulation)
    keys = set(stage.state_dict())
    stage.load_state_dict({k: v for k, v in full.state_dict().items() if k in keys}, strict=True)
    return stage.to(full.dtype).eval()



def load_stage_model(settings: Settings, block_range: tuple[int, int], num_blocks: int) -> CausalWanDiT:
    """This stage's blocks: from ``model.model_dir`` (causal checkpoint), or the tiny random DiT when unset.

    The tiny model is built whole from ``dit_stage.tiny_seed`` and sliced, so blocks [a, b) equal those of the
    single-process model whatever the split.
    """
    device = resolve_device(settings.model.device)
    dtype = resolve_dtype(settings.model.dtype, device)
    model_dir = settings.model.model_dir
    if model_dir is None:
        full = make_tiny_dit(settings.dit_stage.tiny_seed, num_blocks, dtype)
        return slice_stage(full, block_range).to(device)
    ckpt = settings.model.checkpoint or find_causal_checkpoint(model_dir)
    if ckpt is None or not ckpt.is_file():
        raise ServiceStartError(f"no causal DiT checkpoint in {model_dir} (set model.checkpoint)")
    model = load_dit(ckpt, None, block_range, dtype=dtype, device=device).eval()
    if model.config.num_layers != num_blocks:
        raise ServiceStartError(f"block map has {num_blocks} blocks, checkpoint {ckpt} has {model.config.num_layers}")
    return model


@dataclass
class _Output:
    """Publisher of one stream's finished chunks: a bounded queue drained by its own task."""

    window: CreditWindow
    queue: collections.deque[LatentChunk] = field(default_factory=collections.deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class _Switch:
    """An online epoch switch in progress at this stage."""

    old: BlockMap
    new: BlockMap
    senders: dict[str, LinkSender] = field(default_factory=dict)  # new owners of blocks this stage hands over
    next_stage: str | None = None  # the next stage under the new map, when it changes (a stage joins after us)
    next_sender: LinkSender | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: bool = False


@dataclass
class _Totals:
    """Running sums for the stats subject (a window's values are the difference of two snapshots)."""

    micro_steps: int = 0
    items: int = 0
    compute_s: float = 0.0
    queue_wait_s: float = 0.0
    link_send_s: float = 0.0
    link_recv_s: float = 0.0
    extra_s: float = 0.0
    block_s: dict[int, float] = field(default_factory=dict)
    block_steps: dict[int, int] = field(default_factory=dict)

    def snapshot(self) -> _Totals:
        return _Totals(**(vars(self) | {"block_s": dict(self.block_s), "block_steps": dict(self.block_steps)}))

    def minus(self, last: _Totals) -> _Totals:
        scalars = {f: getattr(self, f) - getattr(last, f) for f in _Totals.__dataclass_fields__
                   if f not in ("block_s", "block_steps")}
        return _Totals(**scalars,
                       block_s={b: v - last.block_s.get(b, 0.0) for b, v in self.block_s.items()},
                       block_steps={b: n - last.block_steps.get(b, 0) for b, n in self.block_steps.items()})


class DitStageService(Service):
    role = "dit-stage"

    def __init__(self, settings: Settings, member_id: str | None = None) -> None:
        super().__init__(settings, member_id or settings.dit_stage.stage_id)
        self.cfg = settings.dit_stage
        self.stage_id = self.cfg.stage_id
        self.checks.update(weights=False, link=False)
        self.worker: StageWorker | None = None
        self.block_map: BlockMap | None = None
        self.block_range: tuple[int, int] | None = None
        self.listener: LinkListener | None = None
        self.sender: LinkSender | None = None
        self.next_stage: str | None = None
        self.endpoint = ""
        self.endpoints: KV | None = None
        self._prompt_kv: KV | None = None
        self.malformed_link = 0
        self.ignored_prompts = 0
        self._wake = asyncio.Event()
        self._link_ready = asyncio.Event()
        self._ending: list[str] = []
        self._seeds: dict[str, int] = {}
        self._outputs: dict[str, _Output] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._input_subs: list[Subscription] = []
        self._connect_task: asyncio.Task[None] | None = None
        self._compute_task: asyncio.Task[None] | None = None
        self._closing = False
        self._recover_floor = 0  # a failure epoch to apply in the micro-step loop (worker.recover)
        self._early: list[LatentChunk | StageItems | RingReturn] = []
        self._admit_epoch = 0  # inputs of a later epoch wait in _early until its map applies here
        self._received: BlockMap | None = None  # the newest map the watch delivered (maps apply in order)
        self._totals = _Totals()
        self._reported: collections.Counter[str] = collections.Counter()
        self._maps: asyncio.Queue[BlockMap] = asyncio.Queue()
        self._switch: _Switch | None = None
        self._blockmap_kv: KV | None = None
        self._kv_streams: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        assert self.bus is not None
        self.listener = LinkListener(self.cfg.link_host, self.cfg.link_port,
                                     max_frame_bytes=self.cfg.link_max_frame_bytes).start()
        self.endpoint = f"{self.cfg.advertise_host}:{self.listener.port}"
        self.endpoints = await self.bus.kv(Buckets.ENDPOINTS, replicas=self.settings.nats.kv_replicas)
        await self.endpoints.put(self.stage_id, self.endpoint.encode())
        await self.bus.subscribe(CHANNELS["stream_event"].wildcard(), self._on_event, expected=StreamEvent)
        self._tasks = [
            asyncio.create_task(self._watch_block_map(), name="blockmap"),
            asyncio.create_task(self._apply_maps(), name="blockmap-apply"),
            asyncio.create_task(self._receive(), name="link-recv"),
            asyncio.create_task(self._stats(), name="stats"),
        ]
        self._compute_task = asyncio.create_task(self._compute(), name="compute")
        log.info("dit stage %s: tensor link on %s", self.stage_id, self.endpoint)

    async def drain(self) -> None:
        """Finish the micro-step in flight, let the next stage read the queued link frames (1 s at most), then close."""
        self._closing = True
        self._wake.set()
        if self._compute_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._compute_task, 3.0)
        if self.sender is not None and self._link_ready.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sender.acknowledged(), 1.0)
        if self.endpoints is not None:  # withdraw the endpoint: nobody should connect to a stopped stage
            with contextlib.suppress(Exception):
                entry = await self.endpoints.get(self.stage_id)
                if entry is not None and entry.value == self.endpoint.encode():
                    await asyncio.wait_for(self.endpoints.delete(self.stage_id), 1.0)
        await self._close()

    async def _close(self) -> None:
        tasks = [*self._tasks, *(o.task for o in self._outputs.values() if o.task is not None)]
        if self._connect_task is not None:
            tasks.append(self._connect_task)
        if self._compute_task is not None:
            tasks.append(self._compute_task)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for out in self._outputs.values():
            with contextlib.suppress(Exception):
                await out.window.close()
        if self.sender is not None:
            await asyncio.to_thread(self.sender.close)
        if self.listener is not None:
            self.listener.close()

    async def run(self) -> int:
        try:
            return await super().run()
        finally:
            if not self._closing:  # start failed or stop() came before drain: still free the sockets
                self._closing = True
                await self._close()

    # ------------------------------------------------------------------ block map and link
    async def _watch_block_map(self) -> None:
        assert self.bus is not None
        while True:
            try:
                kv = self._blockmap_kv = await self.bus.kv(Buckets.BLOCKMAP, replicas=self.settings.nats.kv_replicas)
                async for entry in kv.watch(BLOCKMAP_KEY):
                    if entry.value is not None:
                        await self._on_block_map(entry.value, entry.revision)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a NATS hiccup: keep the current map, watch again
                log.warning("stage %s: block map watch failed (%s); retrying", self.stage_id, e)
            await asyncio.sleep(0.5)

    async def _on_block_map(self, value: bytes, revision: int) -> None:
        """Queue a map for ``_apply_maps`` (maps apply in order; an online switch takes a while). A map that cannot
        be an online switch ends a pending one at once: a hard epoch (e.g. a failure) must not wait for it."""
        try:
            bm = _decode_blockmap(value)
            bm.validate_cover()
        except (ProtocolError, ValueError) as e:
            DROPPED.labels(stage=self.stage_id, reason="bad_blockmap").inc()
            log.warning("block map revision %d refused: %s", revision, e)
            return
        sw = self._switch
        if sw is not None and not sw.done.is_set() and offline_reason(sw.new, bm):
            log.warning("stage %s: epoch %d (%s) replaces the pending switch to epoch %d", self.stage_id, bm.epoch,
                        bm.reason, sw.new.epoch)
            sw.aborted = True
            sw.done.set()
        prev, self._received = self._received, bm
        if self.worker is not None and prev is not None and self.stage_id in {s.stage_id for s in bm.stages} \
                and not offline_reason(prev, bm):
            # an online switch: the worker itself orders items of the new epoch (docs/rebalance.md)
            await self._admit_from(bm.epoch)
        self._maps.put_nowait(bm)

    async def _apply_maps(self) -> None:
        while True:
            bm = await self._maps.get()
            try:
                await self._apply(bm)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("block map epoch %d could not be applied", bm.epoch)

    def _hold_early(self, msg: LatentChunk | StageItems | RingReturn) -> None:
        """An input of an epoch whose block map has not reached this stage yet: hold it until it has."""
        self._early.append(msg)
        while len(self._early) > EARLY_QUEUE:
            self._early.pop(0)
            DROPPED.labels(stage=self.stage_id, reason="early_overflow").inc()

    async def _admit_from(self, epoch: int) -> None:
        """Inputs of epochs up to ``epoch`` may reach the worker now: hand over those held."""
        self._admit_epoch = max(self._admit_epoch, epoch)
        held, self._early = self._early, []
        for msg in held:
            if isinstance(msg, LatentChunk):
                await self._on_latent(msg, None)
            else:
                self._take_link(msg)

    async def _apply(self, bm: BlockMap) -> None:
        if self.block_map is not None and bm == self.block_map.model_copy(update={"created_at": bm.created_at}):
            return  # the watch delivered the current map again
        ids = [s.stage_id for s in bm.stages]
        if self.stage_id not in ids:
            log.warning("stage %s is not in block map epoch %d; idle", self.stage_id, bm.epoch)
            self.block_map, self.worker, self.block_range = bm, None, None
            self.checks["weights"] = False
            await self._subscribe_inputs(False)
            return
        if self.worker is None and joins_online(bm) and ids[0] != self.stage_id:
            await self._join_online(bm)
            return
        why = offline_reason(self.block_map, bm) if self.worker is not None else "no blocks loaded"
        if not why:
            await self._switch_online(bm)
            return
        idx = ids.index(self.stage_id)
        mine = bm.stages[idx]
        rng = (mine.block_start, mine.block_end)
        if self.worker is not None:
            self.worker.abort_switch()
        current = self.worker.model if self.worker is not None else None
        if current is None or rng != current.block_range or bm.num_blocks != current.config.num_layers:
            if self.worker is not None:  # a hard switch (docs/rebalance.md): the streams' state here is gone
                log.warning("stage %s: blocks %s → %s under epoch %d (%s: %s); per-stream state is dropped",
                            self.stage_id, self.worker.model.block_range, rng, bm.epoch, bm.reason, why)
            self.checks["weights"] = False
            model = await _in_daemon_thread(load_stage_model, self.settings, rng, bm.num_blocks)
            self.worker = self._make_worker(model)
            self.block_range = rng
            self.checks["weights"] = True
            log.info("stage %s: loaded blocks [%d, %d) of %d (epoch %d)", self.stage_id, *rng, bm.num_blocks,
                     bm.epoch)
        self.worker.epoch = bm.epoch
        self._set_epoch(bm)
        SWITCHES.labels(stage=self.stage_id, kind="hard").inc()
        if bm.reason == "failure" and bm.epoch > self._recover_floor:
            # KV of some blocks is lost: no stream state of an older epoch can be trusted, here either; ingest
            # replays every stream (docs/recovery.md). Applied in the micro-step loop, between forwards.
            log.warning("stage %s: failure epoch %d: dropping all stream state of older epochs", self.stage_id,
                        bm.epoch)
            self._recover_floor = bm.epoch
        await self._admit_from(bm.epoch)
        await self._announce_prepared(bm.epoch)
        await self._subscribe_inputs(self.worker.is_first)
        nxt = ids[(idx + 1) % len(ids)]
        if nxt != self.next_stage:
            self.next_stage = nxt
            if self._connect_task is not None:
                self._connect_task.cancel()
            self._connect_task = asyncio.create_task(self._follow_endpoint(nxt), name="link-connect")
        self._wake.set()

    def _make_worker(self, model: CausalWanDiT) -> StageWorker:
        """The one place a stage's worker is built (a hard switch, or joining a running ring); the timed stand-in
        when ``dit_stage.timed_block_ms`` is set."""
        return make_stage_worker(
            self.cfg, model, window=self.cfg.kv_window, sink=self.cfg.sink,
            adaptive_threshold=self.cfg.adaptive_threshold, max_batch_items=self.cfg.max_batch_items,
            max_queued_chunks=self.cfg.max_queued_chunks,
            move_frame_bytes=self.cfg.link_max_frame_bytes // 2,
        )

    def _set_epoch(self, bm: BlockMap) -> None:
        self.epoch = bm.epoch
        self.block_map = bm
        EPOCH.labels(stage=self.stage_id).set(bm.epoch)

    async def _announce_prepared(self, epoch: int) -> None:
        """Record that this stage can run ``epoch`` (its blocks loaded): the first stage waits for every stage."""
        try:
            kv = self._blockmap_kv or await self.bus.kv(Buckets.BLOCKMAP, replicas=self.settings.nats.kv_replicas)
            await kv.put(stage_prepared_key(self.stage_id), str(epoch).encode())
        except Exception as e:  # the first stage then waits for its retry; correctness does not depend on it
            log.warning("stage %s: could not announce epoch %d as prepared: %s", self.stage_id, epoch, e)

    async def _switch_online(self, bm: BlockMap) -> None:
        """Epoch e → e+1 with every old owner alive (docs/rebalance.md): load the new range while e runs, say so,
        and (first stage) switch once every stage has; the worker moves the KV at the switch point."""
        worker, old = self.worker, self.block_map
        assert worker is not None and old is not None and self.bus is not None
        sw = self._switch = _Switch(old, bm)
        t0 = time.monotonic()
        send, receive = stage_moves(old, bm, self.stage_id)
        mine = next(s for s in bm.stages if s.stage_id == self.stage_id)
        rng = (mine.block_start, mine.block_end)
        model = worker.model
        if rng != model.block_range:
            model = await _in_daemon_thread(load_stage_model, self.settings, rng, bm.num_blocks)
        for target in send:
            endpoint = await self._endpoint_of(target, sw)
            if sw.aborted:
                break
            sw.senders[target] = LinkSender(endpoint, max_frame_bytes=self.cfg.link_max_frame_bytes).start()
        ids = [s.stage_id for s in bm.stages]
        nxt = ids[(ids.index(self.stage_id) + 1) % len(ids)]
        if nxt != self.next_stage and not sw.aborted:  # a stage joins after this one: re-link at the switch point
            endpoint = await self._endpoint_of(nxt, sw)
            if not sw.aborted:
                sw.next_stage = nxt
                sw.next_sender = LinkSender(endpoint, max_frame_bytes=self.cfg.link_max_frame_bytes).start()
        if sw.aborted:
            await self._end_switch(sw)
            return
        worker.prepare_switch(EpochChange(bm.epoch, model, self.stage_id, send, receive,
                                          relink=sw.next_stage is not None))
        log.info("stage %s: prepared epoch %d: blocks %s → %s, sends %s, receives %s", self.stage_id, bm.epoch,
                 worker.model.block_range, rng, send, receive)
        await self._announce_prepared(bm.epoch)
        if worker.is_first:
            await self._until_prepared(bm, sw)
            if worker.change is not None and not sw.aborted:
                worker.change.go = True
                self._wake.set()
        await sw.done.wait()
        if not sw.aborted:
            self.block_range = rng
            self._set_epoch(bm)
            SWITCHES.labels(stage=self.stage_id, kind="online").inc()
            log.info("stage %s: epoch %d online after %.2f s", self.stage_id, bm.epoch, time.monotonic() - t0)
        await self._end_switch(sw)

    async def _join_online(self, bm: BlockMap) -> None:
        """This stage is new to a running ring (reason ``join``): it loads its blocks, and their KV arrives from the
        old owners at the switch point (docs/rebalance.md)."""
        sw = self._switch = _Switch(bm, bm)
        ids = [s.stage_id for s in bm.stages]
        idx = ids.index(self.stage_id)
        mine = bm.stages[idx]
        rng = (mine.block_start, mine.block_end)
        model = await _in_daemon_thread(load_stage_model, self.settings, rng, bm.num_blocks)
        if sw.aborted:
            await self._end_switch(sw)
            return
        worker = self._make_worker(model)
        worker.epoch = bm.epoch - 1
        worker.prepare_switch(EpochChange(bm.epoch, model, self.stage_id, joining=True))
        self.worker = worker
        self.block_range = rng
        self.checks["weights"] = True
        await self._admit_from(bm.epoch)
        await self._subscribe_inputs(worker.is_first)
        self.next_stage = ids[(idx + 1) % len(ids)]
        self._connect_task = asyncio.create_task(self._follow_endpoint(self.next_stage), name="link-connect")
        log.info("stage %s: joins at epoch %d with blocks [%d, %d)", self.stage_id, bm.epoch, *rng)
        await self._announce_prepared(bm.epoch)
        await sw.done.wait()
        if not sw.aborted:
            self._set_epoch(bm)
            SWITCHES.labels(stage=self.stage_id, kind="online").inc()
        await self._end_switch(sw)

    async def _end_switch(self, sw: _Switch) -> None:
        if sw.aborted and self.worker is not None:
            self.worker.abort_switch()
        if sw.aborted and sw.next_sender is not None:
            await asyncio.to_thread(sw.next_sender.close)
        for sender in sw.senders.values():
            if not sw.aborted:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sender.acknowledged(), 30.0)
            await asyncio.to_thread(sender.close)
        if self._switch is sw:
            self._switch = None

    async def _endpoint_of(self, stage_id: str, sw: _Switch) -> str:
        assert self.endpoints is not None
        while not sw.aborted:
            entry = await self.endpoints.get(stage_id)
            if entry is not None and entry.value:
                return entry.value.decode(errors="replace")
            await asyncio.sleep(0.1)
        return ""

    async def _until_prepared(self, bm: BlockMap, sw: _Switch) -> None:
        """First stage: wait until every stage of ``bm`` has announced it can run it."""
        kv = self._blockmap_kv
        assert kv is not None
        waiting = [s.stage_id for s in bm.stages]
        while waiting and not sw.aborted:
            entry = await kv.get(stage_prepared_key(waiting[0]))
            try:
                ready = entry is not None and int(entry.value.decode()) >= bm.epoch
            except ValueError:
                ready = False
            if ready:
                waiting.pop(0)
            else:
                await asyncio.sleep(0.05)

    async def _subscribe_inputs(self, first: bool) -> None:
        """Only the first stage takes latent chunks and prompts (a second consumer would return credit the
        first stage has not earned)."""
        assert self.bus is not None
        if first and not self._input_subs:
            self._input_subs = [
                await self.bus.subscribe(CHANNELS["stream_latent"].wildcard(), self._on_latent,
                                         expected=LatentChunk, credit=True),
                await self.bus.subscribe(CHANNELS["stream_prompt"].wildcard(), self._on_prompt,
                                         expected=PromptUpdate),
            ]
        elif not first and self._input_subs:
            for sub in self._input_subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self._input_subs = []

    async def _follow_endpoint(self, stage_id: str) -> None:
        """Keep a LinkSender to ``stage_id``'s advertised endpoint (reconnecting when it changes)."""
        assert self.endpoints is not None
        while True:
            try:
                async for entry in self.endpoints.watch(stage_id):
                    if entry.value is None:
                        continue
                    endpoint = entry.value.decode(errors="replace")
                    if self.sender is None or self.sender.endpoint != endpoint:
                        await self._connect(endpoint)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("stage %s: endpoint watch failed (%s); retrying", self.stage_id, e)
            await asyncio.sleep(0.5)

    async def _connect(self, endpoint: str) -> None:
        from services.link import parse_endpoint

        try:
            host, port = parse_endpoint(endpoint)
        except ValueError as e:
            log.warning("stage %s: next stage advertises a bad endpoint: %s", self.stage_id, e)
            return
        delay = 0.05
        while True:  # reachable before ready: readiness means the ring can carry an item
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
                writer.close()
                break
            except (OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        old = self.sender
        self._link_ready.clear()
        self.checks["link"] = False
        if old is not None:
            await asyncio.to_thread(old.close)
        self.sender = LinkSender(endpoint, max_frame_bytes=self.cfg.link_max_frame_bytes).start()
        if self.worker is not None:
            self.worker.forwarded.clear()  # a new peer has none of our prompt embeddings
        self.checks["link"] = True
        self._link_ready.set()
        log.info("stage %s: tensor link to %s (%s)", self.stage_id, self.next_stage, endpoint)

    # ------------------------------------------------------------------ inputs
    async def _on_latent(self, chunk: LatentChunk, _raw: object) -> None:
        if chunk.epoch > self._admit_epoch:
            self._hold_early(chunk)
            return
        worker = self.worker
        if worker is None or not worker.is_first:
            if worker is None:
                DROPPED.labels(stage=self.stage_id, reason="no_block_map").inc()
            return
        if chunk.seq == 0 or chunk.stream_id not in self._seeds:
            self._seeds[chunk.stream_id] = await self._stream_seed(chunk.stream_id)
        if chunk.prompt_version not in worker.prompts.get(chunk.stream_id, {}):
            await self._fetch_prompt(worker, chunk.stream_id, chunk.prompt_version)
        if worker.add_chunk(chunk, self._seeds[chunk.stream_id]):
            self.streams.add(chunk.stream_id)
            self._wake.set()

    async def _stream_seed(self, stream_id: str) -> int:
        """The stream's seed from the stream table (every random draw derives from it)."""
        from services.streams import StreamNotFound, StreamTable

        assert self.bus is not None
        try:
            table = await StreamTable.open(self.bus)
            return (await table.get(stream_id)).spec.seed
        except (StreamNotFound, ProtocolError) as e:
            log.warning("stream %s: no usable stream record (%s); using the default seed %d", stream_id, e,
                        self.settings.stream.seed)
            return self.settings.stream.seed

    async def _fetch_prompt(self, worker: StageWorker, stream_id: str, version: int) -> None:
        """A late joiner's prompt: ingest keeps the embedded versions in the prompts bucket (``<stream>.<version>``).
        Missing there too, the chunk waits in its queue for the live update (or its deadline)."""
        assert self.bus is not None
        try:
            if self._prompt_kv is None:
                self._prompt_kv = await self.bus.kv(Buckets.PROMPTS, replicas=self.settings.nats.kv_replicas)
            update = await self._prompt_kv.get_message(f"{stream_id}.{version}", PromptUpdate)
        except Exception as e:
            log.warning("stream %s: prompt v%d not in %s: %s", stream_id, version, Buckets.PROMPTS, e)
            return
        if update is not None and update.embedding is not None:
            worker.add_prompt(stream_id, version, update.embedding)

    async def _on_prompt(self, update: PromptUpdate, _raw: object) -> None:
        worker = self.worker
        if worker is None or not worker.is_first:
            return
        if update.embedding is None:  # the gateway's request; ingest republishes it encoded
            self.ignored_prompts += 1
            return
        if worker.add_prompt(update.stream_id, update.version, update.embedding):
            self._wake.set()

    async def _on_event(self, event: StreamEvent, _raw: object) -> None:
        if event.kind == "ended":
            self._ending.append(event.stream_id)
            self._wake.set()

    async def _receive(self) -> None:
        assert self.listener is not None
        while True:
            frame = await self.listener.recv()
            with frame:
                msg = frame.message
                self._totals.link_recv_s += frame.recv_seconds
                LINK_TIME.labels(stage=self.stage_id, direction="recv").observe(frame.recv_seconds)
                worker = self.worker
                if worker is None:
                    DROPPED.labels(stage=self.stage_id, reason="no_block_map").inc()
                    continue
                if isinstance(msg, StageItems) and not worker.is_first and _consistent(msg):
                    msg.hidden, msg.noisy = msg.hidden.clone(), msg.noisy.clone()  # the buffer goes back to the pool
                    self._take_link(msg)
                elif isinstance(msg, EpochSwitch) and not worker.is_first:
                    worker.add_items(msg)
                elif isinstance(msg, ShardMove | ShardMoveEnd) and msg.target == self.stage_id:
                    if isinstance(msg, ShardMove):  # off the pool buffer, onto the device, off the event loop
                        msg.tensors = await asyncio.to_thread(_to_device, msg.tensors, worker.model.device)
                        MOVED_BYTES.labels(stage=self.stage_id, direction="in").inc(frame.nbytes)
                    worker.add_shard_move(msg)
                elif isinstance(msg, RingReturn) and worker.is_first and msg.latents.shape[0] == len(msg.items):
                    msg.latents = msg.latents.clone()
                    self._take_link(msg)
                elif isinstance(msg, StagePrompt) and not worker.is_first:
                    worker.add_prompt(msg.stream_id, msg.version, msg.embedding)
                else:
                    self.malformed_link += 1
                    DROPPED.labels(stage=self.stage_id, reason="bad_link_frame").inc()
                    log.warning("stage %s: unexpected %s on the tensor link from %s; dropped", self.stage_id,
                                type(msg).__name__, frame.peer)
                    continue
            self._wake.set()

    def _take_link(self, msg: StageItems | RingReturn) -> None:
        """Hand ring traffic to the worker, or hold it while its epoch's block map has not reached this stage."""
        worker = self.worker
        if msg.epoch > self._admit_epoch:
            self._hold_early(msg)
        elif worker is None:
            DROPPED.labels(stage=self.stage_id, reason="no_block_map").inc()
        elif isinstance(msg, StageItems) and not worker.is_first:
            worker.add_items(msg)
        elif isinstance(msg, RingReturn) and worker.is_first:
            worker.add_return(msg)
        else:
            DROPPED.labels(stage=self.stage_id, reason="wrong_role").inc()  # the map moved while it was held

    async def _send_link(self, message: Message) -> bool:
        """Send to the next stage; False (dropped) when the next stage changed meanwhile: a send blocked on a
        dead peer must not hold up the micro-step loop, and what it carried belongs to the old ring."""
        await self._link_ready.wait()
        sender = self.sender
        assert sender is not None
        send = asyncio.ensure_future(sender.send(message))
        while True:
            done, _ = await asyncio.wait({send}, timeout=LINK_POLL_S)
            if done:
                try:
                    send.result()
                except Exception as e:
                    DROPPED.labels(stage=self.stage_id, reason="link_error").inc()
                    log.warning("stage %s: link send failed: %s", self.stage_id, e)
                    return False
                return True
            if self.sender is not sender or self._closing:
                send.cancel()
                DROPPED.labels(stage=self.stage_id, reason="link_changed").inc()
                return False

    # ------------------------------------------------------------------ the micro-step loop
    async def _compute(self) -> None:
        while not self._closing:
            self._wake.clear()
            worker = self.worker
            while self._ending and worker is not None:
                stream_id = self._ending.pop()
                worker.end_stream(stream_id)
                self.streams.discard(stream_id)
                self._seeds.pop(stream_id, None)
                out = self._outputs.pop(stream_id, None)
                if out is not None and out.task is not None:
                    out.task.cancel()
            if worker is not None and worker.floor < self._recover_floor:
                reset = worker.recovered_streams
                worker.recover(self._recover_floor)
                STREAMS_RESET.labels(stage=self.stage_id).inc(worker.recovered_streams - reset)
                self.streams = set(worker.streams)
            step = worker.take() if worker is not None else None
            sw = self._switch
            if sw is not None and worker is not None and worker.change is None and worker.epoch == sw.new.epoch:
                sw.done.set()  # the blocks this stage took over are merged: the switch is complete here
            if step is None:
                await self._wake.wait()
                continue
            assert worker is not None
            if isinstance(step, SwitchStep):
                await self._switch_point(worker, step)
                continue
            try:
                result = await asyncio.to_thread(worker.compute, step)
            except Exception:
                # a refused batch (e.g. inconsistent cache counters) loses only its items
                worker.dropped["compute_error"] += len(step.items)
                log.exception("stage %s: micro-step of %d items failed; dropped", self.stage_id, len(step.items))
                continue
            self._account(step.queue_wait_s, {m.stream_id for m in step.items}, result)
            t = self._totals
            for message in result.link:
                t0 = time.perf_counter()
                await self._send_link(message)
                dt = time.perf_counter() - t0
                t.link_send_s += dt
                LINK_TIME.labels(stage=self.stage_id, direction="send").observe(dt)
            for chunk in result.finished:
                self._publish(chunk)
            REPLAYED.labels(stage=self.stage_id).inc(result.replayed)
            self.streams = set(worker.streams)
            self._sync_drop_metrics(worker)

    def _account(self, queue_wait_s: float, streams: set[str], result: StageOutput) -> None:
        t = self._totals
        t.micro_steps += 1
        t.items += result.items
        t.compute_s += result.compute_s
        t.queue_wait_s += queue_wait_s * result.items
        stage = self.stage_id
        MICRO_STEPS.labels(stage=stage).inc()
        COMPUTE.labels(stage=stage).observe(result.compute_s)
        BATCH_ITEMS.labels(stage=stage).observe(result.items)
        BATCH_STREAMS.labels(stage=stage).observe(len(streams))
        if self.worker is not None and self.worker.is_first:
            QUEUE_WAIT.labels(stage=stage).observe(queue_wait_s)
        if result.times is not None:
            t.extra_s += result.times.extra
            EXTRA_COMPUTE.labels(stage=stage).observe(result.times.extra)
            for b, sec in result.times.blocks.items():
                t.block_s[b] = t.block_s.get(b, 0.0) + sec
                t.block_steps[b] = t.block_steps.get(b, 0) + 1
                BLOCK_COMPUTE.labels(stage=stage, block=str(b)).observe(sec)

    async def _switch_point(self, worker: StageWorker, step: SwitchStep) -> None:
        """This stage's last micro-step of the old epoch is done: ship the blocks it loses to their new owners,
        pass the marker on (docs/rebalance.md)."""
        sw = self._switch
        try:
            result = await asyncio.to_thread(worker.compute, step)
        except Exception:
            log.exception("stage %s: switch to epoch %d failed; abandoned (a hard epoch must follow)", self.stage_id,
                          step.epoch)
            worker.abort_switch()
            if sw is not None:
                sw.aborted = True
                sw.done.set()
            return
        for move in result.moves:
            sender = sw.senders.get(move.target) if sw is not None else None
            if sender is None:
                log.error("stage %s: no link to %s for its moved blocks", self.stage_id, move.target)
                continue
            try:
                n = await sender.send(move)
            except Exception as e:  # e.g. a tensor over the link's frame cap: the new owner counts the stream lost
                log.error("stage %s: move to %s not sent: %s", self.stage_id, move.target, e)
                continue
            if isinstance(move, ShardMove):
                MOVED_BYTES.labels(stage=self.stage_id, direction="out").inc(n)
        for message in result.link:  # the marker, on the old link
            await self._link_ready.wait()
            assert self.sender is not None
            await self.sender.send(message)
        if sw is not None and sw.next_sender is not None and sw.next_stage is not None:
            old, self.sender, self.next_stage = self.sender, sw.next_sender, sw.next_stage
            sw.next_sender = None
            if self._connect_task is not None:
                self._connect_task.cancel()
            self._connect_task = asyncio.create_task(self._follow_endpoint(self.next_stage), name="link-connect")
            if old is not None:
                self._tasks.append(asyncio.create_task(_close_when_acknowledged(old), name="link-close"))
        self.streams = set(worker.streams)
        self._wake.set()

    def _publish(self, chunk: LatentChunk) -> None:
        out = self._outputs.get(chunk.stream_id)
        if out is None:
            assert self.bus is not None
            window = CreditWindow(self.bus, Subjects.stream_x0(chunk.stream_id), self.settings.nats.credit_window_bytes)
            out = self._outputs[chunk.stream_id] = _Output(window)
            out.task = asyncio.create_task(self._drain_output(out), name=f"x0-{chunk.stream_id}")
        out.queue.append(chunk)
        while len(out.queue) > OUTPUT_QUEUE:
            out.queue.popleft()
            DROPPED.labels(stage=self.stage_id, reason="output_full").inc()
        out.ready.set()

    async def _drain_output(self, out: _Output) -> None:
        await out.window.start()
        while True:
            if not out.queue:
                out.ready.clear()
                await out.ready.wait()
                continue
            chunk = out.queue.popleft()
            try:
                await out.window.publish(chunk, timeout=max(0.05, chunk.deadline - time.time()))
                FINISHED.labels(stage=self.stage_id).inc()
            except CreditTimeout:
                DROPPED.labels(stage=self.stage_id, reason="no_credit").inc()
                log.warning("x0 %s/%d dropped: the consumer returned no credit in time", chunk.stream_id, chunk.seq)
                out.window.reset()
            except Exception as e:
                DROPPED.labels(stage=self.stage_id, reason="publish_error").inc()
                log.warning("x0 %s/%d not published: %s", chunk.stream_id, chunk.seq, e)

    # ------------------------------------------------------------------ telemetry
    def _sync_drop_metrics(self, worker: StageWorker) -> None:
        for reason, n in worker.dropped.items():
            delta = n - self._reported[reason]
            if delta > 0:
                DROPPED.labels(stage=self.stage_id, reason=reason).inc(delta)
                self._reported[reason] = n

    async def _stats(self) -> None:
        interval = self.cfg.stats_interval_s
        last = _Totals()
        while True:
            await asyncio.sleep(interval)
            worker, bm = self.worker, self.block_map
            if worker is None or bm is None or self.bus is None:
                continue
            self._sync_drop_metrics(worker)
            now = self._totals
            d = now.minus(last)
            last = now.snapshot()
            steps = max(d.micro_steps, 1)
            a, b = worker.model.block_range
            try:
                kv_bytes = worker.kv_bytes()
            except RuntimeError:  # a switch point is splitting the shards in the compute thread: next window
                continue
            free = _free_memory(worker.model.device)
            self._export_gauges(kv_bytes, free)
            stats = StageStats(
                stage_id=self.stage_id, epoch=worker.epoch, block_start=a, block_end=b, window_s=interval,
                # forwards that ran every owned block: 0 when the window holds no complete measurement (only empty
                # steps, or the blocks of a range this stage has just taken over), which consumers then ignore
                micro_steps=min((d.block_steps.get(i, 0) for i in range(a, b)), default=0),
                block_ms=[1000 * d.block_s.get(i, 0.0) / max(d.block_steps.get(i, 0), 1) for i in range(a, b)],
                extra_ms=1000 * d.extra_s / steps,
                queue_wait_ms=1000 * d.queue_wait_s / max(d.items, 1), link_send_ms=1000 * d.link_send_s / steps,
                link_recv_ms=1000 * d.link_recv_s / steps, batch_items=d.items / steps,
                kv_bytes=kv_bytes, free_memory_bytes=free,
            )
            try:
                await self.bus.publish(Subjects.stats(self.stage_id), stats)
            except Exception as e:
                log.warning("stage stats not sent: %s", e)

    def _export_gauges(self, kv_bytes: dict[str, int], free: int) -> None:
        for stream_id, n in kv_bytes.items():
            KV_BYTES.labels(stage=self.stage_id, stream=stream_id).set(n)
        for gone in self._kv_streams - set(kv_bytes):
            with contextlib.suppress(KeyError):
                KV_BYTES.remove(self.stage_id, gone)
        self._kv_streams = set(kv_bytes)
        FREE_MEMORY.labels(stage=self.stage_id).set(free)


def _free_memory(device: torch.device) -> int:
    """Free memory of the stage's device: the GPU's, or the host's available memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


async def _in_daemon_thread(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` in a daemon thread: loading weights can take minutes, and a SIGTERM must not wait for it (the
    default executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(error: BaseException | None, result: object) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        error: BaseException | None = None
        result = None
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting task
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
            loop.call_soon_threadsafe(settle, error, result)

    threading.Thread(target=target, name="dit-stage-load", daemon=True).start()
    return await done


async def _close_when_acknowledged(sender: LinkSender) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(sender.acknowledged(), 30.0)
    await asyncio.to_thread(sender.close)


def _to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: t.to(device, copy=True) for k, t in tensors.items()}


def _decode_blockmap(data: bytes) -> BlockMap:
    from proto import decode

    return decode(data, BlockMap)


def _consistent(msg: StageItems) -> bool:
    """One row per item and one grid for the micro-step (anything else is a broken peer)."""
    n = len(msg.items)
    if n == 0 or msg.hidden.dim() != 3 or msg.noisy.dim() != 5:
        return False
    return msg.hidden.shape[0] == n and msg.noisy.shape[0] == n and len({m.frames for m in msg.items}) == 1


if __name__ == "__main__":
    sys.exit(main(DitStageService))
