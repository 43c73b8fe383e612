"""The tensor link's same-host path: frames in POSIX shared memory, only a descriptor on the socket.

When the listener and the sender share ``/dev/shm`` (same host, same IPC namespace) and the same uid, the socket
copies (sender → kernel → receiver) are wasted work. The listener says who it is right after the key handshake
(``hello``: a per-host token and its uid); a sender that finds the same token and uid (and ``link_shared_memory``
is ``auto`` on both ends) writes each frame once into a segment of its ``SegmentPool`` and sends only a
descriptor (segment name + length) inside the authenticated connection. The receiver maps the segment
(``SegmentMaps``) and decodes the frame in place: its tensors are views on shared memory.

* **Same host, proven, not guessed.** The token lives in a 0600 file *in* ``/dev/shm`` (``host_token``), so two
  processes read the same token exactly when they can open each other's segments (two pods on one node have
  separate ``/dev/shm``: they get different tokens and keep TCP).
* **No per-frame allocation.** Segments are reused; each has a busy byte the sender sets when it writes a frame
  and the receiver clears when the consumer releases the frame (``LinkFrame.release``), so a segment is written
  again only after the receiver let go. Space is reserved with ``posix_fallocate`` (a full tmpfs fails the
  reservation, and that frame goes inline over TCP, counted, instead of a SIGBUS on the write).
* **Nothing left in /dev/shm.** The receiver unlinks a segment's name as soon as it mapped it (the memory lives
  while either side maps it); the sender unlinks whatever is still named when it closes or reconnects. After a
  reconnect the sender retires every segment (the old receiver may hold views on one, or be dead) and
  resends the unacknowledged frames from their tensors; when a connection ends, the receiver unlinks what its
  sender named and never sent. Both ends killed at once: each connection's sender holds an ``flock`` on a lock
  file, and ``sweep`` (run at every new shared-memory connection) unlinks the segments of locks nobody holds.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import weakref
from typing import Any

from prometheus_client import Counter

SHM_DIR = "/dev/shm"
HEADER = 64  # busy byte, then padding: the frame starts 64-byte aligned
HELLO = struct.Struct("<8s16sQ16s")  # magic, host token (zeros: shared memory off), uid, device id (zeros: none)
_MAGIC = b"RHEOSHM2"
CHOICE = struct.Struct("<QQ")  # the sender's answer: its connection tag (0: TCP), and 1 when frames carry CUDA IPC
PATHS = ("cuda", "shm", "tcp")
DESCRIPTOR = struct.Struct("<48sQ")  # segment name, frame length
_NAME = re.compile(r"rheo-lnk-([0-9a-f]{16})-[0-9a-f]{12}")
_LOCK = re.compile(r"rheo-lnkl-([0-9a-f]{16})")  # a connection's owner lock: flock'ed while its sender lives
_OFF = bytes(16)

LINK_PATH = Counter("rheo_link_path_total", "tensor-link connections by the path their frames take (cuda: CUDA IPC "
                    "handles, same GPU; shm: POSIX shared memory on the same host; tcp: bytes on the socket; "
                    "local: a link to this process, services/link_local.py)",
                    ["path"])
LINK_SHM_INLINE = Counter("rheo_link_shm_inline_frames_total", "frames of a shared-memory connection sent inline "
                          "over TCP because no segment could be reserved (a full /dev/shm)")

_token: bytes | None = None
_token_lock = threading.Lock()


def host_token(shm_dir: str = SHM_DIR) -> bytes:
    """This host's (strictly: this ``/dev/shm``'s) token for this uid, created once by whoever comes first."""
    global _token
    with _token_lock:
        if _token is None:
            path = os.path.join(shm_dir, f"rheo-link-host-{os.getuid()}")
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                tmp = secrets.token_bytes(16)
                os.write(fd, tmp)
                os.close(fd)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                st = os.fstat(fd)
                token = os.read(fd, 16)
            finally:
                os.close(fd)
            if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077 or len(token) != 16:
                raise PermissionError(f"{path} is not this uid's 0600 link token")
            _token = token
        return _token


def hello(enabled: bool, token: bytes | None = None, device: bytes | None = None) -> bytes:
    """What a listener says after the key handshake: its token (zeros when it takes no shared memory), its uid and
    its device id (``services/link_cuda.py``; zeros when it takes no CUDA IPC)."""
    dev = (device or _OFF) if enabled else _OFF
    if not enabled:
        return HELLO.pack(_MAGIC, _OFF, os.getuid(), dev)
    try:
        tok = token if token is not None else host_token()
    except OSError:  # no usable /dev/shm here: TCP only
        tok = _OFF
    return HELLO.pack(_MAGIC, tok, os.getuid(), dev)


def choose_path(peer_hello: bytes, enabled: bool, device: bytes | None = None) -> str:
    """The one rule for a connection's path (``PATHS``), decided by the sender from the listener's hello: ``cuda``
    when both share this host (same token and uid) and the same CUDA device (same device id; ``device`` is ours,
    None without one or with ``link_cuda_ipc: off``), ``shm`` when they share only the host, else ``tcp``. The
    CUDA path rides on the shared-memory one (a frame's segment holds its exported tensors until released), so
    ``enabled`` (shared memory) off on either end means TCP."""
    magic, token, uid, peer_device = HELLO.unpack(peer_hello)
    if magic != _MAGIC:
        raise ValueError("not a rheo link hello")
    if not enabled or token == _OFF or uid != os.getuid():
        return "tcp"
    try:
        if not secrets.compare_digest(token, host_token()):
            return "tcp"
    except OSError:
        return "tcp"
    if device and peer_device != _OFF and secrets.compare_digest(device.ljust(16, b"\0")[:16], peer_device):
        return "cuda"
    return "shm"


def new_tag() -> int:
    """A connection's tag: every segment of the connection is named after it (``_prefix``)."""
    return secrets.randbits(63) | 1


def _prefix(tag: int) -> str:
    return f"rheo-lnk-{tag:016x}-"


def _lock_path(shm_dir: str, tag: int) -> str:
    return os.path.join(shm_dir, f"rheo-lnkl-{tag:016x}")


def _unlink_tag(shm_dir: str, tag: int, names: list[str]) -> int:
    n = 0
    for name in names:
        if name.startswith(_prefix(tag)) and _NAME.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(shm_dir, name))
                n += 1
    return n


def sweep(shm_dir: str = SHM_DIR) -> int:
    """Unlink the segments of senders that died with their receivers (SIGKILL of both ends: nobody else would).
    A live sender holds an ``flock`` on its connection's lock file, which the kernel drops when the process dies
    (whatever its PID namespace); a lock we can take, or segments without a lock file, are leftovers. Returns how
    many segments it unlinked."""
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    unlinked = 0
    tags = {int(m.group(1), 16) for n in names if (m := _NAME.fullmatch(n))}
    for name in names:
        m = _LOCK.fullmatch(name)
        if m is None:
            continue
        tag = int(m.group(1), 16)
        tags.discard(tag)
        try:
            fd = os.open(os.path.join(shm_dir, name), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its sender lives
            unlinked += _unlink_tag(shm_dir, tag, names)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(shm_dir, name))
        finally:
            os.close(fd)
    for tag in tags:  # segments whose lock is gone: their sender closed (or was cleaned) mid-way
        if not os.path.exists(_lock_path(shm_dir, tag)):
            unlinked += _unlink_tag(shm_dir, tag, names)
    return unlinked


class _Segment:
    def __init__(self, size: int, tag: int, shm_dir: str) -> None:
        self.name = f"{_prefix(tag)}{secrets.token_hex(6)}"
        self.path = os.path.join(shm_dir, self.name)
        self.size = size
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, HEADER + size)  # ENOSPC here, not SIGBUS on the write
            self.map = mmap.mmap(fd, HEADER + size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        os.close(fd)
        self.named = True
        self.keep: Any = None  # what must outlive the frame until the receiver releases it (CUDA IPC exports)

    @property
    def busy(self) -> bool:
        return self.map[0] != 0

    def unlink(self) -> None:
        if self.named:
            self.named = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def close(self) -> None:
        self.unlink()
        self.keep = None
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()


class SegmentPool:
    """A sender's segments (module docstring). Used by the link's send thread only."""

    def __init__(self, max_segments: int = 16, shm_dir: str = SHM_DIR) -> None:
        self.max_segments = max_segments
        self.shm_dir = shm_dir
        self._segments: list[_Segment] = []
        self.tag = 0  # the current connection's (``new_connection``)
        self._lock_fd: int | None = None
        _POOLS.add(self)  # a sender never closed still unlinks its names when the process exits
        self.allocations = 0
        self.reuses = 0
        self.retired = 0

    def put(self, parts: list[Any], nbytes: int, keep: Any = None) -> bytes | None:
        """Write a frame's parts into a free segment, holding ``keep`` until the receiver releases it; returns the
        descriptor, or None when no segment could be reserved (the caller sends the frame inline)."""
        free = [s for s in self._segments if s.size >= nbytes and not s.busy]
        if free:
            seg = min(free, key=lambda s: s.size)
            self.reuses += 1
        else:
            idle = [s for s in self._segments if not s.busy]
            if len(self._segments) >= self.max_segments and idle:  # too small ones make room for a bigger one
                self._retire(min(idle, key=lambda s: s.size))
            try:
                seg = _Segment(max(nbytes, 1 << 20), self.tag, self.shm_dir)
            except OSError:
                LINK_SHM_INLINE.inc()
                return None
            self.allocations += 1
            self._segments.append(seg)
        view = memoryview(seg.map)
        try:
            pos = HEADER
            for p in parts:
                raw = memoryview(p).cast("B")
                view[pos:pos + raw.nbytes] = raw
                pos += raw.nbytes
            view[0] = 1  # busy until the receiver releases the frame
        finally:
            view.release()
        seg.keep = keep
        return DESCRIPTOR.pack(seg.name.encode(), nbytes)

    def _retire(self, seg: _Segment) -> None:
        self._segments.remove(seg)
        seg.close()
        self.retired += 1

    def close(self) -> None:
        """Retire every segment: at close, and at a reconnect (a new receiver maps by name, and the old one
        unlinked the names it mapped; busy segments may still be viewed by the old receiver or lost with it, and
        are never written again: its mapping, if any, lives on until it lets go)."""
        for seg in list(self._segments):
            self._retire(seg)
        if self._lock_fd is not None:  # after the segments: a segment never outlives its lock unswept
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_lock_path(self.shm_dir, self.tag))
            os.close(self._lock_fd)
            self._lock_fd = None

    def new_connection(self, shared: bool) -> int:
        """Retire every segment and start a connection; returns its tag (0: this connection sends inline)."""
        self.close()
        self.tag = 0
        if shared:
            sweep(self.shm_dir)
            tag = new_tag()
            try:
                fd = os.open(_lock_path(self.shm_dir, tag), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except OSError:
                return 0  # no /dev/shm to write: inline
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd, self.tag = fd, tag
        return self.tag

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._segments]


_POOLS: weakref.WeakSet[SegmentPool] = weakref.WeakSet()


@atexit.register
def _close_pools() -> None:
    for pool in list(_POOLS):
        with contextlib.suppress(Exception):
            pool.close()


class SegmentMaps:
    """A receiver's mappings of one connection's segments (named after its ``tag``), by name."""

    def __init__(self, max_frame_bytes: int, tag: int, shm_dir: str = SHM_DIR) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.tag = tag
        self.shm_dir = shm_dir
        self._maps: dict[str, mmap.mmap] = {}

    def frame(self, descriptor: bytes | bytearray) -> tuple[memoryview, Any]:
        """The frame a descriptor names, as a view on shared memory, and the function that releases it to the
        sender. Raises ``ValueError`` for a descriptor this receiver will not map."""
        raw_name, n = DESCRIPTOR.unpack(descriptor)
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        match = _NAME.fullmatch(name)
        if match is None or int(match.group(1), 16) != self.tag:
            raise ValueError(f"bad segment name {name!r}")
        if n > self.max_frame_bytes:
            raise ValueError(f"frame of {n} bytes exceeds the {self.max_frame_bytes}-byte cap")
        mm = self._maps.get(name)
        if mm is None:
            mm = self._map(name)
            self._maps[name] = mm
        if HEADER + n > len(mm):
            raise ValueError(f"frame of {n} bytes overruns segment {name}")
        return memoryview(mm)[HEADER:HEADER + n], lambda: mm.__setitem__(0, 0)

    def _map(self, name: str) -> mmap.mmap:
        path = os.path.join(self.shm_dir, name)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode) or st.st_size <= HEADER:
                raise ValueError(f"segment {name} is not this uid's")
            mm = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # mapped now: the name is no longer needed, so no crash can leak it
        return mm

    def release_all(self) -> None:
        """The connection ended: forget the mappings (each unmaps once no frame still views it) and unlink what
        the sender named for this connection and this receiver never mapped (a sender that crashed between
        writing a segment and sending its descriptor leaves one; a live sender retires them all anyway)."""
        self._maps.clear()
        prefix = _prefix(self.tag)
        with contextlib.suppress(OSError):
            for name in os.listdir(self.shm_dir):
                if name.startswith(prefix) and _NAME.fullmatch(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.shm_dir, name))


def leftover_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Segment names in ``shm_dir`` (a leak check for tests)."""
    return sorted(n for n in os.listdir(shm_dir) if _NAME.fullmatch(n))
