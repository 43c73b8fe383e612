"""Frame pacing and shaping: source frames → model-size RGB frames on a constant-rate grid → chunks → queue.

The pacer places each source frame on the target-fps slot grid by its source timestamp, anchored to the wall
clock at the first frame: frames that land on an already-filled slot are dropped, empty slots in between are
filled by repeating the previous frame. Source timestamps, not arrival times, place frames, so network bursts
do not cause drops. A timestamp jump (reconnect, encoder reset) or frames arriving more than ``max_drift_s``
later than their anchored capture time (a stall) re-anchor the grid without dropping or duplicating anything;
capture times stay monotonic. The first anchor is late: the session's first frame waited in the socket while the
session went live (0.2–0.4 s), and the frames behind it arrive in a burst, each earlier than its anchored capture
time. ``settle`` corrects the anchor once, by the most negative lag seen (arrival − anchored capture time), when
the stream's first chunk is cut (``RtmpStream``): every capture time of the stream moves by the same amount, so
they stay uniform (the decoder stamps frames at ``capture_time + i / fps``) and nothing published goes backwards.
Afterwards a frame's capture time is at most its arrival, and late by at most the transport delay plus what of
the wait the first chunk's frames did not show (docs/latency.md). A publisher sending faster than real time is
not slowed here: the bounded chunk
queue drops the oldest chunks instead, so latency stays bounded, but never a prepare chunk while a later chunk could
go instead: without it the rest of its warm-up segment cannot run.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ingest.drops import DropReason, count_drop
from proto.clock import ChunkClock

__all__ = ["ChunkQueue", "Chunker", "FramePacer", "PacerStats", "RawChunk", "Slot"]


@dataclass
class PacerStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    duplicated: int = 0
    resyncs: int = 0


@dataclass(frozen=True)
class Slot:
    """Where a source frame goes: ``repeat_previous`` held slots, then this frame at ``index`` (or dropped)."""

    index: int
    repeat_previous: int
    keep: bool


class FramePacer:
    """Places source frames on the ``fps`` slot grid; the slot index is the output frame number."""

    def __init__(self, fps: float, max_gap_s: float = 1.0, max_drift_s: float = 2.0) -> None:
        self.fps = fps
        self.max_gap_slots = max(1, int(max_gap_s * fps))
        self.max_drift_s = max_drift_s
        self.next_slot = 0
        self.stats = PacerStats()
        self._origin_ts: float | None = None
        self._slot_base = 0
        self._anchor_wall = 0.0
        self._min_lag: float | None = None  # least arrival − anchored capture time, until ``settle``
        self.settled = False
        self.correction_s = 0.0
        """What ``settle`` moved the anchor by (≤ 0)."""

    def capture_time(self, slot: int) -> float:
        """Wall-clock capture time of an output slot."""
        return self._anchor_wall + (slot - self._slot_base) / self.fps

    def time_of(self, ts: float) -> float | None:
        """Wall-clock capture time of source timestamp ``ts`` (s) on the current anchor (None before the first
        frame): what a frame at ``ts`` gets, without the slot rounding; the audio passthrough stamps AAC with it."""
        if self._origin_ts is None:
            return None
        return self._anchor_wall + (ts - self._origin_ts)

    def resync(self) -> None:
        """Forget the timestamp origin (a new session): the next frame takes the next slot."""
        self._origin_ts = None

    def settle(self) -> float:
        """Once: move the anchor earlier by the most negative lag seen so far (module docstring); returns the shift
        (≤ 0, seconds), which the caller applies to capture times it already handed out."""
        if self.settled:
            return 0.0
        self.settled = True
        self.correction_s = min(0.0, self._min_lag or 0.0)
        self._anchor_wall += self.correction_s
        return self.correction_s

    def place(self, ts: float, now: float) -> Slot:
        self.stats.frames_in += 1
        if self._origin_ts is None:
            self._anchor(ts, now)
        # Nearest slot, ties to the earlier one; the 0.6 ms slack absorbs FLV's millisecond rounding, so a
        # 32 fps source lands exactly on every other 16 fps slot.
        slot = self._slot_base + math.ceil((ts - self._origin_ts) * self.fps - 0.5 - 0.0006 * self.fps)
        lag = now - (self._anchor_wall + (slot - self._slot_base) / self.fps)
        jumped = slot - self.next_slot > self.max_gap_slots or slot < self.next_slot - self.max_gap_slots
        if jumped or lag > self.max_drift_s:
            self.stats.resyncs += 1
            self._anchor(ts, now)
            slot = self.next_slot
        if slot < self.next_slot:
            self.stats.dropped += 1
            return Slot(slot, 0, False)
        repeats = slot - self.next_slot if self.stats.frames_out else 0
        slot = self.next_slot + repeats
        self.stats.duplicated += repeats
        self.stats.frames_out += repeats + 1
        self.next_slot = slot + 1
        if not self.settled:
            lag = now - self.capture_time(slot)
            self._min_lag = lag if self._min_lag is None else min(self._min_lag, lag)
        return Slot(slot, repeats, True)

    def _anchor(self, ts: float, now: float) -> None:
        # Capture times never go backwards, even when the old anchor ran ahead of the wall clock.
        wall = now if self.stats.frames_out == 0 else max(now, self.capture_time(self.next_slot))
        self._origin_ts = ts
        self._slot_base = self.next_slot
        self._anchor_wall = wall


@dataclass
class RawChunk:
    """One chunk of model-size input frames (in-process only: raw frames never cross the bus)."""

    stream_id: str
    seq: int
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    frame_times: list[float]  # wall-clock capture time per frame
    capture_time: float  # capture time of the chunk's last frame (when it was complete)
    deadline: float  # wall-clock time by which the output should be shown
    segment: int = 0  # warm-up segment (a `cut` prompt change starts the next)
    segment_start: int = 0  # seq of the segment's prepare chunk

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def prepares(self) -> bool:
        """The prepare chunk of its segment (5 frames): the DiT cannot run the segment's other chunks without it."""
        return self.seq == self.segment_start


class Chunker:
    """Groups paced frames into chunks whose sizes come from the one chunk clock (``proto.clock``).

    ``seq``/``segment``: the session's first chunk (a new session of a stream continues above every seq and segment
    its earlier sessions published: the stream record's reservation, docs/ingest-service.md)."""

    def __init__(self, stream_id: str, clock: ChunkClock, latency_budget_s: float, seq: int = 0,
                 segment: int = 0) -> None:
        self.stream_id = stream_id
        self.clock = clock
        self.latency_budget_s = latency_budget_s
        self.seq = seq
        self.segment = segment
        self.segment_start = seq
        self._frames: list[np.ndarray] = []
        self._times: list[float] = []

    def cut(self) -> int:
        """Start a new warm-up segment with the next chunk (a prepare chunk: ``clock.input_frames(0)`` frames,
        those already gathered included); returns its seq. Seqs keep counting across segments. Before the
        current segment's first chunk there is nothing to cut: that chunk is the one returned."""
        if self.seq > self.segment_start:
            self.segment += 1
            self.segment_start = self.seq
        return self.seq

    def completes_chunk(self) -> bool:
        """The next ``push`` cuts a chunk."""
        return len(self._frames) + 1 >= self.clock.input_frames(self.seq - self.segment_start)

    def shift(self, seconds: float) -> None:
        """Move the capture times of the frames gathered so far (the pacer's one anchor correction)."""
        self._times = [t + seconds for t in self._times]

    def push(self, frame: np.ndarray, capture_time: float) -> RawChunk | None:
        self._frames.append(frame)
        self._times.append(capture_time)
        if len(self._frames) < self.clock.input_frames(self.seq - self.segment_start):
            return None
        chunk = RawChunk(
            stream_id=self.stream_id,
            seq=self.seq,
            frames=np.stack(self._frames),
            frame_times=self._times,
            capture_time=capture_time,
            deadline=capture_time + self.latency_budget_s,
            segment=self.segment,
            segment_start=self.segment_start,
        )
        self.seq += 1
        self._frames, self._times = [], []
        return chunk


@dataclass
class QueueStats:
    put: int = 0
    got: int = 0
    dropped: int = 0


DropHook = Callable[[DropReason, RawChunk], None]


class ChunkQueue:
    """Bounded per-stream queue, so latency stays bounded: a full queue drops its oldest chunk that is not a prepare
    chunk (a lost prepare chunk costs its whole segment, any other chunk 4 frames the decoder covers by repeating);
    a queue of nothing but prepare chunks drops the newcomer instead, or its oldest when that is one too. Every
    drop goes to ``on_drop`` (reason, chunk): the metric alone until the stream's ``IngestStream`` takes the queue
    over (``IngestStream.attach``)."""

    def __init__(self, depth: int, on_drop: DropHook | None = None) -> None:
        self.depth = depth
        self.stats = QueueStats()
        self.on_drop: DropHook = on_drop or (lambda reason, _chunk: count_drop(reason))
        self._items: collections.deque[RawChunk] = collections.deque()
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, chunk: RawChunk) -> None:
        if self._closed:  # the stream could not go live (a normal end detaches the publisher first)
            self.stats.dropped += 1
            self.on_drop("not_live", chunk)
            return
        if len(self._items) >= self.depth:
            at = next((i for i, c in enumerate(self._items) if not c.prepares), None)
            if at is None and not chunk.prepares:  # nothing but prepare chunks queued: the newcomer goes
                self.stats.dropped += 1
                self.on_drop("queue_overflow", chunk)
                return
            victim = self._items[at or 0]
            del self._items[at or 0]
            self.stats.dropped += 1
            self.on_drop("queue_overflow", victim)
        self._items.append(chunk)
        self.stats.put += 1
        self._ready.set()

    def close(self) -> None:
        """No more chunks will come; ``get`` returns None once the queue is drained."""
        self._closed = True
        self._ready.set()

    async def get(self) -> RawChunk | None:
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        self.stats.got += 1
        return self._items.popleft()
