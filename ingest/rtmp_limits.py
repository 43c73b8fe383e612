"""What an RTMP client may hold before and after its stream key is checked: connection caps, the pre-auth pool,
key-guess backoff, and the fixed set of reasons a connection is closed for (metric + rate-limited log).

Kept apart from ``ingest.server`` (the protocol) so the policies are testable without sockets. A client is
identified by its *address bucket* (``address_bucket``): an IPv4 address, or the /64 of an IPv6 one (one host
usually owns a whole /64). Nothing here is ever used as a metric label.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Literal, Protocol, get_args

from prometheus_client import Counter, Gauge

from services.config import IngestSettings
from services.droplog import DropLog

__all__ = [
    "REFUSAL_KINDS",
    "RTMP_CONNECTIONS",
    "RTMP_REFUSED",
    "ConnectionGate",
    "KeyGuessLimiter",
    "RefusalKind",
    "RefusalLog",
    "address_bucket",
]

log = logging.getLogger("rheo.ingest.rtmp")

RefusalKind = Literal[
    "connection_cap",  # every publisher slot (ingest.max_connections) is taken
    "ip_cap",  # the address already holds ingest.max_connections_per_ip connections
    "preauth_ip_cap",  # the address already holds ingest.max_preauth_per_ip connections before their key check
    "preauth_evicted",  # the pre-auth pool was full: the oldest connection of its biggest holder made room
    "handshake_timeout",  # TLS + handshake + publish not done within ingest.handshake_timeout_s
    "preauth_command",  # a message other than connect/createStream/publish (and protocol control) before the key
    "protocol",  # the chunk stream, AMF0 or a size limit was broken
    "tls",  # the TLS handshake of the RTMPS listener failed
    "bad_key",  # unknown stream key or application
    "key_rate_limited",  # the address failed too many keys lately (ingest.key_failures_per_ip)
    "refused",  # the key was fine but the stream cannot start (admission, draining, table unavailable, play)
    "unsupported_media",  # codec or size the pipeline does not take
    "idle_timeout",  # a publisher sent nothing for ingest.idle_timeout_s
    "no_frames",  # a publisher delivered no video frame for ingest.frame_timeout_s
    "audio_only",  # a publisher sent audio but no video for ingest.audio_only_grace_s after publish
    "closed_mid_message",
    "closed_before_publish",
    "connection_error",
    "replaced",  # a new publisher with the same key took over
    "key_revoked",  # the stream's key was rotated: the key this publisher authenticated with opens nothing now
    "stream_deleted",  # the stream was deleted while published
    "shutdown",
    "internal",
]
REFUSAL_KINDS: tuple[str, ...] = get_args(RefusalKind)

RTMP_REFUSED = Counter("rheo_ingest_rtmp_refused_total", "RTMP connections closed by ingest other than by a clean "
                       "end, by reason", ["reason"])
for _kind in REFUSAL_KINDS:
    RTMP_REFUSED.labels(reason=_kind)
RTMP_CONNECTIONS = Gauge("rheo_ingest_rtmp_connections", "open RTMP connections: preauth (before the stream key "
                         "check) or publishing", ["state"])
for _state in ("preauth", "publishing"):
    RTMP_CONNECTIONS.labels(state=_state)


def address_bucket(host: str) -> str:
    """The unit the per-address limits count: an IPv4 address (also IPv4-mapped IPv6) or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Gated(Protocol):
    """A connection the gate tracks: its address bucket, and a way to close it with a reason."""

    bucket: str

    def evict(self, kind: RefusalKind, reason: str) -> None: ...


class ConnectionGate:
    """Counts connections per address and per phase. Pre-auth connections live in their own pool
    (``max_preauth_connections``), so however many idle sockets are open, publisher slots stay free; when the
    pool is full a newcomer still gets in by closing the oldest pre-auth connection of the address holding the
    most of them: one address cannot lock everyone out, and a publisher whose handshake takes milliseconds is
    rarely the one evicted."""

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.preauth: dict[Gated, None] = {}  # insertion-ordered: oldest first
        self.publishing: set[Gated] = set()
        self.per_bucket: collections.Counter[str] = collections.Counter()
        self.preauth_per_bucket: collections.Counter[str] = collections.Counter()

    def admit(self, conn: Gated) -> tuple[RefusalKind, str] | None:
        """Take ``conn`` into the pre-auth pool, or say why not (the caller closes it)."""
        s, bucket = self.settings, conn.bucket
        if self.per_bucket[bucket] >= s.max_connections_per_ip:
            return "ip_cap", f"per-address connection cap of {s.max_connections_per_ip} reached"
        if self.preauth_per_bucket[bucket] >= s.max_preauth_per_ip:
            return "preauth_ip_cap", f"per-address cap of {s.max_preauth_per_ip} connections before publish reached"
        if len(self.preauth) >= s.max_preauth_connections:
            self._evict_one()
        self.preauth[conn] = None
        self.per_bucket[bucket] += 1
        self.preauth_per_bucket[bucket] += 1
        RTMP_CONNECTIONS.labels(state="preauth").inc()
        return None

    def has_publisher_room(self) -> bool:
        return len(self.publishing) < self.settings.max_connections

    def promote(self, conn: Gated) -> None:
        """``conn`` passed the key check: it leaves the pre-auth pool for a publisher slot."""
        if conn in self.preauth:
            del self.preauth[conn]
            self._drop(self.preauth_per_bucket, conn.bucket)
            RTMP_CONNECTIONS.labels(state="preauth").dec()
        if conn not in self.publishing:
            self.publishing.add(conn)
            RTMP_CONNECTIONS.labels(state="publishing").inc()

    def release(self, conn: Gated) -> None:
        """``conn`` closed (in either phase)."""
        if conn in self.preauth:
            del self.preauth[conn]
            self._drop(self.preauth_per_bucket, conn.bucket)
            RTMP_CONNECTIONS.labels(state="preauth").dec()
        elif conn in self.publishing:
            self.publishing.discard(conn)
            RTMP_CONNECTIONS.labels(state="publishing").dec()
        else:
            return
        self._drop(self.per_bucket, conn.bucket)

    def _evict_one(self) -> None:
        biggest = max(self.preauth_per_bucket, key=lambda b: self.preauth_per_bucket[b])
        victim = next(c for c in self.preauth if c.bucket == biggest)
        self.release(victim)  # now: the newcomer must find the room even before the victim's task runs
        victim.evict("preauth_evicted", f"pre-auth pool of {self.settings.max_preauth_connections} full; the "
                     "oldest connection of the address holding the most was closed for a newcomer")

    @staticmethod
    def _drop(counter: collections.Counter[str], bucket: str) -> None:
        counter[bucket] -= 1
        if counter[bucket] <= 0:
            del counter[bucket]


class KeyGuessLimiter:
    """After ``failures`` bad keys from one address within ``window_s``, every publish from it is refused for
    ``backoff_s`` (a right key too: else the refusals would still answer guesses). Tracks at most ``max_tracked``
    addresses (the least recently failing are forgotten first), so a spread-out guesser cannot grow it."""

    def __init__(self, failures: int, window_s: float, backoff_s: float, max_tracked: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.window_s, self.backoff_s = failures, window_s, backoff_s
        self.max_tracked, self.clock = max_tracked, clock
        self._recent: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._blocked: dict[str, float] = {}  # bucket → monotonic time the block ends

    def blocked_for(self, bucket: str) -> float:
        """Seconds ``bucket`` is still refused (0: it may try a key)."""
        until = self._blocked.get(bucket)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._blocked[bucket]
            return 0.0
        return left

    def failed(self, bucket: str) -> None:
        """Count one bad key from ``bucket``; the ``failures``-th within the window starts its backoff."""
        now = self.clock()
        times = self._recent.pop(bucket, None) or collections.deque(maxlen=self.failures)
        times.append(now)
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) >= self.failures:
            self._blocked[bucket] = now + self.backoff_s
            return
        self._recent[bucket] = times
        while len(self._recent) > self.max_tracked:
            self._recent.popitem(last=False)
        if len(self._blocked) > self.max_tracked:
            self._blocked = {b: t for b, t in self._blocked.items() if t > now}


class RefusalLog:
    """Counts every close in ``rheo_ingest_rtmp_refused_total{reason}`` and logs it rate-limited (``DropLog``: the
    first of a kind at once with its detail, later ones as one summary line per kind at most every ``interval_s``),
    so 300 hostile sockets make a few lines, not 300."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._log = DropLog("rtmp", noun="connection", verb="closed", logger=log, interval_s=interval_s, clock=clock)

    def note(self, kind: RefusalKind, peer: str, reason: str) -> None:
        if kind not in REFUSAL_KINDS:
            raise ValueError(f"unknown RTMP refusal kind {kind!r}")
        RTMP_REFUSED.labels(reason=kind).inc()
        self.counts[kind] += 1
        self._log.note(kind, f"{peer}: {reason}")
