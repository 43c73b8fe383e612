"""The service runtime: health, readiness, metrics, heartbeats, and a SIGTERM drain that loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from proto import CHANNELS, Ack, Heartbeat, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.runtime import ServiceStartError
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
