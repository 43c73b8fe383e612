"""A DiT stage's place in the ring as a pure state machine: block maps and events in, actions out.

The service (``dit_stage/service.py``) feeds it every block map the watch delivers and every event its own work produces
(weights loaded, switch prepared, every peer prepared, switch complete, a load or switch failed); it executes the
actions it gets back, in order. Nothing here touches NATS, asyncio or torch, so the ordering rules are unit-tested alone
(``tests/dit_service/test_membership.py``):


- maps apply one at a time, in the order they arrived; the same map again does nothing;
- a map the stage can reach online (``services.rebalance.offline_reason`` empty) becomes a prepared switch whose KV
  moves happen at the switch point (docs/rebalance.md); a stage new to a running ring joins (``joins_online``);
- any other map is a hard switch: reload if the range changed, a failure epoch also recovers (docs/recovery.md);
- a map that cannot be an online switch ends a pending one the moment it arrives: a failure must not wait for it;
- inputs of an epoch not applied yet are held (at most ``EARLY_QUEUE``) and released when it applies.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Generic, TypeVar

from proto import BlockMap
from services.rebalance import joins_online, offline_reason, stage_moves

__all__ = [
    "EARLY_QUEUE",
    "AbortSwitch",
    "Action",
    "AdmitInputs",
    "AnnouncePrepared",
    "AwaitPeers",
    "ConnectNext",
    "Go",
    "HardSwitch",
    "Idle",
    "JoinRing",
    "LoadBlocks",
    "Membership",
    "PrepareSwitch",
    "Recover",
    "SubscribeInputs",
    "SwitchDone",
]

EARLY_QUEUE = 256
"""Inputs of a block-map epoch this stage has not applied yet, held until it has (the oldest dropped beyond)."""

M = TypeVar("M")


@dataclass(frozen=True)
class LoadBlocks:
    """Load the weights of blocks ``block_range`` in the background, then report ``loaded(epoch)``. ``hard``: the
    stage is not ready meanwhile (its streams' state is dropped anyway)."""

    epoch: int
    block_range: tuple[int, int]
    num_blocks: int
    hard: bool


@dataclass(frozen=True)
class HardSwitch:
    """Run ``block_map`` from now on, on the weights just loaded (``reload``) or the current ones; items of older
    epochs become stale."""

    block_map: BlockMap
    block_range: tuple[int, int]
    reload: bool
    why: str


@dataclass(frozen=True)
class Recover:
    """A failure epoch: drop every stream state and item older than ``epoch`` (ingest replays the streams)."""

    epoch: int


@dataclass(frozen=True)
class AdmitInputs:
    """Inputs of epochs up to ``epoch`` may reach the worker: take back those held (``Membership.release``)."""

    epoch: int


@dataclass(frozen=True)
class AnnouncePrepared:
    """Tell the ring this stage can run ``epoch`` (the first stage switches once every stage has)."""

    epoch: int


@dataclass(frozen=True)
class SubscribeInputs:
    """Take latent chunks and prompts (first stage) or stop taking them (any other stage, or idle)."""

    first: bool


@dataclass(frozen=True)
class ConnectNext:
    """Keep a link to ``stage_id``, the next stage in the ring from ``epoch`` on (a no-op when it already is).
    Comes before ``AdmitInputs``: nothing of the new epoch may be queued to the link it replaces."""

    stage_id: str
    epoch: int = 0


@dataclass(frozen=True)
class PrepareSwitch:
    """An online switch to ``block_map``: open links to the new owners in ``send`` (and to ``relink_to``, the new
    next stage, when one joins right after this stage), register the change with the worker, report
    ``switch_prepared(epoch)``. ``receive``: old owner → the blocks whose KV this stage takes over."""

    block_map: BlockMap
    block_range: tuple[int, int]
    send: dict[str, list[int]]
    receive: dict[str, list[int]]
    relink_to: str | None


@dataclass(frozen=True)
class JoinRing:
    """This stage is new to a running ring: a worker on the weights just loaded waits for every block's KV."""

    block_map: BlockMap
    block_range: tuple[int, int]


@dataclass(frozen=True)
class AwaitPeers:
    """First stage: report ``peers_prepared(epoch)`` once every stage of ``block_map`` has announced it."""

    block_map: BlockMap


@dataclass(frozen=True)
class Go:
    """First stage: switch at the next micro-step boundary."""

    epoch: int


@dataclass(frozen=True)
class SwitchDone:
    """The online switch (or join) to ``block_map`` is complete at this stage."""

    block_map: BlockMap
    block_range: tuple[int, int]


@dataclass(frozen=True)
class AbortSwitch:
    """Abandon the pending switch to ``epoch``: close its links, forget it in the worker, drop weights loaded for it."""

    epoch: int


@dataclass(frozen=True)
class Idle:
    """This stage is not in ``block_map``: no blocks, no inputs."""

    block_map: BlockMap


Action = (LoadBlocks | HardSwitch | Recover | AdmitInputs | AnnouncePrepared | SubscribeInputs | ConnectNext
          | PrepareSwitch | JoinRing | AwaitPeers | Go | SwitchDone | AbortSwitch | Idle)


@dataclass
class _Pending:
    """A map being applied that waits for an event: a hard reload, a join or an online switch."""

    kind: str  # "hard" | "join" | "online"
    block_map: BlockMap
    block_range: tuple[int, int]
    why: str = ""
    switch: PrepareSwitch | None = None
    loading: bool = False
    started: bool = False  # online or join: the worker knows the change


class Membership(Generic[M]):
    """One stage's block-map state: which map it runs, which it works towards, which inputs it admits."""

    def __init__(self, stage_id: str, early_queue: int = EARLY_QUEUE) -> None:
        self.stage_id = stage_id
        self.applied: BlockMap | None = None  # the map this stage runs
        self.received: BlockMap | None = None  # the newest map delivered
        self.blocks: tuple[int, int, int] | None = None  # (start, end, num_blocks) of the worker's model
        self.recover_floor = 0
        self.admitted = 0  # inputs of later epochs wait until their map applies here
        self._early_queue = early_queue
        self._early: collections.deque[M] = collections.deque()
        self._maps: collections.deque[BlockMap] = collections.deque()
        self._pending: _Pending | None = None

    # ------------------------------------------------------------------ events
    def on_map(self, bm: BlockMap) -> list[Action]:
        """A (valid) map from the watch: queued behind the one being applied; ends a pending switch it cannot
        follow online."""
        actions: list[Action] = []
        p = self._pending
        if p is not None and p.kind != "hard" and offline_reason(p.block_map, bm):
            self._pending = None
            actions.append(AbortSwitch(p.block_map.epoch))
        prev, self.received = self.received, bm
        if self.blocks is not None and prev is not None and self._in(bm) and not offline_reason(prev, bm):
            actions.append(AdmitInputs(bm.epoch))  # an online switch: the worker itself orders the new epoch's items
        self._maps.append(bm)
        return actions + self._advance()

    def loaded(self, epoch: int) -> list[Action]:
        """The weights a ``LoadBlocks`` asked for are there (ignored when its map was abandoned meanwhile)."""
        p = self._pending
        if p is None or not p.loading or p.block_map.epoch != epoch:
            return []
        p.loading = False
        if p.kind == "hard":
            self._pending = None
            return self._hard(p.block_map, p.block_range, p.why, reload=True) + self._advance()
        if p.kind == "join":
            p.started = True
            bm = p.block_map
            self.blocks = (*p.block_range, bm.num_blocks)
            return [JoinRing(bm, p.block_range), SubscribeInputs(first=False), ConnectNext(self._next_of(bm), bm.epoch),
                    AdmitInputs(bm.epoch), AnnouncePrepared(bm.epoch)]
        assert p.switch is not None
        return [p.switch]

    def switch_prepared(self, epoch: int) -> list[Action]:
        """The links of an online switch are open and the worker knows it."""
        p = self._pending
        if p is None or p.kind != "online" or p.block_map.epoch != epoch or p.started:
            return []
        p.started = True
        first = self._first(p.block_map)
        return [AnnouncePrepared(epoch), *([AwaitPeers(p.block_map)] if first else [])]

    def peers_prepared(self, epoch: int) -> list[Action]:
        """First stage: every stage of the new map can run it."""
        p = self._pending
        if p is None or p.kind != "online" or p.block_map.epoch != epoch:
            return []
        return [Go(epoch)]

    def switched(self, epoch: int) -> list[Action]:
        """The worker runs ``epoch`` with every moved block merged: the switch is complete here."""
        p = self._pending
        if p is None or p.kind == "hard" or p.block_map.epoch != epoch or not p.started:
            return []
        self._pending = None
        self.applied = p.block_map
        self.blocks = (*p.block_range, p.block_map.num_blocks)
        return [SwitchDone(p.block_map, p.block_range), *self._advance()]

    def failed(self, epoch: int) -> list[Action]:
        """Loading the weights for ``epoch`` or its switch point failed: abandon that map (the stage keeps what it
        runs; a later map must repair it) and go on with the next."""
        p = self._pending
        if p is None or p.block_map.epoch != epoch:
            return []
        self._pending = None
        return [*([AbortSwitch(epoch)] if p.kind != "hard" else []), *self._advance()]

    @property
    def switching(self) -> int | None:
        """The epoch of the online switch or join the worker has been told about, if any."""
        p = self._pending
        return p.block_map.epoch if p is not None and p.kind != "hard" and p.started else None

    # ------------------------------------------------------------------ inputs of epochs not applied yet
    def admits(self, epoch: int) -> bool:
        return epoch <= self.admitted

    def hold(self, msg: M) -> int:
        """Hold an input of an epoch not applied yet; returns how many of the oldest were dropped to make room."""
        self._early.append(msg)
        dropped = 0
        while len(self._early) > self._early_queue:
            self._early.popleft()
            dropped += 1
        return dropped

    def release(self, epoch: int) -> list[M]:
        """Admit epochs up to ``epoch``; returns every held input, in arrival order, to be offered again."""
        self.admitted = max(self.admitted, epoch)
        held = list(self._early)
        self._early.clear()
        return held

    # ------------------------------------------------------------------ applying maps
    def _advance(self) -> list[Action]:
        actions: list[Action] = []
        while self._pending is None and self._maps:
            actions += self._apply(self._maps.popleft())
        return actions

    def _apply(self, bm: BlockMap) -> list[Action]:
        if self.applied is not None and bm == self.applied.model_copy(update={"created_at": bm.created_at}):
            return []  # the watch delivered the current map again
        if not self._in(bm):
            self.applied, self.blocks = bm, None
            return [Idle(bm), SubscribeInputs(first=False)]
        mine = next(s for s in bm.stages if s.stage_id == self.stage_id)
        rng = (mine.block_start, mine.block_end)
        if self.blocks is None and joins_online(bm) and not self._first(bm):
            self._pending = _Pending("join", bm, rng, loading=True)
            return [LoadBlocks(bm.epoch, rng, bm.num_blocks, hard=False)]
        why = offline_reason(self.applied, bm) if self.blocks is not None else "no blocks loaded"
        if not why:
            return self._online(bm, rng)
        if self.blocks != (*rng, bm.num_blocks):
            self._pending = _Pending("hard", bm, rng, why=why, loading=True)
            return [LoadBlocks(bm.epoch, rng, bm.num_blocks, hard=True)]
        return self._hard(bm, rng, why, reload=False)

    def _hard(self, bm: BlockMap, rng: tuple[int, int], why: str, *, reload: bool) -> list[Action]:
        self.applied, self.blocks = bm, (*rng, bm.num_blocks)
        actions: list[Action] = [HardSwitch(bm, rng, reload, why)]
        if bm.reason == "failure" and bm.epoch > self.recover_floor:
            self.recover_floor = bm.epoch
            actions.append(Recover(bm.epoch))
        # link and subscriptions first: the held inputs of this epoch (a replay that came first) run at once, and
        # the announcement tells ingest that this stage can take the replay (docs/recovery.md)
        return [*actions, SubscribeInputs(self._first(bm)), ConnectNext(self._next_of(bm), bm.epoch),
                AdmitInputs(bm.epoch), AnnouncePrepared(bm.epoch)]

    def _online(self, bm: BlockMap, rng: tuple[int, int]) -> list[Action]:
        old = self.applied
        assert old is not None and self.blocks is not None
        send, receive = stage_moves(old, bm, self.stage_id)
        nxt = self._next_of(bm)
        switch = PrepareSwitch(bm, rng, send, receive, relink_to=nxt if nxt != self._next_of(old) else None)
        load = rng != self.blocks[:2]
        self._pending = _Pending("online", bm, rng, switch=switch, loading=load)
        return [LoadBlocks(bm.epoch, rng, bm.num_blocks, hard=False)] if load else [switch]

    def _in(self, bm: BlockMap) -> bool:
        return bm.position(self.stage_id) >= 0

    def _first(self, bm: BlockMap) -> bool:
        return bm.position(self.stage_id) == 0

    def _next_of(self, bm: BlockMap) -> str:
        i = bm.position(self.stage_id)
        if i < 0:
            raise ValueError(f"{self.stage_id} is not in block map epoch {bm.epoch}")
        return bm.stages[(i + 1) % len(bm.stages)].stage_id
