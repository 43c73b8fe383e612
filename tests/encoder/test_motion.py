"""Motion-aware noise controller: the official formula and constants, on synthetic still and moving input."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from pydantic import ValidationError

from encoder.motion import MotionNoiseConfig, MotionNoiseController, MotionNoiseState
from wan.scheduler import first_timestep


def official(video: torch.Tensor, end_idx: int, chunk_size: int, noise_scale: float, init_noise_scale: float):
    """StreamDiffusionV2 ``streamv2v/inference.py: compute_noise_scale_and_step``, as published."""
    l2_dist = (video[:, :, end_idx - chunk_size : end_idx] - video[:, :, end_idx - chunk_size - 1 : end_idx - 1]) ** 2
    l2_dist = (torch.sqrt(l2_dist.mean(dim=(0, 1, 3, 4))).max() / 0.2).clamp(0, 1)
    new_noise_scale = (init_noise_scale - 0.1 * l2_dist.item()) * 0.9 + noise_scale * 0.1
    current_step = int(1000 * new_noise_scale) - 100
    return new_noise_scale, current_step


def still(frames: int) -> torch.Tensor:
    return torch.full((1, 3, frames, 8, 8), 0.25)


def flicker(frames: int, start: int = 0) -> torch.Tensor:
    """Frames alternating between −1 and +1: RMS difference 2, i.e. full motion."""
    signs = torch.tensor([(-1.0) ** (start + i) for i in range(frames)])
    return signs.view(1, 1, frames, 1, 1).expand(1, 3, frames, 8, 8).clone()


def test_defaults_are_the_official_constants():
    cfg = MotionNoiseConfig()
    assert (cfg.s_init, cfg.motion_range, cfg.prev_weight, cfg.sigma) == (0.8, 0.1, 0.1, 0.2)
    # t0 = int(1000·s) − 100, and it is the DiT runner's own rule, not a copy that could drift
    assert MotionNoiseController(cfg).timestep_for(0.8) == first_timestep(0.8) == 700
    assert cfg.s_min == pytest.approx(0.7)
    with pytest.raises(ValidationError):
        MotionNoiseConfig(sigma=0.0)
    with pytest.raises(ValidationError):
        MotionNoiseConfig(unknown=1)  # type: ignore[call-arg]


def test_still_input_keeps_s_at_s_init():
    ctl = MotionNoiseController()
    state = ctl.new_state()
    levels = [ctl.update(state, still(5))] + [ctl.update(state, still(4)) for _ in range(10)]
    assert all(lv.scale == 0.8 and lv.timestep == 700 and lv.motion == 0.0 for lv in levels)


def test_strong_motion_drives_s_to_s_min():
    ctl = MotionNoiseController()
    state = ctl.new_state()
    first = ctl.update(state, flicker(5))
    assert (first.scale, first.timestep) == (0.8, 700)  # the first chunk always uses s_init
    scales, steps = [], []
    for c in range(12):
        lv = ctl.update(state, flicker(4, start=1 + c * 4))
        assert lv.motion == 1.0
        scales.append(lv.scale)
        steps.append(lv.timestep)
    assert scales[0] == pytest.approx(0.71) and steps[0] == 610
    assert all(a > b for a, b in itertools.pairwise(scales))
    assert scales[-1] == pytest.approx(0.7, abs=1e-9)
    assert steps[-1] == 600
    assert all(s == int(1000 * sc) - 100 for s, sc in zip(steps, scales, strict=True))


def test_ema_follows_the_formula_for_partial_motion():
    ctl = MotionNoiseController()
    state = ctl.new_state()
    ctl.update(state, still(5))
    # Each new frame differs from the previous by 0.05 everywhere: RMS 0.05, d = 0.25.
    ramp = 0.25 + 0.05 * torch.arange(1, 5, dtype=torch.float64).view(1, 1, 4, 1, 1).expand(1, 3, 4, 8, 8)
    lv = ctl.update(state, ramp)
    assert lv.motion == pytest.approx(0.25)
    expected = (0.8 - 0.1 * lv.motion) * 0.9 + 0.8 * 0.1
    assert lv.scale == expected and lv.timestep == int(1000 * expected) - 100
    held = ctl.update(state, ramp[:, :, -1:].expand(1, 3, 4, 8, 8))  # still again: s relaxes towards s_init
    assert held.motion == 0.0 and held.scale == 0.8 * 0.9 + expected * 0.1


def test_the_previous_chunks_last_frame_is_part_of_the_window():
    """A cut between chunks (each chunk still inside) is motion: the window starts at the previous last frame."""
    ctl = MotionNoiseController()
    state = ctl.new_state()
    ctl.update(state, still(5))
    lv = ctl.update(state, torch.full((1, 3, 4, 8, 8), 0.75))
    assert lv.motion == 1.0 and lv.scale == pytest.approx(0.71)


def test_matches_the_official_function_on_a_random_video():
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, 1 + 4 * 8, 8, 8, generator=g) * 2 - 1).cumsum(2).clamp(-1, 1) * 0.3
    ctl = MotionNoiseController()
    state = ctl.new_state()
    ctl.update(state, video[:, :, :5])
    noise_scale = 0.8
    for end in range(9, video.shape[2] + 1, 4):
        noise_scale, step = official(video, end, 4, noise_scale, 0.8)
        lv = ctl.update(state, video[:, :, end - 4 : end])
        assert (lv.scale, lv.timestep) == (noise_scale, step)


def test_disabled_controller_always_gives_s_init():
    ctl = MotionNoiseController(MotionNoiseConfig(enabled=False, s_init=0.75))
    state = ctl.new_state()
    for c in range(4):
        lv = ctl.update(state, flicker(5 if c == 0 else 4))
        assert (lv.scale, lv.timestep) == (0.75, 650)


def test_state_serialises_and_continues():
    ctl = MotionNoiseController()
    a = ctl.new_state()
    ctl.update(a, still(5))
    ctl.update(a, flicker(4))
    buf = io.BytesIO()
    torch.save(a.to_dict(), buf)
    buf.seek(0)
    b = MotionNoiseState.from_dict(torch.load(buf, weights_only=True))
    nxt = flicker(4, start=1)
    assert ctl.update(b, nxt) == ctl.update(a, nxt)
    with pytest.raises(ValueError, match="frames must be"):
        ctl.update(a, torch.zeros(1, 3, 0, 8, 8))
