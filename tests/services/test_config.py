"""One config model: env and YAML sources, strictness, and the CLI that prints it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.config import Settings, iter_fields, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_have_descriptions() -> None:
    fields = iter_fields()
    assert len(fields) > 40
    assert [k for k, _, d in fields if not d] == []


def test_env_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "rheo.yaml"
    cfg.write_text(yaml.safe_dump({"nats": {"url": "nats://yaml:4222", "max_send_bytes": 1000},
                                   "stream": {"steps": 3}}))
    monkeypatch.setenv("RHEO_CONFIG", str(cfg))
    monkeypatch.setenv("RHEO_NATS__URL", "nats://env:4222")
    s = load_settings()
    assert s.nats.url == "nats://env:4222"  # env beats YAML
    assert s.nats.max_send_bytes == 1000  # YAML beats defaults, other keys of the section kept
    assert s.stream.steps == 3
    assert s.nats.connect_timeout_s == 2.0


def test_unknown_keys_and_bad_values_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "rheo.yaml"
    cfg.write_text(yaml.safe_dump({"nats": {"ulr": "typo"}}))
    monkeypatch.setenv("RHEO_CONFIG", str(cfg))
    with pytest.raises(ValidationError, match="ulr"):
        load_settings()
    monkeypatch.delenv("RHEO_CONFIG")
    with pytest.raises(ValidationError):
        Settings(stream={"steps": 9})
    monkeypatch.setenv("RHEO_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load_settings()


def _rheo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, check=False, timeout=60)


def test_cli_help_and_config() -> None:
    out = _rheo("--help")
    assert out.returncode == 0 and "config" in out.stdout and "up" in out.stdout
    out = _rheo("config", env={"RHEO_NATS__URL": "nats://x:1", "RHEO_NATS__PASSWORD": "hunter2"})
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["nats"]["url"] == "nats://x:1"
    assert "hunter2" not in out.stdout  # secrets are masked
    out = _rheo("config", "--keys")
    assert "nats.max_send_bytes" in out.stdout
