"""The one definition of stream and ring parameters: limits, validation, derived facts, old frames."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from proto import BlockMap, ProtocolError, StreamSpec, decode
from proto.clock import ChunkClock
from proto.codec import encode_frame
from proto.spec import MAX_STEPS, SDV2_STEPS, SIZE_MULTIPLE, RingConfig, chunk_timesteps, first_timestep


def _spec(**kw: object) -> StreamSpec:
    return StreamSpec(**{"stream_id": "s", "width": 512, "height": 512, "fps": 16.0, "steps": 2, "prompt": "p", **kw})


def test_stream_spec_validates_its_limits_once() -> None:
    for bad in [{"width": 500}, {"height": SIZE_MULTIPLE + 1}, {"steps": MAX_STEPS + 1}, {"steps": 0},
                {"fps": 0.0}, {"t2v_frames": 0}]:
        with pytest.raises(ValidationError):
            _spec(**bad)
    assert _spec(steps=MAX_STEPS).timesteps(0.8) == [700, *SDV2_STEPS[1:MAX_STEPS]]


def test_timesteps_are_the_first_timestep_then_the_step_list() -> None:
    assert _spec(steps=3).timesteps(0.65) == [first_timestep(0.65), 500, 400] == [550, 500, 400]
    assert _spec().timesteps() == chunk_timesteps(2, 0.8) == [700, 500]
    assert _spec(t2v=True).timesteps(0.6) == chunk_timesteps(2, None) == [700, 500]  # T2V: the list itself
    assert _spec(steps=3).timesteps(0.7) == [600, 500, 400]
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.4"):
        chunk_timesteps(MAX_STEPS + 1, 0.8)


def test_clock_takes_the_ring() -> None:
    ring = RingConfig(kv_window=8, t_refresh=40)
    assert _spec().clock() == ChunkClock()
    assert _spec().clock(ring) == ChunkClock(kv_window=8, t_refresh=40)
    assert _spec(t2v=True, t2v_frames=3).clock(ring) == ChunkClock.t2v(3, kv_window=8, t_refresh=40)
    with pytest.raises(ValueError, match="must hold a whole chunk"):
        _spec(t2v=True, t2v_frames=3).clock(RingConfig(kv_window=2, sink=1))


def test_ring_config_refuses_inconsistent_rings() -> None:
    with pytest.raises(ValidationError, match="rolling frames"):
        RingConfig(kv_window=4, sink=4)
    with pytest.raises(ValidationError, match="must exceed the reset position"):
        RingConfig(kv_window=8, t_refresh=7)
    assert RingConfig(t_refresh=None).clock().t_refresh is None


def test_frames_of_the_previous_schema_version_still_decode() -> None:
    """A block map stored before maps carried a ring decodes with the default ring; unknown versions still fail."""
    old = {"epoch": 3, "num_blocks": 2, "reason": "initial", "created_at": 0.0,
           "stages": [{"stage_id": "dit-0", "block_start": 0, "block_end": 2, "endpoint": ""}]}
    bm = decode(encode_frame({"t": "BlockMap", "v": 2, "d": old}), BlockMap)
    assert bm.epoch == 3 and bm.ring == RingConfig()
    spec = _spec().model_dump(exclude={"t2v_frames"})
    assert decode(encode_frame({"t": "StreamSpec", "v": 1, "d": spec}), StreamSpec).t2v_frames == 1
    with pytest.raises(ProtocolError, match="unknown schema version"):
        decode(encode_frame({"t": "BlockMap", "v": 1, "d": old}), BlockMap)
