"""What reaches a stage's worker, and what is kept from it: latent chunks and prompts (first stage), link frames.

Each input goes to the worker only in the role it fits (a first stage takes chunks, prompts and ring returns; the
others take micro-steps, switch markers and prompt embeddings from upstream; every stage takes KV moves addressed to
it); anything else is counted and dropped. Inputs of an epoch whose block map has not applied here yet are held by
the membership until it has (docs/recovery.md, Ordering and races).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import torch

from dit_stage.epochs import StageEpochs
from dit_stage.lookups import StreamLookups
from dit_stage.membership import Membership
from dit_stage.telemetry import StageTelemetry
from proto import (
    EpochSwitch,
    LatentChunk,
    PromptUpdate,
    RingReturn,
    ShardMove,
    ShardMoveEnd,
    StageItems,
    StagePrompt,
)
from services.link import LinkListener
from services.link_staging import LinkStaging

__all__ = ["Input", "StageInputs"]

log = logging.getLogger("rheo.dit_stage")

Input = LatentChunk | StageItems | RingReturn


class StageInputs:
    def __init__(self, stage_id: str, epochs: StageEpochs, membership: Membership[Input], lookups: StreamLookups,
                 telemetry: StageTelemetry, streams: set[str], wake: Callable[[], None],
                 on_unprepared: Callable[[str], None] = lambda _sid: None) -> None:
        self.stage_id = stage_id
        self.epochs = epochs
        self.membership = membership
        self.lookups = lookups
        self.telemetry = telemetry
        self.streams = streams  # the service's: a stream counts from its first admitted chunk
        self.wake = wake  # the micro-step loop has something new
        self.on_unprepared = on_unprepared  # a stream's chunk refused for want of a prepare chunk: ask for one
        self.malformed_link = 0
        self.ignored_prompts = 0

    async def admit(self, epoch: int) -> None:
        """The map of ``epoch`` applied here: offer every held input again."""
        for msg in self.membership.release(epoch):
            if isinstance(msg, LatentChunk):
                await self.on_latent(msg, None)
            else:
                self.take_link(msg)

    def _hold(self, msg: Input) -> None:
        dropped = self.membership.hold(msg)
        if dropped:
            self.telemetry.drop("early_overflow", dropped)

    async def on_latent(self, chunk: LatentChunk, _raw: object) -> None:
        if not self.membership.admits(chunk.epoch):
            self._hold(chunk)
            return
        worker = self.epochs.worker
        if worker is None or not worker.is_first:
            if worker is None:
                self.telemetry.drop("no_block_map")
            return
        for version in sorted({chunk.prompt_version, chunk.blend_from} - {None}):
            if version not in worker.prompts.get(chunk.stream_id, {}):
                embedding = await self.lookups.prompt(chunk.stream_id, version)
                if embedding is not None:
                    worker.add_prompt(chunk.stream_id, version, embedding)
        unprepared = worker.dropped["unprepared"]
        if worker.add_chunk(chunk):
            self.streams.add(chunk.stream_id)
            self.wake()
        elif worker.dropped["unprepared"] > unprepared:
            self.on_unprepared(chunk.stream_id)

    async def on_prompt(self, update: PromptUpdate, _raw: object) -> None:
        worker = self.epochs.worker
        if worker is None or not worker.is_first:
            return
        if update.embedding is None:  # the gateway's request; ingest republishes it encoded
            self.ignored_prompts += 1
            return
        if worker.add_prompt(update.stream_id, update.version, update.embedding):
            self.wake()

    async def receive(self, listener: LinkListener) -> None:
        """Drain the link listener for ever (a stage that stopped reading could deadlock the ring)."""
        while True:
            frame = await listener.recv()
            with frame:
                msg = frame.message
                self.telemetry.link("recv", frame.recv_seconds)
                worker = self.epochs.worker
                if worker is None:
                    self.telemetry.drop("no_block_map")
                    continue
                # CUDA: straight to the device (else None); a frame from this process holds its own tensors
                staging = None if frame.local else LinkStaging.for_device(worker.model.device)
                if isinstance(msg, StageItems) and not worker.is_first and _consistent(msg):
                    if staging is not None:
                        msg.hidden, msg.noisy = await asyncio.to_thread(staging.to_device, [msg.hidden, msg.noisy])
                    elif not frame.local:
                        msg.hidden, msg.noisy = msg.hidden.clone(), msg.noisy.clone()  # the buffer goes back
                    self.take_link(msg)
                elif isinstance(msg, EpochSwitch) and not worker.is_first:
                    worker.add_items(msg)
                elif isinstance(msg, ShardMove | ShardMoveEnd) and msg.target == self.stage_id:
                    if isinstance(msg, ShardMove):  # off the pool buffer, onto the device, off the event loop
                        msg.tensors = await asyncio.to_thread(_to_device, msg.tensors, worker.model.device)
                        self.telemetry.moved("in", frame.nbytes)
                    worker.add_shard_move(msg)
                elif isinstance(msg, RingReturn) and worker.is_first and msg.latents.shape[0] == len(msg.items):
                    if staging is not None:  # the first stage keeps returned items on the device
                        (msg.latents,) = await asyncio.to_thread(staging.to_device, [msg.latents])
                    elif not frame.local:
                        msg.latents = msg.latents.clone()
                    self.take_link(msg)
                elif isinstance(msg, StagePrompt) and not worker.is_first:
                    worker.add_prompt(msg.stream_id, msg.version, msg.embedding)
                else:
                    self.malformed_link += 1
                    self.telemetry.drop("bad_link_frame")
                    log.warning("stage %s: unexpected %s on the tensor link from %s; dropped", self.stage_id,
                                type(msg).__name__, frame.peer)
                    continue
            self.wake()

    def take_link(self, msg: StageItems | RingReturn) -> None:
        """Hand ring traffic to the worker, or hold it while its epoch's block map has not reached this stage."""
        worker = self.epochs.worker
        if not self.membership.admits(msg.epoch):
            self._hold(msg)
        elif worker is None:
            self.telemetry.drop("no_block_map")
        elif isinstance(msg, StageItems) and not worker.is_first:
            worker.add_items(msg)
        elif isinstance(msg, RingReturn) and worker.is_first:
            worker.add_return(msg)
        else:
            self.telemetry.drop("wrong_role")  # the map moved while it was held


def _to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copies, complete on return: the frame (its buffer, or the sender's memory on a CUDA IPC link) is released
    right after."""
    out = {k: t.to(device, copy=True) for k, t in tensors.items()}
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return out


def _consistent(msg: StageItems) -> bool:
    """One row per item and one grid for the micro-step (anything else is a broken peer)."""
    n = len(msg.items)
    if n == 0 or msg.hidden.dim() != 3 or msg.noisy.dim() != 5:
        return False
    return msg.hidden.shape[0] == n and msg.noisy.shape[0] == n and len({m.frames for m in msg.items}) == 1
