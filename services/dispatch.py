"""Flood isolation of a subscription: bounded, cheap work per message before any decoding, one lane per stream.

nats-py runs a subscription's callback one message at a time; behind one wildcard subscription a flood on any
subject queued ahead of the live streams (100k bad frames: 28 s for a DiT stage to drain, a playlist ended, the
controller lost its lock). ``Dispatcher`` is what ``Bus.subscribe`` puts between nats-py and the handler:

- on arrival, only a size check and the subject's wildcard tokens (the key: a stream or member id) checked as
  subject tokens; then the message joins a lane, or is dropped and counted (``rheo_bus_dropped_messages_total``
  {channel, reason}: ``oversize``, ``bad_subject``, ``lane_full``, ``newcomers_full``, ``unsubscribed``; nats-py's
  own ``slow_consumer`` drops are counted there too);
- a key the service already serves (``known(key)``: a stream that passed its admission, a member it heard from)
  has its own bounded lane and worker; every other key shares one small bounded *newcomers* lane, so unknown ids,
  however many, cost at most that lane's bound and one worker's turn;
- every worker yields to the event loop after each message: lanes, heartbeats, the controller's lock renewal and
  the HTTP probes take turns, whatever one lane holds;
- order is kept per key (a key's messages already waiting among the newcomers are served before its own lane).

A subject without wildcards (a per-stream or control subscription) is one lane of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from proto import CHANNELS
from services import telemetry
from services.droplog import DropLog

__all__ = ["MAX_LANES", "NATS_PENDING_BYTES", "NATS_PENDING_MSGS", "NEWCOMERS", "Dispatcher", "LaneLimits",
           "channel_of", "count_slow_consumer"]

log = logging.getLogger("rheo.bus")

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # proto.subjects.token's rule, without raising per message


@dataclass(frozen=True)
class LaneLimits:
    msgs: int
    bytes: int


MiB = 1024 * 1024
NEWCOMERS = LaneLimits(256, 16 * MiB)
"""The lane every key the service does not serve yet shares (a new stream's first messages, and any flood)."""
MAX_LANES = 1024
"""Own lanes per subscription at most (known keys are bounded by admission; past this they share the newcomers')."""
NATS_PENDING_MSGS = 64 * 1024
NATS_PENDING_BYTES = 128 * MiB
"""nats-py's queue in front of the dispatcher (which empties it at parse speed); overflow: ``slow_consumer``."""


@lru_cache(maxsize=256)
def channel_of(subject: str) -> str:
    """The ``CHANNELS`` name a subscription subject belongs to ("other" for inboxes and anything else): the only
    subject-derived metric label, so the label set is the channel list."""
    tokens = subject.split(".")
    for name, ch in CHANNELS.items():
        pattern = re.sub(r"{\w+}", "*", ch.pattern).split(".")
        if len(pattern) == len(tokens) and all(p in ("*", t) for p, t in zip(pattern, tokens, strict=True)):
            return name
    return "other"


def count_slow_consumer(subject: str) -> None:
    """nats-py dropped a message before the dispatcher saw it (its pending queue was full)."""
    telemetry.BUS_DROPPED.labels(channel=channel_of(subject), reason="slow_consumer").inc()


class _Lane:
    __slots__ = ("bytes", "limits", "queue", "task")

    def __init__(self, limits: LaneLimits) -> None:
        self.limits = limits
        self.queue: collections.deque[tuple[str, Msg]] = collections.deque()
        self.bytes = 0
        self.task: asyncio.Task[None] | None = None

    def fits(self, n: int) -> bool:
        return len(self.queue) < self.limits.msgs and self.bytes + n <= self.limits.bytes


class Dispatcher:
    """Lanes of one subscription (see the module docstring). ``process`` decodes and handles one message; it must
    not raise."""

    def __init__(self, subject: str, process: Callable[[Msg], Awaitable[None]], *,
                 known: Callable[[str], bool] | None, lane: LaneLimits, max_message_bytes: int,
                 stats: Any = None) -> None:
        self.subject = subject
        self.channel = channel_of(subject)
        self.process = process
        self.known = known
        self.lane_limits = lane
        self.max_message_bytes = max_message_bytes
        tokens = subject.split(".")
        self._ntokens = len(tokens)
        self._positions = [i for i, t in enumerate(tokens) if t == "*"]
        self._lanes: dict[str, _Lane] = {}
        self._newcomers = _Lane(NEWCOMERS)
        self._waiting: dict[str, int] = {}  # key → its messages in the newcomers lane (order across lanes)
        self.dropped: collections.Counter[str] = collections.Counter()
        self._counters: dict[str, Any] = {}  # reason → its metric child (a labels() lookup costs 5x an inc)
        self.drops = DropLog(f"bus {self.channel}", noun="message", logger=log)
        self.sub: Subscription | None = None
        self.stats = stats  # the bus's BusStats: ``dropped`` counts here too

    # -- arrival: bounded work, nothing decoded ----------------------------------------------------------------

    def key(self, subject: str) -> str | None:
        """The subject's wildcard tokens ("" without wildcards); None: not a subject this subscription serves."""
        if not self._positions:
            return ""
        tokens = subject.split(".")
        if len(tokens) != self._ntokens:
            return None
        parts = [tokens[i] for i in self._positions]
        if not all(_TOKEN.match(p) for p in parts):
            return None
        return parts[0] if len(parts) == 1 else ".".join(parts)

    async def on_msg(self, msg: Msg) -> None:
        """nats-py's callback: returns without suspending."""
        self.offer(msg)

    def offer(self, msg: Msg) -> None:
        n = len(msg.data)
        if n > self.max_message_bytes:
            self.drop("oversize", msg)
            return
        key = self.key(msg.subject)
        if key is None:
            self.drop("bad_subject", msg)
            return
        lane = self._lanes.get(key)
        if lane is None and (key == "" or (key not in self._waiting and self.known is not None
                                           and len(self._lanes) < MAX_LANES and self.known(key))):
            lane = self._lanes[key] = _Lane(self.lane_limits)
        newcomer = lane is None
        if lane is None:
            lane = self._newcomers
        if not lane.fits(n):
            self.drop("newcomers_full" if newcomer else "lane_full", msg)
            if not lane.queue and lane.task is None and not newcomer:
                del self._lanes[key]
            return
        lane.queue.append((key, msg))
        lane.bytes += n
        if newcomer:
            self._waiting[key] = self._waiting.get(key, 0) + 1
        if lane.task is None:
            lane.task = asyncio.create_task(self._run(lane, None if newcomer else key),
                                            name=f"bus-{self.channel}-lane")

    def drop(self, reason: str, msg: Msg) -> None:
        self.dropped[reason] += 1
        if self.stats is not None:
            self.stats.dropped += 1
        counter = self._counters.get(reason)
        if counter is None:
            counter = self._counters[reason] = telemetry.BUS_DROPPED.labels(channel=self.channel, reason=reason)
        counter.inc()
        self.drops.note(reason, msg.subject[:120])

    # -- the lanes' workers ------------------------------------------------------------------------------------

    async def _run(self, lane: _Lane, key: str | None) -> None:
        try:
            while lane.queue:
                k, msg = lane.queue.popleft()
                lane.bytes -= len(msg.data)
                if key is None:
                    left = self._waiting[k] - 1
                    if left:
                        self._waiting[k] = left
                    else:
                        del self._waiting[k]
                if self.sub is not None and getattr(self.sub, "_closed", False):
                    self.drop("unsubscribed", msg)  # as nats-py discards a closed subscription's pending
                    continue
                await self.process(msg)
                await asyncio.sleep(0)  # one message per turn: every other lane and task gets the loop
        finally:
            lane.task = None
            if key is not None and not lane.queue and self._lanes.get(key) is lane:
                del self._lanes[key]

    @property
    def pending(self) -> int:
        return len(self._newcomers.queue) + sum(len(lane.queue) for lane in self._lanes.values())

    async def idle(self) -> None:
        """Wait until every lane is empty (the SIGTERM drain: messages already received are handled)."""
        while True:
            tasks = [lane.task for lane in (self._newcomers, *self._lanes.values()) if lane.task is not None]
            if not tasks:
                return
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks)
