"""Which ring each stream's latent chunks go into, and each ring's epochs (docs/scheduling.md, Many rings).

The controller keeps one block map per ring (``blockmap.<ring>``) and places each stream on one ring
(``StreamRecord.assignment.ring_id``). Ingest publishes a stream's chunks on the latent subject of its ring (only
that ring's first stage subscribes to it), clocks each chunk by its ring's current epoch, and replays a ring's
streams when that ring's map moves to a failure epoch. A stream whose ring changes (its ring was lost, or drained
for a scale-down) follows it: its credit window moves to the new ring's subject and a new warm-up segment starts
there (the liveness repair: its prepare chunk builds the stream's state on the new ring's stages).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto import DEFAULT_RING, BlockMap, StreamRecord

__all__ = ["RingEpochs", "ring_of"]


def ring_of(record: StreamRecord | None) -> str:
    """The ring a stream's chunks go into: its placement's, else the default ring (no controller, or no ring was
    live when it was placed: the controller assigns one when it appears)."""
    a = record.assignment if record is not None else None
    return a.ring_id if a is not None and a.ring_id else DEFAULT_RING


@dataclass
class RingEpochs:
    """Each ring's current block-map epoch and latest failure epoch, from the maps ingest watches."""

    epochs: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def epoch(self, ring_id: str) -> int:
        """The epoch a chunk entering ``ring_id`` now is clocked by (0: no map of it seen yet)."""
        return self.epochs.get(ring_id, 0)

    def failure(self, ring_id: str) -> int:
        """The latest failure epoch of ``ring_id``: the one its streams are replayed for."""
        return self.failures.get(ring_id, 0)

    def latest(self) -> int:
        return max(self.epochs.values(), default=0)

    def on_map(self, bm: BlockMap) -> tuple[bool, bool]:
        """Take a map: (newer than the ring's epoch, a new failure epoch of the ring: replay its streams)."""
        newer = bm.epoch > self.epoch(bm.ring_id)
        self.epochs[bm.ring_id] = bm.epoch
        failure = newer and bm.reason == "failure"
        if failure:
            self.failures[bm.ring_id] = bm.epoch
        return newer, failure
