"""The RTMP chunk stream: a sans-IO parser (bytes in, messages out) and a writer.

Kept free of sockets so it can be fuzzed and unit-tested on its own. Every limit that protects memory is
checked here, before any allocation a client controls: message length, chunk size, pending (partially
assembled) bytes and the number of chunk streams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Message type ids (RTMP spec §5.4, §7.1).
SET_CHUNK_SIZE = 1
ABORT = 2
ACKNOWLEDGEMENT = 3
USER_CONTROL = 4
WINDOW_ACK_SIZE = 5
SET_PEER_BANDWIDTH = 6
AUDIO = 8
VIDEO = 9
DATA_AMF3 = 15
COMMAND_AMF3 = 17
DATA_AMF0 = 18
COMMAND_AMF0 = 20

HANDSHAKE_SIZE = 1536
DEFAULT_CHUNK_SIZE = 128
_EXTENDED = 0xFFFFFF
_HEADER_SIZES = (11, 7, 3, 0)


class RtmpProtocolError(Exception):
    """The peer broke the chunk-stream protocol or a limit; the connection must be closed with this reason."""


@dataclass(frozen=True)
class ChunkLimits:
    max_chunk_size: int = 65536
    max_message_bytes: int = 8 * 1024 * 1024
    max_pending_bytes: int = 32 * 1024 * 1024
    max_chunk_streams: int = 64


@dataclass(frozen=True)
class Message:
    type_id: int
    stream_id: int
    timestamp: int
    payload: bytes
    csid: int = 0


@dataclass
class _ChunkStream:
    """Header state the next chunk on this chunk stream id may inherit (fmt 1–3)."""

    timestamp: int = 0
    ts_field: int = 0
    length: int = 0
    type_id: int = 0
    stream_id: int = 0
    partial: bytearray = field(default_factory=bytearray)
    in_message: bool = False


class ChunkStreamParser:
    """Reassembles RTMP messages from chunks; ``feed`` returns the messages completed by the new bytes."""

    def __init__(self, limits: ChunkLimits | None = None) -> None:
        self.limits = limits or ChunkLimits()
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.bytes_received = 0
        self._buf = bytearray()
        self._streams: dict[int, _ChunkStream] = {}
        self._pending = 0
        self.paused = False
        """The last ``feed`` stopped early (its ``stop`` matched) with bytes left unparsed."""

    @property
    def pending_bytes(self) -> int:
        """Bytes held for messages not yet complete plus unparsed input."""
        return self._pending + len(self._buf)

    def feed(self, data: bytes, stop: Callable[[Message], bool] | None = None) -> list[Message]:
        """Parse ``data`` (after what is buffered). With ``stop``, parsing pauses after the first message for which
        it is true (``paused``): the caller may change ``limits`` before the rest is parsed by ``feed(b"")``, e.g.
        after the command that authenticates the connection."""
        self.bytes_received += len(data)
        self._buf += data
        out: list[Message] = []
        pos = 0
        self.paused = False
        try:
            while True:
                before = len(out)
                step = self._parse_chunk(pos, out)
                if step == 0:
                    break
                pos += step
                if stop is not None and len(out) > before and stop(out[-1]) and len(self._buf) > pos:
                    self.paused = True
                    break
        finally:
            del self._buf[:pos]
        if not self.paused and self.pending_bytes > self.limits.max_pending_bytes:
            raise RtmpProtocolError(
                f"pending bytes {self.pending_bytes} exceed the cap of {self.limits.max_pending_bytes}"
            )
        return out

    def _parse_chunk(self, pos: int, out: list[Message]) -> int:
        """Parse one chunk at ``pos``; return its size, or 0 when more bytes are needed."""
        buf = self._buf
        avail = len(buf) - pos
        if avail < 1:
            return 0
        b0 = buf[pos]
        fmt, csid = b0 >> 6, b0 & 0x3F
        hdr = 1
        if csid == 0:
            if avail < 2:
                return 0
            csid, hdr = 64 + buf[pos + 1], 2
        elif csid == 1:
            if avail < 3:
                return 0
            csid, hdr = 64 + buf[pos + 1] + (buf[pos + 2] << 8), 3
        mh = _HEADER_SIZES[fmt]
        if avail < hdr + mh:
            return 0
        st = self._streams.get(csid)
        if st is None:
            if fmt != 0:
                raise RtmpProtocolError(f"chunk fmt {fmt} on chunk stream {csid} that has no previous header")
            if len(self._streams) >= self.limits.max_chunk_streams:
                raise RtmpProtocolError(f"more than {self.limits.max_chunk_streams} chunk streams")
            st = _ChunkStream()
        p = pos + hdr
        ts_field = int.from_bytes(buf[p : p + 3], "big") if fmt <= 2 else st.ts_field
        length, type_id, stream_id = st.length, st.type_id, st.stream_id
        if fmt <= 1:
            length = int.from_bytes(buf[p + 3 : p + 6], "big")
            type_id = buf[p + 6]
        if fmt == 0:
            stream_id = int.from_bytes(buf[p + 7 : p + 11], "little")
        p += mh
        ts_value = ts_field
        if ts_field == _EXTENDED:
            if len(buf) - p < 4:
                return 0
            ts_value = int.from_bytes(buf[p : p + 4], "big")
            p += 4
        if fmt <= 2 and st.in_message:
            raise RtmpProtocolError(f"new message header on chunk stream {csid} inside an unfinished message")
        if not st.in_message and length > self.limits.max_message_bytes:
            raise RtmpProtocolError(f"message length {length} exceeds the cap of {self.limits.max_message_bytes}")
        remaining = length - len(st.partial) if st.in_message else length
        take = min(remaining, self.chunk_size)
        if len(buf) - p < take:
            return 0
        # The chunk is complete in the buffer: commit the header state.
        self._streams[csid] = st
        st.ts_field, st.length, st.type_id, st.stream_id = ts_field, length, type_id, stream_id
        if not st.in_message:
            st.timestamp = ts_value if fmt == 0 else (st.timestamp + ts_value) & 0xFFFFFFFF
            st.in_message = True
        st.partial += buf[p : p + take]
        self._pending += take
        p += take
        if len(st.partial) >= length:
            payload = bytes(st.partial)
            self._pending -= len(st.partial)
            st.partial = bytearray()
            st.in_message = False
            msg = Message(type_id, stream_id, st.timestamp, payload, csid)
            self._on_protocol_control(msg)
            out.append(msg)
        return p - pos

    def _on_protocol_control(self, msg: Message) -> None:
        if msg.type_id == SET_CHUNK_SIZE:
            if len(msg.payload) < 4:
                raise RtmpProtocolError("short Set Chunk Size message")
            size = int.from_bytes(msg.payload[:4], "big") & 0x7FFFFFFF
            if size < 1 or size > self.limits.max_chunk_size:
                raise RtmpProtocolError(f"chunk size {size} outside 1..{self.limits.max_chunk_size}")
            self.chunk_size = size
        elif msg.type_id == ABORT and len(msg.payload) >= 4:
            st = self._streams.get(int.from_bytes(msg.payload[:4], "big"))
            if st is not None and st.in_message:
                self._pending -= len(st.partial)
                st.partial = bytearray()
                st.in_message = False


def encode_message(csid: int, type_id: int, stream_id: int, timestamp: int, payload: bytes, chunk_size: int) -> bytes:
    """One message as a fmt-0 chunk followed by fmt-3 continuation chunks (csid 2..63)."""
    if not 2 <= csid <= 63:
        raise ValueError("writer supports chunk stream ids 2..63")
    extended = timestamp >= _EXTENDED
    ts_field = _EXTENDED if extended else timestamp
    ext = timestamp.to_bytes(4, "big") if extended else b""
    head = (
        bytes([csid])
        + ts_field.to_bytes(3, "big")
        + len(payload).to_bytes(3, "big")
        + bytes([type_id])
        + stream_id.to_bytes(4, "little")
        + ext
    )
    parts = [head, payload[:chunk_size]]
    for off in range(chunk_size, len(payload), chunk_size):
        parts.append(bytes([0xC0 | csid]) + ext)
        parts.append(payload[off : off + chunk_size])
    return b"".join(parts)


def control_message(type_id: int, value: int, extra: bytes = b"") -> bytes:
    """A protocol control message (Set Chunk Size, Window Ack Size, Set Peer Bandwidth, Acknowledgement)."""
    return encode_message(2, type_id, 0, 0, value.to_bytes(4, "big") + extra, DEFAULT_CHUNK_SIZE)


def user_control(event: int, value: int) -> bytes:
    """A User Control message (event 0 = Stream Begin, 1 = Stream EOF, 6 = Ping Request)."""
    return encode_message(2, USER_CONTROL, 0, 0, event.to_bytes(2, "big") + value.to_bytes(4, "big"), 128)
