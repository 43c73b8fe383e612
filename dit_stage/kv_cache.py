"""KVCacheShard: the self-attention KV cache of the blocks one stage owns, for one stream, all slots.

Layout, per owned block: ``k``/``v`` of shape [slots, window·S, H, head_dim] (post-RoPE K, raw V) viewed as
``window`` *frame slots* of S tokens. A slot is one stream-batch slot (= one denoising step).

Ring policy (per block and per slot), for each latent frame written with absolute index a:

1. a is already in the ring (the next denoising step of the same chunk, or the clean pass) → overwrite it;
2. else an empty frame slot exists → the first empty one (so a ring fills as a prefix, sinks first);
3. else, when adaptive sinks are on and the chunk is one frame, the sink least similar to the new frame
   (mean pre-RoPE K and V, cosine, averaged) is replaced if that similarity is below the threshold;
4. else the rolling frame slot holding the oldest frame is replaced (sink slots are never evicted).

Because cached keys carry their RoPE rotation, attention over the ring is order-invariant, so this is
exactly a sink + rolling-window mask over the full sequence. Which frame lives where is recorded in
``frame_pos`` (device tensor, −1 = empty) and decided on the device — the adaptive rule makes it data
dependent, and reading it back would be a host sync. The host keeps only ``frames_end`` per slot (one past
the highest absolute frame written), which the clock determines; it gives the fill level (always a prefix)
for attention masks without touching the device.

All state lives here, none in attention modules: ``to_bytes``/``from_bytes`` move a shard between processes
bit-exactly and ``split_blocks``/``merge`` hand blocks to another stage during a rebalance.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wan.device import host_tensor

__all__ = ["KVCacheShard", "WritePlan"]


@dataclass
class WritePlan:
    """How one forward writes into and reads from a shard; built once per forward, used by every block.

    ``rows`` are the slots written, ``attn`` the slots whose caches the items attend to (one per item).
    For a normal item both are the item's slot. A *broadcast* plan (Self-Forcing clean pass) has one
    item attending to its slot while writing to every slot that still holds the frame (overwrite-only).
    """

    num_frames: int
    rows: torch.Tensor  # [R] long, slots written
    frames: torch.Tensor  # [R, f] long, absolute frame index written per row
    attn_range: tuple[int, int] | None  # contiguous slot range read by the items, else None
    attn_index: torch.Tensor | None  # [N] long, slots read when not contiguous
    key_lengths: torch.Tensor | None  # [N] int32 valid key tokens per item, None = all full
    broadcast: bool
    adaptive: bool

    def signature(self) -> tuple:
        return (
            self.num_frames,
            tuple(self.rows.shape),
            self.attn_range,
            None if self.attn_index is None else tuple(self.attn_index.shape),
            self.key_lengths is None,
            self.broadcast,
            self.adaptive,
        )

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.rows, self.frames, self.attn_index, self.key_lengths]


class KVCacheShard:
    """Self-attention KV cache of ``blocks`` for one stream and ``num_slots`` stream-batch slots."""

    def __init__(
        self,
        blocks: Iterable[int],
        num_slots: int,
        window: int,
        sink: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        adaptive_threshold: float | None = None,
        _empty: bool = False,
    ) -> None:
        if not 0 <= sink < window:
            raise ValueError(f"need 0 <= sink ({sink}) < window ({window}): a rolling frame slot must exist")
        self.blocks = sorted(blocks)
        self.num_slots = num_slots
        self.window = window
        self.sink = sink
        self.tokens_per_frame = tokens_per_frame
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.adaptive_threshold = adaptive_threshold
        self.frames_end = [0] * num_slots
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.frame_pos: dict[int, torch.Tensor] = {}
        self.sink_k: dict[int, torch.Tensor] = {}
        self.sink_v: dict[int, torch.Tensor] = {}
        if not _empty:
            for b in self.blocks:
                self._alloc(b)

    # ---------------------------------------------------------------- shape helpers
    @property
    def adaptive(self) -> bool:
        return self.adaptive_threshold is not None and self.sink > 0

    @property
    def capacity_tokens(self) -> int:
        return self.window * self.tokens_per_frame

    def _alloc(self, b: int) -> None:
        shape = (self.num_slots, self.capacity_tokens, self.num_heads, self.head_dim)
        self.k[b] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v[b] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.frame_pos[b] = torch.full((self.num_slots, self.window), -1, dtype=torch.long, device=self.device)
        if self.adaptive:
            hd = self.num_heads * self.head_dim
            self.sink_k[b] = torch.zeros(self.num_slots, self.sink, hd, dtype=torch.float32, device=self.device)
            self.sink_v[b] = torch.zeros(self.num_slots, self.sink, hd, dtype=torch.float32, device=self.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self._tensor_dicts().values() for t in d.values())

    def tensor_ids(self) -> tuple[int, ...]:
        """Identity of the storage tensors (a CUDA graph bakes their addresses in)."""
        return tuple(id(t) for d in self._tensor_dicts().values() for t in d.values())

    def _tensor_dicts(self) -> dict[str, dict[int, torch.Tensor]]:
        return {"k": self.k, "v": self.v, "frame_pos": self.frame_pos, "sink_k": self.sink_k, "sink_v": self.sink_v}

    # ---------------------------------------------------------------- planning (host side, once per forward)
    def plan(
        self, slots: Sequence[int], frame_starts: Sequence[int], num_frames: int, broadcast: bool = False
    ) -> WritePlan:
        """Validate a forward's writes against the host-side frame counters and build its plan.

        A new frame must extend its slot's sequence without a gap; a re-run must be the slot's latest chunk.
        A broadcast (clean-pass) item rewrites frames it already has, in every slot that still holds them.
        """
        if len(slots) != len(frame_starts):
            raise ValueError("one frame start per slot")
        if broadcast and len(slots) != 1:
            raise ValueError("a broadcast (clean-pass) plan carries exactly one item")
        for s, a in zip(slots, frame_starts, strict=True):
            if not 0 <= s < self.num_slots:
                raise ValueError(f"slot {s} outside 0..{self.num_slots - 1}")
            end = self.frames_end[s]
            if a == end and not broadcast:
                continue
            if a + num_frames != end:
                raise ValueError(
                    f"slot {s}: frames [{a}, {a + num_frames}) neither extend the cache (next frame {end}) "
                    f"nor re-run its latest chunk"
                )
        if not broadcast and len(set(slots)) != len(slots):
            raise ValueError(f"a slot may appear once per forward, got {list(slots)}")
        for s, a in zip(slots, frame_starts, strict=True):
            self.frames_end[s] = max(self.frames_end[s], a + num_frames)
        frames_of = [list(range(a, a + num_frames)) for a in frame_starts]
        if broadcast:
            rows = list(range(self.num_slots))
            frames_of = frames_of * self.num_slots
        else:
            rows = list(slots)
        dev = self.device
        s0 = slots[0]
        contiguous = list(slots) == list(range(s0, s0 + len(slots)))
        fill = [min(self.frames_end[s], self.window) * self.tokens_per_frame for s in slots]
        full = all(n == self.capacity_tokens for n in fill)
        return WritePlan(
            num_frames=num_frames,
            rows=host_tensor(rows, torch.long, dev),
            frames=host_tensor(frames_of, torch.long, dev),
            attn_range=(s0, s0 + len(slots)) if contiguous else None,
            attn_index=None if contiguous else host_tensor(list(slots), torch.long, dev),
            key_lengths=None if full else host_tensor(fill, torch.int32, dev),
            broadcast=broadcast,
            adaptive=self.adaptive and num_frames == 1 and not broadcast,
        )

    # ---------------------------------------------------------------- device side, once per block
    def write(
        self,
        block: int,
        plan: WritePlan,
        k: torch.Tensor,
        v: torch.Tensor,
        k_mean: torch.Tensor | None = None,
        v_mean: torch.Tensor | None = None,
    ) -> None:
        """Write post-RoPE k and raw v [N, f·S, H, D] of the plan's items into ``block``'s ring.

        ``k_mean``/``v_mean`` [N, f, H·D] (fp32, pre-RoPE mean over the frame's tokens) feed the adaptive sink
        rule; they are needed whenever the shard has adaptive sinks.
        """
        rows, f, spf = plan.rows, plan.num_frames, self.tokens_per_frame
        r = rows.shape[0]
        kb = self.k[block].view(self.num_slots, self.window, spf, -1)
        vb = self.v[block].view(self.num_slots, self.window, spf, -1)
        fp_all = self.frame_pos[block]
        k_new = k.reshape(k.shape[0], f, spf, -1)
        v_new = v.reshape(v.shape[0], f, spf, -1)
        if plan.broadcast:
            k_new, v_new = k_new.expand(r, -1, -1, -1), v_new.expand(r, -1, -1, -1)
            if k_mean is not None and v_mean is not None:
                k_mean, v_mean = k_mean.expand(r, -1, -1), v_mean.expand(r, -1, -1)
        for j in range(f):
            fp = fp_all[rows]
            a = plan.frames[:, j : j + 1]
            match = fp == a
            has_match = match.any(1)
            t_match = match.int().argmax(1)
            if plan.broadcast:
                target = t_match
                keep = has_match
            else:
                empty = fp < 0
                t_empty = empty.int().argmax(1)
                t_oldest = self.sink + fp[:, self.sink :].argmin(1)
                target = torch.where(has_match, t_match, torch.where(empty.any(1), t_empty, t_oldest))
                if plan.adaptive and k_mean is not None and v_mean is not None:
                    sim = 0.5 * (
                        F.cosine_similarity(self.sink_k[block][rows], k_mean[:, j : j + 1], dim=-1)
                        + F.cosine_similarity(self.sink_v[block][rows], v_mean[:, j : j + 1], dim=-1)
                    )
                    low, which = sim.min(1)
                    replace = ~has_match & ~empty.any(1) & (low < self.adaptive_threshold)
                    target = torch.where(replace, which, target)
                keep = None
            kj, vj, aj = k_new[:, j], v_new[:, j], a[:, 0]
            if keep is not None:  # overwrite-only: rows without the frame rewrite their own contents
                kj = torch.where(keep[:, None, None], kj, kb[rows, target])
                vj = torch.where(keep[:, None, None], vj, vb[rows, target])
                aj = torch.where(keep, aj, fp.gather(1, target[:, None])[:, 0])
            kb.index_put_((rows, target), kj)
            vb.index_put_((rows, target), vj)
            fp_all.index_put_((rows, target), aj)
            if self.adaptive and k_mean is not None and v_mean is not None:
                in_sink = target < self.sink
                if keep is not None:
                    in_sink = in_sink & keep
                ts = target.clamp(max=self.sink - 1)
                sk, sv = self.sink_k[block], self.sink_v[block]
                sk.index_put_((rows, ts), torch.where(in_sink[:, None], k_mean[:, j], sk[rows, ts]))
                sv.index_put_((rows, ts), torch.where(in_sink[:, None], v_mean[:, j], sv[rows, ts]))

    def keys(self, block: int, plan: WritePlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(K, V, key_lengths) the plan's items attend to: views of the cache when the slots are contiguous."""
        if plan.attn_range is not None:
            s0, s1 = plan.attn_range
            return self.k[block][s0:s1], self.v[block][s0:s1], plan.key_lengths
        assert plan.attn_index is not None
        idx = plan.attn_index
        return self.k[block][idx], self.v[block][idx], plan.key_lengths

    # ---------------------------------------------------------------- slot management
    def replicate_slot(self, src: int = 0) -> None:
        """Copy slot ``src`` into every slot (after the prepare chunk, all stream-batch slots share it)."""
        for d in self._tensor_dicts().values():
            for t in d.values():
                t.copy_(t[src : src + 1].expand_as(t))
        self.frames_end = [self.frames_end[src]] * self.num_slots

    def reset(self) -> None:
        for d in self._tensor_dicts().values():
            for t in d.values():
                if t.dtype == torch.long:
                    t.fill_(-1)
                else:
                    t.zero_()
        self.frames_end = [0] * self.num_slots

    # ---------------------------------------------------------------- serialisation and rebalancing
    def meta(self) -> dict[str, object]:
        return {
            "blocks": self.blocks,
            "num_slots": self.num_slots,
            "window": self.window,
            "sink": self.sink,
            "tokens_per_frame": self.tokens_per_frame,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "dtype": str(self.dtype).removeprefix("torch."),
            "adaptive_threshold": self.adaptive_threshold,
            "frames_end": self.frames_end,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{b}": t for name, d in self._tensor_dicts().items() for b, t in d.items()}

    def to_bytes(self) -> bytes:
        """The whole shard (tensors and ring state) as one safetensors blob."""
        from safetensors.torch import save as st_save

        tensors = {key: t.contiguous() for key, t in self.state_dict().items()}
        return st_save(tensors, metadata={"meta": json.dumps(self.meta())})

    @classmethod
    def from_state(
        cls, meta: dict, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> KVCacheShard:
        shard = cls(
            blocks=meta["blocks"],
            num_slots=meta["num_slots"],
            window=meta["window"],
            sink=meta["sink"],
            tokens_per_frame=meta["tokens_per_frame"],
            num_heads=meta["num_heads"],
            head_dim=meta["head_dim"],
            dtype=getattr(torch, meta["dtype"]),
            device=device,
            adaptive_threshold=meta["adaptive_threshold"],
            _empty=True,
        )
        shard.frames_end = list(meta["frames_end"])
        dicts = shard._tensor_dicts()
        for key, t in tensors.items():
            name, b = key.rsplit(".", 1)
            dicts[name][int(b)] = t.to(device)
        for b in shard.blocks:
            missing = [n for n, d in dicts.items() if b not in d and (n in ("k", "v", "frame_pos") or shard.adaptive)]
            if missing:
                raise ValueError(f"shard state lacks {missing} for block {b}")
        return shard

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> KVCacheShard:
        from safetensors.torch import load as st_load

        tensors = st_load(data)
        meta = json.loads(_safetensors_metadata(data)["meta"])
        return cls.from_state(meta, tensors, device)

    def split_blocks(self, blocks: Iterable[int]) -> KVCacheShard:
        """Remove ``blocks`` from this shard and return them as a new shard (ring state included)."""
        moved = sorted(blocks)
        unknown = set(moved) - set(self.blocks)
        if unknown:
            raise ValueError(f"blocks {sorted(unknown)} are not in this shard ({self.blocks})")
        meta = self.meta() | {"blocks": moved}
        tensors = {}
        for name, d in self._tensor_dicts().items():
            for b in moved:
                if b in d:
                    tensors[f"{name}.{b}"] = d.pop(b)
        self.blocks = [b for b in self.blocks if b not in moved]
        return KVCacheShard.from_state(meta, tensors, self.device)

    def merge(self, other: KVCacheShard) -> None:
        """Take over ``other``'s blocks (same stream, same slot layout and ring counters)."""
        mine, theirs = self.meta(), other.meta()
        for key in ("num_slots", "window", "sink", "tokens_per_frame", "num_heads", "head_dim", "frames_end"):
            if mine[key] != theirs[key]:
                raise ValueError(f"cannot merge shards that differ in {key}: {mine[key]} vs {theirs[key]}")
        overlap = set(self.blocks) & set(other.blocks)
        if overlap:
            raise ValueError(f"blocks {sorted(overlap)} are in both shards")
        for name, d in other._tensor_dicts().items():
            for b, t in d.items():
                self._tensor_dicts()[name][b] = t.to(self.device)
        self.blocks = sorted(self.blocks + other.blocks)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})
