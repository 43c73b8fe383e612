"""The tensor link: a direct TCP connection between adjacent DiT stages for hidden states and KV-shard moves.

Hidden states are 3–16 MiB per micro-step; through NATS that costs ~15 ms a hop on loopback, through a blocking
socket with ``recv_into`` a preallocated buffer ~2 ms (asyncio streams measured 4× slower). So each direction runs
on a dedicated thread:

- ``LinkSender`` (upstream) connects to the downstream stage's ``LinkListener`` and writes frames with
  ``sendmsg`` straight from the tensors' bytes (no join copy).
- ``LinkListener`` (downstream) accepts connections and reads each frame into a buffer from a small pool, then
  hands the decoded message — tensors are views on that buffer — to the event loop. The consumer calls
  ``LinkFrame.release()`` when it no longer needs the tensors (e.g. after the copy to the GPU).

Wire, upstream → downstream: ``u64 length, u64 sender id, u64 seq`` (LE) + one rheo frame (``proto.codec``), so
headers (trace context) ride inside the frame. With a link key (``dit_stage.link_key``; required once a stage listens
beyond loopback) every connection first proves, both ways, that its peer holds the key: the listener sends
``RHEOLNK2`` + a 16-byte nonce, the sender answers its own nonce + HMAC-SHA256(key, "S" + both nonces), the
listener HMAC-SHA256(key, "L" + both nonces) (``2``: the wire since the hello below). A connection that fails it
is closed and counted before any frame is read (docs/tensor-link.md). Downstream → upstream: after the key proof,
the listener's hello (its host token and uid, ``services/link_shm.py``), then ``u64 seq`` acknowledging every frame
read. Upstream, after the hello: a u64 connection tag (0: TCP) and a u64 path flag (1: CUDA IPC). A sender on the
same host (same token and uid) puts frames in shared memory and writes only a descriptor (the length's top bit
set); on the same GPU too (same device id in the hello), the frames' device tensors are IPC handles, not bytes
(``services/link_cuda.py``; the path rule is ``link_shm.choose_path``).
Backpressure is end to end: a consumer that holds every pool buffer stops the reader thread, TCP's window fills,
the sender thread blocks, and ``LinkSender.send`` waits once ``queue_depth`` frames are queued.
A frame longer than ``max_frame_bytes`` cannot be skipped safely (the stream would lose sync), so that connection is
closed with a logged reason; a frame of valid length that fails to decode is counted and dropped.
A write into a connection whose peer just died succeeds locally, so the sender keeps every frame until it is
acknowledged (at most ``max_unacked``); after a reconnect it resends the unacknowledged ones in order and the
listener drops any (sender id, seq) it already delivered: exactly-once, in order, across reconnects. ``close``
returns how many frames it discards unacknowledged, so whoever replaces a link counts them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import os
import queue
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from proto import Limits, Message, ProtocolError, decode_with_headers
from services import link_shm
from services.link_local import LocalSender

if TYPE_CHECKING:
    from services.link_cuda import DeviceIpc

log = logging.getLogger("rheo.link")

_PREFIX = struct.Struct("<QQQ")  # length, sender id, seq
_ACK = struct.Struct("<Q")
_SHM_FLAG = 1 << 63  # in the length: the frame is in shared memory, the payload is its descriptor (link_shm)
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
_HELLO = b"RHEOLNK2"
_NONCE = 16
_MAC = hashlib.sha256().digest_size
HANDSHAKE_TIMEOUT_S = 5.0


class LinkError(RuntimeError):
    """A frame the link will not carry, or a link that is closed."""


@dataclass
class LinkStats:
    frames: int = 0
    bytes: int = 0
    malformed: int = 0
    refused_connections: int = 0
    reconnects: int = 0
    seconds: float = 0.0  # time spent in the socket calls (send or receive)
    discarded: int = 0  # frames a closed sender never got acknowledged (queued or written): see ``close``
    shm_frames: int = 0  # frames through shared memory (services/link_shm.py; a sender counts resends too)
    device_frames: int = 0  # of those, frames whose device tensors went as CUDA IPC handles (no bytes copied)
    reencoded: int = 0  # device frames a sender turned into bytes: the connection changed path, or no segment


@dataclass
class LinkFrame:
    """One received message; its tensors are views on a pool buffer until ``release``."""

    message: Message
    headers: dict[str, str]
    nbytes: int
    recv_seconds: float
    peer: str
    _release: Any = field(repr=False, default=None)
    local: bool = False  # handed over in this process (``link_local``): the message's own tensors, not a buffer's

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def __enter__(self) -> LinkFrame:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"tensor-link endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from the socket; False when the peer closed first."""
    got = 0
    n = view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return False
        got += k
    return True


def _mac(key: bytes, side: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, side + first + second, hashlib.sha256).digest()


def _recv_bytes(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    return bytes(buf) if _recv_exact(sock, memoryview(buf)) else None


def listener_handshake(conn: socket.socket, key: bytes) -> bool | None:
    """The listener's side of the key proof: True (the peer holds the key), False (it does not), None (it left
    before answering: a reachability probe or a dead peer, not an attack)."""
    ours = os.urandom(_NONCE)
    conn.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        conn.sendall(_HELLO + ours)
        answer = _recv_bytes(conn, _NONCE + _MAC)
        if answer is None:
            return None
        theirs, mac = answer[:_NONCE], answer[_NONCE:]
        if not hmac.compare_digest(mac, _mac(key, b"S", ours, theirs)):
            return False
        conn.sendall(_mac(key, b"L", theirs, ours))
    except TimeoutError:
        return False
    finally:
        conn.settimeout(None)
    return True


def sender_handshake(sock: socket.socket, key: bytes, timeout: float = HANDSHAKE_TIMEOUT_S) -> bool:
    """The sender's side: False when the listener is not a keyed rheo link or does not hold the key."""
    ours = os.urandom(_NONCE)
    sock.settimeout(timeout)
    try:
        hello = _recv_bytes(sock, len(_HELLO) + _NONCE)
        if hello is None or not hello.startswith(_HELLO):
            return False
        theirs = hello[len(_HELLO):]
        sock.sendall(ours + _mac(key, b"S", theirs, ours))
        proof = _recv_bytes(sock, _MAC)
        return proof is not None and hmac.compare_digest(proof, _mac(key, b"L", ours, theirs))
    except (TimeoutError, OSError):
        return False
    finally:
        sock.settimeout(None)


class LinkListener:
    """The receiving end: accepts upstream connections and yields ``LinkFrame``s on the event loop."""

    _running: ClassVar[dict[int, LinkListener]] = {}  # this process's started listeners, by port (``in_process``)

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        buffers: int = 4,
        limits: Limits | None = None,
        key: bytes | None = None,
        shared_memory: bool = True,
        device: DeviceIpc | None = None,
    ) -> None:
        self.host = host
        self.key = key
        self.shared_memory = shared_memory
        self.device = device  # offered to a sender on the same GPU (shared memory must be on too)
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.limits = limits or Limits(max_message_bytes=max_frame_bytes, max_tensor_bytes=max_frame_bytes)
        self.stats = LinkStats()
        self._pool: queue.Queue[bytearray] = queue.Queue()
        for _ in range(buffers):
            self._pool.put(bytearray())
        self._frames: asyncio.Queue[LinkFrame] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._delivered: dict[int, int] = {}  # sender id -> highest seq delivered

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> LinkListener:
        """Listen (call from the event loop that will consume frames)."""
        self._loop = asyncio.get_running_loop()
        self._frames = asyncio.Queue()
        sock = socket.create_server((self.host, self.port), reuse_port=False, backlog=8)
        self.port = sock.getsockname()[1]
        self._sock = sock
        threading.Thread(target=self._accept_loop, name=f"link-accept-{self.port}", daemon=True).start()
        LinkListener._running[self.port] = self
        return self

    @classmethod
    def in_process(cls, endpoint: str) -> LinkListener | None:
        """This process's running listener on ``endpoint``'s port (the caller knows the endpoint is its own)."""
        return cls._running.get(parse_endpoint(endpoint)[1])

    def deliver(self, message: Message, headers: dict[str, str]) -> None:
        """A message from this process (``link_local.LocalSender``), queued after the frames already received."""
        if self._frames is None:
            raise LinkError("listener not started")
        self.stats.frames += 1
        self._frames.put_nowait(LinkFrame(message, headers, 0, 0.0, "this process", local=True))

    async def recv(self, timeout: float | None = None) -> LinkFrame:
        if self._frames is None:
            raise LinkError("listener not started")
        if timeout is None:
            return await self._frames.get()
        return await asyncio.wait_for(self._frames.get(), timeout)

    def drop_connections(self) -> None:
        """Cut every current connection (senders reconnect); a network blip, for fault tests."""
        with self._lock:
            for c in list(self._conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        if LinkListener._running.get(self.port) is self:
            del LinkListener._running[self.port]
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept (close alone does not)
            with contextlib.suppress(OSError):
                self._sock.close()
        with self._lock:
            for c in list(self._conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                    c.close()
            self._conns.clear()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            peer = f"{addr[0]}:{addr[1]}"
            threading.Thread(target=self._recv_loop, args=(conn, peer), name=f"link-recv-{peer}",
                             daemon=True).start()

    def _recv_loop(self, conn: socket.socket, peer: str) -> None:
        maps: link_shm.SegmentMaps | None = None
        try:
            if self.key is not None:
                proven = listener_handshake(conn, self.key)
                if not proven:
                    if proven is False:
                        self.stats.refused_connections += 1
                        log.warning("tensor link from %s: refused, the peer does not hold the link key", peer)
                    return
            conn.sendall(link_shm.hello(self.shared_memory, device=self.device.id if self.device else None))
            choice = _recv_bytes(conn, link_shm.CHOICE.size)
            if choice is None:
                return
            tag, on_device = link_shm.CHOICE.unpack(choice)
            if (tag or on_device) and (not self.shared_memory or (on_device and (self.device is None or not tag))):
                self.stats.refused_connections += 1
                log.warning("tensor link from %s: refused, a path this listener did not offer", peer)
                return
            if tag:
                maps = link_shm.SegmentMaps(self.max_frame_bytes, tag)
            device_open = self.device.open if on_device and self.device is not None else None
            while not self._closed.is_set() and self._recv_one(conn, peer, maps, device_open):
                pass
        except OSError as e:
            if not self._closed.is_set():
                log.info("tensor link from %s closed: %s", peer, e)
        except Exception:
            log.exception("tensor link from %s: reader failed; connection closed", peer)
        finally:
            if maps is not None:
                maps.release_all()
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _recv_one(self, conn: socket.socket, peer: str, maps: link_shm.SegmentMaps | None = None,
                  device_open: Any = None) -> bool:
        """Read, acknowledge and deliver one frame (device tensors mapped by ``device_open``, on a CUDA IPC
        connection); False when the connection is done."""
        prefix = bytearray(_PREFIX.size)
        if not _recv_exact(conn, memoryview(prefix)):
            return False
        n, sender_id, seq = _PREFIX.unpack(prefix)
        shared, n = bool(n & _SHM_FLAG), n & ~_SHM_FLAG
        if shared and (maps is None or n != link_shm.DESCRIPTOR.size):
            self.stats.refused_connections += 1
            log.warning("tensor link from %s: a shared-memory frame this listener did not offer; closing", peer)
            return False
        if n > self.max_frame_bytes:
            self.stats.refused_connections += 1
            log.warning("tensor link from %s: frame of %d bytes exceeds the %d-byte cap; closing the connection",
                        peer, n, self.max_frame_bytes)
            return False
        buf = self._pool.get()  # blocks while the consumer holds every buffer: backpressure
        delivered = False
        release_segment: Any = None
        try:
            message: Message | None = None
            headers: dict[str, str] = {}
            error = ""
            t0 = time.perf_counter()
            if shared:  # the frame is in the sender's segment: map it, no socket copy
                assert maps is not None
                descriptor = bytearray(n)
                if not _recv_exact(conn, memoryview(descriptor)):
                    return False
                try:
                    view, release_segment = maps.frame(descriptor)
                    n = view.nbytes
                except (ValueError, OSError) as e:
                    # not a lost frame: its sender retired the segment (it reconnected, and resends the frame on
                    # the new connection) or is hostile; either way this connection is done, unacknowledged
                    log.warning("tensor link from %s: cannot map a shared-memory frame (%s); closing", peer, e)
                    return False
            else:
                if len(buf) < n:
                    # a new buffer, not a resize: tensors of earlier frames may still view the old one
                    buf = bytearray(max(n, 2 * len(buf)))
                view = memoryview(buf)[:n]
                if not _recv_exact(conn, view):
                    return False
            dt = time.perf_counter() - t0
            try:
                message, headers = decode_with_headers(view, None, self.limits, device_open)
            except ProtocolError as e:
                error = str(e)
            # check-and-deliver is atomic: an old connection still draining and the new one carrying resends
            # must not interleave their deliveries
            with self._lock:
                if seq > self._delivered.get(sender_id, 0):  # else: resent after a reconnect, already delivered
                    self._delivered[sender_id] = seq
                    if message is None:
                        self.stats.malformed += 1
                        log.warning("tensor link from %s: dropped malformed frame (%d bytes): %s", peer, n, error)
                    else:
                        self.stats.frames += 1
                        self.stats.shm_frames += shared
                        self.stats.bytes += n
                        self.stats.seconds += dt
                        frame = LinkFrame(message, headers, n, dt, peer,
                                          _release=lambda b=buf, r=release_segment: self._release(b, r))
                        assert self._loop is not None and self._frames is not None
                        self._loop.call_soon_threadsafe(self._frames.put_nowait, frame)
                        delivered = True
            conn.sendall(_ACK.pack(seq))
            return True
        finally:
            if not delivered:
                self._release(buf, release_segment)

    def _release(self, buf: bytearray, release_segment: Any) -> None:
        if release_segment is not None:
            release_segment()  # the sender may write that segment again
        self._pool.put(buf)


@dataclass(frozen=True)
class LinkOptions:
    """What every link of a stage shares, both ends: the frame cap, the link key, whether a peer on the same
    host may get frames through shared memory (``dit_stage.link_shared_memory``), and the stage's device for CUDA
    IPC with a peer on the same GPU (``dit_stage.link_cuda_ipc``; None: no device path)."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME
    key: bytes | None = None
    shared_memory: bool = True
    device: DeviceIpc | None = None

    def sender(self, endpoint: str, own: bool = False) -> Sender:
        """``own``: the listener is this process's (a one-stage ring returns items to itself): the in-process path
        (``services/link_local.py``), or, should that listener not be found here, a socket without the CUDA IPC
        path, which cannot map a process's own allocations."""
        local = LinkListener.in_process(endpoint) if own else None
        if local is not None:
            return LocalSender(local, endpoint)
        return LinkSender(endpoint, max_frame_bytes=self.max_frame_bytes, key=self.key,
                          shared_memory=self.shared_memory, device=None if own else self.device)

    def listener(self, host: str = "127.0.0.1", port: int = 0) -> LinkListener:
        return LinkListener(host, port, max_frame_bytes=self.max_frame_bytes, key=self.key,
                            shared_memory=self.shared_memory, device=self.device)


@dataclass
class _Outgoing:
    """One queued frame: its parts, and for a frame encoded with device handles (``keep``: the exported tensors,
    held until released) the message, to encode again as bytes should the connection's path change."""

    parts: list[Any]
    keep: list[Any] = field(default_factory=list)
    message: Message | None = None
    headers: dict[str, str] | None = None

    @property
    def nbytes(self) -> int:
        return sum(memoryview(p).nbytes for p in self.parts)

    def as_bytes(self) -> None:
        """Encode again with the tensors' bytes (a blocking device→host copy, on the send thread)."""
        assert self.message is not None
        self.parts = self.message.encode_parts(self.headers)
        self.keep, self.message = [], None


class LinkSender:
    """The sending end: one connection to a downstream listener, written by a dedicated thread."""

    def __init__(
        self,
        endpoint: str,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        queue_depth: int = 2,
        max_unacked: int = 8,
        connect_timeout_s: float = 2.0,
        backoff_s: float = 0.05,
        backoff_max_s: float = 2.0,
        key: bytes | None = None,
        shared_memory: bool = True,
        device: DeviceIpc | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.key = key
        self.shared_memory = shared_memory
        self.device = device
        self.path: str | None = None  # the current connection's: link_shm.PATHS
        self._segments = link_shm.SegmentPool(max_segments=max_unacked + queue_depth + 2)
        self.host, self.port = parse_endpoint(endpoint)
        self.max_frame_bytes = max_frame_bytes
        self.queue_depth = queue_depth
        self.max_unacked = max_unacked
        self.connect_timeout_s = connect_timeout_s
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.stats = LinkStats()
        self.sender_id = random.getrandbits(63) | 1
        self._seq = 0
        self._queue: queue.Queue[tuple[_Outgoing | None, asyncio.Future[None] | None] | None] = queue.Queue()
        self._unacked: collections.deque[tuple[int, _Outgoing]] = collections.deque()
        self._acked = threading.Condition()
        self._broken = threading.Event()
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def segments(self) -> link_shm.SegmentPool:
        """The shared-memory segments of the current connection (read-only use: tests, stats)."""
        return self._segments

    def start(self) -> LinkSender:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.queue_depth)
        self._thread = threading.Thread(target=self._send_loop, name=f"link-send-{self.endpoint}", daemon=True)
        self._thread.start()
        return self

    @property
    def on_device(self) -> bool:
        """The current connection hands device tensors over as CUDA IPC handles: send them as they are (no host
        staging)."""
        return self.path == "cuda"

    async def send(self, message: Message, headers: dict[str, str] | None = None) -> int:
        """Queue a message (waits while ``queue_depth`` frames are queued); returns the frame size. On a CUDA IPC
        connection its device tensors are exported here, on the thread whose stream produced them (the export
        records the event the peer waits on)."""
        if self._slots is None or self._closed.is_set():
            raise LinkError(f"link to {self.endpoint} is not running")
        out = _Outgoing([])
        if self.on_device and self.device is not None:
            device = self.device

            def share(t: Any) -> dict[str, Any] | None:
                fields = device.share(t)
                if fields is not None:
                    out.keep.append(t)
                return fields

            out.parts = message.encode_parts(headers, device=share)
            if out.keep:
                out.message, out.headers = message, headers
        else:
            out.parts = message.encode_parts(headers)
        n = out.nbytes
        if n > self.max_frame_bytes:
            raise LinkError(f"{n}-byte frame exceeds the link's {self.max_frame_bytes}-byte cap")
        await self._slots.acquire()
        if self._closed.is_set():  # closed while it waited: the caller still has the message (e.g. to send again)
            self._slots.release()
            raise LinkError(f"link to {self.endpoint} closed")
        self._queue.put((out, None))
        return n

    async def flush(self) -> None:
        """Wait until everything queued so far has been written to the socket."""
        assert self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()
        self._queue.put((None, done))
        await done

    async def acknowledged(self) -> None:
        """Wait until everything queued so far has been read by the peer. Only then may a sender that is done be
        closed: closing with unread acknowledgements resets the connection, and the peer loses the frames it had
        not read yet."""
        await self.flush()
        await asyncio.to_thread(self._wait_acked)

    def _wait_acked(self) -> None:
        with self._acked:
            while self._unacked and not self._closed.is_set():
                self._acked.wait(0.05)

    def close(self) -> int:
        """Stop; returns how many frames are discarded: queued and never written, or written and never
        acknowledged. A caller replacing a link counts them (nothing a link carried is lost silently)."""
        self._closed.set()
        self._queue.put(None)
        with self._acked:
            self._acked.notify_all()
        self._drop_socket()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._segments.close()
        with self._acked:
            discarded = len(self._unacked)
            self._unacked.clear()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                continue
            out, done = item
            if done is not None and self._loop is not None:  # a flush waiting on a closed link: release it
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(lambda d=done: d.done() or d.set_result(None))
            elif out is not None:
                discarded += 1
        self.stats.discarded += discarded
        if discarded:
            log.info("tensor link to %s closed with %d unacknowledged frames", self.endpoint, discarded)
        return discarded

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _connect(self) -> socket.socket | None:
        delay = self.backoff_s
        while not self._closed.is_set():
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
            except OSError as e:
                log.debug("tensor link to %s: connect failed (%s); retrying in %.2fs", self.endpoint, e, delay)
                self._closed.wait(delay * random.uniform(0.8, 1.2))
                delay = min(self.backoff_max_s, delay * 2)
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.key is not None and not sender_handshake(sock, self.key, self.connect_timeout_s):
                self.stats.refused_connections += 1
                log.warning("tensor link to %s: the listener did not prove the link key; retrying in %.2fs",
                            self.endpoint, delay)
                with contextlib.suppress(OSError):
                    sock.close()
                self._closed.wait(delay * random.uniform(0.8, 1.2))
                delay = min(self.backoff_max_s, delay * 2)
                continue
            if not self._choose_path(sock):
                with contextlib.suppress(OSError):
                    sock.close()
                self._closed.wait(delay * random.uniform(0.8, 1.2))
                delay = min(self.backoff_max_s, delay * 2)
                continue
            threading.Thread(target=self._ack_loop, args=(sock,), name=f"link-ack-{self.endpoint}",
                             daemon=True).start()
            return sock
        return None

    def _choose_path(self, sock: socket.socket) -> bool:
        """Read the listener's hello and pick this connection's path; False when it sent none (not a rheo link,
        or it died). Every segment of an earlier connection is retired (link_shm)."""
        sock.settimeout(self.connect_timeout_s)
        path = "tcp"
        try:
            peer = _recv_bytes(sock, link_shm.HELLO.size)
            if peer is not None:
                path = link_shm.choose_path(peer, self.shared_memory, self.device.id if self.device else None)
        except (OSError, ValueError):
            peer = None
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)
        if peer is None:
            log.warning("tensor link to %s: the listener sent no hello; retrying", self.endpoint)
            return False
        # every segment of an earlier connection is retired: a new one maps afresh (the old receiver unlinked the
        # names it mapped)
        tag = self._segments.new_connection(path != "tcp")
        path = path if tag else "tcp"  # no /dev/shm to write after all
        try:
            sock.sendall(link_shm.CHOICE.pack(tag, path == "cuda"))
        except OSError:
            return False
        self.path = path
        link_shm.LINK_PATH.labels(self.path).inc()
        return True

    def _ack_loop(self, sock: socket.socket) -> None:
        ack = bytearray(_ACK.size)
        try:
            while _recv_exact(sock, memoryview(ack)):
                (seq,) = _ACK.unpack(ack)
                with self._acked:
                    while self._unacked and self._unacked[0][0] <= seq:
                        self._unacked.popleft()
                    self._acked.notify_all()
        except OSError:
            pass
        with self._acked:  # the peer went away: the send thread reconnects and resends, even when idle
            if self._sock is sock and not self._closed.is_set():
                self._broken.set()
            self._acked.notify_all()

    def _send_loop(self) -> None:
        assert self._loop is not None and self._slots is not None
        while True:
            if self._broken.is_set():
                self._reconnect()
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            out, done = item
            if done is not None or out is None:
                self._loop.call_soon_threadsafe(lambda d=done: d is None or d.done() or d.set_result(None))
                continue
            with self._acked:
                while len(self._unacked) >= self.max_unacked and not self._closed.is_set():
                    if self._broken.is_set():
                        self._acked.release()
                        try:
                            self._reconnect()
                        finally:
                            self._acked.acquire()
                    else:
                        self._acked.wait(0.05)
                self._seq += 1
                self._unacked.append((self._seq, out))
            frame = self._framed(self._seq, out)
            if self._write(frame):
                self.stats.frames += 1
                self.stats.bytes += out.nbytes
            self._loop.call_soon_threadsafe(self._slots.release)

    def _reconnect(self) -> None:
        self._broken.clear()
        self.stats.reconnects += 1
        self._drop_socket()
        self._write(None)

    def _write(self, frame: list[Any] | None) -> bool:
        """Write one frame (or none); after any (re)connect, first write every unacknowledged frame in order."""
        while not self._closed.is_set():
            frames = [frame] if frame is not None else []
            if self._sock is None:
                self._sock = self._connect()
                if self._sock is None:
                    return False
                with self._acked:  # the current frame is already the last unacknowledged one
                    frames = [self._framed(seq, out) for seq, out in self._unacked]
            try:
                t0 = time.perf_counter()
                for f in frames:
                    self._sendall(self._sock, f)
                self.stats.seconds += time.perf_counter() - t0
                return True
            except OSError as e:
                log.warning("tensor link to %s broke (%s); reconnecting and resending unacknowledged frames",
                            self.endpoint, e)
                self.stats.reconnects += 1
                self._drop_socket()
        return False

    def _framed(self, seq: int, out: _Outgoing) -> list[Any]:
        """The bytes to write for one frame: inline, or (same host) a descriptor of the segment it was put in. A
        frame of device handles goes only on a CUDA IPC connection, in a segment (which holds the tensors until the
        peer releases the frame); anywhere else it is encoded again with its bytes (counted ``reencoded``)."""
        if out.keep and self.path != "cuda":
            out.as_bytes()
            self.stats.reencoded += 1
        if self.path in ("shm", "cuda"):
            descriptor = self._segments.put(out.parts, out.nbytes, keep=out.keep or None)
            if descriptor is not None:
                self.stats.shm_frames += 1
                self.stats.device_frames += bool(out.keep)
                return [_PREFIX.pack(len(descriptor) | _SHM_FLAG, self.sender_id, seq), descriptor]
            if out.keep:  # handles cannot go inline (nothing would hold the tensors until released)
                out.as_bytes()
                self.stats.reencoded += 1
        return [_PREFIX.pack(out.nbytes, self.sender_id, seq), *out.parts]

    @staticmethod
    def _sendall(sock: socket.socket, parts: list[Any]) -> None:
        views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
        while views:
            sent = sock.sendmsg(views[:512])
            while sent and views:
                if sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0


Sender = LinkSender | LocalSender
"""What ``LinkOptions.sender`` returns: a socket's sender, or the in-process one (``services/link_local.py``)."""
