"""The chunk clock (proto/clock.py): frame arithmetic, the RoPE refresh rule and the noise seed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.clock import ChunkClock, noise_seed


def test_v2v_chunk_arithmetic():
    clock = ChunkClock()
    assert [clock.input_frames(c) for c in range(4)] == [5, 4, 4, 4]
    assert [clock.input_start(c) for c in range(4)] == [0, 5, 9, 13]
    assert [clock.latent_frames(c) for c in range(4)] == [2, 1, 1, 1]
    assert [clock.latent_start(c) for c in range(4)] == [0, 2, 3, 4]
    assert [clock.output_frames(c) for c in range(3)] == [5, 4, 4]


def test_t2v_chunk_arithmetic():
    clock = ChunkClock.t2v(3, kv_window=9)
    assert [clock.input_frames(c) for c in range(3)] == [0, 0, 0]
    assert [clock.latent_start(c) for c in range(3)] == [0, 3, 6]
    assert clock.output_frames(0) == 9 and clock.output_frames(1) == 12


def test_sdv2_refresh_positions():
    """SDv2: once a chunk would start at frame ≥ 50 it restarts at kv_window − 1 = 5 and cycles [5, 50)."""
    clock = ChunkClock()
    starts = [clock.rope_start(c) for c in range(120)]
    first = next(c for c in range(120) if clock.latent_start(c) >= 50)
    assert starts[:first] == [clock.latent_start(c) for c in range(first)]
    assert starts[first] == 5
    assert max(starts) == 49 and min(starts[first:]) == 5
    assert starts[first : first + 45] == list(range(5, 50))
    assert starts[first + 45] == 5


def _recursive_rope(clock: ChunkClock, chunks: int) -> list[int]:
    out, p = [], 0
    for c in range(chunks):
        if c > 0:
            p = p + clock.latent_frames(c - 1)
            if clock.t_refresh is not None and p >= clock.t_refresh:
                p = clock.refresh_to
        out.append(p)
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    f0=st.integers(1, 4),
    extra=st.integers(0, 4),
    t_refresh=st.integers(8, 80),
)
def test_closed_form_equals_recursive_rule(n, f0, extra, t_refresh):
    window = max(n, f0) + extra + 1
    if t_refresh <= window - n:
        return
    clock = ChunkClock(first_latent_frames=f0, latent_frames_per_chunk=n, kv_window=window, t_refresh=t_refresh)
    rope = _recursive_rope(clock, 300)
    assert [clock.rope_start(c) for c in range(300)] == rope
    assert all(clock.rope_end(c) <= clock.rope_max for c in range(300))


def test_no_refresh_raises_past_the_table():
    clock = ChunkClock(t_refresh=None)
    assert clock.rope_start(1022) == 1023
    with pytest.raises(ValueError, match="RoPE table"):
        clock.rope_start(1023)


def test_invalid_clocks():
    with pytest.raises(ValueError):
        ChunkClock(kv_window=1)
    with pytest.raises(ValueError):
        ChunkClock(t_refresh=5)  # not above the reset position
    with pytest.raises(ValueError):
        ChunkClock().latent_start(-1)


def test_noise_seed_is_a_pure_function():
    assert noise_seed(7, 3, 1, "renoise") == noise_seed(7, 3, 1, "renoise")
    seeds = {noise_seed(7, c, k, p) for c in range(5) for k in range(4) for p in ("input", "renoise")}
    assert len(seeds) == 40
    assert 0 <= noise_seed(2**40, 10**6, 3, "context") < 2**63
