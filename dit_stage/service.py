"""The DiT stage service (``rheo dit-stage``): one contiguous block range of the DiT in the stream-batch ring.

What it subscribes to and publishes (docs/dit-ring.md, Files, names the modules beside it):

- its ring's block map (``rheo-blockmap``, key ``blockmap.<ring>``: one map per ring) is watched and fed to
  ``Membership`` (``membership.py``); its actions run here, in order, most of them through ``StageEpochs``
  (``epochs.py``: loads, switches, joins,
  ``prepared.<stage id>`` in the same bucket);
- its tensor-link listener is advertised in ``rheo-endpoints`` (key = stage id) and read by ``StageInputs``
  (``inputs.py``); ``NextLink`` (``links.py``) goes to the next stage in the map, the last stage's to the first;
- the first stage subscribes to its ring's latent chunks (credit window) and prompt updates carrying an embedding; every
  stage listens for stream events to free a stream's state when it ends;
- the last stage publishes finished x0 chunks through ``Outputs`` (``outputs.py``); every stage publishes
  ``StageStats`` and Prometheus metrics (``telemetry.py``).

The ring mechanism itself is ``dit_stage.worker.StageWorker`` (transport-free, unit-tested); ``ComputeLoop``
(``compute.py``) runs its forwards in a worker thread so the event loop keeps draining NATS and the link (a stage
that stopped reading its listener could deadlock the ring through backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

from nats.aio.subscription import Subscription

from dit_stage import membership as m
from dit_stage.compute import ComputeLoop
from dit_stage.epochs import StageEpochs
from dit_stage.inputs import Input, StageInputs
from dit_stage.links import NextLink, link_options
from dit_stage.lookups import StreamLookups
from dit_stage.membership import Action, Membership
from dit_stage.outputs import Outputs
from dit_stage.telemetry import StageTelemetry
from dit_stage.worker import StageWorker
from proto import (
    CHANNELS,
    BlockMap,
    Buckets,
    Error,
    LatentChunk,
    PromptUpdate,
    ProtocolError,
    StreamEvent,
    Subjects,
    blockmap_key,
    decode,
)
from proto.rings import resolve_ring
from services.bus import KV
from services.config import Settings
from services.link import LinkListener
from services.runtime import Background, Service, main, watch_key

__all__ = ["ANNOUNCE_LINK_WAIT_S", "REPREPARE_ASK_S", "UNPREPARED", "DitStageService"]

log = logging.getLogger("rheo.dit_stage")

ANNOUNCE_LINK_WAIT_S = 5.0
"""How long a stage waits for its link to the next stage before announcing an epoch anyway."""
REPREPARE_ASK_S = 2.0
"""A stream's chunks refused for this long make a re-prepare request (and one more every as long, while it lasts)."""
UNPREPARED = "unprepared"
"""``Error.code`` on a stream's error subject: the first stage cannot run the stream until a new segment."""


class DitStageService(Service):
    role = "dit-stage"

    def __init__(self, settings: Settings, member_id: str | None = None) -> None:
        super().__init__(settings, member_id or settings.dit_stage.stage_id)
        self.cfg = settings.dit_stage
        self.stage_id = self.cfg.stage_id
        self.ring_id = resolve_ring(self.cfg.ring_id, self.stage_id, settings.controller.stages)
        """This stage's ring (heartbeats say it; only that ring's map and latent chunks reach it)."""
        self.checks.update(weights=False, link=False)
        self.membership: Membership[Input] = Membership(self.stage_id)
        self.telemetry = StageTelemetry(self.stage_id)
        self._tasks = Background()
        self.epochs = StageEpochs(settings, self.stage_id, self.membership, self._feed, self._tasks, self.telemetry,
                                  self.checks, self._on_epoch, self._blockmap)
        self.listener: LinkListener | None = None
        self.link: NextLink | None = None
        self.outputs: Outputs | None = None
        self.inputs: StageInputs | None = None
        self.compute: ComputeLoop | None = None
        self.endpoint = ""
        self.endpoints: KV | None = None
        self._blockmap_kv: KV | None = None
        self._input_subs: list[Subscription] = []
        self._actions: asyncio.Queue[list[Action]] = asyncio.Queue()
        self._compute_task: asyncio.Task[None] | None = None
        self._closing = False
        self._refused: dict[str, tuple[float, float]] = {}  # stream → (first, last) refusal of the current run

    @property
    def worker(self) -> StageWorker | None:
        return self.epochs.worker

    @property
    def malformed_link(self) -> int:
        """Link frames dropped as unexpected here (a broken or confused peer)."""
        return self.inputs.malformed_link if self.inputs is not None else 0

    @property
    def block_map(self) -> BlockMap | None:
        """The map this stage runs."""
        return self.epochs.block_map

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        assert self.bus is not None
        options = link_options(self.cfg, self.settings.model.device)
        self.listener = options.listener(self.cfg.link_host, self.cfg.link_port).start()
        self.endpoint = f"{self.cfg.advertise_host}:{self.listener.port}"
        self.endpoints = await self.bus.kv(Buckets.ENDPOINTS, replicas=self.settings.nats.kv_replicas)
        await self.endpoints.put(self.stage_id, self.endpoint.encode())
        self.link = NextLink(self.stage_id, self.endpoints, options, self.telemetry,
                             self._link_state)
        self.outputs = Outputs(self.bus, self.settings.nats.credit_window_bytes, self.telemetry)
        lookups = StreamLookups(self.bus, self.settings)
        self.compute = compute = ComputeLoop(self.stage_id, self.epochs, self.membership, self._feed, self.link,
                                             self.outputs, self.telemetry, self.streams, self.watchdog)
        self.inputs = StageInputs(self.stage_id, self.epochs, self.membership, lookups, self.telemetry, self.streams,
                                  compute.wake, self._ask_reprepare)
        await self.bus.subscribe(CHANNELS["stream_event"].wildcard(), self._on_event, expected=StreamEvent,
                                 known=self.serves)
        self._tasks.spawn(watch_key(lambda: self._blockmap(reopen=True), blockmap_key(self.ring_id),
                                    self._on_block_map, what=f"stage {self.stage_id}: ring {self.ring_id}'s block map"),
                          "blockmap")
        self._tasks.spawn(self._execute(), "blockmap-apply")
        self._tasks.spawn(self.inputs.receive(self.listener), "link-recv")
        self._tasks.spawn(self._stats(), "stats")
        self._compute_task = self._tasks.spawn(self.compute.run(), "compute")
        log.info("dit stage %s: tensor link on %s", self.stage_id, self.endpoint)

    async def drain(self) -> None:
        """Finish the micro-step in flight, let the next stage read the queued link frames (1 s at most), then close."""
        self._closing = True
        if self.link is not None and self.compute is not None:
            self.link.closing = self.compute.closing = True
            self.compute.wake()
        if self._compute_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._compute_task, 3.0)
        if self.link is not None:
            await self.link.flush(1.0)
        if self.endpoints is not None:  # withdraw the endpoint: nobody should connect to a stopped stage
            with contextlib.suppress(Exception):
                entry = await self.endpoints.get(self.stage_id)
                if entry is not None and entry.value == self.endpoint.encode():
                    await asyncio.wait_for(self.endpoints.delete(self.stage_id), 1.0)
        await self._close()

    async def _close(self) -> None:
        await self._tasks.cancel()
        if self.outputs is not None:
            await self.outputs.close()
        if self.link is not None:
            await self.link.close()
        if self.listener is not None:
            self.listener.close()

    async def run(self) -> int:
        try:
            return await super().run()
        finally:
            if not self._closing:  # start failed or stop() came before drain: still free the sockets
                self._closing = True
                await self._close()

    # ------------------------------------------------------------------ block maps → membership → actions
    async def _blockmap(self, reopen: bool = False) -> KV:
        """The ``rheo-blockmap`` bucket: the map, and which epoch every stage has prepared."""
        assert self.bus is not None
        if reopen or self._blockmap_kv is None:
            self._blockmap_kv = await self.bus.kv(Buckets.BLOCKMAP, replicas=self.settings.nats.kv_replicas)
        return self._blockmap_kv

    async def _on_block_map(self, value: bytes, revision: int) -> None:
        try:
            bm = decode(value, BlockMap)
            bm.validate_cover()
            if bm.ring_id != self.ring_id:
                raise ValueError(f"a map of ring {bm.ring_id} under ring {self.ring_id}'s key")
        except (ProtocolError, ValueError) as e:
            self.telemetry.drop("bad_blockmap")
            log.warning("block map revision %d refused: %s", revision, e)
            return
        self._feed(self.membership.on_map(bm))

    def _feed(self, actions: list[Action]) -> None:
        if actions:
            self._actions.put_nowait(actions)

    async def _execute(self) -> None:
        """Run the membership's actions in the order it gave them; long ones (loads, preparing a switch, waiting
        for peers) run as tasks that report back to it."""
        while True:
            for action in await self._actions.get():
                try:
                    await self._do(action)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("stage %s: %s failed", self.stage_id, action)
            if self.compute is not None:
                self.compute.wake()

    async def _do(self, action: Action) -> None:
        epochs = self.epochs
        match action:
            case m.LoadBlocks():
                epochs.load(action)
            case m.HardSwitch():
                epochs.hard_switch(action)
            case m.Recover(epoch=epoch):
                # KV of some blocks is lost: no stream state of an older epoch can be trusted, here either; ingest
                # replays every stream (docs/recovery.md). Applied in the micro-step loop, between forwards.
                log.warning("stage %s: failure epoch %d: dropping all stream state of older epochs", self.stage_id,
                            epoch)
                assert self.compute is not None
                self.compute.recover_floor = epoch
            case m.AdmitInputs(epoch=epoch):
                assert self.inputs is not None
                await self.inputs.admit(epoch)
            case m.AnnouncePrepared(epoch=epoch):
                self._tasks.spawn(self._announce(epoch), "announce")
            case m.SubscribeInputs(first=first):
                await self._subscribe_inputs(first)
            case m.ConnectNext(stage_id=stage_id, epoch=epoch):
                assert self.link is not None
                self.link.follow(stage_id, epoch)
            case m.PrepareSwitch():
                assert self.endpoints is not None
                epochs.prepare(action, self.endpoints)
            case m.JoinRing():
                epochs.join(action)
            case m.AwaitPeers(block_map=bm):
                self._tasks.spawn(epochs.await_peers(bm), "switch-peers")
            case m.Go(epoch=epoch):
                epochs.go(epoch)
            case m.SwitchDone(block_map=bm):
                epochs.done(bm)
            case m.AbortSwitch(epoch=epoch):
                await epochs.abort(epoch)
            case m.Idle(block_map=bm):
                epochs.idle(bm)

    async def _announce(self, epoch: int) -> None:
        """Announce ``epoch`` once the link to the next stage is up: ingest replays a failure epoch when every
        stage has, and a replayed item must find a ring that carries it. Bounded: a next stage that never comes
        is the controller's to replace, and the waiters have their own timeouts."""
        assert self.link is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.ready.wait(), ANNOUNCE_LINK_WAIT_S)
        await self.epochs.announce_prepared(epoch)

    def _ask_reprepare(self, stream_id: str) -> None:
        """The first stage refused a chunk of a stream it has no prepared state for (joined mid-stream, its prepare
        chunk lost): every chunk is dropped until a prepare chunk comes. When that has gone on for
        ``REPREPARE_ASK_S`` (not a live chunk briefly ahead of a replay's prepare chunk), say so on the stream's
        error subject, ``Error(code="unprepared")``, again every ``REPREPARE_ASK_S`` while it lasts: ingest starts
        a new segment (docs/recovery.md)."""
        now = time.monotonic()
        first, last = self._refused.get(stream_id, (now, now))
        if now - last > REPREPARE_ASK_S:
            first = now  # a new run of refusals
        if len(self._refused) > 4096:  # bounded: stream ids come from outside
            self._refused = {k: v for k, v in self._refused.items() if now - v[1] <= REPREPARE_ASK_S}
        if now - first < REPREPARE_ASK_S or self.bus is None:
            self._refused[stream_id] = (first, now)
            return
        self._refused[stream_id] = (now, now)
        self.telemetry.reprepare_asked()
        log.warning("stage %s: stream %s has had no prepared state here for %.1f s; asking for a new segment",
                    self.stage_id, stream_id, now - first)
        self._tasks.spawn(self.bus.publish(Subjects.stream_error(stream_id), Error(
            code=UNPREPARED, message=f"first DiT stage {self.stage_id} has no prepared state for this stream: "
            "its chunks are dropped until a new segment's prepare chunk", stream_id=stream_id)), "reprepare")

    def _on_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    async def _subscribe_inputs(self, first: bool) -> None:
        """Only the first stage takes latent chunks (of its ring's streams: ingest publishes each stream's into the
        ring it is placed on) and prompts (a second consumer would return credit the first stage has not earned)."""
        assert self.bus is not None and self.inputs is not None
        if first and not self._input_subs:
            self._input_subs = [
                await self.bus.subscribe(Subjects.ring_latents(self.ring_id), self.inputs.on_latent,
                                         expected=LatentChunk, credit=True, known=self.serves),
                await self.bus.subscribe(CHANNELS["stream_prompt"].wildcard(), self.inputs.on_prompt,
                                         expected=PromptUpdate, known=self.serves),
            ]
        elif not first and self._input_subs:
            for sub in self._input_subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self._input_subs = []

    def _link_state(self, up: bool) -> None:
        self.checks["link"] = up
        if up and self.worker is not None:
            self.worker.forwarded.clear()  # a new peer has none of our prompt embeddings

    async def _on_event(self, event: StreamEvent, _raw: object) -> None:
        if event.kind == "ended" and self.compute is not None:
            self.compute.end_stream(event.stream_id)

    async def _advertise(self) -> None:
        """Keep this stage's endpoint in ``rheo-endpoints``: after a lost NATS store the bucket is empty again, and
        the previous stage would never find this one."""
        assert self.endpoints is not None
        if await self.endpoints.get(self.stage_id) is not None:
            return
        log.warning("stage %s: endpoint missing from %s; advertising it again", self.stage_id, Buckets.ENDPOINTS)
        await self.endpoints.put(self.stage_id, self.endpoint.encode())

    async def _stats(self) -> None:
        interval = self.cfg.stats_interval_s
        while True:
            await asyncio.sleep(interval)
            if not self._closing:
                try:
                    await self._advertise()
                except Exception as e:
                    log.warning("stage %s: endpoint not advertised: %s", self.stage_id, e)
            worker = self.worker
            if worker is None or self.block_map is None or self.bus is None:
                continue
            stats = self.telemetry.window(worker, interval)
            if stats is None:
                continue
            try:
                await self.bus.publish(Subjects.stats(self.stage_id), stats)
            except Exception as e:
                log.warning("stage stats not sent: %s", e)


if __name__ == "__main__":
    sys.exit(main(DitStageService))
