"""``rheo up``'s ports: every default moved by ``--port-offset``, single flags over it, and a port already taken is one
line naming the flag to change (before anything starts), not a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from services.cli import _up_ports, build_parser
from services.stack import Ports

ROOT = Path(__file__).resolve().parents[2]


def test_port_offset_moves_every_default_and_flags_win() -> None:
    ports = _up_ports(build_parser().parse_args(["up", "--port-offset", "100", "--rtmp-port", "2000"]))
    assert ports == Ports(gateway=8180, rtmp=2000, egress=8190, nats=4322, first_health=9564, first_link=7200)
    assert _up_ports(build_parser().parse_args(["up", "--port", "9999"])).gateway == 9999  # the old flag still works
    assert _up_ports(build_parser().parse_args(["up"])) == Ports()  # `make up` unchanged


def test_a_taken_port_is_one_clear_line() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for flag, want in (("--gateway-port", "--gateway-port or --port-offset N"),
                           ("--nats-port", "--nats-port or --port-offset N")):
            # the other fixed ports moved far away, so only the held one can clash
            out = subprocess.run([sys.executable, "-m", "services.cli", "up", "--port-offset", "20000", flag,
                                  str(port)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert out.returncode == 2, out.stderr
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and f"port {port}" in lines[0] and lines[0].endswith(want), out.stderr
            assert "Traceback" not in out.stderr
