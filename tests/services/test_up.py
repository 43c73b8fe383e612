"""``rheo up`` before and around the stack: ports (``--port-offset``/``--port-base``, single flags, a taken port is
one line naming the flag), the state folder (one ``rheo up`` at a time, credentials kept across restarts in 0600
files, ``--fresh`` rotates them), ``--host`` and the user's ``RHEO_*`` variables."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import build_parser, main
from services.natsd import make_identities
from services.stack import USER_SET, LocalStack, Ports
from services.up import ROTATED, SECRETS, hold, load_secrets, reachable_host, rotate, up_ports

ROOT = Path(__file__).resolve().parents[2]


def test_port_offset_moves_every_default_and_flags_win() -> None:
    ports = up_ports(build_parser().parse_args(["up", "--port-offset", "100", "--rtmp-port", "2000"]))
    assert ports == Ports(gateway=8180, rtmp=2000, egress=8190, nats=4322, first_health=9564, first_link=7200)
    assert up_ports(build_parser().parse_args(["up", "--port-base", "100"])) == Ports().offset(100)  # one flag
    assert up_ports(build_parser().parse_args(["up", "--port", "9999"])).gateway == 9999  # the old flag still works
    assert up_ports(build_parser().parse_args(["up"])) == Ports()  # `make up` unchanged


def test_a_taken_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for flag, want in (("--gateway-port", "--gateway-port or --port-offset N"),
                           ("--nats-port", "--nats-port or --port-offset N")):
            # the other fixed ports moved far away, so only the held one can clash
            out = subprocess.run([sys.executable, "-m", "services.cli", "up", "--workdir", str(tmp_path),
                                  "--port-offset", "20000", flag, str(port)], capture_output=True, text=True,
                                 timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert out.returncode == 2, out.stderr
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and f"port {port}" in lines[0] and lines[0].endswith(want), out.stderr
            assert "Traceback" not in out.stderr


def test_a_second_rheo_up_on_the_same_state_folder_is_one_line(tmp_path: Path, capsys) -> None:
    with hold(tmp_path) as lock:
        assert lock is not None
        assert main(["up", "--workdir", str(tmp_path), "--port-offset", "20000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rheo up: another rheo up (pid {os.getpid()}) is running in {tmp_path}: stop it (Ctrl-C), or "
                   "give this one its own --workdir DIR and --port-offset N"], err
    with hold(tmp_path) as again:  # released with its holder
        assert again is not None


def test_credentials_are_kept_private_and_fresh_rotates_them(tmp_path: Path) -> None:
    first = load_secrets(tmp_path)
    first["demo"] = {"id": "s1", "stream_key": "k1", "weights": False}
    (tmp_path / SECRETS).write_text(json.dumps(first))
    ids = {r: i.public_key for r, i in make_identities(tmp_path / "identities").items()}
    assert load_secrets(tmp_path) == first  # a restart: the same token, keys and demo stream key
    assert {r: i.public_key for r, i in make_identities(tmp_path / "identities").items()} == ids
    assert stat.S_IMODE((tmp_path / SECRETS).stat().st_mode) == 0o600
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "identities").iterdir())
    (tmp_path / "nats").mkdir()
    (tmp_path / "logs").mkdir()
    rotate(tmp_path)
    assert not any((tmp_path / name).exists() for name in ROTATED) and (tmp_path / "logs").is_dir()
    fresh = load_secrets(tmp_path)
    assert "demo" not in fresh and all(fresh[k] != first[k] for k in ("api_token", "playback_key", "link_key"))
    assert {r: i.public_key for r, i in make_identities(tmp_path / "identities").items()} != ids


def test_host_and_the_users_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--host 0.0.0.0`` binds every public listener there and hands out a reachable address; RHEO_* bind
    addresses, public URLs and secrets the user set are passed through untouched."""
    for key in USER_SET:
        monkeypatch.delenv(key, raising=False)
    assert reachable_host("127.0.0.1") == "localhost" and reachable_host("10.1.2.3") == "10.1.2.3"
    assert reachable_host("0.0.0.0") not in ("0.0.0.0", "")
    stack = LocalStack(tmp_path, host="0.0.0.0", public_host="192.0.2.7", ports=Ports())
    stack.identities = make_identities(tmp_path / "identities")
    env = stack._env("gateway", 9464)
    assert env["RHEO_GATEWAY__HOST"] == env["RHEO_INGEST__RTMP_HOST"] == env["RHEO_EGRESS__HTTP_HOST"] == "0.0.0.0"
    assert env["RHEO_GATEWAY__PUBLIC_URL"] == "http://192.0.2.7:8080"
    assert env["RHEO_GATEWAY__PUBLIC_RTMP_URL"] == "rtmp://192.0.2.7:1935"
    assert env["RHEO_EGRESS__PUBLIC_URL"] == "http://127.0.0.1:8090" and stack.gateway_url == "http://127.0.0.1:8080"
    mine = {"RHEO_GATEWAY__HOST": "10.0.0.5", "RHEO_GATEWAY__PUBLIC_URL": "https://rheo.example",
            "RHEO_GATEWAY__API_TOKENS": '["my-token"]', "RHEO_PLAYBACK__SIGNING_KEYS": '["k" * 40]'}
    for key, value in mine.items():
        monkeypatch.setenv(key, value)
    env = stack._env("gateway", 9464)
    assert {k: env[k] for k in mine} == mine
    assert env["RHEO_INGEST__RTMP_HOST"] == "0.0.0.0"  # what the user left alone is the stack's


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU machine's answer")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["up", "--device", "cuda", "--workdir", str(tmp_path), "--port-offset", "20000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rheo up: --device cuda: no CUDA device is visible"), err
    assert not (tmp_path / SECRETS).exists()  # refused before anything was made or started


def test_one_gpu_budget_names_what_does_not_fit() -> None:
    from services.config import Settings
    from services.gpu_budget import GiB, check_one_gpu, one_gpu_budget

    settings = Settings()
    full = one_gpu_budget(settings, Path("/models/wan"), streams=4)
    assert {"DiT", "umT5", "KV ×4", "VAE caches ×4"} <= set(full.parts)
    assert 2.4 * GiB < full.parts["DiT"] < 2.8 * GiB  # 1.3B in bf16
    assert one_gpu_budget(settings, Path("/m"), 8).total > full.total  # more streams, more memory
    taehv = Settings(encoder={"vae": "taehv"})
    assert one_gpu_budget(taehv, Path("/m"), 4).total < full.total
    assert check_one_gpu(full, free=80 * GiB, total=80 * GiB, device="cuda") is None
    line = check_one_gpu(full, free=16 * GiB, total=24 * GiB, device="cuda:0")
    assert line is not None and "\n" not in line
    assert line.startswith("--device cuda:0: one-GPU mode needs ≈") and "16.0 of 24.0 GiB free" in line
    assert "lower --streams" in line
    assert one_gpu_budget(settings, None, 4).total < 3 * GiB  # the tiny model: contexts and small caches


def test_local_stack_device_reaches_every_model_process(tmp_path: Path) -> None:
    ids = make_identities(tmp_path / "ids")
    on_gpu = LocalStack(tmp_path, stages=1, device="cuda:0", identities=ids)
    assert {on_gpu._env(n, 9000)["RHEO_MODEL__DEVICE"] for n in ("ingest", "dit-0", "decoder")} == {"cuda:0"}
    plain = LocalStack(tmp_path, identities=ids)._env("ingest", 9000)
    assert plain.get("RHEO_MODEL__DEVICE") == os.environ.get("RHEO_MODEL__DEVICE")  # unset: the configured one
