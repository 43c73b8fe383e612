"""An asyncio RTMP ingest server: many publishers on one port, stream keys checked before media flows.

One ``RtmpServer`` owns the listening socket and the ``RtmpStream`` objects (``ingest.rtmp_stream``); one
``_Session`` per TCP connection runs the handshake, the chunk-stream parser and the AMF0 command exchange OBS,
ffmpeg and GStreamer expect. Video is decoded, paced and chunked in a worker thread, and each chunk lands in the
stream's bounded ``ChunkQueue``, which the service that wraps this server consumes. Any error in one
connection closes that connection only, with a counted, logged (and, where the protocol allows, client-visible)
reason. Until its stream key is checked a connection is held to a small budget (``ingest.rtmp_limits``): its own
pool, per-address caps, a deadline, 64 KiB of buffering and only the commands that lead to ``publish``.
An optional second listener speaks RTMPS (TLS, set up only after the connection is admitted).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import av

from ingest.rtmp_limits import ConnectionGate, KeyGuessLimiter, RefusalKind, RefusalLog, address_bucket
from ingest.rtmp_stream import Decision, Publisher, RtmpStream, StreamShape
from ingest.rtmp_tls import TlsContexts
from media import amf0
from media.chunkstream import (
    ABORT,
    ACKNOWLEDGEMENT,
    AUDIO,
    COMMAND_AMF0,
    COMMAND_AMF3,
    DATA_AMF0,
    DATA_AMF3,
    HANDSHAKE_SIZE,
    SET_CHUNK_SIZE,
    SET_PEER_BANDWIDTH,
    USER_CONTROL,
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
_READ_LIMIT = 1 << 16  # StreamReader buffer: reading pauses at 2x this, so a connection buffers at most 128 KiB
_PREAUTH_READ = 4096  # read size before the key check (the parser's budget is checked per read)
_PREAUTH_COMMANDS = frozenset({"connect", "releaseStream", "FCPublish", "createStream", "publish", "_checkbw",
                               "FCUnpublish", "deleteStream", "closeStream", "play"})
_PREAUTH_CONTROL = frozenset({SET_CHUNK_SIZE, ABORT, ACKNOWLEDGEMENT, USER_CONTROL, WINDOW_ACK_SIZE,
                              SET_PEER_BANDWIDTH})
_MAX_PREAUTH_COMMANDS = 16


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
            return Decision(False, "bad stream key", bad_key=True)
        return Decision(True, stream_id=stream_id)


class _Probe(Exception):
    """The peer connected and closed without sending a byte (a port scan or a load balancer's health check)."""


class _Unpublished(Exception):
    """The publisher sent deleteStream/closeStream: a clean end of publishing."""


class Refused(Exception):
    """A publisher is turned away; ``code`` is the NetStream status code the client sees."""

    def __init__(self, reason: str, code: str = "NetStream.Publish.Rejected", kind: RefusalKind = "refused") -> None:
        super().__init__(reason)
        self.reason, self.code, self.kind = reason, code, kind


class _Close(Exception):
    """Close the connection for a limit (``kind``), without a client-visible status."""

    def __init__(self, kind: RefusalKind, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass
class ServerStats:
    connections: int = 0
    accepted: int = 0
    probes: int = 0  # connections closed before sending a byte
    refused: collections.Counter = field(default_factory=collections.Counter)  # RefusalKind → count


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
        budget = settings.preauth_buffer_bytes
        self.preauth_limits = ChunkLimits(max_chunk_size=budget, max_message_bytes=budget, max_pending_bytes=budget,
                                          max_chunk_streams=8)
        self.gate = ConnectionGate(settings)
        self.keys = KeyGuessLimiter(settings.key_failures_per_ip, settings.key_failure_window_s, settings.key_backoff_s)
        self.refusal_log = RefusalLog()
        self.stats.refused = self.refusal_log.counts
        self.tls = (TlsContexts(settings.tls_cert_file, settings.tls_key_file)
                    if settings.tls_cert_file and settings.tls_key_file else None)
        self._server: asyncio.Server | None = None
        self._tls_sock: socket.socket | None = None
        self._tls_accept: asyncio.Task | None = None
        self._sessions: set[Publisher] = set()
        """Every connection (RTMP) and WHIP session, before and after its key check."""
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def tls_port(self) -> int:
        assert self._tls_sock is not None, "no RTMPS listener"
        return self._tls_sock.getsockname()[1]

    @property
    def preauth_buffered_bytes(self) -> int:
        """Bytes the connections not yet past the key check hold in their parsers and read buffers (the budget
        the pre-auth limits bound)."""
        return sum(s.buffered_bytes() for s in self._sessions if s.stream is None)

    async def start(self) -> None:
        s = self.settings
        self._server = await asyncio.start_server(self._accept, s.rtmp_host, s.rtmp_port, limit=_READ_LIMIT,
                                                  backlog=1024)
        log.info("rtmp ingest listening on %s:%d", s.rtmp_host, self.port)
        if s.rtmps_port is not None and self.tls is not None:
            self.tls.current()  # a missing or bad certificate fails the start, not the first publisher
            self._tls_sock = socket.create_server((s.rtmp_host, s.rtmps_port), backlog=1024)
            self._tls_sock.setblocking(False)
            self._tls_accept = asyncio.create_task(self._accept_tls(), name="rtmps-accept")
            log.info("rtmps ingest listening on %s:%d", s.rtmp_host, self.tls_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._tls_accept is not None:
            self._tls_accept.cancel()
            await asyncio.gather(self._tls_accept, return_exceptions=True)
        if self._tls_sock is not None:
            self._tls_sock.close()
        for session in list(self._sessions):
            session.abort("shutdown", "server shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in list(self.streams.values()):
            self._end_stream(stream)
        if self._server is not None:
            await self._server.wait_closed()

    def refuse(self, kind: RefusalKind, peer: str, reason: str) -> None:
        """Count (metric, ``stats.refused``) and log (rate-limited) why a connection was closed."""
        self.refusal_log.note(kind, peer, reason)
        self.refusals.append((peer, reason))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername", ("?", 0))[:2]
        session = _Session(self, f"{host}:{port}", address_bucket(str(host)), reader, writer)
        await self._serve(session, writer.transport.abort)

    async def _accept_tls(self) -> None:
        """The RTMPS accept loop: a connection is admitted (caps, pool) before any TLS work is done for it."""
        assert self._tls_sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._tls_sock)
            except OSError as exc:  # EMFILE and friends: back off rather than spin
                log.warning("rtmps accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            session = _Session(self, f"{addr[0]}:{addr[1]}", address_bucket(str(addr[0])), tls_sock=conn)
            self.adopt(asyncio.create_task(self._serve(session, conn.close), name="rtmps-session"))

    def enter(self, session: Publisher) -> bool:
        """Count a new publisher connection or session in (per-address caps, the pre-auth pool); False: refused,
        and counted. Every ``enter`` is paired with one ``leave``."""
        refusal = self.gate.admit(session)
        if refusal is not None:
            self.refuse(refusal[0], session.peer, refusal[1])
            return False
        self._sessions.add(session)
        self.stats.connections += 1
        return True

    def leave(self, session: Publisher) -> None:
        self.gate.release(session)
        self._sessions.discard(session)

    def adopt(self, task: asyncio.Task) -> None:
        """A publisher's task: ``close`` waits for it (after aborting its publisher)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, session: _Session, close: Callable[[], None]) -> None:
        if not self.enter(session):
            close()
            return
        session.task = asyncio.current_task()
        if session.task is not None:
            self.adopt(session.task)
        try:
            await session.run()
        finally:
            self.leave(session)

    async def admit_publisher(self, session: Publisher, app: str, key: str, metadata: dict[str, Any],
                              stream_id: str | None = None) -> RtmpStream:
        """The one key check every publisher passes (an RTMP ``publish``, a WHIP offer): the publisher cap, the
        address's key-guess backoff, the application, the authoriser; then ``session`` owns the stream (a new one,
        or the lingering one it resumes, replacing its previous publisher). ``stream_id``: the stream the
        publisher named (WHIP's URL), which the key must open. Raises ``Refused`` (the caller counts it)."""
        if not self.gate.has_publisher_room():  # checked again at attach; this spares the authoriser's work
            raise Refused(f"connection cap of {self.settings.max_connections} publishers reached; retry later",
                          kind="connection_cap")
        blocked = self.keys.blocked_for(session.bucket)
        if blocked:
            raise Refused(f"too many failed stream keys from this address; retry in {math.ceil(blocked)} s",
                          kind="key_rate_limited")
        if app != self.settings.rtmp_app:
            self.keys.failed(session.bucket)
            raise Refused(f"unknown application {app[:40]!r}", "NetStream.Publish.BadName", kind="bad_key")
        if not key:
            raise Refused("empty stream key", "NetStream.Publish.BadName", kind="bad_key")
        try:
            decision = await self.authoriser(app, key, metadata)
        except Exception as exc:
            log.exception("authoriser failed for %s", session.peer)
            raise Refused(f"admission unavailable: {exc.__class__.__name__}") from exc
        if decision.allowed and stream_id is not None and decision.stream_id != stream_id:
            decision = Decision(False, "bad stream key", bad_key=True)  # a key of another stream: no hint which
        if not decision.allowed:
            if decision.bad_key:
                self.keys.failed(session.bucket)
            raise Refused(decision.reason or "refused", "NetStream.Publish.BadName",
                          kind="bad_key" if decision.bad_key else "refused")
        return await self._attach(session, decision, key)

    async def _attach(self, session: Publisher, decision: Decision, key: str) -> RtmpStream:
        stream = self.streams.get(decision.stream_id)
        live = stream is not None and not stream.ended
        replacing = live and any(s is not session and s.stream is stream for s in self._sessions)
        if not replacing and not self.gate.has_publisher_room():
            raise Refused(f"connection cap of {self.settings.max_connections} publishers reached; retry later",
                          kind="connection_cap")
        self.gate.promote(session)
        if stream is None or stream.ended:
            stream = RtmpStream(
                decision.stream_id,
                decision.key_hash,
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
                previous.abort("replaced", "replaced by a new publisher with the same stream key")
            log.info("stream %s resumed by %s", stream.stream_id, session.peer)
        if stream._linger is not None:
            stream._linger.cancel()
            stream._linger = None
        with stream._lock:
            stream._owner = session
            stream.pacer.resync()
        stream.end_reason = ""
        stream.key_hash = decision.key_hash  # a resumed stream: the key its new publisher holds
        stream.publishing = True
        stream.stats.sessions += 1
        self.stats.accepted += 1
        return stream

    def detach(self, session: Publisher, stream: RtmpStream, reason: str = "") -> None:
        """``session`` stopped publishing ``stream``; ``reason``: why, when it did not end cleanly."""
        with stream._lock:
            if stream._owner is not session:
                return
            stream._owner = None
        stream.end_reason = reason[:300]
        stream.publishing = False
        loop = asyncio.get_running_loop()
        stream._linger = loop.call_later(self.settings.stream_linger_s, self._end_stream, stream)

    def revoke(self, stream_id: str, key_hash: str | None) -> RefusalKind | None:
        """The stream table now holds ``key_hash`` for ``stream_id`` (None: the stream was deleted): a publisher that
        authenticated with another key is closed, counted as ``key_revoked`` (it may come back with the new key and
        resume the lingering stream) or ``stream_deleted``. Returns that reason; None when no publisher was ended."""
        publisher = self.revoked(stream_id, key_hash)
        if publisher is None:
            return None
        if key_hash is None:
            kind: RefusalKind = "stream_deleted"
            publisher.abort(kind, "the stream was deleted")
        else:
            kind = "key_revoked"
            publisher.abort(kind, "the stream key was rotated: publish again with the new key")
        return kind

    def revoked(self, stream_id: str, key_hash: str | None) -> Publisher | None:
        """The publisher of ``stream_id`` whose key is no longer the one the table holds (``key_hash``), if any."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended or stream._owner is None:
            return None
        if key_hash is not None and hmac.compare_digest(stream.key_hash, key_hash):
            return None
        return next((s for s in self._sessions if s is stream._owner), None)

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
    """One TCP connection: (TLS,) handshake, then messages until close. ``stream`` is set once its key passed."""

    def __init__(
        self, server: RtmpServer, peer: str, bucket: str, reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None, tls_sock: socket.socket | None = None,
    ) -> None:
        self.server, self.peer, self.bucket = server, peer, bucket
        self.reader, self.writer, self._tls_sock = reader, writer, tls_sock
        self.settings = server.settings
        self.parser = ChunkStreamParser(server.preauth_limits)
        self.task: asyncio.Task | None = None
        self.app = ""
        self.connect_info: dict[str, Any] = {}
        self.stream: RtmpStream | None = None
        self.decoder = AvcDecoder(self.settings.max_width, self.settings.max_height)
        self.ack_window = 0
        self.last_ack = 0
        self._abort: tuple[RefusalKind, str] | None = None
        self._deadline = time.monotonic() + self.settings.handshake_timeout_s
        self._frame_deadline = math.inf
        self._audio_only_deadline = math.inf  # set at publish: audio alone past it is refused
        self._video_seen = False  # this session's (a resumed stream's stats count the earlier sessions too)
        self._commands = 0

    def abort(self, kind: RefusalKind, reason: str) -> None:
        self._abort = (kind, reason)
        if self.task is not None:
            self.task.cancel()

    evict = abort  # ConnectionGate closes the pre-auth connection it evicts through this

    def buffered_bytes(self) -> int:
        """What this connection holds in memory for its peer: the parser's pending bytes and the read buffer."""
        reader_buffer = len(getattr(self.reader, "_buffer", b""))
        return self.parser.pending_bytes + reader_buffer

    async def run(self) -> None:
        kind: RefusalKind | None = None
        reason: str | None = None
        try:
            if self._tls_sock is not None:
                await self._start_tls()
            await asyncio.wait_for(self._handshake(), max(0.0, self._deadline - time.monotonic()))
            while True:
                data = await self._read()
                if not data:
                    if self.parser.pending_bytes:
                        kind = "closed_mid_message"
                        reason = f"connection closed mid-message ({self.parser.pending_bytes} bytes pending)"
                    elif self.stream is not None:
                        reason = "publisher closed the connection"
                    else:
                        kind, reason = "closed_before_publish", "closed before publishing"
                    break
                await self._on_bytes(data)
        except _Probe:
            reason = _PROBE
        except _Unpublished:
            reason = "publisher unpublished"
        except Refused as exc:
            kind, reason = exc.kind, exc.reason
            await self._send_refusal(exc)
        except _Close as exc:
            kind, reason = exc.kind, exc.reason
        except RtmpProtocolError as exc:
            kind, reason = "protocol", f"protocol error: {exc}"
        except UnsupportedVideo as exc:
            kind, reason = "unsupported_media", str(exc)
            await self._send_refusal(Refused(reason))
        except TimeoutError:
            if self.stream is None:
                kind, reason = "handshake_timeout", "handshake/publish timeout"
            else:
                kind, reason = "idle_timeout", "idle timeout"
        except asyncio.CancelledError:
            kind, reason = self._abort or ("shutdown", "cancelled")
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            kind, reason = "connection_error", f"connection error: {exc.__class__.__name__}"
        except Exception as exc:  # one connection's bug must not take the server down
            log.exception("rtmp %s: unexpected error", self.peer)
            kind, reason = "internal", f"internal error: {exc}"
        finally:
            try:
                await self._finish(kind, reason or "closed")
            except Exception:
                log.exception("rtmp %s: error while closing", self.peer)
                self._hard_close()

    async def _start_tls(self) -> None:
        """RTMPS: TLS over the admitted socket, within the pre-auth deadline."""
        assert self._tls_sock is not None and self.server.tls is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        left = max(0.0, self._deadline - time.monotonic())
        try:
            transport, _ = await asyncio.wait_for(
                loop.connect_accepted_socket(lambda: protocol, self._tls_sock, ssl=self.server.tls.current(),
                                             ssl_handshake_timeout=left + 1.0),
                left,
            )
        except TimeoutError:
            raise
        except ssl.SSLError as exc:
            raise _Close("tls", f"TLS handshake failed: {exc.reason or exc.__class__.__name__}") from None
        except OSError as exc:  # the client gave up on the handshake (e.g. it does not trust the certificate)
            raise _Close("tls", f"TLS handshake failed: {exc.__class__.__name__}") from None
        self.reader, self.writer = reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    def _hard_close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        elif self._tls_sock is not None:
            self._tls_sock.close()

    async def _finish(self, kind: RefusalKind | None, reason: str) -> None:
        if reason == _PROBE:  # not an RTMP client at all: count it, no warning
            self.server.stats.probes += 1
            log.debug("rtmp %s: %s", self.peer, reason)
            self._hard_close()
            return
        if self.stream is not None:
            try:  # frames the decoder still holds (B-frame delay) belong to the stream too
                for chunk in self.stream.process(self.decoder.flush(), self):
                    self.stream.queue.put(chunk)
            except Exception as exc:
                log.warning("rtmp %s: decoder flush failed: %s", self.peer, exc)
            self.server.detach(self, self.stream, reason if kind is not None else "")
        if kind is None:
            log.info("rtmp %s: %s", self.peer, reason)
            if self.writer is not None:
                self.writer.close()
        else:
            self.server.refuse(kind, self.peer, reason)
            self._hard_close()

    async def _read(self) -> bytes:
        assert self.reader is not None
        now = time.monotonic()
        if self.stream is None:
            timeout, size = self._deadline - now, _PREAUTH_READ
        else:
            timeout, size = min(self.settings.idle_timeout_s, self._frame_deadline - now), 1 << 16
        try:
            if timeout <= 0:
                raise TimeoutError
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel (abort: replaced)
                return await self.reader.read(size)
        except TimeoutError:
            if self.stream is not None and time.monotonic() >= self._frame_deadline:
                raise _Close("no_frames", f"no video frame for {self.settings.frame_timeout_s:g} s "
                             "(ingest.frame_timeout_s)") from None
            raise

    async def _handshake(self) -> None:
        assert self.reader is not None and self.writer is not None
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
        assert self.writer is not None
        self.writer.write(data)

    def _send_command(self, csid: int, stream_id: int, *values: Any) -> None:
        self._send(encode_message(csid, COMMAND_AMF0, stream_id, 0, amf0.encode(*values), _OUT_CHUNK_SIZE))

    def _status(self, level: str, code: str, description: str) -> None:
        info = {"level": level, "code": code, "description": description}
        self._send_command(_CSID_STATUS, _MEDIA_STREAM_ID, "onStatus", 0, None, info)

    async def _send_refusal(self, exc: Refused) -> None:
        """Tell the client why, then wait briefly for it to close so the reason is not lost to a reset."""
        assert self.reader is not None and self.writer is not None
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
        # Before the key check, parsing pauses after each command: ``publish`` lifts the pre-auth limits, and the
        # media a client sends right behind it is then parsed under the publishing ones.
        messages = self.parser.feed(data, None if self.stream is not None else _is_command)
        while True:
            for msg in messages:
                await self._on_message(msg)
            if not self.parser.paused:
                break
            messages = self.parser.feed(b"", None if self.stream is not None else _is_command)
        received = self.parser.bytes_received
        if self.ack_window and received - self.last_ack >= self.ack_window:
            self.last_ack = received
            self._send(control_message(ACKNOWLEDGEMENT, received & 0xFFFFFFFF))

    async def _on_message(self, msg: Message) -> None:
        t = msg.type_id
        if self.stream is None and t not in _PREAUTH_CONTROL and t not in (COMMAND_AMF0, COMMAND_AMF3):
            raise _Close("preauth_command", f"message type {t} before publish (only connect, createStream and "
                         "publish are accepted before the stream key is checked)")
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
        if self.stream is None:
            self._commands += 1
            if name not in _PREAUTH_COMMANDS:
                raise _Close("preauth_command", f"command {name[:40]!r} before publish (only connect, createStream "
                             "and publish are accepted before the stream key is checked)")
            if self._commands > _MAX_PREAUTH_COMMANDS:
                raise _Close("preauth_command", f"more than {_MAX_PREAUTH_COMMANDS} commands before publish")
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
        metadata = {
            "peer": self.peer,
            "tcUrl": self.connect_info.get("tcUrl"),
            "flashVer": self.connect_info.get("flashVer"),
            "connect": self.connect_info,
        }
        self.stream = await self.server.admit_publisher(self, self.app, name.split("?")[0], metadata)
        self.parser.limits = self.server.limits
        self._frame_deadline = time.monotonic() + self.settings.frame_timeout_s
        self._audio_only_deadline = time.monotonic() + self.settings.audio_only_grace_s
        self._send(user_control(0, _MEDIA_STREAM_ID))
        self._status("status", "NetStream.Publish.Start", f"publishing stream {self.stream.stream_id}")
        log.info("rtmp %s publishing app=%s stream=%s", self.peer, self.app, self.stream.stream_id)

    def _on_data(self, values: list[Any]) -> None:
        if values and values[0] == "@setDataFrame":
            values = values[1:]
        if len(values) < 2 or values[0] != "onMetaData" or not isinstance(values[1], dict):
            return
        meta = values[1]
        log.info("rtmp %s onMetaData %s", self.peer, {k: meta[k] for k in list(meta)[:24]})
        problem = metadata_codec_problem(meta)
        if problem:
            raise Refused(problem, kind="unsupported_media")
        width, height = meta.get("width"), meta.get("height")
        numeric = isinstance(width, float | int) and isinstance(height, float | int)
        if numeric and (width > self.settings.max_width or height > self.settings.max_height):
            cap = f"{self.settings.max_width}x{self.settings.max_height}"
            raise Refused(f"video {int(width)}x{int(height)} exceeds the {cap} cap", kind="unsupported_media")
        if self.stream is not None:
            self.stream.metadata = meta

    def _on_audio(self, msg: Message) -> None:
        if self.stream is None:
            return
        self.stream.stats.audio_messages += 1
        if not self._video_seen and time.monotonic() >= self._audio_only_deadline:
            raise Refused(f"audio only: no video for {self.settings.audio_only_grace_s:g} s after publish; rheo "
                          "restyles video, publish an H.264 video track", kind="audio_only")
        self.stream.on_audio(msg.payload, msg.timestamp)

    async def _on_video(self, msg: Message) -> None:
        stream = self.stream
        if stream is None:
            raise RtmpProtocolError("video before publish")
        self._video_seen = True
        stream.stats.video_messages += 1
        tag = parse_video_tag(msg.payload)
        if tag.kind is TagKind.CONFIG:
            self.decoder.configure(tag.data)
            return
        if tag.kind is not TagKind.FRAME:
            return
        self._frame_deadline = time.monotonic() + self.settings.frame_timeout_s
        if tag.composition_ms:
            stream.stats.reordered_frames += 1
        await stream.hand_off(lambda: self._decode(stream, tag, msg.timestamp), self)

    def _decode(self, stream: RtmpStream, tag: Any, dts: int) -> list[av.VideoFrame]:
        frames = self.decoder.decode(tag, dts)
        stream.stats.decode_errors = self.decoder.errors
        return frames


def _is_command(msg: Message) -> bool:
    return msg.type_id in (COMMAND_AMF0, COMMAND_AMF3)
