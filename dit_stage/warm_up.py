"""A stage's throwaway stream before it serves: the first stream after start must not pay for the one-off costs.

On a GPU a stage's first forwards compile (``compile`` mode, the default there: tens of seconds at 1.3B, again for
each new input shape) and capture CUDA graphs (about a second each, rationed by ``CapturePolicy``). Without a
warm-up the first real stream pays for all of it: its first chunks come out after tens of seconds. The throwaway
stream takes those costs, then ends, so its storage and with it its graphs pass to the first real stream of the
same layout (``StatePool``), which replays them from its first micro-step.

It runs through the stage's own worker in an in-process ring (``LocalRing``), exactly as a stream's chunks would:
only a stage that holds every block can run a stream alone (the one-GPU deployment). A stage of a longer ring
still has its compiles counted as warm-ups (``Forward.warmups``), so its latency model stays right; its first
stream waits for them.
"""

from __future__ import annotations

import torch

from dit_stage.ring import LocalRing
from dit_stage.worker import StageWorker
from proto import LatentChunk
from proto.clock import ChunkClock
from proto.spec import chunk_timesteps

__all__ = ["WARM_UP_STREAM", "warm_up_stage"]

WARM_UP_STREAM = "warm-up"


def warm_up_stage(worker: StageWorker, latent_hw: tuple[int, int], steps: int, clock: ChunkClock,
                  noise_scale: float, chunks: int = 6) -> bool:
    """Run ``chunks`` chunks of a throwaway stream (random latents, a zero prompt) through ``worker`` one by one, as
    a live stream's arrive, then end it. False (nothing run) unless the worker holds every block. The worker is
    left as a new one, but for its forward's compiled pieces and graphs and its state pool: no stream, no
    measurement, no drop counted."""
    if not (worker.is_first and worker.is_last):
        return False
    cfg = worker.model.config
    ring = LocalRing([worker])
    ring.add_prompt(WARM_UP_STREAM, 0, torch.zeros(cfg.text_len, cfg.text_dim))
    dropped = worker.dropped.copy()
    g = torch.Generator().manual_seed(0)
    for c in range(chunks):
        now = worker.clock()
        ring.add_chunk(LatentChunk(
            stream_id=WARM_UP_STREAM, seed=0, fps=16.0, seq=c, epoch=worker.epoch, latent_start=clock.latent_start(c),
            rope_start=clock.rope_start(c), capture_time=now, deadline=now + 3600.0, prompt_version=0,
            noise_scale=noise_scale, timesteps=chunk_timesteps(steps, noise_scale),
            latent=torch.randn(clock.latent_frames(c), cfg.in_dim, *latent_hw, generator=g),
        ))
        ring.run()
    worker.end_stream(WARM_UP_STREAM)
    worker.forget_timing()
    worker.dropped, worker.replayed = dropped, 0
    return True
