"""NATS for every rheo service: connect, publish/subscribe/request with trace context, credit windows, KV.

What this adds over nats-py:
- payload sizes are checked at start (this service's largest message against the server's ``max_payload``) and
  at every publish, failing fast with ``PayloadTooLarge`` instead of a disconnect or a timeout;
- every message is a ``proto`` message; a malformed one is counted, logged (rate-limited) and dropped, and a handler
  that raises loses only that message;
- one stream's or one client's traffic cannot stall another stream: a subscription's messages are sorted into
  bounded per-stream lanes before anything is decoded (``services.dispatch``);
- the OpenTelemetry context rides in message headers, so a chunk is one trace across services;
- core NATS has no backpressure, so bulk subjects go through ``CreditWindow`` (consumer-returned byte credits);
- JetStream KV buckets for shared state (stream table, block map, endpoints) behind ``KV``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue, StopIterSentinel
from nats.protocol.parser import PERMISSIONS_ERR
from opentelemetry.trace import SpanKind

from proto import Credit, Limits, Message, ProtocolError, decode
from proto.subjects import kv_subject
from services import telemetry
from services.config import NatsSettings
from services.dispatch import NATS_PENDING_BYTES, NATS_PENDING_MSGS, Dispatcher, LaneLimits, count_slow_consumer
from services.droplog import DropLog

log = logging.getLogger("rheo.bus")

M = TypeVar("M", bound=Message)
T = TypeVar("T")
Handler = Callable[[M, Msg], Awaitable[None]]

CREDIT_EVERY_HEADER = "Rheo-Credit-Every"


class BusError(RuntimeError):
    """Base of the bus's own errors."""


class PayloadTooLarge(BusError):
    """A publish larger than the server accepts; raised before anything is sent."""


class PayloadConfigError(BusError):
    """This service is configured to send more than the server's ``max_payload``: refuse to start."""


class BucketLost(BusError):
    """A KV bucket disappeared under a watch (it has been created again, empty)."""


class CreditTimeout(BusError):
    """A bulk publisher waited too long for its consumer to return credit."""


@dataclass
class BusStats:
    published: int = 0
    received: int = 0
    malformed: int = 0
    handler_errors: int = 0
    dropped: int = 0
    """Dropped by the dispatchers before decoding (services/dispatch.py; nats-py's slow-consumer drops only in
    ``rheo_bus_dropped_messages_total``)."""


def _tls_context(s: NatsSettings) -> ssl.SSLContext | None:
    if not (s.tls_ca_file or s.tls_cert_file or s.url.startswith("tls://")):
        return None
    ctx = ssl.create_default_context(cafile=str(s.tls_ca_file) if s.tls_ca_file else None)
    if s.tls_cert_file:
        ctx.load_cert_chain(str(s.tls_cert_file), str(s.tls_key_file) if s.tls_key_file else None)
    return ctx


def _backoff_handler(s: NatsSettings) -> Callable[[list[Any], dict[str, Any]], tuple[Any, float]]:
    """Reconnect to the least-tried server after an exponential, jittered delay."""

    def pick(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        server = min(servers, key=lambda srv: srv.reconnects)
        delay = min(s.reconnect_wait_max_s, s.reconnect_wait_s * (2 ** min(server.reconnects, 16)))
        return server, delay * random.uniform(0.8, 1.2)

    return pick


class _DeniedLog:
    """Counts the server's permission violations of this connection (``op``: publish/subscribe) and logs them at
    most once per ``EVERY_S`` with the number left unlogged: a misconfigured service must show, a loop of
    refusals must not flood the log."""

    EVERY_S = 10.0

    def __init__(self, name: str) -> None:
        self.name = name
        self._last = -self.EVERY_S
        self._quiet = 0

    def record(self, text: str) -> None:
        low = text.lower()
        op = "publish" if "for publish" in low else "subscribe" if "for subscription" in low else "other"
        telemetry.BUS_PERMISSION_DENIED.labels(op=op).inc()
        now = time.monotonic()
        if now - self._last < self.EVERY_S:
            self._quiet += 1
            return
        more = f" (+{self._quiet} more since the last report)" if self._quiet else ""
        log.error("nats %s: refused by the server: %s%s", self.name, text, more)
        self._last, self._quiet = now, 0


class Bus:
    """One NATS connection of one service."""

    DRAIN_LANES_S = 2.0
    LANE_MSGS = 1024
    """Messages one stream's lane holds (its bytes: two credit windows, ``lane_limits``)."""

    def __init__(self, nc: Client, limits: Limits, max_send_bytes: int, *, credit_window_bytes: int = 32 << 20) -> None:
        self.nc = nc
        self.limits = limits
        self.max_send_bytes = max_send_bytes
        self.stats = BusStats()
        self._js = nc.jetstream()
        # a bulk publisher has at most one credit window in flight: a stream's lane never fills with honest traffic
        self.lane_limits = LaneLimits(self.LANE_MSGS, max(2 * credit_window_bytes, 2 * limits.max_message_bytes))
        self._dispatchers: weakref.WeakSet[Dispatcher] = weakref.WeakSet()
        self.lost = asyncio.Event()
        """Set when NATS closed the connection for good without this service asking (logged with the reason)."""

    @property
    def since_reconnect(self) -> float | None:
        """Seconds since the connection to NATS was last re-established (0 while disconnected, None if it never
        dropped). Whoever judges others by silence (the controller's heartbeat budget) must not count time it
        could not hear them."""
        if not self.nc.is_connected:
            return 0.0
        at = getattr(self.nc, "_rheo_reconnected_at", None)
        return None if at is None else time.monotonic() - at

    @classmethod
    async def connect(
        cls,
        settings: NatsSettings,
        *,
        name: str = "rheo",
        limits: Limits | None = None,
        max_send_bytes: int | None = None,
    ) -> Bus:
        """Connect (retrying the first connect with backoff) and check payload sizes against the server."""
        max_send = max_send_bytes if max_send_bytes is not None else settings.max_send_bytes

        denied = _DeniedLog(name)

        async def on_error(e: Exception) -> None:
            if isinstance(e, nats.errors.SlowConsumerError):  # counted, never one log line per dropped message
                count_slow_consumer(e.sub.subject if e.sub is not None else e.subject)
                return
            if PERMISSIONS_ERR in str(e).lower():
                denied.record(str(e))
                return
            log.warning("nats %s: %s: %s", name, type(e).__name__, e)

        async def on_disconnect() -> None:
            if not (nc.is_closed or nc.is_draining or getattr(nc, "_rheo_closing", False)):
                log.warning("nats %s: disconnected; reconnecting", name)

        async def on_reconnect() -> None:
            nc._rheo_reconnected_at = time.monotonic()  # type: ignore[attr-defined]
            log.info("nats %s: reconnected", name)

        async def on_closed() -> None:
            # nats-py closes for good, without reconnecting, on any -ERR of the server but a permissions one (a
            # maximum payload or control line violation, an authorization failure on reconnect): say why, and let
            # the service end (Bus.lost) instead of running on deaf
            if not (getattr(nc, "_rheo_closing", False) or nc.is_draining):
                log.error("nats %s: the connection was closed (%s); it will not reconnect", name,
                          nc.last_error or "no error given")
                lost.set()

        lost = asyncio.Event()

        options: dict[str, Any] = dict(
            servers=[u.strip() for u in settings.url.split(",") if u.strip()],
            name=settings.name or name,
            connect_timeout=settings.connect_timeout_s,
            reconnect_time_wait=settings.reconnect_wait_s,
            # bounded for the first connect (nats-py would otherwise retry forever); set to the configured
            # value once connected
            max_reconnect_attempts=settings.initial_connect_attempts,
            reconnect_to_server_handler=_backoff_handler(settings),
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            closed_cb=on_closed,
            tls=_tls_context(settings),
            inbox_prefix=settings.inbox_prefix,
        )
        if settings.user:
            options["user"] = settings.user
            options["password"] = settings.password.get_secret_value() if settings.password else ""
        if settings.token:
            options["token"] = settings.token.get_secret_value()
        if settings.creds_file:
            options["user_credentials"] = str(settings.creds_file)
        elif settings.nkey_seed_file:
            options["nkeys_seed"] = str(settings.nkey_seed_file)

        nc = Client()
        try:
            await nc.connect(**options)
        except (TimeoutError, nats.errors.Error, OSError) as e:
            nc._rheo_closing = True  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                await nc.close()  # stop nats-py's background reconnect tasks
            raise BusError(f"cannot connect to NATS at {settings.url}: {type(e).__name__}: {e}") from e
        nc.options["max_reconnect_attempts"] = settings.max_reconnect_attempts
        if nc.max_payload < max_send:
            nc._rheo_closing = True  # type: ignore[attr-defined]
            await nc.close()
            raise PayloadConfigError(
                f"{name} may publish messages of up to {max_send} bytes (nats.max_send_bytes), but the NATS server "
                f"at {settings.url} accepts at most {nc.max_payload} (max_payload). Set max_payload to at least "
                f"{max_send} in the server config (8MB recommended) or lower nats.max_send_bytes."
            )
        bus = cls(nc, limits or Limits(), max_send, credit_window_bytes=settings.credit_window_bytes)
        bus.lost = lost
        return bus

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    async def close(self) -> None:
        if not self.nc.is_closed:
            self.nc._rheo_closing = True  # type: ignore[attr-defined]  # silences the disconnect and close logs
            await self.nc.close()

    async def drain(self) -> None:
        """Finish in-flight messages (also those waiting in the dispatchers' lanes, for up to ``DRAIN_LANES_S``),
        then close (SIGTERM path)."""
        if not self.nc.is_closed:
            self.nc._rheo_closing = True  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*(d.idle() for d in list(self._dispatchers))),
                                       self.DRAIN_LANES_S)
            await self.nc.drain()

    # -- publish / subscribe / request ---------------------------------------------------------------------

    def check_size(self, n: int, subject: str) -> None:
        if n > self.nc.max_payload:
            telemetry.BUS_OVERSIZE.inc()
            raise PayloadTooLarge(f"{n}-byte message to {subject} exceeds the server's max_payload of "
                                  f"{self.nc.max_payload} bytes")

    async def publish(
        self, subject: str, message: Message | bytes, *, headers: dict[str, str] | None = None, reply: str = ""
    ) -> int:
        """Publish a message (or an already encoded frame); returns its size in bytes."""
        if isinstance(message, bytes):
            data = message
        else:
            parts = message.encode_parts()
            self.check_size(sum(memoryview(p).nbytes for p in parts), subject)  # before paying for the join
            data = b"".join(parts)
        self.check_size(len(data), subject)
        with telemetry.tracer().start_as_current_span(
            "rheo.publish", kind=SpanKind.PRODUCER, attributes={"messaging.destination.name": subject}
        ):
            try:
                await self.nc.publish(subject, data, reply=reply, headers=telemetry.inject(headers))
            except nats.errors.MaxPayloadError as e:
                telemetry.BUS_OVERSIZE.inc()
                raise PayloadTooLarge(f"{len(data)}-byte message to {subject}: {e}") from e
        self.stats.published += 1
        return len(data)

    async def subscribe(
        self,
        subject: str,
        handler: Handler[M],
        *,
        expected: type[M] | None = None,
        queue: str = "",
        credit: bool = False,
        known: Callable[[str], bool] | None = None,
    ) -> Subscription:
        """Deliver decoded messages to ``handler``; malformed ones are counted and dropped.

        Messages go through a ``Dispatcher`` (services/dispatch.py): per key of the subject's wildcards (a stream
        or member id) ``known`` by the service its own bounded lane, every other key one shared bounded lane;
        nothing is decoded before that. ``credit``: return byte credits to ``CreditWindow`` publishers (bulk).
        """
        consumed: dict[str, int] = {}
        unacked: dict[str, int] = {}
        dispatcher: Dispatcher

        async def process(msg: Msg) -> None:
            self.stats.received += 1
            try:
                message = decode(msg.data, expected, self.limits)
            except ProtocolError as e:
                self.stats.malformed += 1
                telemetry.BUS_MALFORMED.labels(channel=dispatcher.channel).inc()
                dispatcher.drops.note("malformed", f"{len(msg.data)} bytes on {msg.subject[:120]}: {e}")
            else:
                with telemetry.tracer().start_as_current_span(
                    "rheo.receive", context=telemetry.extract(msg.headers), kind=SpanKind.CONSUMER,
                    attributes={"messaging.destination.name": msg.subject},
                ):
                    try:
                        await handler(message, msg)  # type: ignore[arg-type]
                    except Exception as e:
                        self.stats.handler_errors += 1
                        telemetry.BUS_HANDLER_ERRORS.labels(channel=dispatcher.channel).inc()
                        if dispatcher.drops.note("handler_error", f"on {msg.subject[:120]}: {e!r}"):
                            log.exception("handler for %s failed; message dropped", msg.subject)
            if credit and msg.reply:
                with contextlib.suppress(Exception):  # the connection is closing: the publisher times out
                    await self._return_credit(msg, consumed, unacked)

        dispatcher = Dispatcher(subject, process, known=known, lane=self.lane_limits,
                                max_message_bytes=self.limits.max_message_bytes, stats=self.stats)
        sub = await self.nc.subscribe(subject, queue=queue, cb=dispatcher.on_msg,
                                      pending_msgs_limit=NATS_PENDING_MSGS, pending_bytes_limit=NATS_PENDING_BYTES)
        dispatcher.sub = sub
        self._dispatchers.add(dispatcher)
        return sub

    async def _return_credit(self, msg: Msg, consumed: dict[str, int], unacked: dict[str, int]) -> None:
        inbox = msg.reply
        consumed[inbox] = consumed.get(inbox, 0) + len(msg.data)
        unacked[inbox] = unacked.get(inbox, 0) + len(msg.data)
        every = int((msg.headers or {}).get(CREDIT_EVERY_HEADER, "0") or 0)
        if unacked[inbox] >= every:
            unacked[inbox] = 0
            with contextlib.suppress(nats.errors.ConnectionClosedError):
                await self.nc.publish(inbox, Credit(consumed=consumed[inbox]).encode())

    async def request(
        self, subject: str, message: Message, *, expected: type[M] | None = None, timeout: float = 2.0
    ) -> M:
        """Request/reply; the reply must decode (else ``ProtocolError``)."""
        data = message.encode()
        self.check_size(len(data), subject)
        with telemetry.tracer().start_as_current_span(
            "rheo.request", kind=SpanKind.CLIENT, attributes={"messaging.destination.name": subject}
        ):
            reply = await self.nc.request(subject, data, timeout=timeout, headers=telemetry.inject())
        return decode(reply.data, expected, self.limits)

    async def respond(self, msg: Msg, message: Message) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, message.encode(), headers=telemetry.inject())

    def credit_window(self, subject: str, window_bytes: int | None = None, *,
                      reset_after_s: float = 0.0) -> CreditWindow:
        return CreditWindow(self, subject, window_bytes or 32 * 1024 * 1024, reset_after_s=reset_after_s)

    # -- JetStream KV ----------------------------------------------------------------------------------------

    async def kv(self, bucket: str, *, history: int = 1, ttl: float | None = None, replicas: int = 1) -> KV:
        """Bind to a KV bucket, creating it when missing (and again whenever it is lost later: ``KV``)."""
        config = KeyValueConfig(bucket=bucket, history=history, ttl=ttl, replicas=replicas, storage=StorageType.FILE)

        async def bind() -> KeyValue:
            try:
                return await self._js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                return await self._js.create_key_value(config)

        return KV(await bind(), bucket, self.limits, rebind=bind)


class CreditWindow:
    """Publisher side of a byte-credit window on one subject.

    The publisher may have at most ``window_bytes`` sent but not yet consumed; consumers subscribed with
    ``credit=True`` report their cumulative consumption back on this window's inbox every quarter window.
    A message lost in transit (or a consumer that restarted) never returns its credit. The one policy for that,
    every bulk publisher's: when ``publish`` times out and no credit has come back for ``reset_after_s``
    (0: at the first timeout), the window forgets the outstanding bytes (``reset``) before raising
    ``CreditTimeout``, so the next message can go.
    """

    def __init__(self, bus: Bus, subject: str, window_bytes: int, *, reset_after_s: float = 0.0) -> None:
        self.bus = bus
        self.subject = subject
        self.window_bytes = window_bytes
        self.reset_after_s = reset_after_s
        self.resets = 0
        self._progress = time.monotonic()  # the last time credit came back (or the window started afresh)
        self.sent = 0
        self.acked = 0
        self._base = 0
        self._changed = asyncio.Event()
        self._inbox = bus.nc.new_inbox()
        self._sub: Subscription | None = None
        self._drops = DropLog(f"credit inbox of {subject}", noun="message", logger=log)

    @property
    def outstanding(self) -> int:
        return self.sent - self.acked

    async def start(self) -> CreditWindow:
        async def on_credit(msg: Msg) -> None:
            if not msg.data and (msg.headers or {}).get("Status") == "503":
                return  # the server's "no responders": nobody consumes this subject yet; CreditTimeout covers it
            try:
                c = decode(msg.data, Credit, self.bus.limits)
            except ProtocolError as e:
                telemetry.BUS_MALFORMED.labels(channel="credit").inc()
                self._drops.note("malformed", f"{len(msg.data)} bytes: {e}")
                return
            acked = max(self.acked, self._base + c.consumed)
            if acked > self.acked:
                self._progress = time.monotonic()
            self.acked = acked
            self._changed.set()

        self._sub = await self.bus.nc.subscribe(self._inbox, cb=on_credit)
        return self

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def reset(self) -> None:
        """Forget outstanding credit (e.g. after the consumer restarted)."""
        self._base = self.sent
        self.acked = self.sent
        self._progress = time.monotonic()

    async def publish(self, message: Message | bytes, *, timeout: float = 5.0,
                      headers: dict[str, str] | None = None) -> int:
        data = message if isinstance(message, bytes) else message.encode()
        n = len(data)
        if n > self.window_bytes // 2:
            raise PayloadTooLarge(f"{n}-byte message exceeds half the {self.window_bytes}-byte credit window "
                                  f"of {self.subject}; raise nats.credit_window_bytes")
        if self.outstanding + n > self.window_bytes:
            start = asyncio.get_running_loop().time()
            deadline = start + timeout
            while self.outstanding + n > self.window_bytes:
                self._changed.clear()
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    unconsumed = self.outstanding
                    if time.monotonic() - self._progress >= self.reset_after_s:
                        log.warning("%s: no credit for %.1f s; forgetting %d outstanding bytes", self.subject,
                                    time.monotonic() - self._progress, unconsumed)
                        self.reset()
                        self.resets += 1
                    raise CreditTimeout(f"{self.subject}: {unconsumed} bytes unconsumed for {timeout}s")
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    continue
            telemetry.CREDIT_WAIT.observe(asyncio.get_running_loop().time() - start)
        hdrs = dict(headers or {})
        hdrs[CREDIT_EVERY_HEADER] = str(self.window_bytes // 4)
        self.sent += n
        await self.bus.publish(self.subject, data, headers=hdrs, reply=self._inbox)
        return n


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes | None
    revision: int
    deleted: bool


def _bucket_lost(e: Exception) -> bool:
    """The bucket's stream is gone (the NATS store was lost or the bucket deleted), not an ordinary error."""
    if isinstance(e, nats.js.errors.NoStreamResponseError):
        return True
    return isinstance(e, nats.js.errors.NotFoundError) and getattr(e, "err_code", None) == 10059


class KV:
    """A JetStream KV bucket holding raw bytes or ``proto`` messages.

    A bucket lost under a running service (nats-server restarted on an empty store, a bucket deleted) is created
    again by the first write or listing that finds it gone, and the operation retried once; a watch notices the
    loss within ``LOST_CHECK_S`` and ends with ``BucketLost`` (``watch_keys`` opens it again). What the bucket held
    is gone: its owners write it again (docs/recovery.md, A lost NATS store).
    """

    LOST_CHECK_S = 2.0

    def __init__(self, store: KeyValue, bucket: str, limits: Limits,
                 rebind: Callable[[], Awaitable[KeyValue]] | None = None) -> None:
        self.store = store
        self.bucket = bucket
        self.limits = limits
        self._rebind = rebind
        self.recreated = 0
        """Times this handle found its bucket lost and created it again (owners compare it to re-publish)."""

    async def _recreate(self) -> bool:
        if self._rebind is None:
            return False
        log.warning("KV bucket %s is gone (NATS store lost?): creating it again", self.bucket)
        self.store = await self._rebind()
        self.recreated += 1
        telemetry.BUS_KV_RECREATED.labels(bucket=self.bucket).inc()
        return True

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except nats.errors.Error as e:
            if not _bucket_lost(e) or not await self._recreate():
                raise
        return await op()

    @staticmethod
    def _bytes(value: bytes | Message) -> bytes:
        return value if isinstance(value, bytes) else value.encode()

    async def get(self, key: str) -> KVEntry | None:
        try:
            e = await self.store.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return KVEntry(e.key, e.value, e.revision or 0, False)

    async def get_message(self, key: str, expected: type[M]) -> M | None:
        e = await self.get(key)
        if e is None or e.value is None:
            return None
        return decode(e.value, expected, self.limits)

    async def put(self, key: str, value: bytes | Message) -> int:
        return await self._call(lambda: self.store.put(key, self._bytes(value)))

    async def create(self, key: str, value: bytes | Message) -> int:
        """Put only if the key does not exist (raises ``nats.js.errors.KeyWrongLastSequenceError`` otherwise)."""
        return await self._call(lambda: self.store.create(key, self._bytes(value)))

    async def update(self, key: str, value: bytes | Message, last: int) -> int:
        """Compare-and-set against the revision the caller last saw (after a re-created bucket: that revision is
        gone, so this raises ``KeyWrongLastSequenceError`` as for any concurrent change)."""
        return await self._call(lambda: self.store.update(key, self._bytes(value), last=last))

    async def delete(self, key: str) -> None:
        await self._call(lambda: self.store.delete(key))

    async def keys(self) -> list[str]:
        """Every key holding a message, a deleted key's marker included (callers read each key and skip the
        absent ones). Read from the stream's per-subject state, not with nats-py's ``keys()``: that one watches,
        and reports an empty bucket when the server has pushed every entry before the client counted one (seen on
        a loaded CI machine: a token just minted was not listed)."""
        prefix = kv_subject(self.bucket, "")

        async def keys() -> list[str]:
            info = await self.store._js.stream_info(f"KV_{self.bucket}", subjects_filter=kv_subject(self.bucket, ">"))
            return sorted(s[len(prefix):] for s in info.state.subjects or {})

        return await self._call(keys)

    async def incarnation(self) -> object | None:
        """When the bucket's stream was created (None: it is gone). A watch compares it: a watch on a deleted
        bucket waits forever, also after the bucket is created again."""
        try:
            info = await self.store._js.stream_info(f"KV_{self.bucket}")
        except nats.js.errors.NotFoundError:
            return None
        return info.created

    async def watch(self, keys: str = ">", *, include_history: bool = False) -> AsyncIterator[KVEntry]:
        """Current values, then every change, as they happen; ends with ``BucketLost`` (after creating the bucket
        again) when the bucket disappears."""
        born = await self.incarnation()
        watcher = await self.store.watch(keys, include_history=include_history)
        try:
            while True:
                try:  # not updates(timeout=): its asyncio.wait_for can swallow a cancel on 3.11, and the watch lives on
                    async with asyncio.timeout(self.LOST_CHECK_S):
                        e = await watcher.updates(timeout=None)
                except TimeoutError:
                    now = await self.incarnation()
                    if now != born:
                        if now is None:
                            await self._recreate()
                        raise BucketLost(self.bucket) from None
                    continue
                if isinstance(e, StopIterSentinel):
                    return
                if e is None:  # end of the initial values
                    continue
                deleted = e.operation in ("DEL", "PURGE")
                yield KVEntry(e.key, None if deleted else e.value, e.revision or 0, deleted)
        finally:
            await watcher.stop()
