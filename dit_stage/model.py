"""Causal Wan2.1 DiT with block-range execution.

Parameter names are the original Wan layout (``blocks.{i}.self_attn.q.weight`` …), so real checkpoints
load strictly. A ``CausalWanDiT`` owns a contiguous block range [a, b): the first stage (a = 0) also owns
the patch embedding, the last (b = L) the head. Every stage owns the small time and text embeddings and
recomputes the time modulation and RoPE from (timestep, RoPE start) itself, so only the hidden state
[N, f·S, D] and a few ints cross a stage boundary.

A forward runs a list of ``SlotItem``s (stream-batch slots, possibly of several streams, side by side in
the batch). Linear layers run over the whole batch; self- and cross-attention run once per stream group
(over all its slots at once) against that stream's ``KVCacheShard`` and prompt K/V. Nothing in the hot path
reads device values back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dit_stage.attention import attend
from dit_stage.forward import Forward
from dit_stage.kv_cache import KVCacheShard, WritePlan
from dit_stage.rope import RopeTable, apply_rope
from dit_stage.state import SlotItem, StreamDiTState
from dit_stage.timing import BlockTimer
from wan.config import WanDiTConfig
from wan.device import host_tensor

if TYPE_CHECKING:
    from dit_stage.state_pool import StatePool

__all__ = ["BatchInputs", "CausalWanDiT", "WanBlock"]


class WanRMSNorm(nn.Module):
    """RMSNorm over the full dim (Wan's qk-norm, applied before the head split)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hi = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(hi), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class WanAttention(nn.Module):
    """Projections of Wan's self- or cross-attention (q, k, v, o with RMS qk-norm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)


class WanBlock(nn.Module):
    """One Wan2.1 transformer block (parameters only; the causal forward lives in CausalWanDiT)."""

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.self_attn = WanAttention(d, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = WanAttention(d, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))


class WanHead(nn.Module):
    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.head = nn.Linear(cfg.dim, cfg.out_dim * cfg.patch_numel)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)


@dataclass
class _Group:
    state: StreamDiTState
    start: int
    stop: int
    plan: WritePlan


@dataclass
class BatchInputs:
    """What a forward needs besides x: per-item device tensors and the per-stream write plans."""

    grid: tuple[int, int, int]
    groups: list[_Group]
    t: torch.Tensor  # [N, f] float64 timesteps
    rope_starts: torch.Tensor  # [N] long
    sigmas: torch.Tensor | None  # [N] float64, last stage only

    def signature(self) -> tuple:
        """Everything that shapes the device work: equal signatures replay the same CUDA graph. A state is named by
        its storage, not the object: a new stream on an ended one's storage (``StatePool``) replays its graphs."""
        return (
            self.grid,
            tuple(self.t.shape),
            self.sigmas is not None,
            tuple(
                (g.start, g.stop, g.plan.signature(), g.state.shard.tensor_ids(), g.state.cross_ids())
                for g in self.groups
            ),
        )

    def tensors(self) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [self.t, self.rope_starts, self.sigmas]
        for g in self.groups:
            out += g.plan.tensors()
        return out

    def copy_(self, other: BatchInputs) -> None:
        """Load another batch's values into these (static, graph-captured) tensors."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            if mine is not None and theirs is not None:
                mine.copy_(theirs, non_blocking=True)


class CausalWanDiT(nn.Module):
    """Blocks [a, b) of the causal Wan2.1 DiT (the whole model when ``block_range`` is None).

    ``fp32_modulation`` (default, as in the Wan reference) computes time embeddings, modulation, LayerNorms
    and the gated residual adds in fp32 even when weights are bf16; False runs them in the model dtype
    (what Self-Forcing and SDv2 do).
    """

    def __init__(
        self,
        config: WanDiTConfig,
        block_range: tuple[int, int] | None = None,
        fp32_modulation: bool = True,
    ) -> None:
        super().__init__()
        a, b = block_range if block_range is not None else (0, config.num_layers)
        if not 0 <= a < b <= config.num_layers:
            raise ValueError(f"block range [{a}, {b}) is not inside [0, {config.num_layers})")
        if config.patch_size[0] != 1:
            raise ValueError("the causal DiT needs a temporal patch size of 1")
        self.config = config
        self.block_range = (a, b)
        self.fp32_modulation = fp32_modulation
        d = config.dim
        self.patch_embedding = (
            nn.Conv3d(config.in_dim, d, kernel_size=config.patch_size, stride=config.patch_size) if a == 0 else None
        )
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleDict({str(i): WanBlock(config) for i in range(a, b)})
        self.head = WanHead(config) if b == config.num_layers else None
        self._rope: RopeTable | None = None

    # ------------------------------------------------------------------ properties
    @property
    def is_first(self) -> bool:
        return self.block_range[0] == 0

    @property
    def is_last(self) -> bool:
        return self.block_range[1] == self.config.num_layers

    @property
    def block_ids(self) -> list[int]:
        return list(range(*self.block_range))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embedding[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embedding[0].weight.device

    @property
    def _hi(self) -> torch.dtype:
        """dtype of the precision-critical ops: fp32 (fp64 for an fp64 model) or the model dtype."""
        return torch.promote_types(self.dtype, torch.float32) if self.fp32_modulation else self.dtype

    def rope_table(self) -> RopeTable:
        dev, dt = self.device, torch.promote_types(self.dtype, torch.float32)
        if self._rope is None or self._rope.cos[0].device != dev or self._rope.dtype != dt:
            self._rope = RopeTable(self.config.rope_axis_dims, self.config.rope_max_seq_len, dev, dt)
        return self._rope

    # ------------------------------------------------------------------ per-stream state
    def new_state(
        self,
        stream_id: str,
        num_slots: int,
        latent_hw: tuple[int, int],
        window: int,
        sink: int,
        adaptive_threshold: float | None = None,
        cache_dtype: torch.dtype | None = None,
        pool: StatePool | None = None,
    ) -> StreamDiTState:
        """Empty per-stream state for this stage's blocks: a KV shard over ``num_slots`` slots (an ended stream's
        from ``pool``, reset, when it has one of this layout)."""
        cfg = self.config
        layout = {
            "blocks": self.block_ids,
            "num_slots": num_slots,
            "window": window,
            "sink": sink,
            "tokens_per_frame": cfg.tokens_per_frame(*latent_hw),
            "num_heads": cfg.num_heads,
            "head_dim": cfg.head_dim,
            "dtype": cache_dtype or self.dtype,
            "device": self.device,
            "adaptive_threshold": adaptive_threshold,
        }
        if pool is None:
            return StreamDiTState(stream_id=stream_id, shard=KVCacheShard(**layout))
        shard = pool.shard(KVCacheShard(**layout, _empty=True))
        return StreamDiTState(stream_id=stream_id, shard=shard or pool.allocate(lambda: KVCacheShard(**layout)))

    @torch.no_grad()
    def set_prompt(self, state: StreamDiTState, context: torch.Tensor, version: int = 0,
                   pool: StatePool | None = None) -> None:
        """Compute this stage's cross-attention K/V for a prompt embedding [1, ≤text_len, text_dim] once (into an
        ended stream's storage from ``pool`` when ``state`` has none yet)."""
        cfg = self.config
        if context.dim() == 2:
            context = context[None]
        if context.shape[0] != 1 or context.shape[-1] != cfg.text_dim or context.shape[1] > cfg.text_len:
            want = f"[1, <= {cfg.text_len}, {cfg.text_dim}]"
            raise ValueError(f"prompt embedding must be {want}, got {tuple(context.shape)}")
        if context.shape[1] < cfg.text_len:  # zero-pad as Wan does; padded rows are attended to
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        ctx = self.text_embedding(context.to(device=self.device, dtype=self.dtype))
        h = cfg.num_heads
        for i in self.block_ids:
            ca = self.blocks[str(i)].cross_attn
            k = ca.norm_k(ca.k(ctx)).unflatten(2, (h, -1))
            v = ca.v(ctx).unflatten(2, (h, -1))
            if pool is not None and not state.cross_k:  # (first block) as they come out, so shapes and dtypes match
                pooled = pool.cross(self.block_ids, tuple(k.shape), k.dtype, k.device)
                if pooled is not None:
                    state.cross_k, state.cross_v = pooled
            if i in state.cross_k and state.cross_k[i].shape == k.shape:  # in place: captured graphs stay valid
                state.cross_k[i].copy_(k)
                state.cross_v[i].copy_(v)
            else:
                state.cross_k[i], state.cross_v[i] = k, v
        state.prompt_version = version

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        items: Sequence[SlotItem],
        grid: tuple[int, int, int],
        noisy: torch.Tensor | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Run blocks [a, b) for ``items``.

        x: latents [N, C, f, H, W] on the first stage, else hidden states [N, f·S, D].
        grid: (f, h, w) in tokens (h = H/2, w = W/2).
        Returns hidden states [N, f·S, D], or on the last stage the flow prediction [N, C, f, H, W] — or
        x0 = noisy − σ·v when ``noisy`` and per-item ``sigmas`` are given. A convenience for the eager
        ``dit_stage.forward.Forward`` (the one implementation; use it directly for graphs, compile or timing).
        """
        return Forward(self)(x, items, grid, noisy, sigmas)

    def check_input(self, x: torch.Tensor, n: int, grid: tuple[int, int, int]) -> None:
        """Refuse a wrongly shaped input before any per-stream state is touched."""
        f, gh, gw = grid
        if self.is_first:
            if x.dim() != 5 or x.shape[0] != n or x.shape[2] != f:
                raise ValueError(f"first stage takes latents [N={n}, C, f={f}, H, W], got {tuple(x.shape)}")
        elif x.dim() != 3 or x.shape[0] != n or x.shape[1] != f * gh * gw:
            raise ValueError(f"stage takes hidden states [N={n}, {f * gh * gw}, D], got {tuple(x.shape)}")

    def prepare_batch(
        self, items: Sequence[SlotItem], grid: tuple[int, int, int], sigmas: Sequence[float] | None = None
    ) -> BatchInputs:
        """Host side of a forward: validate the items, advance the shards' frame counters, and put the few
        per-item numbers on the device (pinned, non-blocking)."""
        cfg = self.config
        f = grid[0]
        n = len(items)
        if n == 0:
            raise ValueError("a forward needs at least one item")
        for it in items:
            if it.rope_start < 0 or it.rope_start + f > cfg.rope_max_seq_len:
                raise ValueError(f"RoPE frames [{it.rope_start}, {it.rope_start + f}) outside the table")
        if sigmas is not None and len(sigmas) != n:
            raise ValueError("x0 needs one sigma per item")
        groups = self._plan(items, f)
        dev = self.device
        return BatchInputs(
            grid=grid,
            groups=groups,
            t=host_tensor([it.timesteps(f) for it in items], torch.float64, dev),
            rope_starts=host_tensor([it.rope_start for it in items], torch.long, dev),
            sigmas=None if sigmas is None else host_tensor(list(sigmas), torch.float64, dev),
        )

    @torch.no_grad()
    def run(
        self, x: torch.Tensor, batch: BatchInputs, noisy: torch.Tensor | None = None, timer: BlockTimer | None = None
    ) -> torch.Tensor:
        """Device side of a forward: pure tensor work, no host syncs (CUDA-graph capturable without ``timer``).

        ``timer`` marks the end of the patch embedding, of every block and of the head (per-block telemetry)."""
        f, gh, gw = batch.grid
        n = batch.t.shape[0]
        groups = batch.groups
        e, e0 = self._time_embedding(batch.t)
        cos, sin = self.rope_table().cos_sin(batch.rope_starts, f, gh, gw)

        self.check_input(x, n, batch.grid)
        if self.is_first:
            assert self.patch_embedding is not None
            h = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
        else:
            h = x.to(self.dtype)
        if timer is not None:
            timer.mark("embed")
        for i in self.block_ids:
            h = self._block(i, h, e0, cos, sin, groups)
            if timer is not None:
                timer.mark(i)
        if not self.is_last:
            return h
        flow = self._head(h, e, batch.grid)
        if noisy is None:
            out = flow
        else:
            if batch.sigmas is None:
                raise ValueError("x0 needs one sigma per item")
            sig = batch.sigmas.view(n, 1, 1, 1, 1)
            out = (noisy.double() - sig * flow.double()).to(noisy.dtype)
        if timer is not None:
            timer.mark("head")
        return out

    def _plan(self, items: Sequence[SlotItem], f: int) -> list[_Group]:
        """Group items per stream (contiguous in the batch) and plan each group's cache writes."""
        groups: list[_Group] = []
        spans: list[tuple[StreamDiTState, int, int, bool]] = []
        seen: set[int] = set()
        for idx, it in enumerate(items):
            last = spans[-1] if spans else None
            if last is not None and last[0] is it.state and not it.clean and not last[3]:
                spans[-1] = (last[0], last[1], idx + 1, False)
                continue
            if id(it.state) in seen and not it.clean:
                raise ValueError(f"items of stream {it.state.stream_id!r} must be contiguous in the batch")
            seen.add(id(it.state))
            spans.append((it.state, idx, idx + 1, it.clean))
        saved = [(state.shard, list(state.shard.frames_end)) for state, *_ in spans]
        try:
            for state, start, stop, clean in spans:
                if set(state.cross_k) != set(self.block_ids):
                    raise ValueError(f"stream {state.stream_id!r} has no prompt K/V for blocks {self.block_ids}")
                if state.shard.blocks != self.block_ids:
                    raise ValueError(
                        f"stream {state.stream_id!r} shard covers {state.shard.blocks}, stage {self.block_ids}"
                    )
                sub = items[start:stop]
                slots = [it.slot for it in sub]
                plan = state.shard.plan(slots, [it.frame_start for it in sub], f, broadcast=clean)
                groups.append(_Group(state, start, stop, plan))
        except ValueError:
            for shard, frames_end in saved:  # a refused batch leaves every stream as it was
                shard.frames_end = frames_end
            raise
        return groups

    def _time_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e [N, f, D] and e0 [N, f, 6, D] from per-frame timesteps t [N, f] (sinusoid in float64)."""
        cfg = self.config
        n, f = t.shape
        half = cfg.freq_dim // 2
        omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
        angle = t.reshape(-1, 1) * omega
        sinusoid = torch.cat([angle.cos(), angle.sin()], dim=1)
        hi = self._hi
        te, tp = self.time_embedding, self.time_projection
        x = F.linear(sinusoid.to(hi), te[0].weight.to(hi), te[0].bias.to(hi))
        e = F.linear(F.silu(x), te[2].weight.to(hi), te[2].bias.to(hi))
        e0 = F.linear(F.silu(e), tp[1].weight.to(hi), tp[1].bias.to(hi))
        return e.view(n, f, cfg.dim), e0.view(n, f, 6, cfg.dim)

    def _modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """LN(x)·(1+scale)+shift per frame; x [N, f, S, D], shift/scale [N, f, 1, D]; returns [N, f·S, D]."""
        hi = self._hi
        y = F.layer_norm(x.to(hi), (x.shape[-1],), eps=self.config.eps) * (1 + scale) + shift
        return y.to(self.dtype).flatten(1, 2)

    def _gated_add(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        n, f = gate.shape[:2]
        hi = self._hi
        out = x.view(n, f, -1, x.shape[-1]).to(hi) + y.view(n, f, -1, y.shape[-1]).to(hi) * gate
        return out.to(self.dtype).flatten(1, 2)

    def _block(
        self,
        i: int,
        x: torch.Tensor,
        e0: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        groups: list[_Group],
    ) -> torch.Tensor:
        blk = self.blocks[str(i)]
        want_means = any(g.state.shard.adaptive for g in groups)
        pre, mid, post = self._pieces
        q, k, v, k_mean, v_mean, mod = pre(blk, x, e0, cos, sin, want_means)

        # self-attention through each stream's KV ring
        outs = []
        for g in groups:
            s = slice(g.start, g.stop)
            shard = g.state.shard
            km = k_mean[s] if k_mean is not None and shard.adaptive else None
            vm = v_mean[s] if v_mean is not None and shard.adaptive else None
            shard.write(i, g.plan, k[s], v[s], km, vm)
            kc, vc, lengths = shard.keys(i, g.plan)
            outs.append(attend(q[s], kc, vc, lengths))
        attn = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        x, q2 = mid(blk, x, attn, mod)

        # cross-attention over each stream's cached prompt K/V
        outs = []
        for g in groups:
            rows = g.stop - g.start
            ck, cv = g.state.cross_k[i], g.state.cross_v[i]
            outs.append(attend(q2[g.start : g.stop], ck.expand(rows, -1, -1, -1), cv.expand(rows, -1, -1, -1)))
        attn = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        return post(blk, x, attn, mod)

    # The three attention-free pieces of a block. They are plain tensor code, so ``compile_pieces`` can hand
    # them to torch.compile, which fuses the fp32 modulation, norms and RoPE into a few kernels.
    def _pre(
        self, blk: WanBlock, x: torch.Tensor, e0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, means: bool
    ) -> tuple:
        n, _, d = x.shape
        f = e0.shape[1]
        heads = self.config.num_heads
        hi = self._hi
        mod = (blk.modulation.to(hi)[None] + e0.to(hi)).unsqueeze(3)  # [N, f, 6, 1, D]
        sa = blk.self_attn
        y = self._modulate(x.view(n, f, -1, d), mod[:, :, 0], mod[:, :, 1])
        q = sa.norm_q(sa.q(y)).unflatten(2, (heads, -1))
        k = sa.norm_k(sa.k(y)).unflatten(2, (heads, -1))
        v = sa.v(y).unflatten(2, (heads, -1))
        k_mean = v_mean = None
        if means:
            k_mean = k.reshape(n, f, -1, d).float().mean(2)
            v_mean = v.reshape(n, f, -1, d).float().mean(2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, k_mean, v_mean, mod

    def _mid(self, blk: WanBlock, x: torch.Tensor, attn: torch.Tensor, mod: torch.Tensor) -> tuple:
        d = x.shape[-1]
        hi = self._hi
        x = self._gated_add(x, blk.self_attn.o(attn.flatten(2)), mod[:, :, 2])
        ca = blk.cross_attn
        c = F.layer_norm(x.to(hi), (d,), blk.norm3.weight.to(hi), blk.norm3.bias.to(hi), self.config.eps)
        q2 = ca.norm_q(ca.q(c.to(self.dtype))).unflatten(2, (self.config.num_heads, -1))
        return x, q2

    def _post(self, blk: WanBlock, x: torch.Tensor, attn: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        n, _, d = x.shape
        f = mod.shape[1]
        x = x + blk.cross_attn.o(attn.flatten(2))
        y = self._modulate(x.view(n, f, -1, d), mod[:, :, 3], mod[:, :, 4])
        return self._gated_add(x, blk.ffn(y), mod[:, :, 5])

    @property
    def _pieces(self) -> tuple:
        compiled = self.__dict__.get("_compiled")
        return compiled if compiled is not None else (self._pre, self._mid, self._post)

    def compile_pieces(self, **kwargs: object) -> None:
        """torch.compile the attention-free block pieces (GPU speed; attention and the ring stay eager)."""
        opts = {"dynamic": True} | kwargs
        self.__dict__["_compiled"] = tuple(torch.compile(fn, **opts) for fn in (self._pre, self._mid, self._post))

    def _head(self, h: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        assert self.head is not None
        cfg = self.config
        f, gh, gw = grid
        n, _, d = h.shape
        hi = self._hi
        mod = (self.head.modulation.to(hi)[None] + e.to(hi)[:, :, None]).unsqueeze(3)  # [N, f, 2, 1, D]
        shift, scale = mod.unbind(2)
        y = self._modulate(h.view(n, f, -1, d), shift, scale)
        out = self.head.head(y)
        pt, ph, pw = cfg.patch_size
        out = out.view(n, f, gh, gw, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(n, cfg.out_dim, f * pt, gh * ph, gw * pw)

    # ------------------------------------------------------------------ helpers
    def grid_of(self, latent_frames: int, latent_h: int, latent_w: int) -> tuple[int, int, int]:
        _, ph, pw = self.config.patch_size
        return latent_frames, latent_h // ph, latent_w // pw

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def flops_per_item(cfg: WanDiTConfig, tokens_per_frame: int, frames: int, kv_frames: int, blocks: int) -> float:
        """Model FLOPs of one item through ``blocks`` blocks (model.md §7 formula, cross K/V cached)."""
        s = tokens_per_frame * frames
        d, ff = cfg.dim, cfg.ffn_dim
        linear = 2 * s * (6 * d * d + 2 * d * ff)
        self_attn = 4 * s * (tokens_per_frame * kv_frames) * d
        cross = 4 * s * cfg.text_len * d
        return float(blocks * (linear + self_attn + cross))


def init_weights_(model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Random init for benchmarks and tests (normal weights, unit norms, small modulation)."""
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
                p.fill_(1.0)
            elif name.endswith("modulation"):
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)


def make_tiny_dit(seed: int = 0, num_layers: int = 3, dtype: torch.dtype = torch.float32) -> CausalWanDiT:
    """The tiny random DiT (``WanDiTConfig.tiny``, weights std 0.2 from ``seed``): the model of the tiny preset,
    the same in the single-process pipeline and in every stage process, so stage splits equal the whole."""
    model = CausalWanDiT(WanDiTConfig.tiny(num_layers))
    init_weights_(model, std=0.2, generator=torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()
