"""One config model: env and YAML sources, strictness, and the CLI that prints it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.cli import main
from services.config import Settings, iter_fields, load_settings
from services.config_errors import ConfigError

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
    with pytest.raises(ConfigError, match="ulr"):
        load_settings()
    monkeypatch.delenv("RHEO_CONFIG")
    with pytest.raises(ValidationError):
        Settings(stream={"steps": 9})
    monkeypatch.setenv("RHEO_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
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


CONFIG_MISTAKES = {
    "bad YAML": ({"RHEO_CONFIG": "{yaml}"}, "nats: {url: [\n",
                 "config error: RHEO_CONFIG {yaml} line 2, column 1: not valid YAML"),
    "unknown YAML key": ({"RHEO_CONFIG": "{yaml}"}, "stream:\n  stepz: 2\n",
                         "config error: stream.stepz in RHEO_CONFIG {yaml}: unknown key"),
    "wrong YAML type": ({"RHEO_CONFIG": "{yaml}"}, "stream:\n  steps: two\n",
                        "config error: stream.steps in RHEO_CONFIG {yaml}: should be a valid integer"),
    "bad env value": ({"RHEO_GATEWAY__PORT": "99999"}, "",
                      "config error: RHEO_GATEWAY__PORT='99999': should be less than or equal to 65535"),
    "unknown env key": ({"RHEO_STREAM__STEPZ": "2"}, "", "config error: RHEO_STREAM__STEPZ='2': unknown key"),
    "capture budget past all the time": ({"RHEO_DIT_STAGE__CAPTURE_BUDGET": "2"}, "",
                                         "config error: RHEO_DIT_STAGE__CAPTURE_BUDGET='2': should be less than or "
                                         "equal to 1"),
    "env list not JSON": ({"RHEO_GATEWAY__API_TOKENS": "abc"}, "",
                          "config error: RHEO_GATEWAY__API_TOKENS='abc': not JSON"),
    "missing file": ({"RHEO_CONFIG": "{yaml}.missing"}, "", "config error: RHEO_CONFIG names"),
}


@pytest.mark.parametrize("mistake", list(CONFIG_MISTAKES))
@pytest.mark.parametrize("command", [["config"], ["run", "--t2v", "--output", "o.mp4", "--prompt", "x"]])
def test_a_config_mistake_is_one_line_naming_the_key(mistake: str, command: list[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    env, text, want = CONFIG_MISTAKES[mistake]
    cfg = tmp_path / "rheo.yaml"
    cfg.write_text(text)
    for key in [k for k in os.environ if k.startswith("RHEO_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(yaml=cfg))
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rheo {command[0]}: {want.format(yaml=cfg)}"), err
    assert "Traceback" not in out + err


def test_a_service_with_a_config_mistake_exits_with_one_line() -> None:
    out = _rheo("gateway", env={"RHEO_STREAM__STEPS": "9"})
    assert out.returncode == 2
    assert out.stderr.strip() == "rheo gateway: config error: RHEO_STREAM__STEPS='9': should be less than or equal to 4"
