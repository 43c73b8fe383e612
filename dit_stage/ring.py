"""The stream-batch ring in one process: N ``StageWorker``s wired first → … → last → first without a network.

This is the in-process transport of the one engine. The stage service moves the same workers' messages over NATS
and the tensor link (``dit_stage/service.py``); ``LocalRing`` hands them from one worker to the next directly (or,
with ``wire=True``, through ``encode``/``decode`` exactly as on the wire). ``StreamPipeline`` and ``rheo run`` drive
it; the ring mechanism itself — admission, slots, prompt versions, drops — is only ever ``StageWorker``'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from dit_stage.micro_step import StageOutput
from dit_stage.worker import StageWorker
from proto import LatentChunk, Message, RingReturn, StageItems, StagePrompt, decode

__all__ = ["LocalRing", "RingStalled"]


class RingStalled(RuntimeError):
    """The ring ran more micro-steps than any finite input can need (a bug, never a normal state)."""


class LocalRing:
    """Stage workers over contiguous block ranges covering the model, driven in-process until idle."""

    def __init__(self, workers: Sequence[StageWorker], *, wire: bool = False, max_micro_steps: int = 100_000) -> None:
        if not workers or not workers[0].is_first or not workers[-1].is_last:
            raise ValueError("the workers must start at block 0 and end at the head")
        for a, b in itertools.pairwise(workers):
            if a.model.block_range[1] != b.model.block_range[0]:
                raise ValueError(f"stages {a.model.block_range} and {b.model.block_range} are not contiguous")
        self.workers = list(workers)
        self.wire = wire
        self.max_micro_steps = max_micro_steps
        self.micro_steps = 0

    @property
    def first(self) -> StageWorker:
        return self.workers[0]

    def add_prompt(self, stream_id: str, version: int, embedding) -> None:
        if not self.first.add_prompt(stream_id, version, embedding):
            raise ValueError(f"prompt embedding {tuple(embedding.shape)} does not fit the DiT")

    def add_chunk(self, chunk: LatentChunk) -> None:
        """Queue a chunk at the first stage; a refusal (counted by the worker) raises with its reason."""
        before = self.first.dropped.copy()
        if not self.first.add_chunk(chunk):
            reason = next(iter(self.first.dropped - before), "refused")
            raise ValueError(f"chunk {chunk.stream_id}/{chunk.seq} refused: {reason}")

    def run(self) -> list[LatentChunk]:
        """Run micro-steps until no stage has anything to run; returns the finished chunks in the order the last
        stage finished them."""
        finished: list[LatentChunk] = []
        while True:
            progressed = False
            for i, worker in enumerate(self.workers):
                step = worker.take()
                while step is not None:
                    progressed = True
                    self.micro_steps += 1
                    if self.micro_steps > self.max_micro_steps:
                        raise RingStalled(f"more than {self.max_micro_steps} micro-steps")
                    self._deliver(i, worker.compute(step), finished)
                    step = worker.take() if i else None  # the first stage forms one micro-step per pass
            if not progressed:
                return finished

    def end_stream(self, stream_id: str) -> None:
        for worker in self.workers:
            worker.end_stream(stream_id)

    def _deliver(self, i: int, out: StageOutput, finished: list[LatentChunk]) -> None:
        if out.moves:
            raise RuntimeError("an in-process ring has one block map: no KV moves")
        finished.extend(self._carry(c) for c in out.finished)
        nxt = self.workers[(i + 1) % len(self.workers)]
        for msg in out.link:
            msg = self._carry(msg)
            if isinstance(msg, StagePrompt):
                nxt.add_prompt(msg.stream_id, msg.version, msg.embedding)
            elif isinstance(msg, StageItems):
                nxt.add_items(msg)
            elif isinstance(msg, RingReturn):
                nxt.add_return(msg)
            else:
                raise TypeError(f"unexpected link message {type(msg).__name__}")

    def _carry(self, msg: Message) -> Message:
        return decode(msg.encode(), type(msg)) if self.wire else msg
