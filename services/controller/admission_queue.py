"""Queued admission (``controller.admission_queue``): a stream refused for capacity waits its turn instead.

Pure (no I/O): the controller asks ``verdict`` with its admission decision each time a stream asks to start (its
ingest asks again every ``QUEUE_POLL_S`` while it waits; the answer past ``max_wait_s`` is the refusal) and calls
``expire`` every tick (streams nobody asks for any more). First come, first served:
a stream that fits is admitted only when no earlier stream waits (else a later small stream could overtake a
waiting large one for ever), and joins the tail otherwise. A stream leaves the queue admitted, refused after
``max_wait_s`` (with the reason it last waited for), or abandoned when its ingest stopped asking (the publisher
left); the queue holds at most ``max_streams``. Only capacity refusals queue: a stream too slow for its own
latency SLO would wait for nothing. docs/scheduling.md ("Queued admission") states the rules.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

__all__ = ["QUEUE_POLL_S", "AdmissionQueue", "QueueVerdict", "Waiting", "queueable"]

QUEUE_POLL_S = 1.0
"""How often a waiting stream's ingest asks again (``ingest.admission.ask_admission``)."""

ABANDONED_AFTER_POLLS = 5
"""A waiting stream whose ingest has not asked for this many polls is gone (its publisher left)."""


def queueable(reason: str) -> bool:
    """Whether a refusal is one waiting can cure: no capacity now (the path's or a member's)."""
    return reason.startswith("no capacity")


@dataclass
class Waiting:
    stream_id: str
    since: float
    asked: float
    reason: str


@dataclass(frozen=True)
class QueueVerdict:
    state: Literal["admit", "queued", "refuse"]
    message: str = ""
    position: int = 0


class AdmissionQueue:
    def __init__(self, max_wait_s: float, max_streams: int) -> None:
        self.max_wait_s, self.max_streams = max_wait_s, max_streams
        self.waiting: OrderedDict[str, Waiting] = OrderedDict()

    def position(self, stream_id: str) -> int | None:
        """1 for the head; None when not waiting."""
        for i, sid in enumerate(self.waiting, 1):
            if sid == stream_id:
                return i
        return None

    def verdict(self, stream_id: str, fits: bool, reason: str, now: float) -> QueueVerdict:
        """What to answer a stream that asks to start, given whether it fits now (and if not, why)."""
        w = self.waiting.get(stream_id)
        if not fits and not queueable(reason):
            self.waiting.pop(stream_id, None)
            return QueueVerdict("refuse", reason)
        if w is not None and now - w.since > self.max_wait_s:
            del self.waiting[stream_id]
            return QueueVerdict("refuse", self._expired(w, reason if not fits else w.reason))
        ahead = [sid for sid in self.waiting if sid != stream_id]
        if w is not None:
            ahead = ahead[: list(self.waiting).index(stream_id)]
        if fits and not ahead:
            self.waiting.pop(stream_id, None)
            return QueueVerdict("admit")
        why = reason if not fits else f"{len(ahead)} stream{'s' if len(ahead) != 1 else ''} waiting before it"
        if w is None:
            if len(self.waiting) >= self.max_streams:
                return QueueVerdict("refuse", f"no capacity, and the admission queue is full ({self.max_streams} "
                                              f"streams wait): {why}")
            w = self.waiting[stream_id] = Waiting(stream_id, now, now, why)
        w.asked, w.reason = now, why
        pos = len(ahead) + 1
        return QueueVerdict("queued", f"queued: position {pos} of {len(self.waiting)}, waiting {now - w.since:.0f} s "
                                      f"of at most {self.max_wait_s:.0f} s for capacity: {why}", pos)

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Remove the streams whose ingest stopped asking (the publisher left): (stream, refusal message) each. One
        that waited past ``max_wait_s`` and still asks is refused at its next ask, with the reason (a poll away)."""
        out: list[tuple[str, str]] = []
        for sid, w in list(self.waiting.items()):
            if now - w.asked > ABANDONED_AFTER_POLLS * QUEUE_POLL_S:
                out.append((sid, f"left the admission queue: nothing asked for it for {now - w.asked:.0f} s (the "
                                 "publisher went away)"))
                del self.waiting[sid]
        return out

    def remove(self, stream_id: str) -> bool:
        return self.waiting.pop(stream_id, None) is not None

    def _expired(self, w: Waiting, reason: str) -> str:
        return f"no capacity after waiting {self.max_wait_s:.0f} s in the admission queue: {reason}"
