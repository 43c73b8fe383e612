"""What every rheo service process runs: bus connection, health/metrics HTTP, heartbeats, SIGTERM drain.

A service subclasses ``Service`` and fills in ``start`` (subscribe, load weights, open ports) and ``drain``
(finish what is in flight). ``Service.run`` owns the rest:

- ``GET /healthz`` — 200 while the process is alive, its loop turns on time and no unit of work is stuck
  (``self.watchdog``, services/watchdog.py); else 503 naming what is stuck (liveness);
- ``GET /readyz``  — 200 once every readiness check is true (bus connected, weights loaded, ...), else 503 with
  the failing checks named (readiness: Kubernetes routes nothing to it until then);
- ``GET /metrics`` — Prometheus text, every rheo metric prefixed ``rheo_``;
- a ``Heartbeat`` on ``rheo.ctl.heartbeat.<role>.<member>`` every ``lifecycle.heartbeat_interval_s``;
- SIGTERM/SIGINT → not ready, ``drain()`` (bounded by ``lifecycle.drain_timeout_s``), bus drain, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import nats.errors
import numpy as np
import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from proto import Heartbeat, Limits, Subjects
from proto.messages import Role
from services import telemetry
from services.bus import KV, Bus, BusError
from services.config import Settings
from services.watchdog import Watchdog
from services.workmeter import WorkMeter

log = logging.getLogger("rheo.runtime")

T = TypeVar("T")

BUS_DRAIN_S = 4.0
"""Longest the bus drain at exit may take (it waits for the dispatchers' lanes, up to ``Bus.DRAIN_LANES_S``)."""

class ServiceStartError(RuntimeError):
    """A service cannot start (port in use, NATS unreachable, weights missing); the message says why."""


def listen_socket(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket, or a ``ServiceStartError`` that names what wanted the port."""
    try:
        return socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise ServiceStartError(f"cannot listen on {host}:{port} for {what}: {e.strerror}") from e


READY = Gauge("rheo_service_ready", "1 when the service reports ready", ["service"])
LOOP_LAG = Gauge("rheo_service_loop_lag_seconds", "how late the event loop woke (liveness)", ["service"])
BUSY = Gauge("rheo_service_busy_seconds", "the oldest in-flight unit of work: seconds busy so far (0: idle)",
             ["service", "unit"])


class Service:
    """Base of every rheo service process."""

    role: ClassVar[Role]

    def __init__(self, settings: Settings, member_id: str | None = None) -> None:
        self.settings = settings
        self.member_id = (member_id or settings.lifecycle.member_id
                          or f"{self.role}-{socket.gethostname()}-{os.getpid()}")
        self.bus: Bus | None = None
        self.checks: dict[str, bool] = {"bus": False, "started": False}
        self.epoch = 0
        self.streams: set[str] = set()
        self.work = WorkMeter()
        """What this service's model work costs (VAE encode, decode): heartbeats carry it to admission."""
        self.ring_id = ""
        """A DiT stage's ring; ``address``: an egress's HLS base URL. Heartbeats carry both to placement."""
        self.address = ""
        self.http_port = 0
        self._stop = asyncio.Event()
        self._draining = False
        self._server: uvicorn.Server | None = None
        self._busy_units: set[str] = set()  # units seen busy: their gauge drops to 0 when idle
        self.watchdog = Watchdog(settings.lifecycle.work_stuck_s, settings.lifecycle.loop_lag_s, meter=self.work)
        """Workers wrap their units of work in ``watchdog.busy(unit)``/``watch(unit, fn)``; /healthz reports it (and
        the work meter what a unit costs, when the call says how much it processed)."""

    # -- what a service fills in ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, load, listen. Set ``self.checks[...] = True`` as things become ready."""

    async def drain(self) -> None:
        """Finish in-flight work before the process exits."""

    def serves(self, stream_id: str) -> bool:
        """A stream this service serves: its messages get their own lane on the bus (services/dispatch.py); any
        other id's share one bounded lane, so a flood on unknown ids cannot stall the streams served."""
        return stream_id in self.streams

    def max_send_bytes(self) -> int:
        """Largest message this service publishes (checked against the server's max_payload at connect)."""
        return self.settings.nats.max_send_bytes

    # -- lifecycle --------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self._draining and all(self.checks.values())

    def stop(self) -> None:
        """Begin a clean shutdown (what SIGTERM does)."""
        self._stop.set()

    async def _stop_when_bus_lost(self, bus: Bus) -> None:
        """A connection NATS closed for good (services/bus.py: ``Bus.lost``) is a dead service: not ready, and it
        ends with exit status 1 for its supervisor to start it again, rather than running on deaf."""
        await bus.lost.wait()
        self.checks["bus"] = False
        log.error("%s: lost its NATS connection for good; stopping (exit status 1)", self.member_id)
        self.stop()

    def http_app(self) -> FastAPI:
        app = FastAPI(title=f"rheo {self.role}", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/healthz")
        async def healthz(response: Response) -> dict[str, object]:
            stuck = self.watchdog.problems()
            if stuck:
                response.status_code = 503
                log.error("%s unhealthy: %s", self.member_id, "; ".join(stuck))
            return {"status": "stuck" if stuck else "ok", "member": self.member_id, "stuck": stuck}

        @app.get("/readyz")
        async def readyz(response: Response) -> dict[str, object]:
            if not self.ready:
                response.status_code = 503
            failing = [k for k, ok in self.checks.items() if not ok] + (["draining"] if self._draining else [])
            return {"ready": self.ready, "failing": failing}

        @app.get("/metrics")
        async def metrics() -> Response:
            READY.labels(service=self.role).set(1 if self.ready else 0)
            LOOP_LAG.labels(service=self.role).set(self.watchdog.loop_lag())
            ages = self.watchdog.busy_ages()
            for unit in {*ages, *self._busy_units}:
                BUSY.labels(service=self.role, unit=unit).set(ages.get(unit, 0.0))
            self._busy_units.update(ages)
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        return app

    def _listen(self) -> socket.socket:
        sock = listen_socket(self.settings.lifecycle.http_host, self.settings.telemetry.metrics_port,
                             f"{self.role} /healthz and /metrics (telemetry.metrics_port)")
        self.http_port = sock.getsockname()[1]
        return sock

    async def _serve_http(self, sock: socket.socket) -> None:
        config = uvicorn.Config(self.http_app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # signals are ours
        await self._server.serve(sockets=[sock])

    async def _heartbeats(self) -> None:
        while not self._stop.is_set():
            if self.bus is not None:
                hb = Heartbeat(member_id=self.member_id, role=self.role, epoch=self.epoch, sent_at=time.time(),
                               ready=self.ready, streams=sorted(self.streams), work=self.work.report(),
                               ring_id=self.ring_id, address=self.address)
                try:
                    await self.bus.publish(Subjects.heartbeat(self.role, self.member_id), hb)
                except Exception as e:  # a missed heartbeat is the controller's signal; never crash on it
                    log.warning("heartbeat not sent: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.lifecycle.heartbeat_interval_s)

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or ``stop()``; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        http = asyncio.create_task(self._serve_http(self._listen()), name="http")
        lag_probe = asyncio.create_task(self.watchdog.run_lag_probe(), name="loop-lag")
        beats: asyncio.Task[None] | None = None
        lost: asyncio.Task[None] | None = None
        try:
            self.bus = await Bus.connect(self.settings.nats, name=self.member_id,
                                         limits=Limits.from_settings(self.settings.proto),
                                         max_send_bytes=self.max_send_bytes())
            self.checks["bus"] = True
            lost = asyncio.create_task(self._stop_when_bus_lost(self.bus), name="bus-lost")
            try:
                await self.start()
            except Exception as e:  # said now: the cleanup below waits on this service's tasks
                log.error("%s failed to start: %s: %s", self.member_id, type(e).__name__, e)
                raise
            self.checks["started"] = True  # subscriptions exist: only now may anyone count on this service
            beats = asyncio.create_task(self._heartbeats(), name="heartbeats")
            log.info("%s ready (health on :%d)", self.member_id, self.http_port)
            await self._stop.wait()
            self._draining = True
            log.info("%s draining", self.member_id)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(self.drain(), self.settings.lifecycle.drain_timeout_s)
            except TimeoutError:
                log.warning("%s: drain did not finish in %.1fs", self.member_id,
                            self.settings.lifecycle.drain_timeout_s)
            log.info("%s drained in %.1f s; closing the bus", self.member_id, time.monotonic() - t0)
            return 1 if self.bus.lost.is_set() else 0
        finally:
            self._stop.set()
            if lost is not None:
                lost.cancel()
            if beats is not None:
                await beats
            if self.bus is not None:
                try:  # bounded: nats-py's own drain waits up to 30 s for a stuck callback
                    await asyncio.wait_for(self.bus.drain(), BUS_DRAIN_S)
                except Exception as e:
                    log.warning("%s: the bus did not drain in %.0f s (%s); closing it", self.member_id,
                                BUS_DRAIN_S, type(e).__name__)
                    with contextlib.suppress(Exception):
                        await self.bus.close()
            if self._server is not None:
                self._server.should_exit = True
            await http
            lag_probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_probe


class Background:
    """A service's background tasks: spawned by name, forgotten when done, all cancelled (and awaited) at close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel(self, again_s: float = 0.5) -> None:
        """Cancel every task and await them all. A task still running ``again_s`` later is cancelled again: on
        Python 3.11 ``asyncio.wait_for`` (in our code and in nats-py's) swallows a cancel that arrives as its
        future completes, and such a task would otherwise hold a SIGTERM drain until its timeout."""
        pending = set(self._tasks)
        while pending:
            for t in pending:
                t.cancel()
            done, pending = await asyncio.wait(pending, timeout=again_s)
            for t in done:  # retrieved, so that a task's own failure is not reported as "never retrieved"
                if not t.cancelled():
                    t.exception()


async def watch_keys(open_kv: Callable[[], Awaitable[KV]], keys: str,
                     on_entry: Callable[[str, bytes | None, int], Awaitable[None]], *, what: str,
                     retry_s: float = 0.5) -> None:
    """Call ``on_entry(key, value, revision)`` for the current value of every key matching ``keys`` and every later
    change (``value`` None: deleted), forever: a failed watch (a NATS hiccup) is logged and opened again after
    ``retry_s`` (the current values come again; callers treat them as idempotent), until the connection is closed
    for good (a drain, or ``Bus.lost``: the runtime stops the service) or the task is cancelled. The one KV-watch
    loop of every service: the block map (stages, ingest), the stream table (ingest's T2V streams)."""
    while True:
        try:
            kv = await open_kv()
            async for entry in kv.watch(keys):
                await on_entry(entry.key, entry.value, entry.revision)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if _cancelling():  # nats-py's wait_for can turn our cancel into its own error: the cancel wins
                raise asyncio.CancelledError from e
            if isinstance(e, nats.errors.ConnectionClosedError):  # closed for good: nothing to retry on
                log.warning("%s watch ended: the NATS connection is closed", what)
                return
            log.warning("%s watch failed (%s); retrying", what, e)
        await asyncio.sleep(retry_s)


def _cancelling() -> bool:
    """Whether the running task has a cancel pending (one that something below it swallowed)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def watch_key(open_kv: Callable[[], Awaitable[KV]], key: str, on_value: Callable[[bytes, int], Awaitable[None]],
                    *, what: str, retry_s: float = 0.5) -> None:
    """``watch_keys`` for one key, deletes skipped: ``on_value(value, revision)``."""

    async def on_entry(_key: str, value: bytes | None, revision: int) -> None:
        if value is not None:
            await on_value(value, revision)

    await watch_keys(open_kv, key, on_entry, what=what, retry_s=retry_s)


async def in_daemon_thread(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` in a daemon thread: loading weights can take minutes, and a SIGTERM must not wait for it (the
    default executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(error: BaseException | None, result: object) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        error: BaseException | None = None
        result = None
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting task
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
            loop.call_soon_threadsafe(settle, error, result)

    threading.Thread(target=target, name=f"daemon-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await done


def write_debug_tap(path: Path, array: np.ndarray) -> None:
    """Save a debug tap (frames at a pipeline boundary) atomically, for the equality tests to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.telemetry.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(service_cls: type[Service], settings: Settings | None = None) -> int:
    """Entry point of ``rheo <service>`` and ``python -m <package>.service``."""
    from services.config import load_settings
    from services.config_errors import ConfigError

    try:
        settings = settings or load_settings(service=service_cls.role)
    except ConfigError as e:
        print(f"rheo {service_cls.role}: {e}", file=sys.stderr)
        return 2
    configure_logging(settings)
    telemetry.setup_tracing(settings.telemetry.service_name + "-" + service_cls.role,
                            settings.telemetry.otlp_endpoint, settings.telemetry.trace_sample_ratio)
    try:
        return asyncio.run(service_cls(settings).run())
    except (ServiceStartError, BusError) as e:
        log.error("%s", e)
        return 2
    finally:
        telemetry.shutdown_tracing()  # the batch processor's last spans, bounded (telemetry.EXPORT_DRAIN_S)
