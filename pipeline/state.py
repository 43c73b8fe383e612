"""Per-stream state of the single-process pipeline outside the DiT ring: one object, serialisable and movable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from encoder.motion import MotionNoiseState
from encoder.vae import StreamVAEState
from proto.clock import ChunkClock, segment_seed

__all__ = ["PromptBlend", "StreamSpec", "StreamState", "segment_seed"]


@dataclass(frozen=True)
class StreamSpec:
    """What a stream is opened with. ``t2v``: no input video, the pipeline generates from the prompt."""

    prompt: str
    seed: int = 0
    t2v: bool = False
    stream_id: str | None = None
    fps: float = 16.0
    """The stream's frame rate: stamped on its chunks (the services' decoder paces by it; offline it is a label)."""


@dataclass
class PromptBlend:
    """A `blend` prompt change in progress: chunk j (1-based) after the change uses lerp(source, target, j/total).
    The chunks carry it as (prompt version, ``source_version``, j/total); the stages compute the same lerp."""

    source: torch.Tensor
    target: torch.Tensor
    total: int
    done: int = 0
    source_version: int = 0

    def advance(self) -> tuple[torch.Tensor, float]:
        """The embedding for the next chunk and its weight of the target (1.0: the blend is complete)."""
        self.done += 1
        if self.done >= self.total:
            return self.target, 1.0
        alpha = self.done / self.total
        return torch.lerp(self.source, self.target, alpha), alpha


@dataclass(eq=False)
class StreamState:
    """Everything the pipeline keeps for one stream outside the DiT ring (the ring's stage workers hold its KV
    shards, prompt versions and slot queues; ``StreamPipeline.save_stream`` moves both together).

    ``vae`` the Stream-VAE caches; ``motion`` the noise EMA; ``context`` the prompt embedding applied now (mid-blend:
    the interpolated one); ``pending`` the input frames not yet making up a whole chunk ([1, 3, T, H, W] in
    [-1, 1]); ``seq`` the next chunk's sequence number over the stream's life, ``segment_start`` the seq of the
    current segment's prepare chunk, ``out_seq`` the next chunk expected back from the ring.
    """

    stream_id: str
    seed: int
    t2v: bool
    fps: float
    clock: ChunkClock
    vae: StreamVAEState
    motion: MotionNoiseState
    steps: int
    """Denoising steps of the current segment (a change starts a new one)."""
    noise_scale: float
    """s_init of the stream's motion-aware noise (live: from the next chunk)."""
    prompt: str
    prompt_version: int
    context: torch.Tensor
    blend: PromptBlend | None = None
    segment: int = 0
    segment_start: int = 0
    seq: int = 0
    out_seq: int = 0
    chunks: int = 0
    """Chunks that entered the DiT over the stream's life (all segments)."""
    pending: torch.Tensor | None = None
    frames_in: int = 0
    frames_out: int = 0
    delivered: int = 0
    t2v_target: int = 0
    ended: bool = False
    outbox: list[torch.Tensor] = field(default_factory=list)

    @property
    def next_chunk(self) -> int:
        """The next chunk's index in the current segment (0 = its prepare chunk)."""
        return self.seq - self.segment_start

    def in_flight(self) -> list[int]:
        """Chunks (seq) that entered the ring and have not come back finished."""
        return list(range(self.out_seq, self.seq))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        cpu = _cpu
        return {
            "stream_id": self.stream_id,
            "seed": self.seed,
            "t2v": self.t2v,
            "fps": self.fps,
            "clock": asdict(self.clock),
            "vae": _map_tensors(self.vae.to_dict(), cpu),
            "motion": _map_tensors(self.motion.to_dict(), cpu),
            "steps": self.steps,
            "noise_scale": self.noise_scale,
            "prompt": self.prompt,
            "prompt_version": self.prompt_version,
            "context": cpu(self.context),
            "blend": None
            if self.blend is None
            else {
                "source": cpu(self.blend.source),
                "target": cpu(self.blend.target),
                "total": self.blend.total,
                "done": self.blend.done,
                "source_version": self.blend.source_version,
            },
            "segment": self.segment,
            "segment_start": self.segment_start,
            "seq": self.seq,
            "out_seq": self.out_seq,
            "chunks": self.chunks,
            "pending": cpu(self.pending),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "delivered": self.delivered,
            "t2v_target": self.t2v_target,
            "ended": self.ended,
            "outbox": [cpu(t) for t in self.outbox],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str = "cpu") -> StreamState:
        def dev(t: Any) -> Any:
            return t.to(device) if isinstance(t, torch.Tensor) else t

        blend = d["blend"]
        return cls(
            stream_id=d["stream_id"],
            seed=int(d["seed"]),
            t2v=bool(d["t2v"]),
            fps=float(d["fps"]),
            clock=ChunkClock(**d["clock"]),
            vae=StreamVAEState.from_dict(_map_tensors(d["vae"], dev)),
            motion=MotionNoiseState.from_dict(_map_tensors(d["motion"], dev)),
            steps=int(d["steps"]),
            noise_scale=float(d["noise_scale"]),
            prompt=d["prompt"],
            prompt_version=int(d["prompt_version"]),
            context=dev(d["context"]),
            blend=None
            if blend is None
            else PromptBlend(dev(blend["source"]), dev(blend["target"]), int(blend["total"]), int(blend["done"]),
                             int(blend["source_version"])),
            segment=int(d["segment"]),
            segment_start=int(d["segment_start"]),
            seq=int(d["seq"]),
            out_seq=int(d["out_seq"]),
            chunks=int(d["chunks"]),
            pending=dev(d["pending"]),
            frames_in=int(d["frames_in"]),
            frames_out=int(d["frames_out"]),
            delivered=int(d["delivered"]),
            t2v_target=int(d["t2v_target"]),
            ended=bool(d["ended"]),
            outbox=[dev(t) for t in d["outbox"]],
        )


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu").clone()


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj
