"""What a DiT stage reports: its Prometheus metrics and the ``StageStats`` windows the controller's balancer reads.

Running sums (``Totals``) are kept per micro-step; a stats window is the difference of two snapshots, so the
publisher never resets what Prometheus also counts (docs/rebalance.md, Telemetry).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

import torch
from prometheus_client import Counter, Gauge, Histogram

from dit_stage.micro_step import StageOutput
from dit_stage.worker import StageWorker
from proto import LatencyFit, StageStats

__all__ = ["DROPPED", "LINK_TIME", "MOVED_BYTES", "StageTelemetry", "Totals", "free_memory"]

LATE_REASONS = ("deadline_infeasible", "queue_full")
"""Drop reasons that mean an item missed its deadline (the autoscaler's fast loop counts them)."""
_MS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
DROPPED = Counter("rheo_dit_stage_dropped_total", "items or messages a DiT stage dropped", ["stage", "reason"])
REPREPARE = Counter("rheo_dit_stage_reprepare_requests_total", "streams the first stage asked a new segment for "
                    "(their chunks refused for want of a prepare chunk)", ["stage"])
MICRO_STEPS = Counter("rheo_dit_stage_micro_steps_total", "micro-steps a DiT stage ran", ["stage"])
WARMUP_STEPS = Counter("rheo_dit_stage_warmup_steps_total", "micro-steps that captured a CUDA graph or compiled "
                       "first (left out of the compute, block and batch figures: their time is a one-off cost)",
                       ["stage"])
WARMUP_SECONDS = Counter("rheo_dit_stage_warmup_seconds_total", "time of the warm-up micro-steps", ["stage"])
COMPUTE = Histogram("rheo_dit_stage_compute_seconds", "compute time of one micro-step", ["stage"], buckets=_MS)
BLOCK_COMPUTE = Histogram("rheo_dit_stage_block_seconds", "compute time of one block in one micro-step (CUDA events "
                          "on GPU, wall clock on CPU)", ["stage", "block"], buckets=_MS)
EXTRA_COMPUTE = Histogram("rheo_dit_stage_extra_seconds", "non-block compute of one micro-step (patch embed, time "
                          "embedding, head, x0)", ["stage"], buckets=_MS)
QUEUE_WAIT = Histogram("rheo_dit_stage_queue_wait_seconds", "mean wait of a micro-step's items at the first stage",
                       ["stage"], buckets=_MS)
LINK_TIME = Histogram("rheo_dit_stage_link_seconds", "time to hand one tensor-link frame to the link (send) or to "
                      "read it from the socket (recv)", ["stage", "direction"], buckets=_MS)
BATCH_ITEMS = Histogram("rheo_dit_stage_batch_items", "items in one micro-step", ["stage"],
                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
BATCH_STREAMS = Histogram("rheo_dit_stage_batch_streams", "streams in one micro-step", ["stage"],
                          buckets=(1, 2, 3, 4, 6, 8, 12, 16))
# no stream label: stream ids are not metric labels (bounded series; the per-stream split goes to the controller in
# StageStats.kv_bytes, over the authenticated bus)
KV_BYTES = Gauge("rheo_dit_stage_kv_bytes", "KV-cache bytes a stage holds, all its streams together", ["stage"])
POOLED_BYTES = Gauge("rheo_dit_stage_pooled_state_bytes", "ended streams' state storage a stage keeps for new ones "
                     "(StatePool: their CUDA graphs replay)", ["stage"])
KV_STREAMS = Gauge("rheo_dit_stage_kv_streams", "streams a stage holds KV cache for", ["stage"])
FREE_MEMORY = Gauge("rheo_dit_stage_free_memory_bytes", "free memory of the stage's device", ["stage"])
EPOCH = Gauge("rheo_dit_stage_epoch", "block-map epoch the stage runs", ["stage"])
SWITCHES = Counter("rheo_dit_stage_epoch_switches_total", "block-map epoch switches", ["stage", "kind"])
MOVED_BYTES = Counter("rheo_dit_stage_shard_move_bytes_total", "KV-shard bytes moved at online switches",
                      ["stage", "direction"])
STREAMS_RESET = Counter("rheo_dit_stage_streams_reset_total",
                        "streams whose state a failure epoch discarded (ingest replays them)", ["stage"])
REPLAYED = Counter("rheo_dit_stage_replayed_chunks_total", "replayed chunks finished, not published", ["stage"])
FINISHED = Counter("rheo_dit_stage_finished_chunks_total", "x0 chunks published by the last stage", ["stage"])


@dataclass
class Totals:
    """Running sums for the stats subject (a window's values are the difference of two snapshots)."""

    micro_steps: int = 0
    items: int = 0
    compute_s: float = 0.0
    queue_wait_s: float = 0.0
    link_send_s: float = 0.0
    link_recv_s: float = 0.0
    extra_s: float = 0.0
    block_s: dict[int, float] = field(default_factory=dict)
    block_steps: dict[int, int] = field(default_factory=dict)

    def snapshot(self) -> Totals:
        return Totals(**(vars(self) | {"block_s": dict(self.block_s), "block_steps": dict(self.block_steps)}))

    def minus(self, last: Totals) -> Totals:
        scalars = {f: getattr(self, f) - getattr(last, f) for f in Totals.__dataclass_fields__
                   if f not in ("block_s", "block_steps")}
        return Totals(**scalars,
                      block_s={b: v - last.block_s.get(b, 0.0) for b, v in self.block_s.items()},
                      block_steps={b: n - last.block_steps.get(b, 0) for b, n in self.block_steps.items()})


class StageTelemetry:
    """One stage's counters: fed per micro-step and per link frame, read as Prometheus metrics and stats windows."""

    def __init__(self, stage_id: str) -> None:
        self.stage_id = stage_id
        self.totals = Totals()
        self._last = Totals()
        self._reported: collections.Counter[str] = collections.Counter()
        self._late_reported = 0

    def drop(self, reason: str, n: int = 1) -> None:
        DROPPED.labels(stage=self.stage_id, reason=reason).inc(n)

    def reprepare_asked(self) -> None:
        REPREPARE.labels(stage=self.stage_id).inc()

    def switched(self, kind: str, epoch: int) -> None:
        """A block-map epoch switch (``hard`` or ``online``) completed here."""
        SWITCHES.labels(stage=self.stage_id, kind=kind).inc()
        EPOCH.labels(stage=self.stage_id).set(epoch)

    def moved(self, direction: str, nbytes: int) -> None:
        MOVED_BYTES.labels(stage=self.stage_id, direction=direction).inc(nbytes)

    def streams_reset(self, n: int) -> None:
        STREAMS_RESET.labels(stage=self.stage_id).inc(n)

    def finished(self) -> None:
        FINISHED.labels(stage=self.stage_id).inc()

    def link(self, direction: str, seconds: float) -> None:
        if direction == "send":
            self.totals.link_send_s += seconds
        else:
            self.totals.link_recv_s += seconds
        LINK_TIME.labels(stage=self.stage_id, direction=direction).observe(seconds)

    def micro_step(self, queue_wait_s: float, streams: int, result: StageOutput, first: bool) -> None:
        stage = self.stage_id
        if result.warmup:
            WARMUP_STEPS.labels(stage=stage).inc()
            WARMUP_SECONDS.labels(stage=stage).inc(result.compute_s)
            REPLAYED.labels(stage=stage).inc(result.replayed)
            return
        t = self.totals
        t.micro_steps += 1
        t.items += result.items
        t.compute_s += result.compute_s
        t.queue_wait_s += queue_wait_s * result.items
        MICRO_STEPS.labels(stage=stage).inc()
        COMPUTE.labels(stage=stage).observe(result.compute_s)
        BATCH_ITEMS.labels(stage=stage).observe(result.items)
        BATCH_STREAMS.labels(stage=stage).observe(streams)
        if first:
            QUEUE_WAIT.labels(stage=stage).observe(queue_wait_s)
        if result.times is not None:
            t.extra_s += result.times.extra
            EXTRA_COMPUTE.labels(stage=stage).observe(result.times.extra)
            for b, sec in result.times.blocks.items():
                t.block_s[b] = t.block_s.get(b, 0.0) + sec
                t.block_steps[b] = t.block_steps.get(b, 0) + 1
                BLOCK_COMPUTE.labels(stage=stage, block=str(b)).observe(sec)
        REPLAYED.labels(stage=stage).inc(result.replayed)

    def sync_drops(self, worker: StageWorker) -> None:
        """The worker counts its own drops; Prometheus gets what it has not seen yet."""
        for reason, n in worker.dropped.items():
            delta = n - self._reported[reason]
            if delta > 0:
                self.drop(reason, delta)
                self._reported[reason] = n

    def window(self, worker: StageWorker, interval_s: float) -> StageStats | None:
        """The stats of the window since the last call (None: the shards are being split; try the next one)."""
        self.sync_drops(worker)
        d = self.totals.minus(self._last)
        self._last = self.totals.snapshot()
        steps = max(d.micro_steps, 1)
        a, b = worker.model.block_range
        try:
            kv_bytes = worker.kv_bytes()
        except RuntimeError:  # a switch point is splitting the shards in the compute thread: next window
            return None
        free = free_memory(worker.model.device)
        self._export_gauges(kv_bytes, free)
        POOLED_BYTES.labels(stage=self.stage_id).set(worker.storage.nbytes())
        late = sum(worker.dropped.get(r, 0) for r in LATE_REASONS)
        late_items, self._late_reported = late - self._late_reported, late
        return StageStats(
            stage_id=self.stage_id, epoch=worker.epoch, block_start=a, block_end=b, window_s=interval_s,
            # forwards that ran every owned block: 0 when the window holds no complete measurement (only empty
            # steps, or the blocks of a range this stage has just taken over), which consumers then ignore
            micro_steps=min((d.block_steps.get(i, 0) for i in range(a, b)), default=0),
            block_ms=[1000 * d.block_s.get(i, 0.0) / max(d.block_steps.get(i, 0), 1) for i in range(a, b)],
            extra_ms=1000 * d.extra_s / steps,
            queue_wait_ms=1000 * d.queue_wait_s / max(d.items, 1), link_send_ms=1000 * d.link_send_s / steps,
            link_recv_ms=1000 * d.link_recv_s / steps, batch_items=d.items / steps,
            kv_bytes=kv_bytes, free_memory_bytes=free, items=d.items, late_items=late_items,
            latency_fits=[LatencyFit(grid=list(sig), a_ms=1000 * a, b_ms=1000 * b, items=n)  # type: ignore[arg-type]
                          for sig, a, b, n in worker.latency.fits()],
        )

    def _export_gauges(self, kv_bytes: dict[str, int], free: int) -> None:
        KV_BYTES.labels(stage=self.stage_id).set(sum(kv_bytes.values()))
        KV_STREAMS.labels(stage=self.stage_id).set(len(kv_bytes))
        FREE_MEMORY.labels(stage=self.stage_id).set(free)


def free_memory(device: torch.device) -> int:
    """Free memory of the stage's device: the GPU's, or the host's available memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
