"""The controller service: block maps under epochs, failure and join, online rebalancing, admission, one leader.

Subscribes (every instance, so a standby is warm): ``rheo.ctl.heartbeat.*`` (membership), ``rheo.ctl.stats.*``
(the cost model), stream events and errors (admitted streams ending). The leader alone also answers
``rheo.ctl.admission`` and writes the block map: ``rheo-blockmap`` KV key ``current`` (revision-checked, so a
deposed leader cannot overwrite its successor's map), also published on ``rheo.ctl.blockmap``.

Epochs (docs/controller.md): ``initial`` (first start or a configuration change), ``failure`` (a stage in the map
went silent for ``heartbeat_dead_s``, withdrew its endpoint, or restarted: silent only for ``heartbeat_miss_s``, it
is merely suspected), ``join`` (a configured stage outside the
map heartbeats again), ``rebalance`` (the policy found a split with a sustained predicted gain). State lives in KV
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
)
from proto.messages import BlockMapReason
from services.bus import KV
from services.controller.admission_queue import AdmissionQueue
from services.controller.assigner import Assigner, MemberView
from services.controller.costmodel import CostModel
from services.controller.leader import KubernetesLease, KVLeaderLock, LeaderLock, in_cluster
from services.controller.partition import PartitionProblem, Split, Stage, best_split, evaluate, even_split
from services.controller.placement import Pool
from services.controller.policy import (
    ADMISSION_QUEUE_KEY,
    Fit,
    PathCosts,
    RebalancePolicy,
    StreamNeed,
    admission_key,
    batch_reached,
    decide_admission,
    ring_item_ms,
    stream_need,
)
from services.controller.scaling import Autoscaler, Demand
from services.rebalance import offline_reason
from services.runtime import Service, main, watch_keys
from services.streams import StreamTable
from wan.config import WanDiTConfig

log = logging.getLogger("rheo.controller")

MEMBERS = Gauge("rheo_controller_members", "members heard from within the miss budget", ["role"])
EPOCH = Gauge("rheo_controller_epoch", "block-map epoch the leader published or resumed")
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
BLOCKMAP_KEY = "current"
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


def block_weight_bytes(cfg: WanDiTConfig, dtype_bytes: int) -> int:
    """Weights of one DiT block: self- and cross-attention (q, k, v, o), the FFN, norms and modulation."""
    d = cfg.dim
    return dtype_bytes * (8 * (d * d + d) + 2 * d * cfg.ffn_dim + d + cfg.ffn_dim + 6 * d + 4 * d)


class ControllerService(Service):
    role = "controller"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cfg = self.settings.controller
        self.ring = self.settings.dit_stage.ring()
        """The ring every map this controller writes carries (ingest clocks chunks by it)."""
        self.members: dict[str, Member] = {}
        self._refused_logged_at = -1e9
        self.block_map: BlockMap | None = None
        self.leader = False
        self.cost = CostModel(self.num_blocks())
        self.policy = RebalancePolicy(self.cfg.rebalance_gain_threshold, self.cfg.rebalance_sustain_s,
                                      self.cfg.rebalance_cooldown_s)
        self.admitted: dict[str, StreamNeed] = {}
        """Admitted streams → what they need of each bottleneck per second."""
        self.assigner = Assigner(self.cfg.admission_headroom, self.settings.dit_stage.ring_id)
        """Where each admitted stream runs (docs/scheduling.md, Placement)."""
        self.item_ms: float | None = None
        self.bottleneck = ""
        self.ring_fits: tuple[tuple[Fit, ...], ...] = ()
        """Each stage's fitted micro-step times per grid, once every stage of the map reported one (else none)."""
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=512)
        self.lock: LeaderLock | None = None
        self._kv: KV | None = None
        self._state_kv: KV | None = None
        self._bm_revision: int | None = None
        self._seen_map: BlockMap | None = None
        """The latest map published by whoever leads (a standby keeps its cost model warm with it)."""
        self._lead_started = 0.0
        self._store_checked = 0.0
        self._admission_sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self.suspected: dict[str, float] = {}
        """Stages of the map silent past the miss budget → when the suspicion began (not failed yet)."""
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

    def stage_ids(self) -> list[str]:
        return [f"dit-{i}" for i in range(self.cfg.stages)]

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
        with contextlib.suppress(Exception):  # a standby's view of the map, for its cost model
            self._seen_map = await self._kv.get_message(BLOCKMAP_KEY, BlockMap)
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
        self.block_map = await self._ensure_block_map()
        self.epoch = self.block_map.epoch
        EPOCH.set(self.epoch)
        await self.bus.publish(Subjects.blockmap(), self.block_map)
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
            self.item_ms = state.get("item_ms")
            self.bottleneck = state.get("bottleneck", "")
            self.assigner.load(state.get("assignments"))
            ago = time.time() - float(state.get("last_change_at", 0.0))
            if ago < self.cfg.rebalance_cooldown_s:
                self.policy.note_change(time.monotonic() - max(ago, 0.0))
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
        state = {"admitted": admitted, "item_ms": self.item_ms, "bottleneck": self.bottleneck,
                 "assignments": self.assigner.dump(),
                 "last_change_at": changed_at if changed_at is not None else last,
                 "last_decision": self.decisions[-1] if self.decisions else None}
        await self._state_kv.put(STATE_KEY, json.dumps(state).encode())

    async def _ensure_block_map(self) -> BlockMap:
        """Keep the stored map when it still fits the configuration (a restart, a new leader); else a new epoch."""
        assert self._kv is not None
        entry = await self._kv.get(BLOCKMAP_KEY)
        current = None
        if entry is not None and entry.value:
            current = await self._kv.get_message(BLOCKMAP_KEY, BlockMap)
            self._bm_revision = entry.revision
        else:
            self._bm_revision = None
            known = self.block_map or self._seen_map
            if known is not None:  # a lost NATS store: the map in force goes back, same epoch
                log.warning("the block map is gone from %s (NATS store lost?): writing epoch %d again",
                            Buckets.BLOCKMAP, known.epoch)
                self._bm_revision = await self._kv.create(BLOCKMAP_KEY, known)
                current = known
        ids = self.stage_ids()
        stored = [s.stage_id for s in current.stages] if current else []
        if current is not None and current.num_blocks == self.num_blocks() and current.ring == self.ring and \
                stored and all(s in ids for s in stored) and stored == sorted(stored, key=ids.index):
            log.info("resuming block map epoch %d (%s)", current.epoch, _ranges(current))
            return current
        new = BlockMap(epoch=(current.epoch + 1) if current else 1, num_blocks=self.num_blocks(),
                       stages=even_split(self.num_blocks(), ids), created_at=time.time(), reason="initial",
                       ring=self.ring)
        await self._write_map(new)
        return new

    async def _write_map(self, new: BlockMap) -> None:
        assert self._kv is not None
        new.validate_cover()
        try:
            if self._bm_revision is None:
                self._bm_revision = await self._kv.create(BLOCKMAP_KEY, new)
            else:
                self._bm_revision = await self._kv.update(BLOCKMAP_KEY, new, last=self._bm_revision)
        except nats.js.errors.KeyWrongLastSequenceError as e:
            raise LostLeadership(f"the block map changed under this controller (epoch {new.epoch} not written)") \
                from e
        EPOCHS.labels(reason=new.reason).inc()
        EPOCH.set(new.epoch)
        log.info("block map epoch %d (%s): %s", new.epoch, new.reason, _ranges(new))

    async def _publish_map(self, stages: list[StageAssignment], reason: BlockMapReason) -> None:
        assert self.bus is not None and self.block_map is not None
        new = BlockMap(epoch=self.block_map.epoch + 1, num_blocks=self.block_map.num_blocks, stages=stages,
                       created_at=time.time(), reason=reason, ring=self.ring)
        await self._write_map(new)
        self.block_map = new
        self.epoch = new.epoch
        self.policy.note_change(time.monotonic())
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
        self.members[hb.member_id] = Member(hb.member_id, hb.role, hb.ready, now, alive_since,
                                            old.first_seen if old is not None else now,
                                            {w.unit: w.ms_per_mpx for w in hb.work}, hb.ring_id, hb.address)
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
        if self._seen_map is None or bm.epoch >= self._seen_map.epoch:
            self._seen_map = bm

    async def _on_stats(self, stats: StageStats, _raw: object) -> None:
        bm = self.block_map if self.leader else self._seen_map
        if bm is None:
            return
        i = bm.position(stats.stage_id)
        if i < 0:
            return
        self.cost.observe(stats, bm.epoch, time.monotonic(), first=i == 0, last=i == len(bm.stages) - 1)
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
        await self._keep_map_stored(now)
        await self._membership(now)
        self._refresh_capacity(now)
        if self.cfg.mode == "adaptive":
            await self._rebalance(now)
        await self._move_streams(now)
        if self.queue is not None:
            await self._expire_queue(now)
        if self.autoscaler is not None:
            await self.autoscaler.tick(now, list(self.admitted.values()),
                                       Demand(self.ring_price(self.admitted.values()), self.path_costs(),
                                              self.cfg.admission_prior_streams),
                                       self._drain)

    async def _keep_map_stored(self, now: float) -> None:
        """After a lost NATS store the bucket is empty again: write the map in force back, same epoch (to the stages
        it is the map they run), so whoever watches it or starts now finds it."""
        if now - self._store_checked < STORE_CHECK_S:
            return
        self._store_checked = now
        assert self._kv is not None and self.block_map is not None
        entry = await self._kv.get(BLOCKMAP_KEY)
        if entry is None or not entry.value:
            log.warning("the block map is gone from %s (NATS store lost?): writing epoch %d again", Buckets.BLOCKMAP,
                        self.block_map.epoch)
            self._bm_revision = await self._kv.create(BLOCKMAP_KEY, self.block_map)

    async def _membership(self, now: float) -> None:
        """Failure and join epochs (always applied: they keep the ring whole)."""
        assert self.block_map is not None
        ids = self.stage_ids()
        in_map = [s.stage_id for s in self.block_map.stages]
        budget = self.cfg.heartbeat_miss_s
        dead = max(self.cfg.heartbeat_dead_s, budget)
        assert self.bus is not None
        since = self.bus.since_reconnect
        if since is not None and since < dead + self.settings.nats.reconnect_wait_max_s:
            return  # NATS was away: the silence was ours, and the stages may still be reconnecting
        for sid in [sid for sid in self._gone if sid not in in_map]:
            del self._gone[sid]  # outside the map: it joins by heartbeats, like any newcomer
        for sid in [sid for sid in self.suspected if sid not in in_map]:
            del self.suspected[sid]
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
                self._suspect(sid, now - m.last_seen > budget, now)
        for sid in failed:
            self._suspect(sid, False, now, failed=True)
        restarted = [sid for sid in in_map if sid not in failed and self._gone.get(sid) == "restarted"]
        joined = [sid for sid in ids if sid not in in_map and (m := self.members.get(sid)) is not None
                  and now - m.last_seen <= budget and now - m.alive_since >= self.cfg.rejoin_settle_s
                  and sid not in self._withdrawn]
        if not failed and not joined and not restarted:
            return
        members = [sid for sid in ids if (sid in in_map and sid not in failed) or sid in joined]
        if not members:
            return  # nobody to give the blocks to: keep the map, its stages may come back
        if len(members) > self.block_map.num_blocks:
            return
        for sid in (*failed, *restarted):
            if sid in self._gone:
                GONE.labels(how=self._gone.pop(sid)).inc()
        # a restarted stage keeps its place, but the KV it held is gone: a failure epoch rebuilds it by replay
        reason: BlockMapReason = "failure" if failed or restarted else "join"
        stages = self._split(members)
        if reason == "join":
            probe = BlockMap(epoch=self.block_map.epoch + 1, num_blocks=self.block_map.num_blocks, stages=stages,
                             reason="join", ring=self.ring)
            why = offline_reason(self.block_map, probe)
            if why:  # e.g. the first stage comes back: no KV can move, so streams are rebuilt by replay
                log.warning("stages %s rejoin but KV cannot move online (%s): announced as a failure epoch", joined,
                            why)
                reason = "failure"
        self._record({"kind": reason, "failed": failed, "restarted": restarted, "joined": joined,
                      "map": _pairs(stages), "applied": True})
        log.warning("stages %s: %s; new epoch over %s", reason, failed or restarted or joined, members)
        await self._publish_map(stages, reason)

    def placement_pool(self, budget: float | None = None, item_ms: float | None = None) -> Pool:
        """The members a stream may be placed on: heard within ``budget`` (default: the miss budget); rings priced
        at ``item_ms`` (default: the admitted streams' ``ring_price``)."""
        return self.assigner.pool((m.view() for m in self.live_members(budget=budget) if m.ready),
                                  self.ring_price(self.admitted.values()) if item_ms is None else item_ms)

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
            self.assigner.set(m.stream_id, m.new)
            self._record({"kind": "move", "stream_id": m.stream_id, "from": m.old.model_dump(),
                          "to": m.new.model_dump(), "overcommitted": list(m.overcommitted), "applied": True})
            await self.assigner.record(m.stream_id, m.new)
        if moved:
            await self._save_state()

    def _suspect(self, sid: str, silent: bool, now: float, *, failed: bool = False) -> None:
        """Suspected vs dead: a stage silent past ``heartbeat_miss_s`` is only suspected (a loaded node stalls a
        live stage that long); it fails after ``heartbeat_dead_s``. Logged and counted either way."""
        since = self.suspected.get(sid)
        if silent and since is None:
            self.suspected[sid] = now
            log.warning("stage %s suspected: no heartbeat for %.1f s (declared dead after %.1f s)", sid,
                        self.cfg.heartbeat_miss_s, max(self.cfg.heartbeat_dead_s, self.cfg.heartbeat_miss_s))
        elif not silent and since is not None:
            del self.suspected[sid]
            SUSPICIONS.labels(outcome="failed" if failed else "cleared").inc()
            if not failed:
                log.info("stage %s beats again after %.1f s of suspicion", sid, now - since)
        SUSPECTED.set(len(self.suspected))

    def _split(self, members: list[str]) -> list[StageAssignment]:
        """Blocks over ``members``: the cost-aware optimum when there is an estimate, else even."""
        assert self.block_map is not None
        if self.cfg.mode == "adaptive":
            problem = self._problem(members)
            if problem is not None:
                split = best_split(problem, _current(self.block_map))
                if split is not None:
                    return split.assignments(members)
                log.error("no split of %d blocks over %s fits their memory; splitting evenly",
                          self.block_map.num_blocks, members)
        return even_split(self.block_map.num_blocks, members)

    def _problem(self, members: list[str]) -> PartitionProblem | None:
        assert self.block_map is not None
        est = self.cost.estimate(self.block_map.epoch)
        if est is None:
            return None
        dtype = self.settings.model.dtype
        weights = block_weight_bytes(WanDiTConfig.named(self.settings.model.preset), 4 if dtype == "float32" else 2)
        reports = [r for r in self.cost.reports.values() if r.epoch == self.block_map.epoch]
        kv_per_block = max((r.kv_bytes / (r.block_end - r.block_start) for r in reports), default=0.0)
        per_block = weights + kv_per_block
        stages = []
        for sid in members:
            r = self.cost.reports.get(sid)
            memory = math.inf
            if r is not None and r.free_memory_bytes > 0:
                memory = (r.free_memory_bytes + (r.block_end - r.block_start) * per_block) \
                    * (1 - self.cfg.memory_headroom)
            stages.append(Stage(sid, est.speed.get(sid, 1.0), memory))
        return PartitionProblem(est.block_ms, stages, est.first_extra_ms, est.last_extra_ms, per_block)

    def path_costs(self) -> PathCosts:
        """The measured encode and decode costs (the slowest live member of each) and one step through the ring."""

        def slowest(role: str, unit: str) -> float | None:
            costs = [m.work[unit] for m in self.live_members(role) if unit in m.work]
            return max(costs) if costs else None

        ring_ms = None
        if self.block_map is not None:
            reports = [self.cost.reports.get(s.stage_id) for s in self.block_map.stages]
            if all(r is not None and r.epoch == self.block_map.epoch for r in reports):
                ring_ms = sum(r.step_ms for r in reports if r is not None)
        return PathCosts(slowest("ingest", "vae_encode"), slowest("decoder", "vae_decode"), ring_ms)

    def _refresh_capacity(self, now: float) -> None:
        """The slowest stage's measured ms per item, once every stage of the map reported in this epoch."""
        assert self.block_map is not None
        ids = [s.stage_id for s in self.block_map.stages]
        reports = [self.cost.reports.get(s) for s in ids]
        if not all(r is not None and r.epoch == self.block_map.epoch for r in reports):
            return
        per_item = {r.stage_id: r.step_ms / max(r.batch_items, 1.0) for r in reports if r is not None}
        self.bottleneck = max(per_item, key=per_item.__getitem__)
        self.item_ms = per_item[self.bottleneck]
        fits = [r.fits for r in reports if r is not None]
        self.ring_fits = tuple(fits) if all(fits) else ()

    def ring_price(self, needs: Iterable[StreamNeed]) -> float | None:
        """The ring's ms per item for these streams: L(n)/n at the batch they reach, from the stages' fitted
        latency model (``policy.ring_item_ms``); before every stage reported a fit, the measured ms per item."""
        fitted = ring_item_ms(self.ring_fits, needs, self.settings.dit_stage.max_batch_items)
        return self.item_ms if fitted is None else fitted

    async def _rebalance(self, now: float) -> None:
        assert self.block_map is not None
        bm = self.block_map
        ids = [s.stage_id for s in bm.stages]
        max_age = 2.5 * self.settings.dit_stage.stats_interval_s
        now_split: Split | None = None
        best: Split | None = None
        if self.cost.fresh(ids, bm.epoch, now, max_age):
            problem = self._problem(ids)
            if problem is not None:
                now_split = evaluate(problem, [(s.block_start, s.block_end) for s in bm.stages])
                best = best_split(problem, _current(bm))
        verdict = self.policy.decide(now_split.bottleneck_ms if now_split else None,
                                     best.bottleneck_ms if best else None, now)
        if verdict.verdict != "act":
            return
        assert now_split is not None and best is not None
        stages = best.assignments(ids)
        applied = not self.cfg.advisory
        self._record({"kind": "rebalance", "epoch": bm.epoch, "gain": round(verdict.gain, 4),
                      "now_ms": round(now_split.bottleneck_ms, 3), "best_ms": round(best.bottleneck_ms, 3),
                      "map": _pairs(stages), "applied": applied})
        DECISIONS.labels(kind="rebalance", result="applied" if applied else "advisory").inc()
        if applied:
            await self._publish_map(stages, "rebalance")
        else:
            self.policy.note_change(now)  # what an applied change would have done: no decision per tick
            await self._save_state()

    def _record(self, decision: dict[str, Any]) -> None:
        decision = {"at": time.time(), "advisory": self.cfg.advisory, **decision}
        self.decisions.append(decision)
        log.info("decision: %s", json.dumps(decision, sort_keys=True))

    # ------------------------------------------------------------------ admission
    async def _on_admission(self, spec: StreamSpec, raw: Any) -> None:
        assert self.bus is not None
        reply: Ack | Error
        ring = [*(v for k, v in self.admitted.items() if k != spec.stream_id), stream_need(spec)]
        item_ms = self.ring_price(ring)
        pool = self.placement_pool(item_ms=item_ms)
        bottleneck = f"{self.bottleneck}; fitted a + b·n at n = " \
            f"{batch_reached(ring, self.settings.dit_stage.max_batch_items)}" if self.ring_fits else self.bottleneck
        d = decide_admission(spec, self.admitted, item_ms, headroom=self.cfg.admission_headroom,
                             prior_streams=self.cfg.admission_prior_streams, bottleneck=bottleneck,
                             costs=self.path_costs(), decoders_placed=bool(pool.decoders))
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
        liveness path (a new segment elsewhere); a ring that goes would lose its streams' KV, so rings shrink only
        when no stream is admitted until placement can move streams off one ring (docs/scheduling.md)."""
        return pool != "rings" or not self.admitted


def _need(stored: object) -> StreamNeed:
    """An admitted stream's need as saved in the controller's state (a bare number: items/s, from before)."""
    if isinstance(stored, dict):
        return StreamNeed(float(stored.get("items_per_s", 0.0)), float(stored.get("decode_mpx_per_s", 0.0)),
                          bool(stored.get("t2v", False)), int(stored.get("steps", 1)),
                          float(stored.get("slo_ms", math.inf)))
    return StreamNeed(float(stored))  # type: ignore[arg-type]


def _current(bm: BlockMap) -> dict[str, tuple[int, int]]:
    return {s.stage_id: (s.block_start, s.block_end) for s in bm.stages}


def _pairs(stages: list[StageAssignment]) -> list[list[Any]]:
    return [[s.stage_id, s.block_start, s.block_end] for s in stages]


def _ranges(bm: BlockMap) -> str:
    return ", ".join(f"{s.stage_id}=[{s.block_start},{s.block_end})" for s in bm.stages)


__all__ = ["ControllerService", "LostLeadership", "Member", "block_weight_bytes"]

if __name__ == "__main__":
    sys.exit(main(ControllerService))
