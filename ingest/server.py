"""An asyncio RTMP ingest server: many publishers on one port, stream keys checked before media flows.

One ``RtmpServer`` owns the listening socket and the ``RtmpStream`` objects (``ingest.rtmp_stream``); one
``_Session`` per TCP connection runs the handshake, the chunk-stream parser and the AMF0 command exchange OBS,
ffmpeg and GStreamer expect. Video is decoded, paced and chunked in a worker thread, and each chunk lands in the
stream's bounded ``ChunkQueue``, which the service that wraps this server consumes. Any error in one
connection closes that connection only, with a logged (and, where the protocol allows, client-visible) reason.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ingest.pacing import RawChunk
from ingest.rtmp_stream import Decision, RtmpStream, StreamShape
from media import amf0
from media.chunkstream import (
    ACKNOWLEDGEMENT,
    AUDIO,
    COMMAND_AMF0,
    COMMAND_AMF3,
    DATA_AMF0,
    DATA_AMF3,
    HANDSHAKE_SIZE,
    SET_CHUNK_SIZE,
    SET_PEER_BANDWIDTH,
    VIDEO,
    WINDOW_ACK_SIZE,
    ChunkLimits,
    ChunkStreamParser,
    Message,
    RtmpProtocolError,
    control_message,
    encode_message,
    user_control,
)
from media.flv import AvcDecoder, TagKind, UnsupportedVideo, metadata_codec_problem, parse_video_tag
from services.config import IngestSettings, StreamDefaults

log = logging.getLogger(__name__)

_OUT_CHUNK_SIZE = 4096
_MEDIA_STREAM_ID = 1
_CSID_COMMAND = 3
_CSID_STATUS = 5
_PROBE = "closed before the handshake"


Authoriser = Callable[[str, str, dict[str, Any]], Awaitable[Decision]]


class KeyTableAuthoriser:
    """Admits publishers whose key is in a fixed table (tests, single-node runs); maps key → stream id."""

    def __init__(self, keys: dict[str, str], app: str = "live") -> None:
        self.keys, self.app = dict(keys), app

    async def __call__(self, app: str, stream_key: str, metadata: dict[str, Any]) -> Decision:
        if app != self.app:
            return Decision(False, f"unknown application {app!r}")
        stream_id = self.keys.get(stream_key)
        if stream_id is None:
            return Decision(False, "bad stream key")
        return Decision(True, stream_id=stream_id)


class _Probe(Exception):
    """The peer connected and closed without sending a byte (a port scan or a load balancer's health check)."""


class _Unpublished(Exception):
    """The publisher sent deleteStream/closeStream: a clean end of publishing."""


class Refused(Exception):
    """A publisher is turned away; ``code`` is the NetStream status code the client sees."""

    def __init__(self, reason: str, code: str = "NetStream.Publish.Rejected") -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


@dataclass
class ServerStats:
    connections: int = 0
    accepted: int = 0
    probes: int = 0  # connections closed before sending a byte
    refused: collections.Counter = field(default_factory=collections.Counter)


class RtmpServer:
    """The RTMP listener; ``streams`` maps stream id → ``RtmpStream`` while a stream is live or lingering."""

    def __init__(
        self,
        settings: IngestSettings,
        authoriser: Authoriser,
        default_shape: StreamShape | None = None,
        latency_budget_s: float | None = None,
        on_stream_start: Callable[[RtmpStream], None] | None = None,
        on_stream_end: Callable[[RtmpStream], None] | None = None,
    ) -> None:
        defaults = StreamDefaults()
        self.settings = settings
        self.authoriser = authoriser
        self.default_shape = default_shape or StreamShape(defaults.width, defaults.height, defaults.fps)
        self.latency_budget_s = latency_budget_s if latency_budget_s is not None else defaults.slo_latency_ms / 1000.0
        self.on_stream_start, self.on_stream_end = on_stream_start, on_stream_end
        self.streams: dict[str, RtmpStream] = {}
        self.stats = ServerStats()
        self.refusals: collections.deque[tuple[str, str]] = collections.deque(maxlen=1000)
        self.limits = ChunkLimits(
            max_chunk_size=settings.max_chunk_size,
            max_message_bytes=settings.max_message_bytes,
            max_pending_bytes=settings.max_pending_bytes,
        )
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.settings.rtmp_host, self.settings.rtmp_port, limit=1 << 16, backlog=1024
        )
        log.info("rtmp ingest listening on %s:%d", self.settings.rtmp_host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            session.abort("server shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in list(self.streams.values()):
            self._end_stream(stream)
        if self._server is not None:
            await self._server.wait_closed()

    def refuse(self, peer: str, reason: str) -> None:
        """Record and log why a connection was closed."""
        kind = reason.split(":")[0].split(" (")[0][:60]
        self.stats.refused[kind] += 1
        self.refusals.append((peer, reason))
        log.warning("rtmp %s closed: %s", peer, reason)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername", ("?", 0))[:2]
        peer = f"{host}:{port}"
        if len(self._sessions) >= self.settings.max_connections:
            self.refuse(peer, f"connection cap of {self.settings.max_connections} reached")
            writer.transport.abort()
            return
        session = _Session(self, reader, writer, peer)
        self._sessions.add(session)
        self.stats.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            session.task = task
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            if task is not None:
                self._tasks.discard(task)

    async def _attach(self, session: _Session, decision: Decision, key: str) -> RtmpStream:
        stream = self.streams.get(decision.stream_id)
        if stream is None or stream.ended:
            stream = RtmpStream(
                decision.stream_id,
                key,
                decision.shape or self.default_shape,
                self.settings.chunk_queue_depth,
                self.latency_budget_s,
                decision.first,
            )
            self.streams[stream.stream_id] = stream
            if self.on_stream_start is not None:
                self.on_stream_start(stream)
        else:
            previous = next((s for s in self._sessions if s is not session and s.stream is stream), None)
            if previous is not None:
                previous.abort("replaced by a new publisher with the same stream key")
            log.info("stream %s resumed by %s", stream.stream_id, session.peer)
        if stream._linger is not None:
            stream._linger.cancel()
            stream._linger = None
        with stream._lock:
            stream._owner = session
            stream.pacer.resync()
        stream.publishing = True
        stream.stats.sessions += 1
        self.stats.accepted += 1
        return stream

    def _detach(self, session: _Session, stream: RtmpStream) -> None:
        with stream._lock:
            if stream._owner is not session:
                return
            stream._owner = None
        stream.publishing = False
        loop = asyncio.get_running_loop()
        stream._linger = loop.call_later(self.settings.stream_linger_s, self._end_stream, stream)

    def _end_stream(self, stream: RtmpStream) -> None:
        if stream.ended:
            return
        if stream._linger is not None:
            stream._linger.cancel()
        stream.ended = True
        stream.publishing = False
        stream.queue.close()
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        log.info("stream %s ended", stream.stream_id)
        if self.on_stream_end is not None:
            self.on_stream_end(stream)


class _Session:
    """One TCP connection: handshake, then messages until close."""

    def __init__(
        self, server: RtmpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self.server, self.reader, self.writer, self.peer = server, reader, writer, peer
        self.settings = server.settings
        self.parser = ChunkStreamParser(server.limits)
        self.task: asyncio.Task | None = None
        self.app = ""
        self.connect_info: dict[str, Any] = {}
        self.stream: RtmpStream | None = None
        self.decoder = AvcDecoder(self.settings.max_width, self.settings.max_height)
        self.ack_window = 0
        self.last_ack = 0
        self._abort_reason: str | None = None
        self._deadline = time.monotonic() + self.settings.handshake_timeout_s

    def abort(self, reason: str) -> None:
        self._abort_reason = reason
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        reason: str | None = None
        try:
            await asyncio.wait_for(self._handshake(), self.settings.handshake_timeout_s)
            while True:
                data = await self._read()
                if not data:
                    if self.parser.pending_bytes:
                        reason = f"connection closed mid-message ({self.parser.pending_bytes} bytes pending)"
                    else:
                        reason = "publisher closed the connection" if self.stream else "closed before publishing"
                    break
                await self._on_bytes(data)
        except _Probe:
            reason = _PROBE
        except _Unpublished:
            reason = "publisher unpublished"
        except Refused as exc:
            reason = exc.reason
            await self._send_refusal(exc)
        except RtmpProtocolError as exc:
            reason = f"protocol error: {exc}"
        except UnsupportedVideo as exc:
            reason = str(exc)
            await self._send_refusal(Refused(reason))
        except TimeoutError:
            reason = "handshake/publish timeout" if self.stream is None else "idle timeout"
        except asyncio.CancelledError:
            reason = self._abort_reason or "cancelled"
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            reason = f"connection error: {exc.__class__.__name__}"
        except Exception as exc:  # one connection's bug must not take the server down
            log.exception("rtmp %s: unexpected error", self.peer)
            reason = f"internal error: {exc}"
        finally:
            try:
                await self._finish(reason or "closed")
            except Exception:
                log.exception("rtmp %s: error while closing", self.peer)
                self.writer.transport.abort()

    async def _finish(self, reason: str) -> None:
        if reason == _PROBE:  # not an RTMP client at all: count it, no warning
            self.server.stats.probes += 1
            log.debug("rtmp %s: %s", self.peer, reason)
            self.writer.transport.abort()
            return
        clean = reason.startswith(("publisher closed", "publisher unpublished"))
        if self.stream is not None:
            try:  # frames the decoder still holds (B-frame delay) belong to the stream too
                for chunk in self.stream.process(self.decoder.flush(), self):
                    self.stream.queue.put(chunk)
            except Exception as exc:
                log.warning("rtmp %s: decoder flush failed: %s", self.peer, exc)
            self.server._detach(self, self.stream)
        if clean:
            log.info("rtmp %s: %s", self.peer, reason)
            self.writer.close()
        else:
            self.server.refuse(self.peer, reason)
            self.writer.transport.abort()

    async def _read(self) -> bytes:
        if self.stream is None:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError
        else:
            timeout = self.settings.idle_timeout_s
        return await asyncio.wait_for(self.reader.read(1 << 16), timeout)

    async def _handshake(self) -> None:
        try:
            c0 = await self.reader.readexactly(1)
        except asyncio.IncompleteReadError:
            raise _Probe from None
        if c0[0] != 3:
            raise RtmpProtocolError(f"unsupported RTMP version {c0[0]} (handshake)")
        try:
            c1 = await self.reader.readexactly(HANDSHAKE_SIZE)
            s1 = int(time.monotonic() * 1000 % 2**32).to_bytes(4, "big") + b"\x00" * 4 + os.urandom(1528)
            self.writer.write(b"\x03" + s1 + c1)
            await self.reader.readexactly(HANDSHAKE_SIZE)
        except asyncio.IncompleteReadError as exc:
            raise RtmpProtocolError(f"truncated handshake ({len(exc.partial)} of {HANDSHAKE_SIZE} bytes)") from None

    def _send(self, data: bytes) -> None:
        self.writer.write(data)

    def _send_command(self, csid: int, stream_id: int, *values: Any) -> None:
        self._send(encode_message(csid, COMMAND_AMF0, stream_id, 0, amf0.encode(*values), _OUT_CHUNK_SIZE))

    def _status(self, level: str, code: str, description: str) -> None:
        info = {"level": level, "code": code, "description": description}
        self._send_command(_CSID_STATUS, _MEDIA_STREAM_ID, "onStatus", 0, None, info)

    async def _send_refusal(self, exc: Refused) -> None:
        """Tell the client why, then wait briefly for it to close so the reason is not lost to a reset."""
        try:
            self._status("error", exc.code, exc.reason)
            await asyncio.wait_for(self.writer.drain(), 1.0)
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(1.0):
                while await self.reader.read(1 << 16):
                    pass
        except (TimeoutError, ConnectionError, OSError):
            pass

    async def _on_bytes(self, data: bytes) -> None:
        for msg in self.parser.feed(data):
            await self._on_message(msg)
        received = self.parser.bytes_received
        if self.ack_window and received - self.last_ack >= self.ack_window:
            self.last_ack = received
            self._send(control_message(ACKNOWLEDGEMENT, received & 0xFFFFFFFF))

    async def _on_message(self, msg: Message) -> None:
        t = msg.type_id
        if t == VIDEO:
            await self._on_video(msg)
        elif t == AUDIO:
            self._on_audio(msg)
        elif t in (COMMAND_AMF0, COMMAND_AMF3):
            payload = msg.payload[1:] if t == COMMAND_AMF3 and msg.payload[:1] == b"\x00" else msg.payload
            try:
                values = amf0.decode_all(payload)
            except amf0.AmfError as exc:
                raise RtmpProtocolError(f"bad AMF0 command: {exc}") from exc
            await self._on_command(values, msg.stream_id)
        elif t in (DATA_AMF0, DATA_AMF3):
            payload = msg.payload[1:] if t == DATA_AMF3 and msg.payload[:1] == b"\x00" else msg.payload
            try:
                values = amf0.decode_all(payload)
            except amf0.AmfError as exc:
                raise RtmpProtocolError(f"bad AMF0 data message: {exc}") from exc
            self._on_data(values)
        elif t == WINDOW_ACK_SIZE and len(msg.payload) >= 4:
            self.ack_window = int.from_bytes(msg.payload[:4], "big")

    async def _on_command(self, values: list[Any], stream_id: int) -> None:
        if not values or not isinstance(values[0], str):
            raise RtmpProtocolError("command without a name")
        name = values[0]
        txn = values[1] if len(values) > 1 and isinstance(values[1], float | int) else 0
        args = values[2:]
        if name == "connect":
            self._on_connect(txn, args[0] if args and isinstance(args[0], dict) else {})
        elif name in ("releaseStream", "FCPublish", "_checkbw"):
            self._send_command(_CSID_COMMAND, 0, "_result", txn, None, amf0.UNDEFINED)
        elif name == "createStream":
            self._send_command(_CSID_COMMAND, 0, "_result", txn, None, float(_MEDIA_STREAM_ID))
        elif name == "publish":
            await self._on_publish(args[1] if len(args) > 1 and isinstance(args[1], str) else "")
        elif name in ("FCUnpublish", "deleteStream", "closeStream"):
            if self.stream is not None and name != "FCUnpublish":
                self._status("status", "NetStream.Unpublish.Success", "stream unpublished")
                raise _Unpublished
        elif name == "play":
            raise Refused("this server only accepts publishers (play is not supported)", "NetStream.Play.Failed")
        else:
            log.debug("rtmp %s: ignored command %s", self.peer, name)

    def _on_connect(self, txn: float, info: dict[str, Any]) -> None:
        self.connect_info = info
        self.app = str(info.get("app", "")).split("?")[0].strip("/")
        self._send(control_message(WINDOW_ACK_SIZE, self.settings.window_ack_bytes))
        self._send(control_message(SET_PEER_BANDWIDTH, self.settings.window_ack_bytes, b"\x02"))
        self._send(control_message(SET_CHUNK_SIZE, _OUT_CHUNK_SIZE))
        props = {"fmsVer": "FMS/3,0,1,123", "capabilities": 31.0}
        result = {
            "level": "status",
            "code": "NetConnection.Connect.Success",
            "description": "Connection succeeded.",
            "objectEncoding": float(info.get("objectEncoding", 0) or 0),
        }
        self._send_command(_CSID_COMMAND, 0, "_result", txn, props, result)

    async def _on_publish(self, name: str) -> None:
        if self.stream is not None:
            raise RtmpProtocolError("publish twice on one connection")
        key = name.split("?")[0]
        if self.app != self.settings.rtmp_app:
            raise Refused(f"unknown application {self.app!r}", "NetStream.Publish.BadName")
        if not key:
            raise Refused("empty stream key", "NetStream.Publish.BadName")
        metadata = {
            "peer": self.peer,
            "tcUrl": self.connect_info.get("tcUrl"),
            "flashVer": self.connect_info.get("flashVer"),
            "connect": self.connect_info,
        }
        try:
            decision = await self.server.authoriser(self.app, key, metadata)
        except Exception as exc:
            log.exception("authoriser failed for %s", self.peer)
            raise Refused(f"admission unavailable: {exc.__class__.__name__}") from exc
        if not decision.allowed:
            raise Refused(decision.reason or "refused", "NetStream.Publish.BadName")
        self.stream = await self.server._attach(self, decision, key)
        self._send(user_control(0, _MEDIA_STREAM_ID))
        self._status("status", "NetStream.Publish.Start", f"publishing stream {decision.stream_id}")
        log.info("rtmp %s publishing app=%s stream=%s", self.peer, self.app, decision.stream_id)

    def _on_data(self, values: list[Any]) -> None:
        if values and values[0] == "@setDataFrame":
            values = values[1:]
        if len(values) < 2 or values[0] != "onMetaData" or not isinstance(values[1], dict):
            return
        meta = values[1]
        log.info("rtmp %s onMetaData %s", self.peer, {k: meta[k] for k in list(meta)[:24]})
        problem = metadata_codec_problem(meta)
        if problem:
            raise Refused(problem)
        width, height = meta.get("width"), meta.get("height")
        numeric = isinstance(width, float | int) and isinstance(height, float | int)
        if numeric and (width > self.settings.max_width or height > self.settings.max_height):
            raise Refused(
                f"video {int(width)}x{int(height)} exceeds the {self.settings.max_width}x{self.settings.max_height} cap"
            )
        if self.stream is not None:
            self.stream.metadata = meta

    def _on_audio(self, msg: Message) -> None:
        if self.stream is None:
            return
        self.stream.stats.audio_messages += 1
        p = msg.payload
        if len(p) >= 2 and p[0] >> 4 == 10 and p[1] == 0:
            self.stream.audio_config = p[2:]

    async def _on_video(self, msg: Message) -> None:
        stream = self.stream
        if stream is None:
            raise RtmpProtocolError("video before publish")
        stream.stats.video_messages += 1
        tag = parse_video_tag(msg.payload)
        if tag.kind is TagKind.CONFIG:
            self.decoder.configure(tag.data)
            return
        if tag.kind is not TagKind.FRAME:
            return
        if tag.composition_ms:
            stream.stats.reordered_frames += 1
        chunks = await asyncio.to_thread(self._decode_and_process, stream, tag, msg.timestamp)
        for chunk in chunks:
            stream.queue.put(chunk)

    def _decode_and_process(self, stream: RtmpStream, tag: Any, dts: int) -> list[RawChunk]:
        frames = self.decoder.decode(tag, dts)
        stream.stats.decode_errors = self.decoder.errors
        return stream.process(frames, self) if frames else []
