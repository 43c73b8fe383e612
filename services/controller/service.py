"""The controller service: block maps under epochs, failure and join, online rebalancing, admission, one leader.

Subscribes (every instance, so a standby is warm): ``rheo.ctl.heartbeat.*`` (membership), ``rheo.ctl.stats.*``
(the cost model), stream events and errors (admitted streams ending). The leader alone also answers
``rheo.ctl.admission`` and writes one block map per ring (``RingState``, services/controller/rings.py):
``rheo-blockmap`` KV key ``blockmap.<ring>`` (revision-checked, so a deposed leader cannot overwrite its successor's
map), also published on ``rheo.ctl.blockmap``. Rings come from ``controller.rings`` and from stage heartbeats.

Epochs (docs/controller.md), each ring its own: ``initial`` (first start or a configuration change), ``failure``
(a stage in the map went silent for ``heartbeat_dead_s``, withdrew its endpoint, or restarted: silent only for
``heartbeat_miss_s``, it is merely suspected), ``join`` (a configured stage of the ring outside its map heartbeats
again), ``rebalance`` (the policy found a split with a sustained predicted gain). State lives in KV
(``rheo-controller``: the leader lock, ``state``, ``admission.<stream>``), so a restarted or new leader resumes
the same epoch without disturbing running stages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Gauge

from proto import (
    CHANNELS,
    Ack,
    Assignment,
    BlockMap,
    Buckets,
    Error,
    Heartbeat,
    StageAssignment,
    StageStats,
    StreamEvent,
    StreamSpec,
    Subjects,
    ring_stage_ids,
)
from proto.messages import BlockMapReason
from proto.subjects import BLOCKMAP_KEYS
from services.bus import KV
from services.controller.admission_queue import AdmissionQueue
from services.controller.assigner import Assigner, MemberView
from services.controller.costmodel import CostModel
from services.controller.leader import KubernetesLease, KVLeaderLock, LeaderLock, in_cluster
from services.controller.partition import PartitionProblem, Split, best_split, block_weight_bytes, evaluate, even_split
from services.controller.placement import Move, Pool
from services.controller.policy import (
    ADMISSION_QUEUE_KEY,
    PathCosts,
    RebalancePolicy,
    StreamNeed,
    admission_key,
    batch_reached,
    decide_admission,
    ring_item_ms,
    stream_need,
)
from services.controller.rings import RingState
from services.controller.scaling import Autoscaler, Demand, ring_work
from services.rebalance import offline_reason
from services.runtime import Service, main, watch_keys
from services.streams import StreamTable
from wan.config import WanDiTConfig

log = logging.getLogger("rheo.controller")

MEMBERS = Gauge("rheo_controller_members", "members heard from within the miss budget", ["role"])
EPOCH = Gauge("rheo_controller_epoch", "block-map epoch the leader published or resumed, per ring", ["ring"])
LEADER = Gauge("rheo_controller_leader", "1 while this controller holds the leader lock")
EPOCHS = Counter("rheo_controller_epochs_total", "block-map epochs published", ["reason"])
SUSPECTED = Gauge("rheo_controller_suspected_stages", "stages of the map silent past heartbeat_miss_s, not yet dead")
SUSPICIONS = Counter("rheo_controller_suspicions_total", "stages suspected, by how the suspicion ended (cleared: it "
                     "beat again; failed: declared dead)", ["outcome"])
GONE = Counter("rheo_controller_stages_gone_total", "stages failed at once, without waiting for heartbeat_dead_s "
               "(withdrawn: drained; restarted: a new process, its KV is gone)", ["how"])
HEARTBEATS_REFUSED = Counter("rheo_controller_heartbeats_refused_total", "heartbeats whose body claims another "
                             "role than the subject the bus let its sender publish")
DECISIONS = Counter("rheo_controller_decisions_total", "rebalance and admission decisions", ["kind", "result"])
QUEUE = Counter("rheo_controller_admission_queue_total", "admission queue outcomes of an ask or a tick (queued: "
                "waiting; admit: admitted; refuse: refused, at once or after the longest wait; abandoned: its "
                "publisher left)", ["outcome"])
STORE_CHECK_S = 2.0
"""How often the leader checks that the block map is still stored (a lost NATS store empties the bucket)."""
STATE_KEY = "state"


class LostLeadership(RuntimeError):
    """Another controller holds the lock or wrote the block map: stop acting."""


@dataclass
class Member:
    member_id: str
    role: str
    ready: bool
    last_seen: float
    alive_since: float
    """Start of the current run of heartbeats (reset after a silence longer than the miss budget)."""
    first_seen: float
    """Its first heartbeat to this controller (never reset): a later endpoint write is a restart."""
    work: dict[str, float] = field(default_factory=dict)
    """Its measured model-work costs, unit → ms per megapixel-frame (admission's encode/decode bottlenecks)."""
    ring_id: str = ""
    address: str = ""

    def view(self) -> MemberView:
        return MemberView(self.member_id, self.role, self.ring_id, self.address, self.work.get("vae_decode"))


class ControllerService(Service):
    role = "controller"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cfg = self.settings.controller
        self.ring = self.settings.dit_stage.ring()
        """The KV window, sinks and RoPE refresh every map this controller writes carries (ingest clocks chunks by
        it): the same for every ring."""
        self.members: dict[str, Member] = {}
        self._refused_logged_at = -1e9
        self.leader = False
        self.default_ring = self.settings.dit_stage.ring_id if self.settings.dit_stage.ring_id.isdigit() else "0"
        """The ring the single-ring accessors (``block_map``, ``cost``, ``item_ms``…) read."""
        self.rings: dict[str, RingState] = {}
        """Every ring known: configured (``controller.rings``) or heard from (a stage's heartbeat)."""
        for r in range(self.cfg.rings):
            self._ring(str(r))
        self._ring(self.default_ring)
        self.admitted: dict[str, StreamNeed] = {}
        """Admitted streams → what they need of each bottleneck per second."""
        self.assigner = Assigner(self.cfg.admission_headroom)
        """Where each admitted stream runs (docs/scheduling.md, Placement)."""
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=512)
        self.lock: LeaderLock | None = None
        self._kv: KV | None = None
        self._state_kv: KV | None = None
        self._lead_started = 0.0
        self._admission_sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._gone: dict[str, str] = {}
        self._withdrawn: set[str] = set()
        """Stages whose endpoint is deleted (drained): they join again only as a new process (a new endpoint)."""
        """Stages positively gone since the last epoch: ``withdrawn`` (endpoint deleted: drained) or ``restarted``
        (endpoint written again: a new process, without the KV its blocks held)."""
        self._endpoint_revs: dict[str, int] = {}
        self._endpoint_watch: asyncio.Task[None] | None = None
        self.autoscaler: Autoscaler | None = None
        self.queue = AdmissionQueue(self.cfg.admission_queue_max_wait_s, self.cfg.admission_queue_max_streams) \
            if self.cfg.admission_queue else None
        self._queue_published: dict[str, str] | None = None
        if self.cfg.autoscale.mode != "disabled":
            self.autoscaler = Autoscaler.from_settings(self.cfg)

    def num_blocks(self) -> int:
        return self.cfg.num_blocks or WanDiTConfig.named(self.settings.model.preset).num_layers

    def stage_ids(self, ring_id: str | None = None) -> list[str]:
        """The configured stages of a ring (default: ``default_ring``), in ring order (proto/rings.py)."""
        return ring_stage_ids(ring_id or self.default_ring, self.cfg.stages)

    def _ring(self, ring_id: str) -> RingState:
        """The ring's state, made on first mention (a ring id that names no stages by the rule is not a ring)."""
        ring = self.rings.get(ring_id)
        if ring is None:
            policy = RebalancePolicy(self.cfg.rebalance_gain_threshold, self.cfg.rebalance_sustain_s,
                                     self.cfg.rebalance_cooldown_s)
            ring = self.rings[ring_id] = RingState.new(ring_id, self.cfg.stages, self.num_blocks(), policy)
        return ring

    def ring_of(self, stage_id: str) -> RingState | None:
        return next((r for r in self.rings.values() if r.holds(stage_id)), None)

    # the default ring's state, under the names a single-ring controller had (tests, bench/rebalance.py)
    @property
    def block_map(self) -> BlockMap | None:
        return self.rings[self.default_ring].block_map

    @block_map.setter
    def block_map(self, bm: BlockMap | None) -> None:
        self.rings[self.default_ring].block_map = bm

    @property
    def cost(self) -> CostModel:
        return self.rings[self.default_ring].cost

    @property
    def policy(self) -> RebalancePolicy:
        return self.rings[self.default_ring].policy

    @property
    def suspected(self) -> dict[str, float]:
        return self.rings[self.default_ring].suspected

    @property
    def item_ms(self) -> float | None:
        """The slowest ring's ms per item (admission's DiT capacity per ring; None: a ring not measured yet)."""
        measured = [r.item_ms for r in self._serving_rings()]
        return None if not measured or None in measured else max(m for m in measured if m is not None)

    @property
    def bottleneck(self) -> str:
        rings = [r for r in self._serving_rings() if r.item_ms is not None]
        return max(rings, key=lambda r: r.item_ms or 0.0).bottleneck if rings else ""

    def _serving_rings(self) -> list[RingState]:
        """Rings with a map and a live stage (the ones streams can be placed on)."""
        live = {m.ring_id for m in self.live_members("dit-stage")}
        rings = [r for r in self.rings.values() if r.block_map is not None and r.ring_id in live]
        return rings or [self.rings[self.default_ring]]

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        assert self.bus is not None
        replicas = self.settings.nats.kv_replicas
        self._kv = await self.bus.kv(Buckets.BLOCKMAP, history=8, replicas=replicas)
        self._state_kv = await self.bus.kv(Buckets.CONTROLLER, replicas=replicas)
        self.assigner.table = await StreamTable.open(self.bus)
        if in_cluster() and KubernetesLease.TOKEN_FILE.is_file():
            self.lock = KubernetesLease(self.cfg.lease_name, self.member_id, self.cfg.lease_ttl_s)
        else:
            if in_cluster():
                log.warning("in a cluster without a service-account token: leader election uses the KV lock")
            self.lock = KVLeaderLock(self._state_kv, self.member_id, self.cfg.lease_ttl_s)
        with contextlib.suppress(Exception):  # a standby's view of the maps, for its cost models
            for key in await self._kv.keys():
                if key.startswith(BLOCKMAP_KEYS[:-1]) and (bm := await self._kv.get_message(key, BlockMap)):
                    await self._on_block_map(bm, None)
        await self.bus.subscribe(Subjects.blockmap(), self._on_block_map, expected=BlockMap)
        # each its own subscription, each known member or admitted stream its own lane (services/dispatch.py): a
        # flood on any of them cannot starve heartbeats of known members, and the lock renewal (_lead) is a task
        # of its own that every lane yields to after each message
        await self.bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), self._on_heartbeat, expected=Heartbeat,
                                 known=self._is_member)
        await self.bus.subscribe(CHANNELS["ctl_stats"].wildcard(), self._on_stats, expected=StageStats,
                                 known=self._is_member)
        await self.bus.subscribe(CHANNELS["stream_event"].wildcard(), self._on_event, expected=StreamEvent,
                                 known=self._is_admitted)
        await self.bus.subscribe(CHANNELS["stream_error"].wildcard(), self._on_stream_error, expected=Error,
                                 known=self._is_admitted)
        endpoints = await self.bus.kv(Buckets.ENDPOINTS, replicas=replicas)

        async def endpoints_kv() -> KV:
            return endpoints

        self._endpoint_watch = asyncio.create_task(
            watch_keys(endpoints_kv, ">", self._on_endpoint, what="controller: stage endpoints"), name="endpoints")
        self._task = asyncio.create_task(self._leadership(), name="leadership")

    async def drain(self) -> None:
        """Stop leading and free the lock at once, so a standby takes over without waiting for it to expire."""
        for task in (self._task, self._endpoint_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.lock is not None:
            await self.lock.release()  # a no-op unless this controller holds it
        self._set_leader(False)

    def _set_leader(self, leading: bool) -> None:
        self.leader = leading
        LEADER.set(1 if leading else 0)

    async def _leadership(self) -> None:
        assert self.lock is not None
        while True:
            try:
                if not await self.lock.try_acquire():
                    await asyncio.sleep(min(0.5, self.lock.ttl_s / 4))
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store is unreachable: try again
                log.warning("controller lock: %s", e)
                await asyncio.sleep(0.5)
                continue
            log.info("%s leads", self.member_id)
            try:
                await self._lead()
            except LostLeadership as e:
                log.error("%s: %s", self.member_id, e)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("controller failed while leading; standing down")
            finally:
                self._set_leader(False)
                if self._admission_sub is not None:
                    with contextlib.suppress(Exception):
                        await self._admission_sub.unsubscribe()
                    self._admission_sub = None
            await asyncio.sleep(min(0.5, self.lock.ttl_s / 4))

    async def _lead(self) -> None:
        assert self.bus is not None and self.lock is not None
        await self._load_state()
        for ring in list(self.rings.values()):
            await self._ensure_block_map(ring)
        self._admission_sub = await self.bus.subscribe(Subjects.admission(), self._on_admission,
                                                       expected=StreamSpec)
        await self.bus.nc.flush()
        self._gone.clear()
        self._set_leader(True)  # only now: the map is resumed or written and admission is answered
        self._lead_started = time.monotonic()
        renewed = time.monotonic()
        tick = min(0.2, self.cfg.heartbeat_miss_s / 5)
        while True:
            now = time.monotonic()
            if now - renewed >= self.lock.ttl_s / 3:
                if not await self.lock.renew():
                    raise LostLeadership("the controller lock could not be renewed")
                renewed = now
            await self._tick(now)
            await asyncio.sleep(tick)

    # ------------------------------------------------------------------ state in KV
    async def _load_state(self) -> None:
        assert self._state_kv is not None
        entry = await self._state_kv.get(STATE_KEY)
        if entry is None or not entry.value:
            return
        try:
            state = json.loads(entry.value)
            self.admitted = {str(k): _need(v) for k, v in state.get("admitted", {}).items()}
            capacity = state.get("rings") or {self.default_ring: {"item_ms": state.get("item_ms"),
                                                                  "bottleneck": state.get("bottleneck", "")}}
            for rid, c in capacity.items():
                if ring_stage_ids(str(rid), self.cfg.stages):
                    ring = self._ring(str(rid))
                    ring.item_ms, ring.bottleneck = c.get("item_ms"), c.get("bottleneck", "")
            self.assigner.load(state.get("assignments"))
            ago = time.time() - float(state.get("last_change_at", 0.0))
            if ago < self.cfg.rebalance_cooldown_s:
                for ring in self.rings.values():
                    ring.policy.note_change(time.monotonic() - max(ago, 0.0))
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("ignored unreadable controller state: %s", e)

    async def _save_state(self, changed_at: float | None = None) -> None:
        assert self._state_kv is not None
        prev = await self._state_kv.get(STATE_KEY)
        last = 0.0
        if prev is not None and prev.value:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                last = float(json.loads(prev.value).get("last_change_at", 0.0))
        admitted = {k: dataclasses.asdict(v) for k, v in self.admitted.items()}
        state = {"admitted": admitted,
                 "rings": {r.ring_id: {"item_ms": r.item_ms, "bottleneck": r.bottleneck} for r in self.rings.values()},
                 "assignments": self.assigner.dump(),
                 "last_change_at": changed_at if changed_at is not None else last,
                 "last_decision": self.decisions[-1] if self.decisions else None}
        await self._state_kv.put(STATE_KEY, json.dumps(state).encode())

    async def _ensure_block_map(self, ring: RingState) -> BlockMap:
        """Keep the ring's stored map when it still fits the configuration (a restart, a new leader); else a new
        epoch. Either way it is published (a stage or ingest that missed the KV write hears it)."""
        assert self._kv is not None and self.bus is not None
        entry = await self._kv.get(ring.key)
        current = None
        if entry is not None and entry.value:
            current = await self._kv.get_message(ring.key, BlockMap)
            ring.revision = entry.revision
        else:
            ring.revision = None
            known = ring.block_map or ring.seen_map
            if known is not None:  # a lost NATS store: the map in force goes back, same epoch
                log.warning("ring %s: the block map is gone from %s (NATS store lost?): writing epoch %d again",
                            ring.ring_id, Buckets.BLOCKMAP, known.epoch)
                ring.revision = await self._kv.create(ring.key, known)
                current = known
        ids = ring.stage_ids
        stored = [s.stage_id for s in current.stages] if current else []
        if current is not None and current.num_blocks == self.num_blocks() and current.ring == self.ring and \
                current.ring_id == ring.ring_id and stored and all(s in ids for s in stored) and \
                stored == sorted(stored, key=ids.index):
            log.info("ring %s: resuming block map epoch %d (%s)", ring.ring_id, current.epoch, _ranges(current))
            ring.block_map = current
        else:
            new = BlockMap(epoch=(current.epoch + 1) if current else 1, num_blocks=self.num_blocks(),
                           stages=even_split(self.num_blocks(), ids), created_at=time.time(), reason="initial",
                           ring=self.ring, ring_id=ring.ring_id)
            await self._write_map(ring, new)
            ring.block_map = new
        self._note_epoch(ring)
        await self.bus.publish(Subjects.blockmap(), ring.block_map)
        return ring.block_map

    def _note_epoch(self, ring: RingState) -> None:
        assert ring.block_map is not None
        EPOCH.labels(ring=ring.ring_id).set(ring.block_map.epoch)
        self.epoch = max((r.block_map.epoch for r in self.rings.values() if r.block_map is not None), default=0)

    async def _write_map(self, ring: RingState, new: BlockMap) -> None:
        assert self._kv is not None
        new.validate_cover()
        try:
            if ring.revision is None:
                ring.revision = await self._kv.create(ring.key, new)
            else:
                ring.revision = await self._kv.update(ring.key, new, last=ring.revision)
        except nats.js.errors.KeyWrongLastSequenceError as e:
            raise LostLeadership(f"ring {ring.ring_id}'s block map changed under this controller (epoch "
                                 f"{new.epoch} not written)") from e
        EPOCHS.labels(reason=new.reason).inc()
        log.info("ring %s: block map epoch %d (%s): %s", ring.ring_id, new.epoch, new.reason, _ranges(new))

    async def _publish_map(self, ring: RingState, stages: list[StageAssignment], reason: BlockMapReason) -> None:
        assert self.bus is not None and ring.block_map is not None
        new = BlockMap(epoch=ring.block_map.epoch + 1, num_blocks=ring.block_map.num_blocks, stages=stages,
                       created_at=time.time(), reason=reason, ring=self.ring, ring_id=ring.ring_id)
        await self._write_map(ring, new)
        ring.block_map = new
        self._note_epoch(ring)
        ring.policy.note_change(time.monotonic())
        await self.bus.publish(Subjects.blockmap(), new)
        await self._save_state(changed_at=time.time())

    # ------------------------------------------------------------------ inputs
    def _is_member(self, key: str) -> bool:
        """A heartbeat's lane key is ``<role>.<member id>``, a stats message's the stage id."""
        return key.rsplit(".", 1)[-1] in self.members

    def _is_admitted(self, stream_id: str) -> bool:
        return stream_id in self.admitted

    async def _on_heartbeat(self, hb: Heartbeat, raw: Msg) -> None:
        if CHANNELS["ctl_heartbeat"].param(raw.subject, "role") != hb.role:  # only its own role may send there
            HEARTBEATS_REFUSED.inc()
            if time.monotonic() - self._refused_logged_at > 10.0:  # counted always, logged at most every 10 s
                self._refused_logged_at = time.monotonic()
                log.warning("refused a heartbeat of %s claiming role %s on %s", hb.member_id, hb.role, raw.subject)
            return
        now = time.monotonic()
        budget = self.cfg.heartbeat_miss_s
        old = self.members.get(hb.member_id)
        alive_since = old.alive_since if old is not None and now - old.last_seen <= budget else now
        ring_id = hb.ring_id
        if hb.role == "dit-stage":  # its ring: as it says (a stage of the old format says none: by its id)
            known = self.ring_of(hb.member_id)
            ring_id = ring_id or (known.ring_id if known is not None else self.default_ring)
            if ring_id not in self.rings and ring_stage_ids(ring_id, self.cfg.stages):
                log.info("ring %s discovered (stage %s heartbeats it)", ring_id, hb.member_id)
                self._ring(ring_id)  # the leader writes its map on its next tick
        self.members[hb.member_id] = Member(hb.member_id, hb.role, hb.ready, now, alive_since,
                                            old.first_seen if old is not None else now,
                                            {w.unit: w.ms_per_mpx for w in hb.work}, ring_id, hb.address)
        for role in {m.role for m in self.members.values()}:
            MEMBERS.labels(role=role).set(sum(1 for m in self.members.values()
                                              if m.role == role and now - m.last_seen <= budget))

    async def _on_endpoint(self, stage_id: str, value: bytes | None, revision: int) -> None:
        """A stage's tensor-link endpoint: deleted when it drains, written when a process starts. A change after
        the first one seen means that stage is positively gone (or is a new process): no need to wait for its
        heartbeats to run out. The watch's replays after a reconnect carry known revisions and change nothing."""
        prev = self._endpoint_revs.get(stage_id)
        self._endpoint_revs[stage_id] = revision
        if value is None and prev is not None and revision > prev:
            self._withdrawn.add(stage_id)  # seen draining: it does not rejoin on its last heartbeats
        elif value is not None:
            self._withdrawn.discard(stage_id)
        if prev is None or revision <= prev or not self.leader:
            return  # a standby that takes over judges by heartbeats
        member = self.members.get(stage_id)
        if member is None or time.monotonic() - member.first_seen < 5 * self.settings.lifecycle.heartbeat_interval_s:
            return  # not heard from before this write: a first start (an old entry overwritten), not a restart
        # (first_seen, not alive_since: the new process's first heartbeat may be handled before this watch event
        # and start a new run of heartbeats; the restart was then missed and the ring ran on a stage without state)
        how = "withdrawn" if value is None else "restarted"
        self._gone[stage_id] = how
        log.warning("stage %s %s its tensor-link endpoint", stage_id, "withdrew" if value is None else
                    "rewrote (a new process)")

    def live_members(self, role: str | None = None, budget: float | None = None) -> list[Member]:
        budget = self.cfg.heartbeat_miss_s if budget is None else budget
        now = time.monotonic()
        return [m for m in self.members.values()
                if now - m.last_seen <= budget and (role is None or m.role == role)]

    async def _on_block_map(self, bm: BlockMap, _raw: object) -> None:
        if not ring_stage_ids(bm.ring_id, self.cfg.stages):
            return
        ring = self._ring(bm.ring_id)
        if ring.seen_map is None or bm.epoch >= ring.seen_map.epoch:
            ring.seen_map = bm

    async def _on_stats(self, stats: StageStats, _raw: object) -> None:
        ring = self.ring_of(stats.stage_id)
        bm = ring.current(self.leader) if ring is not None else None
        if ring is None or bm is None:
            return
        i = bm.position(stats.stage_id)
        if i < 0:
            return
        ring.cost.observe(stats, bm.epoch, time.monotonic(), first=i == 0, last=i == len(bm.stages) - 1)
        if self.autoscaler is not None and i == 0:  # items are counted once, where the batcher drops them
            self.autoscaler.note_stats(stats)

    async def _on_event(self, event: StreamEvent, _raw: object) -> None:
        if event.kind == "ended":
            await self._release(event.stream_id)

    async def _on_stream_error(self, err: Error, _raw: object) -> None:
        if err.code == "stream_deleted" and err.stream_id:
            await self._release(err.stream_id)

    async def _release(self, stream_id: str) -> None:
        if self.queue is not None:
            self.queue.remove(stream_id)
        placed = self.assigner.release(stream_id)
        if (self.admitted.pop(stream_id, None) is not None or placed) and self.leader:
            await self._save_state()

    # ------------------------------------------------------------------ the leader's loop
    async def _tick(self, now: float) -> None:
        for ring in list(self.rings.values()):
            if ring.block_map is None:  # a ring discovered since: its first map
                await self._ensure_block_map(ring)
            await self._keep_map_stored(ring, now)
            await self._membership(ring, now)
            ring.refresh_capacity()
            if self.cfg.mode == "adaptive":
                await self._rebalance(ring, now)
        await self._move_streams(now)
        if self.queue is not None:
            await self._expire_queue(now)
        if self.autoscaler is not None:
            pooled = self.ring_price(self.admitted.values())
            await self.autoscaler.tick(now, list(self.admitted.values()),
                                       Demand(pooled, self.path_costs(), self.cfg.admission_prior_streams,
                                              ring_work(self._placed_rings(pooled))),
                                       self._drain)

    async def _keep_map_stored(self, ring: RingState, now: float) -> None:
        """After a lost NATS store the bucket is empty again: write the map in force back, same epoch (to the stages
        it is the map they run), so whoever watches it or starts now finds it."""
        if now - ring.store_checked < STORE_CHECK_S:
            return
        ring.store_checked = now
        assert self._kv is not None and ring.block_map is not None
        entry = await self._kv.get(ring.key)
        if entry is None or not entry.value:
            log.warning("ring %s: the block map is gone from %s (NATS store lost?): writing epoch %d again",
                        ring.ring_id, Buckets.BLOCKMAP, ring.block_map.epoch)
            ring.revision = await self._kv.create(ring.key, ring.block_map)

    async def _membership(self, ring: RingState, now: float) -> None:
        """Failure and join epochs of one ring (always applied: they keep the ring whole)."""
        assert ring.block_map is not None
        ids = ring.stage_ids
        in_map = [s.stage_id for s in ring.block_map.stages]
        budget = self.cfg.heartbeat_miss_s
        dead = max(self.cfg.heartbeat_dead_s, budget)
        assert self.bus is not None
        since = self.bus.since_reconnect
        if since is not None and since < dead + self.settings.nats.reconnect_wait_max_s:
            return  # NATS was away: the silence was ours, and the stages may still be reconnecting
        for sid in [sid for sid in self._gone if sid not in in_map]:
            del self._gone[sid]  # outside the map: it joins by heartbeats, like any newcomer
        for sid in [sid for sid in ring.suspected if sid not in in_map]:
            del ring.suspected[sid]
        failed = []
        for sid in in_map:
            m = self.members.get(sid)
            if self._gone.get(sid) == "withdrawn":
                failed.append(sid)
            elif m is None:
                if now - self._lead_started > self.cfg.startup_grace_s:
                    failed.append(sid)
            elif now - m.last_seen > dead:
                failed.append(sid)
            else:
                self._suspect(ring, sid, now - m.last_seen > budget, now)
        for sid in failed:
            self._suspect(ring, sid, False, now, failed=True)
        restarted = [sid for sid in in_map if sid not in failed and self._gone.get(sid) == "restarted"]
        joined = [sid for sid in ids if sid not in in_map and (m := self.members.get(sid)) is not None
                  and now - m.last_seen <= budget and now - m.alive_since >= self.cfg.rejoin_settle_s
                  and sid not in self._withdrawn]
        if not failed and not joined and not restarted:
            return
        members = [sid for sid in ids if (sid in in_map and sid not in failed) or sid in joined]
        if not members:
            return  # nobody to give the blocks to: keep the map, its stages may come back
        if len(members) > ring.block_map.num_blocks:
            return
        for sid in (*failed, *restarted):
            if sid in self._gone:
                GONE.labels(how=self._gone.pop(sid)).inc()
        # a restarted stage keeps its place, but the KV it held is gone: a failure epoch rebuilds it by replay
        reason: BlockMapReason = "failure" if failed or restarted else "join"
        stages = self._split(ring, members)
        if reason == "join":
            probe = BlockMap(epoch=ring.block_map.epoch + 1, num_blocks=ring.block_map.num_blocks, stages=stages,
                             reason="join", ring=self.ring, ring_id=ring.ring_id)
            why = offline_reason(ring.block_map, probe)
            if why:  # e.g. the first stage comes back: no KV can move, so streams are rebuilt by replay
                log.warning("stages %s rejoin but KV cannot move online (%s): announced as a failure epoch", joined,
                            why)
                reason = "failure"
        self._record({"kind": reason, "ring": ring.ring_id, "failed": failed, "restarted": restarted, "joined": joined,
                      "map": _pairs(stages), "applied": True})
        log.warning("ring %s: stages %s: %s; new epoch over %s", ring.ring_id, reason, failed or restarted or joined,
                    members)
        await self._publish_map(ring, stages, reason)

    def placement_pool(self, budget: float | None = None, newcomer: StreamNeed | None = None) -> Pool:
        """The members a stream may be placed on: heard within ``budget`` (default: the miss budget); each ring
        priced (``ring_price``) at the streams placed on it, and ``newcomer`` (a stream asking for admission)."""
        return self.assigner.pool((m.view() for m in self.live_members(budget=budget) if m.ready),
                                  {r.ring_id: self.ring_price(self._ring_needs(r.ring_id, newcomer), r)
                                   for r in self.rings.values() if r.block_map is not None})

    def _placed_rings(self, pooled: float | None) -> list[tuple[list[StreamNeed], float | None]]:
        """Each serving ring's streams with its price at them; the streams on no serving ring at ``pooled``."""
        serving = self._serving_rings()
        on = {r.ring_id for r in serving}
        rest = [n for sid, n in self.admitted.items()
                if sid not in self.assigner.assignments or self.assigner.assignments[sid].ring_id not in on]
        placed = [(needs, self.ring_price(needs, r)) for r in serving for needs in [self._ring_needs(r.ring_id)]]
        return [*placed, (rest, pooled)]

    def _ring_needs(self, ring_id: str, newcomer: StreamNeed | None = None) -> list[StreamNeed]:
        """The needs of the admitted streams placed on ``ring_id`` (and ``newcomer``'s)."""
        on_ring = [self.admitted[sid] for sid, a in self.assigner.assignments.items()
                   if a.ring_id == ring_id and sid in self.admitted]
        return on_ring + ([newcomer] if newcomer is not None else [])

    async def _move_streams(self, now: float) -> None:
        """Streams of a ring, decoder or egress silent for ``heartbeat_dead_s`` move to a live one (also a stream
        placed while no member of a kind was heard gets one). Not right after taking the lead or a NATS
        reconnect: silence then is this controller's, not theirs."""
        assert self.bus is not None
        dead = max(self.cfg.heartbeat_dead_s, self.cfg.heartbeat_miss_s)
        since = self.bus.since_reconnect
        if now - self._lead_started < dead or (since is not None and since < dead + self.settings.nats
                                               .reconnect_wait_max_s):
            return
        moved = self.assigner.moves(self.admitted, self.placement_pool(dead))
        for m in moved:
            await self._apply_move(m, why="dead")
        if moved:
            await self._save_state()

    async def _apply_move(self, m: Move, why: str) -> None:
        """A stream's new assignment, recorded (its ingest, decoder and egress follow the record)."""
        self.assigner.set(m.stream_id, m.new)
        self._record({"kind": "move", "why": why, "stream_id": m.stream_id, "from": m.old.model_dump(),
                      "to": m.new.model_dump(), "overcommitted": list(m.overcommitted), "applied": True})
        await self.assigner.record(m.stream_id, m.new)

    def _suspect(self, ring: RingState, sid: str, silent: bool, now: float, *, failed: bool = False) -> None:
        """Suspected vs dead: a stage silent past ``heartbeat_miss_s`` is only suspected (a loaded node stalls a
        live stage that long); it fails after ``heartbeat_dead_s``. Logged and counted either way."""
        since = ring.suspected.get(sid)
        if silent and since is None:
            ring.suspected[sid] = now
            log.warning("stage %s suspected: no heartbeat for %.1f s (declared dead after %.1f s)", sid,
                        self.cfg.heartbeat_miss_s, max(self.cfg.heartbeat_dead_s, self.cfg.heartbeat_miss_s))
        elif not silent and since is not None:
            del ring.suspected[sid]
            SUSPICIONS.labels(outcome="failed" if failed else "cleared").inc()
            if not failed:
                log.info("stage %s beats again after %.1f s of suspicion", sid, now - since)
        SUSPECTED.set(sum(len(r.suspected) for r in self.rings.values()))

    def _split(self, ring: RingState, members: list[str]) -> list[StageAssignment]:
        """Blocks over ``members``: the cost-aware optimum when there is an estimate (adaptive mode), else even."""
        return ring.split(members, self._problem(members, ring) if self.cfg.mode == "adaptive" else None)

    def _problem(self, members: list[str], ring: RingState | None = None) -> PartitionProblem | None:
        dtype_bytes = 4 if self.settings.model.dtype == "float32" else 2
        weights = block_weight_bytes(WanDiTConfig.named(self.settings.model.preset), dtype_bytes)
        return (ring or self.rings[self.default_ring]).problem(members, weights, self.cfg.memory_headroom)

    def path_costs(self) -> PathCosts:
        """The measured encode and decode costs (the slowest live member of each) and one step through the ring."""

        def slowest(role: str, unit: str) -> float | None:
            costs = [m.work[unit] for m in self.live_members(role) if unit in m.work]
            return max(costs) if costs else None

        ring_ms = None
        for ring in self._serving_rings():  # the slowest ring's step: any stream may be placed on it
            bm = ring.block_map
            reports = [ring.cost.reports.get(s.stage_id) for s in bm.stages] if bm is not None else []
            if bm is not None and all(r is not None and r.epoch == bm.epoch for r in reports):
                ms = sum(r.step_ms for r in reports if r is not None)
                ring_ms = ms if ring_ms is None else max(ring_ms, ms)
        return PathCosts(slowest("ingest", "vae_encode"), slowest("decoder", "vae_decode"), ring_ms)

    def ring_price(self, needs: Iterable[StreamNeed], ring: RingState | None = None) -> float | None:
        """A ring's ms per item for these streams: L(n)/n at the batch they reach, from its stages' fitted latency
        model (``policy.ring_item_ms``); before every stage reported a fit, the measured ms per item. No ring: the
        slowest serving ring's price (admission's per-ring DiT check, the autoscaler's demand)."""
        needs = list(needs)
        if ring is None:
            prices = [self.ring_price(needs, r) for r in self._serving_rings()]
            return None if not prices or None in prices else max(p for p in prices if p is not None)
        fitted = ring_item_ms(ring.fits, needs, self.settings.dit_stage.max_batch_items)
        return ring.item_ms if fitted is None else fitted

    async def _rebalance(self, ring: RingState, now: float) -> None:
        assert ring.block_map is not None
        bm = ring.block_map
        ids = [s.stage_id for s in bm.stages]
        max_age = 2.5 * self.settings.dit_stage.stats_interval_s
        now_split: Split | None = None
        best: Split | None = None
        if ring.cost.fresh(ids, bm.epoch, now, max_age):
            problem = self._problem(ids, ring)
            if problem is not None:
                now_split = evaluate(problem, list(bm.ranges().values()))
                best = best_split(problem, bm.ranges())
        verdict = ring.policy.decide(now_split.bottleneck_ms if now_split else None,
                                     best.bottleneck_ms if best else None, now)
        if verdict.verdict != "act":
            return
        assert now_split is not None and best is not None
        stages = best.assignments(ids)
        applied = not self.cfg.advisory
        self._record({"kind": "rebalance", "ring": ring.ring_id, "epoch": bm.epoch, "gain": round(verdict.gain, 4),
                      "now_ms": round(now_split.bottleneck_ms, 3), "best_ms": round(best.bottleneck_ms, 3),
                      "map": _pairs(stages), "applied": applied})
        DECISIONS.labels(kind="rebalance", result="applied" if applied else "advisory").inc()
        if applied:
            await self._publish_map(ring, stages, "rebalance")
        else:
            ring.policy.note_change(now)  # what an applied change would have done: no decision per tick
            await self._save_state()

    def _record(self, decision: dict[str, Any]) -> None:
        decision = {"at": time.time(), "advisory": self.cfg.advisory, **decision}
        self.decisions.append(decision)
        log.info("decision: %s", json.dumps(decision, sort_keys=True))

    # ------------------------------------------------------------------ admission
    async def _on_admission(self, spec: StreamSpec, raw: Any) -> None:
        assert self.bus is not None
        reply: Ack | Error
        need = stream_need(spec)
        pool = self.placement_pool(newcomer=need)
        ring = [*(v for k, v in self.admitted.items() if k != spec.stream_id), need]
        item_ms = self.ring_price(ring)
        fitted = all(r.fits for r in self._serving_rings())
        bottleneck = f"{self.bottleneck}; fitted a + b·n at n = " \
            f"{batch_reached(ring, self.settings.dit_stage.max_batch_items)}" if fitted else self.bottleneck
        d = decide_admission(spec, self.admitted, item_ms, headroom=self.cfg.admission_headroom,
                             prior_streams=self.cfg.admission_prior_streams, bottleneck=bottleneck,
                             costs=self.path_costs(), decoders_placed=bool(pool.decoders),
                             rings=max(len(pool.rings), 1))
        applied = not self.cfg.advisory
        placed: Assignment | str | None = None
        if d.admit or not applied:  # advisory admits every stream: each still gets one owner of each kind
            placed = self.assigner.place(spec.stream_id, stream_need(spec), pool, self.admitted, force=not applied)
        if isinstance(placed, str):  # the path has room in sum, but no one member of some kind has
            d = dataclasses.replace(d, admit=False, reason=f"no capacity: {placed}")
        queued = False
        if self.queue is not None and applied:  # first come, first served (docs/scheduling.md)
            v = self.queue.verdict(spec.stream_id, d.admit, d.reason, time.monotonic())
            QUEUE.labels(outcome=v.state).inc()
            if v.state != "admit":
                d = dataclasses.replace(d, admit=False, reason=v.message)
                queued = v.state == "queued"
        self._record({"kind": "admission", "stream_id": spec.stream_id, "admit": d.admit, "reason": d.reason,
                      "need": round(d.need_items_per_s, 3), "applied": applied,
                      "placement": placed.model_dump() if isinstance(placed, Assignment) else None})
        DECISIONS.labels(kind="admission", result=("admit" if d.admit else "queued" if queued else "refuse")
                         + ("" if applied else "_advisory")).inc()
        if d.admit or not applied:
            self.admitted[spec.stream_id] = stream_need(spec)
            detail = d.reason if d.admit else f"advisory: would refuse: {d.reason}"
            if isinstance(placed, Assignment):  # recorded before the answer: the stream's chunks follow it
                self.assigner.set(spec.stream_id, placed)
                await self.assigner.record(spec.stream_id, placed)
                detail += (f"; placed on ring {placed.ring_id or '-'}, decoder {placed.decoder or '-'}, egress "
                           f"{placed.egress or '-'}")
            reply = Ack(ref=spec.stream_id, detail=f"epoch {self.epoch}; {detail}")
        else:
            reply = Error(code="queued" if queued else "no_capacity", message=d.reason, stream_id=spec.stream_id)
            if self.autoscaler is not None:
                self.autoscaler.note_refused(spec, time.monotonic())
        await self.bus.respond(raw, reply)
        assert self._state_kv is not None
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._state_kv.put(admission_key(spec.stream_id), reply)
            await self._save_state()
        if isinstance(reply, Error) and not queued:
            await self.bus.publish(Subjects.stream_error(spec.stream_id), reply)
        if self.queue is not None:
            await self._publish_queue()

    async def _expire_queue(self, now: float) -> None:
        """Drop the queued streams whose publisher left (their refusal kept for the API)."""
        assert self.queue is not None and self.bus is not None and self._state_kv is not None
        for sid, message in self.queue.expire(now):
            QUEUE.labels(outcome="abandoned").inc()
            log.info("stream %s: %s", sid, message)
            refusal = Error(code="no_capacity", message=message, stream_id=sid)
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._state_kv.put(admission_key(sid), refusal)
                await self.bus.publish(Subjects.stream_error(sid), refusal)
        await self._publish_queue()

    async def _publish_queue(self) -> None:
        """The waiting streams and their places (``ADMISSION_QUEUE_KEY``: the API's stream list shows them)."""
        assert self.queue is not None and self._state_kv is not None
        waiting = {sid: i for i, sid in enumerate(self.queue.waiting, 1)}
        if waiting == self._queue_published:
            return
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._state_kv.put(ADMISSION_QUEUE_KEY, json.dumps(
                {sid: {"position": i, "of": len(waiting), "reason": self.queue.waiting[sid].reason}
                 for sid, i in waiting.items()}).encode())
            self._queue_published = waiting


    async def _drain(self, pool: str, keep: int) -> bool:
        """May ``pool`` shrink to ``keep`` replicas? A decoder or ingest that goes hands its streams over by the
        liveness path (a new segment elsewhere). Rings shrink from the top (the StatefulSet removes the highest
        ordinals): the rings from ``keep`` up are drained first, their streams moved to the rings that stay (a new
        segment there, docs/scheduling.md, Many rings); the shrink goes ahead once none is left on them."""
        if pool != "rings":
            return True
        going = {r for r in self.rings if r.isdigit() and int(r) >= keep}
        on_going = [sid for sid, a in self.assigner.assignments.items() if a.ring_id in going and sid in self.admitted]
        if not on_going:
            return True
        staying = self.placement_pool()
        staying = dataclasses.replace(staying, rings=[b for b in staying.rings if b.member not in going])
        if not staying.rings:
            return False  # nowhere to move them: wait (as before, until no stream is admitted there)
        for m in self.assigner.moves(self.admitted, staying):  # (a dead member's streams move too, as they would)
            await self._apply_move(m, why="drain")
        await self._save_state()
        return False


def _need(stored: object) -> StreamNeed:
    """An admitted stream's need as saved in the controller's state (a bare number: items/s, from before)."""
    if isinstance(stored, dict):
        return StreamNeed(float(stored.get("items_per_s", 0.0)), float(stored.get("decode_mpx_per_s", 0.0)),
                          bool(stored.get("t2v", False)), int(stored.get("steps", 1)),
                          float(stored.get("slo_ms", math.inf)))
    return StreamNeed(float(stored))  # type: ignore[arg-type]


def _pairs(stages: list[StageAssignment]) -> list[list[Any]]:
    return [[s.stage_id, s.block_start, s.block_end] for s in stages]


def _ranges(bm: BlockMap) -> str:
    return ", ".join(f"{s.stage_id}=[{s.block_start},{s.block_end})" for s in bm.stages)


__all__ = ["ControllerService", "LostLeadership", "Member"]

if __name__ == "__main__":
    sys.exit(main(ControllerService))
