"""The service runtime: health, readiness, metrics, heartbeats, and a SIGTERM drain that loses nothing."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from proto import CHANNELS, Ack, Heartbeat, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.runtime import ServiceStartError
from services.watchdog import Watchdog
from support.echo_service import EchoService

ROOT = Path(__file__).resolve().parents[2]


def _settings(nats_settings: NatsSettings) -> Settings:
    return Settings(nats=nats_settings, telemetry={"metrics_port": 0},
                    lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.05, "drain_timeout_s": 5})


async def test_health_readiness_metrics_and_heartbeats(nats_settings: NatsSettings, bus: Bus, eventually) -> None:
    beats: list[Heartbeat] = []

    async def on_beat(hb: Heartbeat, _raw) -> None:
        beats.append(hb)

    await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat)
    await bus.nc.flush()
    service = EchoService(_settings(nats_settings), member_id="echo-1")
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.http_port != 0 and service.ready)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        service.checks["weights"] = False
        not_ready = await http.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["failing"] == ["weights"]
        service.checks["weights"] = True
        metrics = (await http.get("/metrics")).text
        assert 'rheo_service_ready{service="controller"} 1.0' in metrics
    reply = await bus.request(Subjects.admission(),
                              StreamSpec(stream_id="s", width=64, height=64, fps=16.0, steps=1, prompt="p"))
    assert isinstance(reply, Ack) and reply.ref == "s"
    await eventually(lambda: any(b.member_id == "echo-1" and b.ready for b in beats))
    service.stop()
    assert await asyncio.wait_for(task, 10) == 0


async def test_sigterm_drains_in_flight_work_then_exits(nats_settings: NatsSettings, bus: Bus) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}", "ECHO_DELAY_S": "1.0",
           "RHEO_NATS__URL": nats_settings.url, "RHEO_TELEMETRY__METRICS_PORT": "0",
           "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "support.echo_service"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        beats: list[Heartbeat] = []

        async def on_beat(hb: Heartbeat, _raw) -> None:
            beats.append(hb)

        await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat)
        deadline = time.monotonic() + 30
        while not any(b.ready and b.role == "controller" for b in beats):
            assert time.monotonic() < deadline and proc.poll() is None, "service never became ready"
            await asyncio.sleep(0.05)
        request = asyncio.create_task(bus.request(
            Subjects.admission(), StreamSpec(stream_id="late", width=64, height=64, fps=16.0, steps=1, prompt="p"),
            timeout=5))
        await asyncio.sleep(0.3)  # the request is being handled (1 s) when SIGTERM arrives
        proc.send_signal(signal.SIGTERM)
        reply = await request
        assert isinstance(reply, Ack) and reply.ref == "late"  # in-flight work finished before exit
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in out, out


async def test_a_connection_nats_closes_for_good_ends_the_service_with_its_reason(
        nats_settings: NatsSettings, eventually, caplog: pytest.LogCaptureFixture) -> None:
    """nats-py never reconnects after a server -ERR other than a permissions one: the server's own close of the
    connection. Such a service was deaf (every KV watch failing) while it kept saying nothing useful; it must end
    with exit status 1 and the server's reason in its log, so that its supervisor starts it again."""
    service = EchoService(_settings(nats_settings), member_id="echo-lost")
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.http_port != 0 and service.ready)
    assert service.bus is not None
    service.bus.nc._transport.write(b"PUB " + b"x" * 5000 + b" 0\r\n\r\n")  # over the 4 KB control line
    assert await asyncio.wait_for(task, 15) == 1
    assert "maximum control line exceeded" in caplog.text.lower() and "will not reconnect" in caplog.text
    assert not service.ready


async def test_a_service_stopped_on_purpose_logs_no_lost_connection(
        nats_settings: NatsSettings, eventually, caplog: pytest.LogCaptureFixture) -> None:
    """The negative control: a drain closes the connection too, and is no loss."""
    service = EchoService(_settings(nats_settings), member_id="echo-stop")
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.http_port != 0 and service.ready)
    service.stop()
    assert await asyncio.wait_for(task, 15) == 0
    assert "will not reconnect" not in caplog.text


def test_http_port_clash_is_a_clear_failure(nats_settings: NatsSettings) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        settings = Settings(nats=nats_settings, telemetry={"metrics_port": port},
                            lifecycle={"http_host": "127.0.0.1"})
        with pytest.raises(ServiceStartError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(EchoService(settings).run())


# -- liveness that reflects the work (services/watchdog.py) ---------------------------------------------------------


def test_watchdog_idle_is_not_stuck_and_a_unit_busy_too_long_is() -> None:
    dog = Watchdog(work_limit_s=0.2, lag_limit_s=10)
    assert dog.problems() == []  # nothing registered, nothing running: idle
    with dog.busy("vae_encode"):
        assert dog.problems() == []  # busy, within its limit
        time.sleep(0.3)
        with dog.busy("vae_encode", limit_s=5):  # a second call of the same unit, its own limit
            [problem] = dog.problems()
            assert problem.startswith("vae_encode busy for 0.") and problem.endswith("(limit 0.2s)")
            assert 0.3 <= dog.busy_ages()["vae_encode"] < 5
    assert dog.problems() == [] and dog.busy_ages() == {}  # done: idle again, however long it took
    watched = dog.watch("micro_step", lambda x: (dog.busy_ages(), x))
    ages, x = watched(7)
    assert x == 7 and set(ages) == {"micro_step"} and dog.busy_ages() == {}


async def test_healthz_fails_naming_a_stuck_unit_or_a_lagging_loop(nats_settings: NatsSettings, eventually) -> None:
    settings = Settings(nats=nats_settings, telemetry={"metrics_port": 0},
                        lifecycle={"http_host": "127.0.0.1", "work_stuck_s": 0.5, "loop_lag_s": 0.8})
    service = EchoService(settings, member_id="echo-stuck")
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.http_port != 0 and service.ready)
    url = f"http://127.0.0.1:{service.http_port}"
    async with httpx.AsyncClient(base_url=url) as http:
        healthy = await http.get("/healthz")
        assert healthy.status_code == 200 and healthy.json()["stuck"] == []
        # a unit of work in a thread that does not come back (a wedged forward): 503 once past its limit
        release = threading.Event()
        stuck = asyncio.create_task(asyncio.to_thread(service.watchdog.watch("micro_step", release.wait), 30))
        await asyncio.sleep(0.1)
        assert (await http.get("/healthz")).status_code == 200  # busy is not stuck
        await asyncio.sleep(0.6)
        reply = await http.get("/healthz")
        assert reply.status_code == 503 and reply.json()["status"] == "stuck", reply.text
        assert reply.json()["stuck"][0].startswith("micro_step busy for")
        metrics = (await http.get("/metrics")).text
        assert re.search(r'rheo_service_busy_seconds\{service="controller",unit="micro_step"\} 0\.[5-9]', metrics)
        release.set()
        await stuck
        assert (await http.get("/healthz")).status_code == 200
        assert 'rheo_service_busy_seconds{service="controller",unit="micro_step"} 0.0' in (await http.get(
            "/metrics")).text
    # the loop itself blocked for 2 s (a blocking call on it): the probe, answered after it, says so
    answers: list[httpx.Response] = []
    prober = threading.Thread(target=lambda: (time.sleep(0.5), answers.append(httpx.get(url + "/healthz",
                                                                                        timeout=30))))
    prober.start()  # asks while the loop is blocked
    time.sleep(2.0)  # the point: the loop does not turn
    await asyncio.to_thread(prober.join)
    [lagging] = answers
    assert lagging.status_code == 503 and "event loop lagging" in lagging.json()["stuck"][0], lagging.text
    async with httpx.AsyncClient(base_url=url) as http:  # turns on time again: healthy again
        await eventually(lambda: service.watchdog.loop_lag() < 0.8, timeout=10)
        assert (await http.get("/healthz")).status_code == 200
    service.stop()
    assert await asyncio.wait_for(task, 10) == 0


async def test_background_cancel_outlives_a_swallowed_cancel() -> None:
    """A task that swallows one cancel (Python 3.11's wait_for does, when its future completes as the cancel
    arrives) is cancelled again: closing ends in well under a second, not at the drain timeout."""
    from services.runtime import Background

    swallowed = asyncio.Event()

    async def swallow_once() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(3600)

    async def fails() -> None:
        raise RuntimeError("its own failure")

    tasks = Background()
    stubborn = tasks.spawn(swallow_once(), "stubborn")
    tasks.spawn(fails(), "fails")
    await asyncio.sleep(0)
    t0 = time.monotonic()
    await tasks.cancel(again_s=0.05)
    assert swallowed.is_set() and stubborn.cancelled()
    assert time.monotonic() - t0 < 2.0
