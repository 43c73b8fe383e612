"""StreamPipeline on the tiny random preset: file → MP4, determinism, batching, prompt modes, T2V, state moves."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from pipeline import PipelineError, StreamSpec, segment_seed
from pipeline.offline import run_file, run_t2v
from support.pipekit import SIZE, moving_frames, read_clip, tiny_pipeline

FRAMES = moving_frames(29)  # 5 + 6·4: chunk boundaries at 5, 9, 13, ...


def _run(pipe, frames, sid="s", seed=1, prompt="a red cat", pieces=(7, 3, 4, 1, 9)):
    """Push ``frames`` in uneven pieces, then finish; returns all output frames."""
    sid = pipe.open_stream(StreamSpec(prompt, seed=seed, stream_id=sid))
    outs, i, k = [], 0, 0
    while i < len(frames):
        n = pieces[k % len(pieces)]
        outs.append(pipe.push(sid, frames[i : i + n]))
        i, k = i + n, k + 1
    outs.append(pipe.finish(sid))
    return np.concatenate(outs)


def _mean_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(len(a), -1).mean(1)


def test_clip_to_mp4_with_input_frame_count_fps_and_model_size(clip, tmp_path):
    pipe = tiny_pipeline()
    out = tmp_path / "out.mp4"
    stats = run_file(pipe, clip, out, "a red cat", seed=3, progress=False)
    frames, fps = read_clip(out)
    src, src_fps = read_clip(clip)
    assert len(src) == 24 and src_fps == 12
    assert frames.shape == (24, SIZE, SIZE, 3)  # 96×80 input, resized and centre-cropped to the model size
    assert fps == Fraction(12)
    assert stats.frames_in == stats.frames_out == 24 and stats.fps > 0 and 0 < stats.ttff_s < stats.seconds
    assert not pipe.streams  # the stream was closed
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temp file left behind


def test_same_seed_same_frames_other_seed_other_frames():
    a = _run(tiny_pipeline(), FRAMES, seed=7)
    b = _run(tiny_pipeline(), FRAMES, seed=7, pieces=(29,))  # other push sizes: same chunks, same frames
    c = _run(tiny_pipeline(), FRAMES, seed=8)
    assert a.shape == (29, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert _mean_abs(a, c).mean() > 1.0  # negative control: the seed matters


def test_warm_up_then_one_chunk_per_push():
    pipe = tiny_pipeline(steps=3)
    sid = pipe.open_stream(StreamSpec("a cat", stream_id="w"))
    assert len(pipe.push(sid, FRAMES[:4])) == 0  # not yet a whole prepare chunk
    assert len(pipe.push(sid, FRAMES[4:5])) == 5  # prepare: 5 frames → 2 latents → 5 frames, at once
    assert len(pipe.push(sid, FRAMES[5:9])) == 0  # stream-batch warm-up: B − 1 = 2 forwards yield nothing
    assert len(pipe.push(sid, FRAMES[9:13])) == 0
    assert len(pipe.push(sid, FRAMES[13:17])) == 4  # then one finished chunk (4 frames) per chunk in
    assert len(pipe.finish(sid)) == 8  # chunks 2 and 3 were still in the slots: 17 frames in, 17 out
    with pytest.raises(PipelineError, match="ended"):
        pipe.push(sid, FRAMES[:4])
    with pytest.raises(PipelineError, match=r"frames must be \[T, 64, 64, 3\]"):
        pipe.push(pipe.open_stream(StreamSpec("x")), np.zeros((4, 32, 32, 3), np.uint8))


def test_two_streams_batched_equal_each_alone():
    """Streams with different seeds, prompts and phases share DiT forwards; each equals its solo run."""
    a_frames, b_frames = FRAMES, moving_frames(25, seed=5)
    alone = {
        "a": _run(tiny_pipeline(output="float"), a_frames, sid="a", seed=1, prompt="a red cat"),
        "b": _run(tiny_pipeline(output="float"), b_frames, sid="b", seed=2, prompt="blue fish"),
    }
    pipe = tiny_pipeline(output="float")
    rows: list[int] = []
    worker = pipe.ring.first
    compute = worker.compute
    worker.compute = lambda step: rows.append(len(step.items)) or compute(step)  # type: ignore[method-assign]
    pipe.open_stream(StreamSpec("a red cat", seed=1, stream_id="a"))
    pipe.open_stream(StreamSpec("blue fish", seed=2, stream_id="b"))
    got: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    pipe.feed("a", a_frames)
    pipe.feed("b", b_frames[:4])  # b starts a chunk later: its prepare runs while a is stepping
    fed_b = 4
    while pipe.ready() or fed_b < len(b_frames):
        if fed_b < len(b_frames):
            pipe.feed("b", b_frames[fed_b : fed_b + 4])
            fed_b += 4
        for sid, frames in pipe.step_all().items():
            got[sid].append(frames)
    for sid in ("a", "b"):
        got[sid].append(pipe.finish(sid))
        together = np.concatenate(got[sid])
        assert together.shape == alone[sid].shape
        np.testing.assert_allclose(together, alone[sid], atol=2e-5, rtol=0)
    assert max(rows) == 4  # both streams' two slots went through one forward


def test_prompt_cut_drains_then_restarts_as_a_fresh_stream():
    """`cut` at a chunk boundary: chunks in flight finish under the old prompt (= a stream that ends there), the
    rest equals a fresh stream on the remaining frames with the new prompt and the next segment's seed."""
    pipe = tiny_pipeline()
    sid = pipe.open_stream(StreamSpec("a red cat", seed=1, stream_id="c"))
    out = [pipe.push(sid, FRAMES[:13])]
    pipe.set_prompt(sid, "a blue fish in the sky", "cut")
    st = pipe.stream_state(sid)
    assert st.segment == 1 and st.next_chunk == 0 and st.vae.frames_encoded == 0 and not st.in_flight()
    out.append(pipe.push(sid, FRAMES[13:]))
    out.append(pipe.finish(sid))
    got = np.concatenate(out)
    assert got.shape == (29, SIZE, SIZE, 3)
    before = _run(tiny_pipeline(), FRAMES[:13], sid="c", seed=1)
    fresh = tiny_pipeline()
    after = fresh.push(fresh.open_stream(StreamSpec("a blue fish in the sky", seed=segment_seed(1, 1))), FRAMES[13:])
    after = np.concatenate([after, fresh.finish(next(iter(fresh.streams)))])
    assert np.array_equal(got[:13], before)
    assert np.array_equal(got[13:], after)


def test_prompt_blend_keeps_kv_and_moves_smoothly():
    base_pipe = tiny_pipeline(output="float")
    base = _run(base_pipe, FRAMES, sid="b", pieces=(13, 4))
    base_shard = base_pipe.dit_states("b")[0].shard

    def blended(chunks: int) -> tuple[np.ndarray, list[torch.Tensor], object]:
        pipe = tiny_pipeline(output="float")
        sid = pipe.open_stream(StreamSpec("a red cat", seed=1, stream_id="b"))
        out = [pipe.push(sid, FRAMES[:13])]
        st = pipe.stream_state(sid)
        old = st.context.clone()
        pipe.set_prompt(sid, "a blue fish in the sky", "blend", chunks=chunks)
        new = st.blend.target.clone() if st.blend is not None else None
        ctxs = []
        for i in range(13, 29, 4):
            out.append(pipe.push(sid, FRAMES[i : i + 4]))
            ctxs.append(st.context.clone())
        out.append(pipe.finish(sid))
        assert st.segment == 0 and st.blend is None  # no restart; the blend completed
        return np.concatenate(out), [old, new, *ctxs], pipe.dit_states(sid)

    smooth, (old, new, *ctxs), dit = blended(4)
    for j, ctx in enumerate(ctxs, start=1):  # chunk j after the change uses lerp(old, new, j/4), then new
        torch.testing.assert_close(ctx, torch.lerp(old, new, min(j, 4) / 4), atol=1e-7, rtol=0)
    assert torch.equal(ctxs[-1], new)
    # the KV cache was kept: the ring holds the same frames as a run without a prompt change
    shard = dit[0].shard
    assert shard.frames_end == base_shard.frames_end
    assert all(torch.equal(shard.frame_pos[b], base_shard.frame_pos[b]) for b in shard.blocks)
    instant, *_ = blended(1)
    d_smooth, d_instant = _mean_abs(smooth, base), _mean_abs(instant, base)
    # chunk 2 (frames 9..12) was in flight: it finishes under the prompt it entered with
    assert np.all(d_smooth[:13] == 0) and np.all(d_instant[:13] == 0)
    assert np.all(d_smooth[13:] > 0)
    assert np.all(d_smooth[13:] < d_instant[13:])  # a 4-chunk blend departs more gently than a switch
    per_chunk = [d_smooth[a : a + 4].mean() for a in range(13, 29, 4)]
    assert all(x < y for x, y in itertools.pairwise(per_chunk))  # and moves monotonically towards the new prompt


def test_t2v_generates_the_requested_duration(tmp_path):
    pipe = tiny_pipeline()
    sid = pipe.open_stream(StreamSpec("a blue sky", seed=4, t2v=True))
    first = pipe.generate(sid, 10)
    more = pipe.generate(sid, 7)
    assert first.shape == (10, SIZE, SIZE, 3) and more.shape == (7, SIZE, SIZE, 3)
    assert len(pipe.finish(sid)) == 0
    out = tmp_path / "t2v.mp4"
    stats = run_t2v(tiny_pipeline(), out, "a blue sky", seconds=2.0, fps=16, seed=4, progress=False)
    frames, fps = read_clip(out)
    assert frames.shape == (32, SIZE, SIZE, 3) and fps == 16 and stats.frames_out == 32
    # the first 17 frames of the file are the frames generated above (same seed, same chunks)
    again = tiny_pipeline()
    sid = again.open_stream(StreamSpec("a blue sky", seed=4, t2v=True))
    assert np.array_equal(again.generate(sid, 17), np.concatenate([first, more]))
    with pytest.raises(PipelineError, match="T2V"):
        again.push(sid, FRAMES[:5])


@pytest.mark.parametrize("cut_at", [11, 16])
def test_state_saved_mid_stream_restores_bit_exactly_in_a_fresh_pipeline(cut_at):
    """Mid-stream (frames pending, chunks in flight, a blend half done), the stream's one state object is saved
    as bytes, restored into a new pipeline, and continues with exactly the frames of the uninterrupted run."""
    def first_part(pipe):
        sid = pipe.open_stream(StreamSpec("a red cat", seed=6, stream_id="m"))
        out = [pipe.push(sid, FRAMES[:9])]
        pipe.set_prompt(sid, "blue fish", "blend", chunks=3)
        out.append(pipe.push(sid, FRAMES[9:cut_at]))
        return sid, out

    ref = tiny_pipeline()
    sid, want = first_part(ref)
    want += [ref.push(sid, FRAMES[cut_at:]), ref.finish(sid)]

    src = tiny_pipeline()
    sid, got = first_part(src)
    st = src.stream_state(sid)
    assert st.blend is not None and st.in_flight() and st.pending is not None
    blob = src.save_stream(sid)
    src.close_stream(sid)
    dst = tiny_pipeline()
    assert dst.restore_stream(blob) == sid
    got += [dst.push(sid, FRAMES[cut_at:]), dst.finish(sid)]
    assert np.array_equal(np.concatenate(got), np.concatenate(want))

    early = tiny_pipeline()  # saved before any chunk entered the ring: only its prompt moves
    sid = early.open_stream(StreamSpec("a red cat", seed=6, stream_id="e"))
    moved = tiny_pipeline()
    moved.restore_stream(early.save_stream(sid))
    fresh = tiny_pipeline()
    want = fresh.push(fresh.open_stream(StreamSpec("a red cat", seed=6, stream_id="e")), FRAMES[:13])
    assert np.array_equal(moved.push(sid, FRAMES[:13]), want)


def test_live_steps_and_noise_changes_as_a_patch_makes_them():
    """``set_params`` is the pipeline's ``PATCH``: a new step count finishes the chunks in flight and starts a new
    segment (equal to a fresh pipeline with that count and the segment's seed on the rest of the input); a noise
    scale applies from the next chunk (at the start, equal to a pipeline configured with it)."""
    chunks = [FRAMES[:5]] + [FRAMES[i : i + 4] for i in range(5, 29, 4)]  # 7 chunks
    pipe = tiny_pipeline(output="float")
    sid = pipe.open_stream(StreamSpec("a red cat", seed=3, stream_id="p"))
    out = [pipe.push(sid, c) for c in chunks[:3]]
    pipe.set_params(sid, steps=3)  # chunks 0..2 finish with 2 steps; a new segment from here
    assert pipe.stream_state(sid).segment == 1 and pipe.stream_state(sid).steps == 3
    out += [pipe.push(sid, FRAMES[13:18])] + [pipe.push(sid, FRAMES[i : i + 4]) for i in range(18, 26, 4)]
    got = np.concatenate(out)
    unchanged = _run(tiny_pipeline(output="float"), FRAMES[:13], sid="p", seed=3, pieces=(13,))
    fresh = tiny_pipeline(output="float", steps=3)
    after = fresh.push(fresh.open_stream(StreamSpec("a red cat", seed=segment_seed(3, 1))), FRAMES[13:26])
    np.testing.assert_array_equal(got[:13], unchanged)
    np.testing.assert_allclose(got[13:], after, atol=1e-6, rtol=0)
    with pytest.raises(PipelineError, match="steps"):
        pipe.set_params(sid, steps=9)
    with pytest.raises(PipelineError, match="noise_scale"):
        pipe.set_params(sid, noise_scale=1.5)

    noisy = tiny_pipeline(output="float")
    sid = noisy.open_stream(StreamSpec("a red cat", seed=3))
    noisy.set_params(sid, noise_scale=0.6)
    configured = tiny_pipeline(output="float", noise_scale=0.6)
    want = configured.push(configured.open_stream(StreamSpec("a red cat", seed=3)), FRAMES)
    np.testing.assert_array_equal(noisy.push(sid, FRAMES), want)
    mid = tiny_pipeline(output="float")
    sid = mid.open_stream(StreamSpec("a red cat", seed=3))
    first = mid.push(sid, FRAMES[:13])
    mid.set_params(sid, noise_scale=0.6)
    rest = mid.push(sid, FRAMES[13:])
    base = tiny_pipeline(output="float")
    plain = base.push(base.open_stream(StreamSpec("a red cat", seed=3)), FRAMES)
    np.testing.assert_array_equal(first, plain[: len(first)])
    assert np.abs(rest - plain[len(first) : len(first) + len(rest)]).max() > 1e-3  # from the next chunk on


def test_a_live_seed_change_draws_the_next_chunks_noise_from_the_new_seed() -> None:
    """``set_params(seed=)`` keeps the segment (no new warm-up, KV kept): the chunks before are the old seed's, the
    next ones draw their noise from the new one; before the first chunk it equals a stream opened with it."""
    pipe = tiny_pipeline(output="float")
    sid = pipe.open_stream(StreamSpec("a red cat", seed=3))
    first = pipe.push(sid, FRAMES[:13])
    pipe.set_params(sid, seed=11)
    rest = pipe.push(sid, FRAMES[13:])
    assert pipe.stream_state(sid).segment == 0 and pipe.stream_state(sid).seed == 11
    assert pipe.ring.first.streams[sid].seed == 11  # the ring's stream state follows (its input noise draws)
    base = tiny_pipeline(output="float")
    plain = base.push(base.open_stream(StreamSpec("a red cat", seed=3)), FRAMES)
    np.testing.assert_array_equal(first, plain[: len(first)])
    assert np.abs(rest - plain[len(first) : len(first) + len(rest)]).max() > 1e-3
    at_start = tiny_pipeline(output="float")
    early = at_start.open_stream(StreamSpec("a red cat", seed=3))
    at_start.set_params(early, seed=11)
    other = tiny_pipeline(output="float")
    np.testing.assert_array_equal(at_start.push(early, FRAMES),
                                  other.push(other.open_stream(StreamSpec("a red cat", seed=11)), FRAMES))
    with pytest.raises(PipelineError, match="seed"):
        pipe.set_params(sid, seed=-1)
