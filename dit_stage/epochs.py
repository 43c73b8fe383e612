"""The stage's worker across block-map epochs: what the membership's epoch actions do to it.

Loads a range's weights in a daemon thread, builds the worker (a hard switch or a join), registers an online switch with
it once the switch's links are open, says which epoch this stage has prepared (``prepared.<stage id>`` in
``rheo-blockmap``; the first stage waits for every stage's), completes or abandons the switch (docs/rebalance.md).
Loading and opening links run as tasks that report back to the membership through ``feed``; everything else is
immediate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dit_stage.links import SwitchLinks, link_options
from dit_stage.membership import Action, HardSwitch, JoinRing, LoadBlocks, Membership, PrepareSwitch
from dit_stage.model import CausalWanDiT
from dit_stage.stage_model import load_stage_model
from dit_stage.switching import EpochChange
from dit_stage.telemetry import StageTelemetry
from dit_stage.timed import make_stage_worker
from dit_stage.warm_up import warm_up_stage
from dit_stage.worker import StageWorker
from proto import BlockMap, stage_prepared_key
from proto.spec import latent_hw
from services.bus import KV
from services.config import Settings
from services.epochs import wait_prepared
from services.runtime import Background, in_daemon_thread

__all__ = ["StageEpochs"]

log = logging.getLogger("rheo.dit_stage")


class StageEpochs:
    """Which worker runs, under which block map, and the online switch in progress (if any)."""

    def __init__(self, settings: Settings, stage_id: str, membership: Membership[Any],
                 feed: Callable[[list[Action]], None], tasks: Background, telemetry: StageTelemetry,
                 checks: dict[str, bool], on_epoch: Callable[[int], None],
                 blockmap: Callable[[], Awaitable[KV]]) -> None:
        self.settings = settings
        self.cfg = settings.dit_stage
        self.stage_id = stage_id
        self.membership = membership
        self.feed = feed
        self.tasks = tasks
        self.telemetry = telemetry
        self.checks = checks  # the service's readiness: "weights" is ours
        self.on_epoch = on_epoch
        self.blockmap = blockmap  # the bucket where stages say which epoch they have prepared
        self.worker: StageWorker | None = None
        self.block_map: BlockMap | None = None  # the map this stage runs
        self.switch: SwitchLinks | None = None
        self._loaded: tuple[int, CausalWanDiT] | None = None  # weights a LoadBlocks fetched for its epoch
        self._warmed: StageWorker | None = None  # a worker over those weights that ran a warm-up stream
        self._long: asyncio.Task[None] | None = None  # the load or switch preparation in progress
        self._t0 = 0.0
        self._announced = 0
        self._announcing = asyncio.Lock()

    def load(self, action: LoadBlocks) -> None:
        if action.hard:
            self.checks["weights"] = False
        self._long = self.tasks.spawn(self._load(action), "load")

    async def _load(self, action: LoadBlocks) -> None:
        try:
            model = await in_daemon_thread(load_stage_model, self.settings, action.block_range, action.num_blocks)
            warmed = await in_daemon_thread(self._warm_up, model)
        except Exception:
            log.exception("stage %s: blocks %s of epoch %d not loaded", self.stage_id, action.block_range,
                          action.epoch)
            self.feed(self.membership.failed(action.epoch))
            return
        self._loaded, self._warmed = (action.epoch, model), warmed
        self.feed(self.membership.loaded(action.epoch))

    def _warm_up(self, model: CausalWanDiT) -> StageWorker | None:
        """A worker over ``model`` that ran a throwaway stream of the default stream size (``dit_stage/warm_up.py``:
        compiles and CUDA graphs before the first stream), when this stage holds every block and its forward has
        such one-off costs; else None. A failed warm-up only costs the first stream its wait."""
        worker = self._make_worker(model)
        if worker.forward.mode == "eager" or self.cfg.warm_up_chunks == 0:
            return None
        s, t0 = self.settings.stream, time.monotonic()
        try:
            ran = warm_up_stage(worker, latent_hw(s.height, s.width), s.steps, self.cfg.ring().clock(), s.noise_scale,
                                self.cfg.warm_up_chunks)
        except Exception:
            log.exception("stage %s: the warm-up stream failed; the first stream pays for compiles and captures",
                          self.stage_id)
            return None
        if ran:
            log.info("stage %s: warm-up stream in %.1f s (%d one-off forwards: compiles, captures)", self.stage_id,
                     time.monotonic() - t0, worker.forward.warmups)
        return worker if ran else None

    def _take_model(self, epoch: int) -> CausalWanDiT | None:
        loaded, self._loaded = self._loaded, None
        self._warmed = None
        return loaded[1] if loaded is not None and loaded[0] == epoch else None

    def _make_worker(self, model: CausalWanDiT) -> StageWorker:
        """The one place a stage's worker is built (a hard switch, or joining a running ring); the timed stand-in
        when ``dit_stage.timed_block_ms`` is set."""
        return make_stage_worker(
            self.cfg, model, passthrough=self.settings.model.passthrough, window=self.cfg.kv_window,
            sink=self.cfg.sink,
            adaptive_threshold=self.cfg.adaptive_threshold, max_batch_items=self.cfg.max_batch_items,
            batcher=self.cfg.batcher, max_queued_chunks=self.cfg.max_queued_chunks,
            move_frame_bytes=self.cfg.link_max_frame_bytes // 2,
        )

    def hard_switch(self, action: HardSwitch) -> None:
        bm, rng = action.block_map, action.block_range
        if self.worker is not None:
            self.worker.abort_switch()
        if action.reload:
            warmed = self._warmed
            model = self._take_model(bm.epoch)
            assert model is not None
            if self.worker is not None:  # docs/rebalance.md, Hard switches: the streams' state here is gone
                log.warning("stage %s: blocks %s → %s under epoch %d (%s: %s); per-stream state is dropped",
                            self.stage_id, self.worker.model.block_range, rng, bm.epoch, bm.reason, action.why)
            fresh = warmed if warmed is not None and warmed.model is model else self._make_worker(model)
            old, self.worker = self.worker, fresh
            if old is not None and old.model.block_range == rng:
                self.worker.latency = old.latency  # the same blocks: the fitted micro-step times still hold
            self.checks["weights"] = True
            log.info("stage %s: loaded blocks [%d, %d) of %d (epoch %d)", self.stage_id, *rng, bm.num_blocks,
                     bm.epoch)
        assert self.worker is not None
        self.worker.epoch = bm.epoch
        self._set_epoch(bm, "hard")

    def prepare(self, action: PrepareSwitch, endpoints: KV) -> None:
        """Epoch e → e+1 with every old owner alive: open the links the switch needs, then register it with the
        worker, which moves the KV at the switch point."""
        self.switch = SwitchLinks(action.block_map.epoch, link_options(self.cfg, self.settings.model.device))
        self._t0 = time.monotonic()
        self._long = self.tasks.spawn(self._prepare(action, self.switch, endpoints), "switch-prepare")

    async def _prepare(self, action: PrepareSwitch, sw: SwitchLinks, endpoints: KV) -> None:
        worker, epoch = self.worker, action.block_map.epoch
        assert worker is not None
        try:
            await sw.open(endpoints, action.send, action.relink_to, self.stage_id)
        except Exception:
            log.exception("stage %s: links for epoch %d not opened", self.stage_id, epoch)
            self.feed(self.membership.failed(epoch))
            return
        if sw.aborted:
            return
        model = self._take_model(epoch) or worker.model
        worker.prepare_switch(EpochChange(epoch, model, self.stage_id, action.send, action.receive,
                                          relink=sw.next_stage is not None))
        log.info("stage %s: prepared epoch %d: blocks %s → %s, sends %s, receives %s", self.stage_id, epoch,
                 worker.model.block_range, action.block_range, action.send, action.receive)
        self.feed(self.membership.switch_prepared(epoch))

    def join(self, action: JoinRing) -> None:
        """This stage is new to a running ring (reason ``join``): its blocks' KV arrives from the old owners at the
        switch point."""
        bm = action.block_map
        model = self._take_model(bm.epoch)
        assert model is not None
        worker = self._make_worker(model)
        worker.epoch = bm.epoch - 1
        worker.prepare_switch(EpochChange(bm.epoch, model, self.stage_id, joining=True))
        self.worker = worker
        self.checks["weights"] = True
        self._t0 = time.monotonic()
        log.info("stage %s: joins at epoch %d with blocks [%d, %d)", self.stage_id, bm.epoch, *action.block_range)

    def go(self, epoch: int) -> None:
        """First stage: every stage is prepared; switch at the next micro-step boundary."""
        change = self.worker.change if self.worker is not None else None
        if change is not None and change.epoch == epoch:
            change.go = True

    def done(self, bm: BlockMap) -> None:
        """The online switch is complete here: its links close once the new owners have read the moves."""
        self._set_epoch(bm, "online")
        log.info("stage %s: epoch %d online after %.2f s", self.stage_id, bm.epoch, time.monotonic() - self._t0)
        sw, self.switch = self.switch, None
        if sw is not None:
            self.tasks.spawn(sw.close(self.telemetry), "switch-close")

    async def abort(self, epoch: int) -> None:
        """Abandon a pending switch: what it was loading or opening finishes first (no two loads at once)."""
        log.warning("stage %s: the switch to epoch %d is abandoned", self.stage_id, epoch)
        sw = self.switch
        if sw is not None:
            sw.aborted = True
        if self._long is not None:
            await asyncio.gather(self._long, return_exceptions=True)
        self._loaded = self._warmed = None
        if self.worker is not None:
            self.worker.abort_switch()
        if sw is not None and self.switch is sw:
            self.switch = None
            await sw.close(self.telemetry)

    async def announce_prepared(self, epoch: int) -> None:
        """Record that this stage can run ``epoch`` (its blocks loaded, its inputs and link up): the first stage
        waits for every stage before an online switch, ingest before it replays a failure epoch
        (``services.epochs``). Never goes back: announcements may finish out of order."""
        async with self._announcing:
            if epoch <= self._announced:
                return
            try:
                kv = await self.blockmap()
                await kv.put(stage_prepared_key(self.stage_id), str(epoch).encode())
                self._announced = epoch
            except Exception as e:  # the waiters time out; correctness does not depend on it
                log.warning("stage %s: could not announce epoch %d as prepared: %s", self.stage_id, epoch, e)

    async def await_peers(self, bm: BlockMap) -> None:
        """First stage: wait until every stage of ``bm`` has announced it can run it (or the switch is abandoned)."""
        await wait_prepared(await self.blockmap(), bm, still=lambda: self.membership.switching == bm.epoch)
        self.feed(self.membership.peers_prepared(bm.epoch))

    def idle(self, bm: BlockMap) -> None:
        log.warning("stage %s is not in block map epoch %d; idle", self.stage_id, bm.epoch)
        self.block_map, self.worker = bm, None
        self.checks["weights"] = False

    def _set_epoch(self, bm: BlockMap, kind: str) -> None:
        self.block_map = bm
        self.on_epoch(bm.epoch)
        self.telemetry.switched(kind, bm.epoch)
