"""Shared inputs of the DiT-stage tests: chunks, prompts, the single-process reference and an in-process ring."""

from __future__ import annotations

import time

import torch

from dit_stage.micro_step import MicroStep
from dit_stage.model import CausalWanDiT, make_tiny_dit
from dit_stage.stage_model import slice_stage
from dit_stage.tracing import StepTrace
from dit_stage.worker import StageWorker
from oracle.stream_batch import StreamBatchConfig, StreamBatchRunner
from proto import LatentChunk, RingReturn, StageItems, StagePrompt, decode

NUM_BLOCKS = 3
WEIGHT_SEED = 0
NOISE_SCALE = 0.7
# a high adaptive threshold makes sink replacements frequent and different per block and slot; t_refresh small
# enough that RoPE restarts inside the run
CONFIG = StreamBatchConfig(steps=2, noise_scale=NOISE_SCALE, kv_window=5, sink=2, adaptive_threshold=0.97,
                           t_refresh=6)
SPLITS = {1: [(0, 3)], 2: [(0, 2), (2, 3)], 3: [(0, 1), (1, 2), (2, 3)]}


def full_model(num_blocks: int = NUM_BLOCKS) -> CausalWanDiT:
    return make_tiny_dit(WEIGHT_SEED, num_blocks, torch.float32)


def stage_models(n: int) -> list[CausalWanDiT]:
    full = full_model()
    return [slice_stage(full, r) for r in SPLITS[n]]


def latents(seed: int, n: int, hw: tuple[int, int]) -> list[torch.Tensor]:
    """Encoded input chunks [1, C, F, H, W]: chunk 0 has 2 latent frames, the others 1."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 2 if c == 0 else 1, *hw, generator=g) for c in range(n)]


def prompt(seed: int) -> torch.Tensor:
    """A prompt embedding [L, D] (shorter than text_len: the stages pad it as Wan does)."""
    return torch.randn(12, 32, generator=torch.Generator().manual_seed(1000 + seed))


def chunk_message(stream_id: str, c: int, z: torch.Tensor, *, seed: int = 0, epoch: int = 0,
                  deadline: float | None = None, prompt_version: int = 0,
                  config: StreamBatchConfig = CONFIG) -> LatentChunk:
    clock = config.clock()
    now = time.time()
    return LatentChunk(
        stream_id=stream_id, seed=seed, fps=16.0, seq=c, epoch=epoch, latent_start=clock.latent_start(c),
        rope_start=clock.rope_start(c),
        capture_time=now, deadline=now + 600 if deadline is None else deadline, prompt_version=prompt_version,
        noise_scale=config.noise_scale,
        timesteps=[config.first_timestep(config.noise_scale), *config.timesteps[1:]],
        latent=z[0].permute(1, 0, 2, 3).contiguous(),
    )


def reference(streams: dict[str, tuple[int, torch.Tensor, list[torch.Tensor]]],
              config: StreamBatchConfig = CONFIG, num_blocks: int = NUM_BLOCKS) -> dict[str, list[torch.Tensor]]:
    """StreamBatchRunner's finished chunks per stream ({id: (seed, prompt, latents)}), all streams side by side."""
    runner = StreamBatchRunner([full_model(num_blocks)], config)
    out: dict[str, list[torch.Tensor]] = {s: [] for s in streams}
    for s, (seed, ctx, zs) in streams.items():
        runner.open_stream(s, seed, ctx[None], zs[0].shape[-2:])
        out[s].append(runner.prepare(s, zs[0], config.noise_scale))
    n = max(len(zs) for _, _, zs in streams.values())
    for c in range(1, n):
        res = runner.step({s: (zs[c], config.noise_scale) for s, (_, _, zs) in streams.items() if c < len(zs)})
        for s, x0 in res.items():
            if x0 is not None:
                out[s].append(x0)
    return out


def as_chunk_latent(x0: torch.Tensor) -> torch.Tensor:
    """A runner output [1, C, F, H, W] as a LatentChunk latent [F, C, H, W]."""
    return x0[0].permute(1, 0, 2, 3)


def workers(n: int, config: StreamBatchConfig = CONFIG, **kw) -> list[StageWorker]:
    opts = {"window": config.kv_window, "sink": config.sink, "adaptive_threshold": config.adaptive_threshold,
            "max_queued_chunks": 64} | kw
    return [StageWorker(m, **opts) for m in stage_models(n)]


def run_ring(ring: list[StageWorker], max_rounds: int = 10_000) -> list[LatentChunk]:
    """Drive in-process workers until idle; every link message goes through encode → decode like on the wire, and
    every micro-step is traced as the stage service's loop traces it (``StepTrace``)."""
    finished: list[LatentChunk] = []
    for _ in range(max_rounds):
        progressed = False
        for i, w in enumerate(ring):
            step = w.take()
            if step is None:
                continue
            progressed = True
            traced = StepTrace(i, step) if isinstance(step, MicroStep) else None
            out = w.compute(step)
            if traced is not None:
                traced.forwarded()
            finished.extend(decode(c.encode(), LatentChunk) for c in out.finished)
            nxt = ring[(i + 1) % len(ring)]
            for msg in out.link:
                if traced is not None:
                    with traced.sending(msg):
                        wire = decode(msg.encode())
                else:
                    wire = decode(msg.encode())
                if isinstance(wire, StagePrompt):
                    nxt.add_prompt(wire.stream_id, wire.version, wire.embedding)
                elif isinstance(wire, StageItems):
                    nxt.add_items(wire)
                else:
                    assert isinstance(wire, RingReturn)
                    nxt.add_return(wire)
        if not progressed:
            return finished
    raise AssertionError("ring did not go idle")
