"""The local stack behind ``rheo up``: a private nats-server and every service as its own process.

Each service runs as ``python -m services.cli <service>`` with its ports and identity in ``RHEO_*`` variables,
exactly as in a cluster; logs go to ``<workdir>/logs/<name>.log``. ``start`` returns once every service answers
``/readyz`` (a service that dies while starting fails it). The nats-server enforces the bus permissions: each
service connects with its own role's nkey (a 0600 seed file in ``<workdir>/identities``), nothing anonymous;
``nats_settings(role)`` connects a test or tool as a role. From then on a supervisor thread restarts any service
that exits, with backoff, as Kubernetes would (services/supervisor.py); ``check_alive`` raises once it has given
up on a crash loop (``strict``: on any exit). ``stop`` ends the supervision, sends SIGTERM to all, waits for their
drain, then kills what is left, so no process outlives the stack.
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
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from proto.rings import ring_stage_ids
from services.config import NatsSettings
from services.natsd import Identity, NatsServer, make_identities
from services.supervisor import CrashLoopError, Proc, RestartPolicy, StackError, Supervisor

__all__ = [
    "CrashLoopError",
    "LocalStack",
    "Ports",
    "Proc",
    "RestartPolicy",
    "StackError",
    "connect_host",
    "free_port",
    "open_demo_stream",
    "start_testpattern",
    "url_host",
    "with_player_path",
]


_LISTEN_PORTS = (10000, 32767)
"""Where ``free_port`` picks: below Linux's ephemeral range (``ip_local_port_range``, 32768–60999 by default), from
which the kernel also takes the local port of every outbound connection. A port found free there by binding to 0
can be taken by one of the stack's own NATS connections before its service binds it (a stage's link port was, in
CI: "Address already in use"); below the range only another listener can take it."""
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ephemeral range where the platform says what that range is."""
    low, high = _LISTEN_PORTS
    with contextlib.suppress(OSError, ValueError):
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        high = min(high, low_ephemeral - 1)
        for _ in range(200 if high - low > 1000 else 0):
            port = secrets.randbelow(high - low + 1) + low
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the services listen: TIME_WAIT is no clash
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


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

    def offset(self, n: int) -> Ports:
        """Every fixed port moved by ``n`` (a second stack on the same host)."""
        return Ports(**{k: v + n if v > 0 else v for k, v in vars(self).items()})

    def in_use(self, stages: int, host: str = "127.0.0.1") -> list[tuple[str, int]]:
        """``(field, port)`` of each fixed port of a stack with ``stages`` stages that something already holds
        (gateway, RTMP and egress on ``host``, their bind address; the rest on loopback)."""
        public = {"gateway", "rtmp", "egress"}
        fixed = [("gateway", self.gateway), ("rtmp", self.rtmp), ("egress", self.egress), ("nats", self.nats)]
        if self.first_health:
            fixed += [("first_health", self.first_health + i) for i in range(stages + SINGLE_SERVICES)]
        if self.first_link:
            fixed += [("first_link", self.first_link + i) for i in range(stages)]
        return [(name, port) for name, port in fixed
                if port > 0 and port_in_use(port, host if name in public else "127.0.0.1")]


SINGLE_SERVICES = 6
"""Processes of a stack besides its stages: controller, decoder, egress, ingest, gateway, one jobs worker."""

WILDCARDS = ("", "0.0.0.0", "::")


def connect_host(host: str) -> str:
    """Where this host reaches a service bound to ``host``: loopback for a wildcard or loopback bind."""
    return "127.0.0.1" if host in WILDCARDS or host in ("localhost", "127.0.0.1") else host


def url_host(host: str) -> str:
    """``host`` as it goes into a URL (an IPv6 literal in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


USER_SET = ("RHEO_GATEWAY__HOST", "RHEO_INGEST__RTMP_HOST", "RHEO_EGRESS__HTTP_HOST", "RHEO_GATEWAY__PUBLIC_URL",
            "RHEO_GATEWAY__PUBLIC_RTMP_URL", "RHEO_GATEWAY__API_TOKENS", "RHEO_PLAYBACK__SIGNING_KEYS",
            "RHEO_DIT_STAGE__LINK_KEY")
"""Variables the stack sets only where the user did not: their bind addresses, public URLs and secrets win."""


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class LocalStack:
    workdir: Path
    stages: int = 2
    """DiT stages per ring."""
    rings: int = 1
    """Rings of ``stages`` stages each: ring r runs ``dit-<r·stages>`` … (proto/rings.py); the controller keeps a
    block map per ring and places each stream on one."""
    decoders: int = 1
    egresses: int = 1
    """Decoder and egress processes (``decoder``, ``decoder-1``, …): the controller places each stream on one."""
    jobs: int = 1
    """Offline-job workers (``jobs``, ``jobs-1``, …; docs/jobs.md): each runs one job at a time."""
    ports: Ports = field(default_factory=Ports)
    model_dir: Path | None = None
    host: str = "127.0.0.1"
    """Bind address of the gateway, RTMP ingest and egress (``0.0.0.0``: reachable from other machines)."""
    public_host: str = "localhost"
    """The host name in the URLs the API hands out (publish, player, playback)."""
    extra_env: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    """torch device of every model process (``model.device``; ``cuda``: one-GPU mode, see ``services.up``).
    None: the configured one (``auto``)."""
    torch_threads: int | None = 1
    """CPU threads of each service's torch (``OMP_NUM_THREADS``, unless the environment sets it): every service
    is its own process on the same cores, and one thread each keeps them from oversubscribing the machine (on the
    2-core dev VM, torch's default of one thread per core in each of 6 processes ran the stack 2× slower)."""
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    link_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    """The tensor-link key of this stack's stages (they listen on loopback, but a stack is as keyed as a cluster)."""
    playback_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    """Signs the stack's playback URLs (gateway and egress share it, like a chart's Secret)."""
    fork: bool = True
    """Fork the services from one process that has imported torch, diffusers and the rest once
    (services/forkserver.py), rather than start eight interpreters that each import them."""
    whip: bool = True
    """WebRTC publish (ingest's WHIP listener behind the gateway; needs aiortc). Off for what publishes over RTMP
    only, on a machine that may lack aiortc (``bench/serve.py`` on a bare GPU machine)."""
    strict: bool = False
    """No supervision: any exit after ``start`` is an error (``check_alive`` raises) and nothing restarts."""
    no_restart: set[str] = field(default_factory=set)
    """Services left down when they exit (a fault test that kills one on purpose and tests the failover)."""
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    report: Callable[[str], None] = field(default_factory=lambda: _to_stderr)
    """Where the supervisor's one-line accounts of exits and restarts go."""
    procs: list[Proc] = field(default_factory=list)
    nats: NatsServer | None = None
    identities: dict[str, Identity] = field(default_factory=dict)
    """Each bus role's credential (made by ``start``; a restarted nats-server takes the same)."""
    supervisor: Supervisor | None = None
    failure: StackError | None = None
    """Why supervision gave up (a crash loop); ``check_alive`` raises it."""
    _halt: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _playback: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    @property
    def gateway_url(self) -> str:
        return f"http://{url_host(connect_host(self.host))}:{self.ports.gateway}"

    def nats_settings(self, role: str, **overrides: object) -> NatsSettings:
        """How a test or tool connects to this stack's NATS acting as ``role`` (with exactly its permissions)."""
        assert self.nats is not None, "the stack is not started"
        ident = self.identities[role]
        return NatsSettings(url=self.nats.url, nkey_seed_file=ident.seed_file,  # type: ignore[arg-type]
                            inbox_prefix=ident.env()["RHEO_NATS__INBOX_PREFIX"], **overrides)

    def start_nats(self, port: int | None = None) -> NatsServer:
        """(Re)start the stack's nats-server (same JetStream store and identities); ``port`` defaults to the
        configured one."""
        self.identities = self.identities or make_identities(self.workdir / "identities")
        self.nats = NatsServer(self.workdir / "nats", port=self.ports.nats if port is None else port,
                               identities=self.identities).start()
        return self.nats

    def _env(self, name: str, health_port: int) -> dict[str, str]:
        role = "dit-stage" if name.startswith("dit-") else name.split("-")[0]
        public = url_host(self.public_host)
        defaults = {
            "RHEO_GATEWAY__HOST": self.host,
            "RHEO_INGEST__RTMP_HOST": self.host,
            "RHEO_EGRESS__HTTP_HOST": self.host,
            "RHEO_GATEWAY__PUBLIC_URL": f"http://{public}:{self.ports.gateway}",
            "RHEO_GATEWAY__PUBLIC_RTMP_URL": f"rtmp://{public}:{self.ports.rtmp}",
            "RHEO_GATEWAY__API_TOKENS": json.dumps([self.api_token]),
            "RHEO_PLAYBACK__SIGNING_KEYS": json.dumps([self.playback_key]),
            "RHEO_DIT_STAGE__LINK_KEY": self.link_key,
        }
        assert set(defaults) == set(USER_SET)
        env = {
            **os.environ,
            "RHEO_NATS__URL": self.nats.url if self.nats else "",
            **self.identities[role].env(),
            "RHEO_TELEMETRY__METRICS_PORT": str(health_port),
            "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1",
            "RHEO_CONTROLLER__STAGES": str(self.stages),
            "RHEO_CONTROLLER__RINGS": str(self.rings),
            "RHEO_GATEWAY__PORT": str(self.ports.gateway),
            **{k: v for k, v in defaults.items() if k not in os.environ},
            "RHEO_INGEST__RTMP_PORT": str(self.ports.rtmp),
            "RHEO_EGRESS__HTTP_PORT": str(self.ports.egress),
            # how the gateway reaches egress (this host), not a viewer's URL
            "RHEO_EGRESS__PUBLIC_URL": f"http://{url_host(connect_host(self.host))}:{self.ports.egress}",
            "RHEO_EGRESS__HLS_DIR": str(self.workdir / "hls"),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        if self.torch_threads and "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in self.extra_env:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        if self.model_dir is not None:
            env["RHEO_MODEL__MODEL_DIR"] = str(self.model_dir)
        if self.device is not None:
            env["RHEO_MODEL__DEVICE"] = self.device
        return env

    def _plan(self) -> list[Proc]:
        decoders = [_replica("decoder", i) for i in range(self.decoders)]
        egresses = [_replica("egress", i) for i in range(self.egresses)]
        stages = [sid for r in range(self.rings) for sid in ring_stage_ids(str(r), self.stages)]
        workers = [_replica("jobs", i) for i in range(self.jobs)]
        names = ["controller", *stages, *decoders, *egresses, "ingest", "gateway", *workers]
        whip = free_port()  # ingest's WHIP listener, on loopback: browsers publish through the gateway
        procs = []
        for i, name in enumerate(names):
            health = self.ports.first_health + i if self.ports.first_health else free_port()
            env = self._env(name, health)
            service = name.split("-")[0]
            if name in decoders or name in egresses:  # a restart keeps its placed streams (lifecycle.member_id)
                env["RHEO_LIFECYCLE__MEMBER_ID"] = name
            if name in egresses[1:]:
                port = free_port()  # the first egress has the stack's fixed port; more are for tests
                env["RHEO_EGRESS__HTTP_PORT"] = str(port)
                env["RHEO_EGRESS__PUBLIC_URL"] = f"http://{url_host(connect_host(self.host))}:{port}"
            if name == "ingest" and self.whip:
                env.update(RHEO_INGEST__WHIP_PORT=str(whip), RHEO_INGEST__WHIP_CLIENT_HEADER="X-Forwarded-For")
            if name == "gateway" and self.whip:
                env["RHEO_GATEWAY__WHIP_URL"] = f"http://127.0.0.1:{whip}"
            if name.startswith("dit-"):
                service = "dit-stage"
                env["RHEO_DIT_STAGE__STAGE_ID"] = name
                env["RHEO_DIT_STAGE__RING_ID"] = str(stages.index(name) // self.stages)
                env["RHEO_DIT_STAGE__LINK_HOST"] = "127.0.0.1"
                env["RHEO_DIT_STAGE__LINK_PORT"] = str(
                    self.ports.first_link + int(name[4:]) if self.ports.first_link else free_port())
            procs.append(Proc(name, [sys.executable, "-m", "services.cli", service], env, health,
                              self.workdir / "logs" / f"{name}.log", fork=self.fork))
        return procs

    def start(self, timeout: float = 180.0, progress: bool = False) -> None:
        """Spawn every service and wait until each answers ``/readyz``; ``progress`` reports each one's time."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.start_nats()
        self.procs = self._plan()
        for p in self.procs:
            p.spawn()
        started = time.monotonic()
        deadline = started + timeout
        pending = list(self.procs)
        while pending:
            self._check_exits()
            still = []
            for p in pending:
                if not p.ready():
                    still.append(p)
                elif progress:
                    self.report(f"{p.name} ready after {time.monotonic() - started:.1f} s")
            pending = still
            if time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise StackError(f"not ready after {timeout:.0f}s: {names}\n{pending[0].log_tail()}")
            time.sleep(0.2)
        if not self.strict:
            self.supervisor = Supervisor(self.procs, self.policy, no_restart=self.no_restart, report=self.report)
            self._thread = threading.Thread(target=self._supervise, name="rheo-supervisor", daemon=True)
            self._thread.start()

    def _supervise(self) -> None:
        assert self.supervisor is not None
        while not self._halt.wait(0.2):
            try:
                self.supervisor.poll()
            except StackError as e:
                self.failure = e
                return
            except Exception as e:  # a restart that cannot even be attempted (fork failed, argv gone): stop watching
                self.failure = StackError(f"supervision failed: {type(e).__name__}: {e}")
                return

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts of each service since ``start`` (all 0 in strict mode)."""
        return self.supervisor.restarts if self.supervisor else {p.name: 0 for p in self.procs}

    def restart(self, name: str, sig: int = signal.SIGKILL, timeout: float = 120.0) -> float:
        """Kill one service with ``sig`` and have it back (same command, environment, ports): the supervisor
        restarts it (in strict mode, or for a service it leaves down, this does); returns the seconds until it
        answered ``/readyz`` again."""
        p = next(p for p in self.procs if p.name == name)
        old = p.popen
        if old is not None and old.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(old.pid, sig)
            old.wait(timeout)
        t0 = time.monotonic()
        if self.supervisor is None or name in self.no_restart:
            p.spawn()
        while p.popen is old or not p.ready():
            if p.popen is not old and p.popen is not None and p.popen.poll() is not None and self.supervisor is None:
                raise StackError(f"{name} exited with {p.popen.returncode} after a restart:\n{p.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise StackError(f"{name} not ready {timeout:.0f}s after a restart\n{p.log_tail()}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def check_alive(self) -> None:
        """Raise ``StackError`` if supervision gave up (a crash loop), or in strict mode if any service exited."""
        if self.failure is not None:
            raise self.failure
        if self.strict:
            self._check_exits()

    def _check_exits(self) -> None:
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is not None:
                raise StackError(f"{p.name} exited with {p.popen.returncode}:\n{p.log_tail()}")

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(
            self.gateway_url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.api_token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def playback(self, stream_id: str) -> str:
        """``/hls/<id>/<token>``: the base path of the stream's playlists and media, signed by the API once (valid
        ``playback.token_ttl_s``, so also while the gateway restarts)."""
        if stream_id not in self._playback:
            urls = self.api("POST", f"/v1/streams/{stream_id}/playback")
            self._playback[stream_id] = urllib.parse.urlsplit(urls["llhls_url"]).path.rsplit("/", 1)[0]
        return self._playback[stream_id]

    def stop(self, timeout: float = 10.0) -> dict[str, int | None]:
        """End supervision, SIGTERM every service, wait for the drains, kill leftovers; returns each exit code
        (of the current process: a service restarted once ran again and exits 0 like the others)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
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


def _replica(service: str, i: int) -> str:
    return service if i == 0 else f"{service}-{i}"


def open_demo_stream(stack: LocalStack, prompt: str, weights: bool) -> dict:
    """The stream ``rheo up`` opens: the API's answer, plus ``player_path`` (the gateway's hls.js page for it, with
    its signed playlist).
    The tiny random model runs on CPU: a small frame keeps it real-time on a laptop."""
    side = 512 if weights else 128
    created = stack.api("POST", "/v1/streams", {"prompt": prompt, "width": side, "height": side,
                                                "slo_latency_ms": 1000 if weights else 5000})
    return with_player_path(created)


def with_player_path(info: dict) -> dict:
    """``info`` (the API's answer about a stream) plus ``player_path``: its ``player_url`` without scheme and host."""
    parts = urllib.parse.urlsplit(info["player_url"])
    return {**info, "player_path": f"{parts.path}?{parts.query}"}


def start_testpattern(publish_url: str) -> subprocess.Popen[bytes]:
    """``rheo up --testpattern``'s publisher: the moving test pattern, in real time, in its own process; it
    reconnects as OBS does (an ingest restarted by the supervisor)."""
    return subprocess.Popen([sys.executable, "-m", "ingest.testpattern", publish_url.replace("localhost", "127.0.0.1"),
                             "--reconnect"])

