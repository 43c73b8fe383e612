"""The micro-step loop: the worker's forwards in a thread, and where what they produce goes.

Between forwards it applies what must not race a forward (streams that ended, a failure epoch's recovery) and
notices when an online switch has completed; after each forward it sends the link messages in order, hands finished
chunks to their publishers and syncs the drop counters. At a switch point it ships the moved KV and passes the
marker on before re-linking (docs/rebalance.md). The event loop never waits for a forward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from dit_stage.epochs import StageEpochs
from dit_stage.links import NextLink
from dit_stage.membership import Action, Membership
from dit_stage.micro_step import SwitchStep
from dit_stage.outputs import Outputs
from dit_stage.telemetry import StageTelemetry
from dit_stage.tracing import StepTrace, stage_index
from dit_stage.worker import StageWorker
from services.watchdog import Watchdog

__all__ = ["ComputeLoop"]

log = logging.getLogger("rheo.dit_stage")


class ComputeLoop:
    def __init__(self, stage_id: str, epochs: StageEpochs, membership: Membership[Any],
                 feed: Callable[[list[Action]], None], link: NextLink, outputs: Outputs, telemetry: StageTelemetry,
                 streams: set[str], watchdog: Watchdog | None = None) -> None:
        self.stage_id = stage_id
        self.epochs = epochs
        self.membership = membership
        self.feed = feed
        self.link = link
        self.outputs = outputs
        self.telemetry = telemetry
        self.streams = streams  # the service's (heartbeats report them), kept equal to the worker's
        self.watchdog = watchdog  # a forward stuck past lifecycle.work_stuck_s fails the stage's /healthz
        self.recover_floor = 0  # a failure epoch to apply between forwards (worker.recover)
        self.closing = False
        self._ending: list[str] = []
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def end_stream(self, stream_id: str) -> None:
        """Free the stream between forwards."""
        self._ending.append(stream_id)
        self._wake.set()

    async def run(self) -> None:
        while not self.closing:
            self._wake.clear()
            worker = self.epochs.worker
            while self._ending and worker is not None:
                stream_id = self._ending.pop()
                worker.end_stream(stream_id)
                self.streams.discard(stream_id)
                self.outputs.end(stream_id)
            if worker is not None and worker.floor < self.recover_floor:
                reset = worker.recovered_streams
                worker.recover(self.recover_floor)
                self.telemetry.streams_reset(worker.recovered_streams - reset)
                self._sync_streams(worker)
            step = worker.take() if worker is not None else None
            switching = self.membership.switching
            if switching is not None and worker is not None and worker.change is None and worker.epoch == switching:
                self.feed(self.membership.switched(switching))  # the blocks taken over are merged: done here
            if step is None:
                await self._wake.wait()
                continue
            assert worker is not None
            if isinstance(step, SwitchStep):
                await self._switch_point(worker, step)
                continue
            traced = StepTrace(stage_index(self.epochs.block_map, self.stage_id), step)
            try:
                result = await asyncio.to_thread(self._forward(worker), step)
            except Exception as e:
                traced.forwarded(e)
                # a refused batch (e.g. inconsistent cache counters) loses only its items
                worker.dropped["compute_error"] += len(step.items)
                log.exception("stage %s: micro-step of %d items failed; dropped", self.stage_id, len(step.items))
                continue
            traced.forwarded()
            worker.measured(step, result.compute_s, result.warmup)
            self.telemetry.micro_step(step.queue_wait_s, len({m.stream_id for m in step.items}), result,
                                      worker.is_first)
            for message in result.link:
                t0 = time.perf_counter()
                with traced.sending(message):
                    await self.link.send(message)
                self.telemetry.link("send", time.perf_counter() - t0)
            for chunk in result.finished:
                self.outputs.publish(chunk)
            traced.done()
            self._sync_streams(worker)
            self.telemetry.sync_drops(worker)

    async def _switch_point(self, worker: StageWorker, step: SwitchStep) -> None:
        """This stage's last micro-step of the old epoch is done: ship the blocks it loses to their new owners,
        pass the marker on, re-link when a stage joined right after this one."""
        sw = self.epochs.switch
        try:
            result = await asyncio.to_thread(self._forward(worker), step)
        except Exception:
            log.exception("stage %s: switch to epoch %d failed; abandoned (a hard epoch must follow)", self.stage_id,
                          step.epoch)
            worker.abort_switch()
            self.feed(self.membership.failed(step.epoch))
            return
        if sw is not None:
            await sw.send_moves(self.stage_id, result.moves, self.telemetry)
        elif result.moves:
            log.error("stage %s: no links for its moved blocks", self.stage_id)
        for message in result.link:  # the marker, on the old link
            await self.link.send_marker(message)
        relink = sw.take_next() if sw is not None else None
        if relink is not None:
            self.link.hand_over(*relink)
        self._sync_streams(worker)
        self._wake.set()

    def _forward(self, worker: StageWorker) -> Callable[..., Any]:
        return worker.compute if self.watchdog is None else self.watchdog.watch("micro_step", worker.compute)

    def _sync_streams(self, worker: StageWorker) -> None:
        self.streams.clear()
        self.streams.update(worker.streams)
