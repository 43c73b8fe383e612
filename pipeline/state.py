"""Per-stream state of the single-process pipeline: one object, serialisable and movable."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dit_stage.state import StreamDiTState
from dit_stage.stream_batch import StreamSlots
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


@dataclass
class PromptBlend:
    """A `blend` prompt change in progress: chunk j (1-based) after the change uses lerp(source, target, j/total)."""

    source: torch.Tensor
    target: torch.Tensor
    total: int
    done: int = 0

    def advance(self) -> tuple[torch.Tensor, bool]:
        """The embedding for the next chunk and whether the blend is complete with it."""
        self.done += 1
        if self.done >= self.total:
            return self.target, True
        return torch.lerp(self.source, self.target, self.done / self.total), False


@dataclass(eq=False)
class StreamState:
    """Everything the pipeline keeps for one stream.

    ``slots`` and ``dit`` are the DiT side (slot contents, the chunk clock position, the KV shards and the prompt's
    cross-attention K/V, one ``StreamDiTState`` per stage); ``vae`` the Stream-VAE caches; ``motion`` the noise EMA;
    ``context`` the prompt embedding applied now (mid-blend: the interpolated one); ``pending`` the input frames
    not yet making up a whole chunk ([1, 3, T, H, W] in [-1, 1]). ``to_bytes``/``from_bytes`` move it bit-exactly.
    """

    stream_id: str
    seed: int
    t2v: bool
    slots: StreamSlots
    dit: list[StreamDiTState]
    vae: StreamVAEState
    motion: MotionNoiseState
    prompt: str
    prompt_version: int
    context: torch.Tensor
    blend: PromptBlend | None = None
    segment: int = 0
    chunks: int = 0
    """Chunks that entered the DiT over the stream's life (all segments)."""
    pending: torch.Tensor | None = None
    frames_in: int = 0
    frames_out: int = 0
    delivered: int = 0
    t2v_target: int = 0
    last_latent: torch.Tensor | None = None
    last_scale: float | None = None
    ended: bool = False
    outbox: list[torch.Tensor] = field(default_factory=list)

    @property
    def clock(self) -> ChunkClock:
        return self.slots.clock

    @property
    def next_chunk(self) -> int:
        """The next chunk of the current segment (0 = its prepare chunk)."""
        return self.slots.next_chunk

    def in_flight(self) -> list[int]:
        """Chunks of the current segment sitting in stream-batch slots (entered, not finished)."""
        return [c for c in self.slots.chunk if c is not None]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        s = self.slots
        cpu = _cpu
        return {
            "stream_id": self.stream_id,
            "seed": self.seed,
            "t2v": self.t2v,
            "slots": {
                "stream_id": s.stream_id,
                "seed": s.seed,
                "clock": asdict(s.clock),
                "num_slots": s.num_slots,
                "latent_hw": list(s.latent_hw),
                "chunk": list(s.chunk),
                "latent": [cpu(t) for t in s.latent],
                "timestep": list(s.timestep),
                "next_chunk": s.next_chunk,
                "context": [cpu(t) for t in s.context],
            },
            "dit": [torch.frombuffer(bytearray(st.to_bytes()), dtype=torch.uint8) for st in self.dit],
            "vae": _map_tensors(self.vae.to_dict(), cpu),
            "motion": _map_tensors(self.motion.to_dict(), cpu),
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
            },
            "segment": self.segment,
            "chunks": self.chunks,
            "pending": cpu(self.pending),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "delivered": self.delivered,
            "t2v_target": self.t2v_target,
            "last_latent": cpu(self.last_latent),
            "last_scale": self.last_scale,
            "ended": self.ended,
            "outbox": [cpu(t) for t in self.outbox],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str = "cpu") -> StreamState:
        def dev(t: Any) -> Any:
            return t.to(device) if isinstance(t, torch.Tensor) else t

        sl = d["slots"]
        slots = StreamSlots(
            stream_id=sl["stream_id"],
            seed=int(sl["seed"]),
            clock=ChunkClock(**sl["clock"]),
            num_slots=int(sl["num_slots"]),
            latent_hw=(int(sl["latent_hw"][0]), int(sl["latent_hw"][1])),
            chunk=list(sl["chunk"]),
            latent=[dev(t) for t in sl["latent"]],
            timestep=[float(t) for t in sl["timestep"]],
            next_chunk=int(sl["next_chunk"]),
            context=[dev(t) for t in sl["context"]],
        )
        blend = d["blend"]
        return cls(
            stream_id=d["stream_id"],
            seed=int(d["seed"]),
            t2v=bool(d["t2v"]),
            slots=slots,
            dit=[StreamDiTState.from_bytes(t.numpy().tobytes(), device) for t in d["dit"]],
            vae=StreamVAEState.from_dict(_map_tensors(d["vae"], dev)),
            motion=MotionNoiseState.from_dict(_map_tensors(d["motion"], dev)),
            prompt=d["prompt"],
            prompt_version=int(d["prompt_version"]),
            context=dev(d["context"]),
            blend=None
            if blend is None
            else PromptBlend(dev(blend["source"]), dev(blend["target"]), int(blend["total"]), int(blend["done"])),
            segment=int(d["segment"]),
            chunks=int(d["chunks"]),
            pending=dev(d["pending"]),
            frames_in=int(d["frames_in"]),
            frames_out=int(d["frames_out"]),
            delivered=int(d["delivered"]),
            t2v_target=int(d["t2v_target"]),
            last_latent=dev(d["last_latent"]),
            last_scale=d["last_scale"],
            ended=bool(d["ended"]),
            outbox=[dev(t) for t in d["outbox"]],
        )

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> StreamState:
        return cls.from_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), device)


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
