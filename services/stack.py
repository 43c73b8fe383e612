"""The local stack behind ``rheo up``: a private nats-server and every service as its own process.

Each service runs as ``python -m services.cli <service>`` with its ports and identity in ``RHEO_*`` variables,
exactly as in a cluster; logs go to ``<workdir>/logs/<name>.log``. ``start`` returns once every service answers
``/readyz``; if any process dies, ``watch`` says which and why (its log tail) and the stack stops. ``stop`` sends
SIGTERM to all, waits for their drain, then kills what is left, so no process outlives the stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.natsd import NatsServer


class StackError(RuntimeError):
    """The stack could not start; the message names the service and shows its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_port: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.is_file() else ""


@dataclass
class Ports:
    gateway: int = 8080
    rtmp: int = 1935
    egress: int = 8090
    nats: int = 4222
    first_health: int = 9464
    first_link: int = 7100

    @classmethod
    def ephemeral(cls) -> Ports:
        return cls(gateway=free_port(), rtmp=free_port(), egress=free_port(), nats=-1, first_health=0,
                   first_link=0)


@dataclass
class LocalStack:
    workdir: Path
    stages: int = 2
    ports: Ports = field(default_factory=Ports)
    model_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    torch_threads: int | None = 1
    """CPU threads of each service's torch (``OMP_NUM_THREADS``, unless the environment sets it): every service
    is its own process on the same cores, and one thread each keeps them from oversubscribing the machine (on the
    2-core dev VM, torch's default of one thread per core in each of 6 processes ran the stack 2× slower)."""
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    procs: list[Proc] = field(default_factory=list)
    nats: NatsServer | None = None

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    def _env(self, name: str, health_port: int) -> dict[str, str]:
        env = {
            **os.environ,
            "RHEO_NATS__URL": self.nats.url if self.nats else "",
            "RHEO_TELEMETRY__METRICS_PORT": str(health_port),
            "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1",
            "RHEO_CONTROLLER__STAGES": str(self.stages),
            "RHEO_GATEWAY__HOST": "127.0.0.1",
            "RHEO_GATEWAY__PORT": str(self.ports.gateway),
            "RHEO_GATEWAY__API_TOKENS": json.dumps([self.api_token]),
            "RHEO_GATEWAY__PUBLIC_URL": f"http://localhost:{self.ports.gateway}",
            "RHEO_GATEWAY__PUBLIC_RTMP_URL": f"rtmp://localhost:{self.ports.rtmp}",
            "RHEO_INGEST__RTMP_HOST": "127.0.0.1",
            "RHEO_INGEST__RTMP_PORT": str(self.ports.rtmp),
            "RHEO_EGRESS__HTTP_HOST": "127.0.0.1",
            "RHEO_EGRESS__HTTP_PORT": str(self.ports.egress),
            "RHEO_EGRESS__PUBLIC_URL": f"http://127.0.0.1:{self.ports.egress}",
            "RHEO_EGRESS__HLS_DIR": str(self.workdir / "hls"),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        if self.torch_threads and "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in self.extra_env:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        if self.model_dir is not None:
            env["RHEO_MODEL__MODEL_DIR"] = str(self.model_dir)
        return env

    def _plan(self) -> list[Proc]:
        names = ["controller", *(f"dit-{i}" for i in range(self.stages)), "decoder", "egress", "ingest", "gateway"]
        procs = []
        for i, name in enumerate(names):
            health = self.ports.first_health + i if self.ports.first_health else free_port()
            env = self._env(name, health)
            service = name
            if name.startswith("dit-"):
                service = "dit-stage"
                env["RHEO_DIT_STAGE__STAGE_ID"] = name
                env["RHEO_DIT_STAGE__LINK_HOST"] = "127.0.0.1"
                env["RHEO_DIT_STAGE__LINK_PORT"] = str(
                    self.ports.first_link + int(name[4:]) if self.ports.first_link else free_port())
            procs.append(Proc(name, [sys.executable, "-m", "services.cli", service], env, health,
                              self.workdir / "logs" / f"{name}.log"))
        return procs

    def start(self, timeout: float = 180.0) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.nats = NatsServer(self.workdir / "nats", port=self.ports.nats).start()
        self.procs = self._plan()
        for p in self.procs:
            _spawn(p)
        deadline = time.monotonic() + timeout
        pending = list(self.procs)
        while pending:
            self.check_alive()
            pending = [p for p in pending if not _ready(p.health_port)]
            if time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise StackError(f"not ready after {timeout:.0f}s: {names}\n{pending[0].log_tail()}")
            time.sleep(0.2)

    def restart(self, name: str, sig: int = signal.SIGKILL, timeout: float = 120.0) -> float:
        """Kill one service with ``sig`` and start it again (same command, environment, ports); returns the
        seconds until it answered ``/readyz`` again."""
        p = next(p for p in self.procs if p.name == name)
        if p.popen is not None and p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, sig)
            p.popen.wait(timeout)
        t0 = time.monotonic()
        _spawn(p)
        while not _ready(p.health_port):
            if p.popen is not None and p.popen.poll() is not None:
                raise StackError(f"{name} exited with {p.popen.returncode} after a restart:\n{p.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise StackError(f"{name} not ready {timeout:.0f}s after a restart\n{p.log_tail()}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is not None:
                raise StackError(f"{p.name} exited with {p.popen.returncode}:\n{p.log_tail()}")

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(
            self.gateway_url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.api_token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def stop(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGTERM every service, wait for the drains, kill leftovers; returns each exit code."""
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for p in self.procs:
            if p.popen is None:
                continue
            try:
                codes[p.name] = p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
                codes[p.name] = None
        if self.nats is not None:
            self.nats.stop()
        return codes


def open_demo_stream(stack: LocalStack, prompt: str, weights: bool) -> dict:
    """The stream ``rheo up`` opens: the API's answer, plus ``player_path`` (the gateway's hls.js page for it).
    The tiny random model runs on CPU: a small frame keeps it real-time on a laptop."""
    side = 512 if weights else 128
    created = stack.api("POST", "/v1/streams", {"prompt": prompt, "width": side, "height": side,
                                                "slo_latency_ms": 1000 if weights else 5000})
    created["player_path"] = f"/player/index.html?src=/hls/{created['id']}/index.m3u8"
    return created


def start_testpattern(publish_url: str) -> subprocess.Popen[bytes]:
    """``rheo up --testpattern``'s publisher: the moving test pattern, in real time, in its own process."""
    return subprocess.Popen([sys.executable, "-m", "ingest.testpattern", publish_url.replace("localhost", "127.0.0.1")])


def _spawn(p: Proc) -> None:
    log = open(p.log_path, "ab")  # noqa: SIM115 - the child owns it
    p.popen = subprocess.Popen(p.argv, env=p.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False
