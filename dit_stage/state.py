"""Per-stream DiT-side state of one stage, and the work item a forward is made of."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dit_stage.kv_cache import KVCacheShard, _safetensors_metadata

__all__ = ["SlotItem", "StreamDiTState"]


@dataclass(eq=False)
class StreamDiTState:
    """Everything a stage keeps for one stream: the KV shard of its blocks (all slots) and the
    cross-attention K/V of the current prompt version. One object, serialisable and movable."""

    stream_id: str
    shard: KVCacheShard
    cross_k: dict[int, torch.Tensor] = field(default_factory=dict)
    cross_v: dict[int, torch.Tensor] = field(default_factory=dict)
    prompt_version: int = -1

    def cross_ids(self) -> tuple[int, ...]:
        return tuple(id(t) for d in (self.cross_k, self.cross_v) for t in d.values())

    def to_bytes(self) -> bytes:
        from safetensors.torch import save as st_save

        tensors = {f"shard.{k}": t.contiguous() for k, t in self.shard.state_dict().items()}
        for b, t in self.cross_k.items():
            tensors[f"cross_k.{b}"] = t.contiguous()
        for b, t in self.cross_v.items():
            tensors[f"cross_v.{b}"] = t.contiguous()
        meta = {"stream_id": self.stream_id, "prompt_version": self.prompt_version, "shard": self.shard.meta()}
        return st_save(tensors, metadata={"meta": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> StreamDiTState:
        from safetensors.torch import load as st_load

        meta = json.loads(_safetensors_metadata(data)["meta"])
        tensors = st_load(data)
        shard_tensors = {k.removeprefix("shard."): t for k, t in tensors.items() if k.startswith("shard.")}
        state = cls(
            stream_id=meta["stream_id"],
            shard=KVCacheShard.from_state(meta["shard"], shard_tensors, device),
            prompt_version=meta["prompt_version"],
        )
        for k, t in tensors.items():
            kind, _, b = k.rpartition(".")
            if kind == "cross_k":
                state.cross_k[int(b)] = t.to(device)
            elif kind == "cross_v":
                state.cross_v[int(b)] = t.to(device)
        return state

    def split_blocks(self, blocks: Sequence[int]) -> StreamDiTState:
        """Hand ``blocks`` (KV shard and cross K/V) to a new state object, e.g. for another stage."""
        moved = StreamDiTState(self.stream_id, self.shard.split_blocks(blocks), prompt_version=self.prompt_version)
        for b in blocks:
            if b in self.cross_k:
                moved.cross_k[b] = self.cross_k.pop(b)
                moved.cross_v[b] = self.cross_v.pop(b)
        return moved

    def merge(self, other: StreamDiTState) -> None:
        if other.stream_id != self.stream_id or other.prompt_version != self.prompt_version:
            raise ValueError("can only merge state of the same stream and prompt version")
        self.shard.merge(other.shard)
        self.cross_k.update(other.cross_k)
        self.cross_v.update(other.cross_v)


@dataclass(frozen=True, eq=False)
class SlotItem:
    """One batch row of a forward: stream ``state``'s slot ``slot`` processing the chunk whose first latent
    frame is ``frame_start`` (absolute) at RoPE position ``rope_start`` and ``timestep`` (one value, or one
    per frame). ``clean`` marks a Self-Forcing cache pass: it attends through ``slot``'s cache and rewrites
    its frames in every slot that holds them."""

    state: StreamDiTState
    slot: int
    frame_start: int
    rope_start: int
    timestep: float | tuple[float, ...]
    clean: bool = False

    def timesteps(self, frames: int) -> list[float]:
        if isinstance(self.timestep, (int, float)):
            return [float(self.timestep)] * frames
        if len(self.timestep) != frames:
            raise ValueError(f"{len(self.timestep)} timesteps for a {frames}-frame chunk")
        return [float(t) for t in self.timestep]
