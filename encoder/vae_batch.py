"""Stream-VAE batched across streams: one encoder (decoder) call for every stream with a chunk ready.

The per-stream causal caches are gathered (stacked along batch) into one temporary state, the chunk API runs once
on the stacked chunks, and the caches are scattered back (each stream gets its own copy, so it stays freeable and
``torch.save`` writes only its own rows). Every layer of the Wan VAE and of TAEHV is per-sample along batch, so the
result equals the per-stream calls (tests/encoder/test_vae_batch.py: ≤ 1e-6 in fp32).

Streams are batched together only when their caches have the same structure (same first-call branch, same cached
frame counts, same shapes); others form their own group. A stream that appears twice runs its chunks in order, in
successive rounds. A group whose batched call fails is rerun stream by stream (its states were not touched), so
one bad chunk fails only its own stream.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from encoder.taehv import TAEHVDecoderState

if TYPE_CHECKING:
    from encoder.vae import CacheSlot, StreamVAE, StreamVAEState

Result = torch.Tensor | Exception


def _slot_sig(slot: CacheSlot) -> Hashable:
    if isinstance(slot, torch.Tensor):
        return (tuple(slot.shape[1:]), slot.dtype, slot.device)
    return slot


def _memory_sig(mem: TAEHVDecoderState | None) -> Hashable:
    if mem is None:
        return None
    return tuple((i, tuple(t.shape[1:])) for i, t in sorted(mem.memory.items()))


def _gather_cache(caches: Sequence[list[CacheSlot]]) -> list[CacheSlot]:
    """Slot by slot: tensors stacked along batch; ``None``/``"Rep"`` markers (equal across the group) kept."""
    return [torch.cat(slots, 0) if isinstance(slots[0], torch.Tensor) else slots[0]
            for slots in zip(*caches, strict=True)]


def _scatter_cache(cache: list[CacheSlot], sizes: list[int]) -> list[list[CacheSlot]]:
    per_slot = [[t.clone() for t in s.split(sizes)] if isinstance(s, torch.Tensor) else [s] * len(sizes)
                for s in cache]
    return [[slots[i] for slots in per_slot] for i in range(len(sizes))]


def _gather_memory(mems: Sequence[TAEHVDecoderState | None]) -> TAEHVDecoderState | None:
    if mems[0] is None:
        return None
    first = mems[0]
    return TAEHVDecoderState(memory={i: torch.cat([m.memory[i] for m in mems if m is not None], 0)
                                     for i in first.memory}, frames_out=first.frames_out)


def _scatter_memory(merged: TAEHVDecoderState | None, before: Sequence[TAEHVDecoderState | None],
                    sizes: list[int]) -> list[TAEHVDecoderState | None]:
    """Each stream's rows of the merged memory; its frame count advanced by what this call added (streams of one
    group may have different counts: only the count's trim-relevant part is equal)."""
    if merged is None:
        return [None] * len(sizes)
    added = merged.frames_out - (before[0].frames_out if before[0] is not None else 0)
    parts = {i: [p.clone() for p in t.split(sizes)] for i, t in merged.memory.items()}
    return [TAEHVDecoderState(memory={i: p[k] for i, p in parts.items()},
                              frames_out=(b.frames_out if b is not None else 0) + added)
            for k, b in enumerate(before)]


def _rounds(states: Sequence[StreamVAEState]) -> list[list[int]]:
    """Item indices in rounds where each state appears at most once, a state's items in submission order."""
    rounds: list[list[int]] = []
    seen: list[set[int]] = []
    for i, st in enumerate(states):
        k = next((r for r in range(len(rounds) - 1, -1, -1) if id(st) in seen[r]), -1) + 1
        if k == len(rounds):
            rounds.append([])
            seen.append(set())
        rounds[k].append(i)
        seen[k].add(id(st))
    return rounds


def _run(states: Sequence[StreamVAEState], inputs: Sequence[torch.Tensor], key: Callable[[StreamVAEState], Any],
         single: Callable[[StreamVAEState, torch.Tensor], torch.Tensor],
         merged_call: Callable[[list[StreamVAEState], torch.Tensor], torch.Tensor]) -> list[Result]:
    if len(states) != len(inputs):
        raise ValueError(f"{len(states)} states for {len(inputs)} inputs")
    results: list[Result | None] = [None] * len(states)
    for indices in _rounds(states):
        groups: dict[Hashable, list[int]] = {}
        for i in indices:
            x = inputs[i]
            groups.setdefault((key(states[i]), tuple(x.shape[1:]), x.dtype, x.device), []).append(i)
        for group in groups.values():
            if len(group) > 1 and _batched(group, states, inputs, merged_call, results):
                continue
            for i in group:
                try:
                    results[i] = single(states[i], inputs[i])
                except Exception as e:  # one stream's error is that stream's result
                    results[i] = e
    return [r if r is not None else RuntimeError("not run") for r in results]


def _batched(group: list[int], states: Sequence[StreamVAEState], inputs: Sequence[torch.Tensor],
             merged_call: Callable[[list[StreamVAEState], torch.Tensor], torch.Tensor],
             results: list[Result | None]) -> bool:
    """One call for the group; False when it failed (the states are untouched: the caller reruns one by one)."""
    try:
        out = merged_call([states[i] for i in group], torch.cat([inputs[i] for i in group], 0))
    except Exception:  # rerun one by one: the failure is then the failing stream's own
        return False
    for i, part in zip(group, out.split([inputs[i].shape[0] for i in group]), strict=True):
        results[i] = part
    return True


def encode_batch(vae: StreamVAE, states: Sequence[StreamVAEState], chunks: Sequence[torch.Tensor]) -> list[Result]:
    """``vae.encode(states[i], chunks[i])`` for every i, as few model calls as the streams' caches allow."""
    from encoder.vae import StreamVAEState

    def key(st: StreamVAEState) -> Hashable:
        return (st.frames_encoded == 0, tuple(map(_slot_sig, st.encoder_cache)), _memory_sig(st.taehv_encoder))

    def merged_call(group: list[StreamVAEState], x: torch.Tensor) -> torch.Tensor:
        sizes = [1] * len(group)  # one row per stream (_one_row_each)
        first = group[0]
        merged = StreamVAEState(encoder_cache=_gather_cache([s.encoder_cache for s in group]),
                                frames_encoded=first.frames_encoded,
                                taehv_encoder=_gather_memory([s.taehv_encoder for s in group]))
        out = vae.encode(merged, x)
        caches = _scatter_cache(merged.encoder_cache, sizes)
        mems = _scatter_memory(merged.taehv_encoder, [s.taehv_encoder for s in group], sizes)
        for st, cache, mem in zip(group, caches, mems, strict=True):
            st.encoder_cache, st.taehv_encoder = cache, mem
            st.frames_encoded += x.shape[2]
        return out

    return _run(states, chunks, key, vae.encode, _one_row_each(merged_call, chunks))


def decode_batch(vae: StreamVAE, states: Sequence[StreamVAEState], latents: Sequence[torch.Tensor]) -> list[Result]:
    """``vae.decode(states[i], latents[i])`` for every i, as few model calls as the streams' caches allow."""
    from encoder.vae import StreamVAEState

    trim = vae.taehv.frames_to_trim if vae.taehv is not None else 0

    def key(st: StreamVAEState) -> Hashable:
        out = min(st.taehv.frames_out, trim) if st.taehv is not None else 0
        return (st.latents_decoded == 0, tuple(map(_slot_sig, st.decoder_cache)), _memory_sig(st.taehv), out)

    def merged_call(group: list[StreamVAEState], z: torch.Tensor) -> torch.Tensor:
        sizes = [1] * len(group)
        first = group[0]
        merged = StreamVAEState(decoder_cache=_gather_cache([s.decoder_cache for s in group]),
                                latents_decoded=first.latents_decoded,
                                taehv=_gather_memory([s.taehv for s in group]))
        out = vae.decode(merged, z)
        caches = _scatter_cache(merged.decoder_cache, sizes)
        mems = _scatter_memory(merged.taehv, [s.taehv for s in group], sizes)
        for st, cache, mem in zip(group, caches, mems, strict=True):
            st.decoder_cache, st.taehv = cache, mem
            st.latents_decoded += z.shape[2]
        return out

    return _run(states, latents, key, vae.decode, _one_row_each(merged_call, latents))


def _one_row_each(merged_call: Callable[[list[StreamVAEState], torch.Tensor], torch.Tensor],
                  inputs: Sequence[torch.Tensor]) -> Callable[[list[StreamVAEState], torch.Tensor], torch.Tensor]:
    """Batch only single-row inputs (a stream's chunk is ``[1, …]``); a multi-row input raises, so its group runs
    stream by stream (the per-stream API takes any batch)."""

    def call(group: list[StreamVAEState], x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(group):
            raise ValueError("batched VAE calls take one row per stream")
        return merged_call(group, x)

    return call
