"""The chunk-stream parser and AMF0 on their own: round trips, every header format, limits, and fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media import amf0
from media.chunkstream import (
    ABORT,
    SET_CHUNK_SIZE,
    VIDEO,
    ChunkLimits,
    ChunkStreamParser,
    Message,
    RtmpProtocolError,
    control_message,
    encode_message,
)


def feed_in_pieces(parser: ChunkStreamParser, data: bytes, cuts: list[int]) -> list[Message]:
    out: list[Message] = []
    pos = 0
    for cut in [*sorted(set(c % (len(data) + 1) for c in cuts)), len(data)]:
        out += parser.feed(data[pos:cut])
        pos = cut
    return out


def test_header_formats_0_to_3_and_timestamp_deltas() -> None:
    # fmt 0 (t=1000, 3 bytes), fmt 1 (delta 20, new length), fmt 2 (delta 20), fmt 3 (delta reused) on csid 4.
    data = (
        bytes([0x04]) + (1000).to_bytes(3, "big") + (3).to_bytes(3, "big") + bytes([VIDEO]) + (1).to_bytes(4, "little")
        + b"abc"
        + bytes([0x44]) + (20).to_bytes(3, "big") + (2).to_bytes(3, "big") + bytes([VIDEO]) + b"de"
        + bytes([0x84]) + (20).to_bytes(3, "big") + b"fg"
        + bytes([0xC4]) + b"hi"
    )  # fmt: skip
    msgs = ChunkStreamParser().feed(data)
    assert [(m.timestamp, m.payload) for m in msgs] == [(1000, b"abc"), (1020, b"de"), (1040, b"fg"), (1060, b"hi")]
    assert all(m.stream_id == 1 and m.type_id == VIDEO for m in msgs)


def test_extended_timestamp_on_first_and_continuation_chunks() -> None:
    payload = bytes(range(256)) * 2
    data = encode_message(6, VIDEO, 1, 0x1234567, payload, 128)
    assert data.count((0x1234567).to_bytes(4, "big")) == 4  # fmt 0 + three fmt-3 continuations
    (msg,) = ChunkStreamParser().feed(data)
    assert msg.timestamp == 0x1234567 and msg.payload == payload


def test_two_byte_and_three_byte_chunk_stream_ids() -> None:
    for csid in (64 + 10, 64 + 300):
        basic = bytes([0, csid - 64]) if csid < 320 else bytes([1, (csid - 64) & 0xFF, (csid - 64) >> 8])
        data = (
            basic + (5).to_bytes(3, "big") + (2).to_bytes(3, "big") + bytes([VIDEO]) + (1).to_bytes(4, "little") + b"xy"
        )
        (msg,) = ChunkStreamParser().feed(data)
        assert msg.csid == csid and msg.payload == b"xy"


def test_set_chunk_size_applies_to_the_following_bytes_and_abort_drops_a_partial_message() -> None:
    parser = ChunkStreamParser()
    big = bytes(5000)
    data = control_message(SET_CHUNK_SIZE, 4096) + encode_message(6, VIDEO, 1, 0, big, 4096)
    msgs = parser.feed(data)
    assert parser.chunk_size == 4096 and msgs[-1].payload == big
    partial = encode_message(7, VIDEO, 1, 0, bytes(8000), 4096)[: 12 + 4096]  # one whole chunk
    parser.feed(partial)
    assert parser.pending_bytes > 0
    parser.feed(control_message(ABORT, 7))
    assert parser.pending_bytes == 0


def test_interleaved_chunk_streams_reassemble() -> None:
    a = encode_message(6, VIDEO, 1, 0, b"A" * 300, 128)
    b = encode_message(4, 8, 1, 0, b"B" * 300, 128)

    def chunks(data: bytes, first: int) -> list[bytes]:
        out = [data[: first + 128]]
        rest = data[first + 128 :]
        while rest:
            out.append(rest[: 1 + 128])
            rest = rest[1 + 128 :]
        return out

    ca, cb = chunks(a, 12), chunks(b, 12)
    mixed = b"".join(x + y for x, y in zip(ca, cb, strict=True))
    msgs = ChunkStreamParser().feed(mixed)
    assert sorted(m.payload for m in msgs) == [b"A" * 300, b"B" * 300]


@pytest.mark.parametrize(
    ("limits", "data", "reason"),
    [
        (ChunkLimits(max_message_bytes=1000), encode_message(6, VIDEO, 1, 0, bytes(1001), 128), "message length 1001"),
        (ChunkLimits(max_chunk_size=4096), control_message(SET_CHUNK_SIZE, 4097), "chunk size 4097 outside"),
        (ChunkLimits(), control_message(SET_CHUNK_SIZE, 0), "chunk size 0 outside"),
        (ChunkLimits(), bytes([0x46]) + bytes(7), "no previous header"),
        (
            ChunkLimits(max_pending_bytes=1000, max_message_bytes=10_000),
            b"".join(encode_message(c, VIDEO, 1, 0, bytes(5000), 128)[:140] for c in range(3, 12)),
            "pending bytes",
        ),
        (
            ChunkLimits(max_chunk_streams=4),
            b"".join(encode_message(c, VIDEO, 1, 0, bytes(500), 128)[:140] for c in range(3, 9)),
            "more than 4 chunk streams",
        ),
    ],
)
def test_limits_raise_protocol_errors(limits: ChunkLimits, data: bytes, reason: str) -> None:
    with pytest.raises(RtmpProtocolError, match=reason):
        ChunkStreamParser(limits).feed(data)


messages = st.lists(
    st.tuples(
        st.integers(2, 63),
        st.sampled_from([8, 9, 18, 20]),
        st.integers(0, 5),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=3000),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.sampled_from([128, 1000, 4096]), st.lists(st.integers(0, 10**6), max_size=12))
def test_round_trip_any_split(msgs: list, chunk_size: int, cuts: list[int]) -> None:
    data = control_message(SET_CHUNK_SIZE, chunk_size) + b"".join(
        encode_message(csid, t, sid, ts, payload, chunk_size) for csid, t, sid, ts, payload in msgs
    )
    parser = ChunkStreamParser()
    got = [m for m in feed_in_pieces(parser, data, cuts) if m.type_id != SET_CHUNK_SIZE]
    assert [(m.csid, m.type_id, m.stream_id, m.timestamp, m.payload) for m in got] == msgs
    assert parser.pending_bytes == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(0, 4096), max_size=6))
def test_fuzz_parser_only_raises_protocol_errors_and_respects_limits(data: bytes, cuts: list[int]) -> None:
    limits = ChunkLimits(max_chunk_size=4096, max_message_bytes=64 * 1024, max_pending_bytes=16 * 1024)
    parser = ChunkStreamParser(limits)
    try:
        for m in feed_in_pieces(parser, data, cuts):
            assert len(m.payload) <= limits.max_message_bytes
    except RtmpProtocolError:
        return
    assert parser.pending_bytes <= limits.max_pending_bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=20), st.binary(max_size=2000))
def test_fuzz_parser_after_a_valid_prefix(prefix_noise: bytes, tail: bytes) -> None:
    valid = encode_message(3, 20, 0, 0, amf0.encode("connect", 1.0, {"app": "live"}), 128)
    parser = ChunkStreamParser(ChunkLimits(max_message_bytes=64 * 1024, max_pending_bytes=128 * 1024))
    with contextlib.suppress(RtmpProtocolError):
        parser.feed(valid + prefix_noise + tail)


amf_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=50) | st.just(amf0.UNDEFINED),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(amf_values, max_size=5))
def test_amf0_round_trip(values: list) -> None:
    assert amf0.decode_all(amf0.encode(*values)) == values


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_amf0_decoder_only_raises_amf_errors(data: bytes) -> None:
    with contextlib.suppress(amf0.AmfError):
        amf0.decode_all(data)


def test_amf0_refuses_huge_declarations_without_allocating() -> None:
    with pytest.raises(amf0.AmfError, match="truncated"):
        amf0.decode_all(b"\x0c" + (2**31 - 1).to_bytes(4, "big") + b"abc")
    with pytest.raises(amf0.AmfError, match="strict array declares"):
        amf0.decode_all(b"\x0a" + (2**31 - 1).to_bytes(4, "big"))
    with pytest.raises(amf0.AmfError, match="too deep"):
        amf0.decode_all(b"\x0a\x00\x00\x00\x01" * 40)
