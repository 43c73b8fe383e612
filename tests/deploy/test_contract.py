"""The chart against the code it deploys: CLI subcommands, config keys (services/config.py, read now) and ports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy.chartkit import CHART, Rendered, component, containers

from proto.permissions import ROLES, inbox_prefix, user_name
from services.cli import SERVICES, build_parser
from services.config import Settings, iter_fields

CONFIG_KEYS = {key for key, _, _ in iter_fields()}
DEFAULTS = {key: default for key, default, _ in iter_fields()}
# The listener each component's named container port must match: (port name, config key).
LISTENERS = {
    "gateway": ("http", "gateway.port"),
    "ingest": ("rtmp", "ingest.rtmp_port"),
    "egress": ("hls", "egress.http_port"),
    "dit-stage": ("link", "dit_stage.link_port"),
}
# Stand-ins for what Kubernetes fills in at run time, shaped like the real thing.
SECRET_STANDINS = {"api-tokens": json.dumps(["t" * 40]), "signing-keys": json.dumps(["s" * 48]), "link-key": "l" * 48,
                   **{c: "p" * 32 for c in ROLES}}  # one NATS password per bus role
DOWNWARD = {"metadata.name": "dit-3", "status.podIP": "10.1.2.3"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _env_key(name: str) -> str:
    section, sep, key = name.removeprefix("RHEO_").partition("__")
    assert sep and section and key, f"{name} is not RHEO_<SECTION>__<KEY>"
    return f"{section.lower()}.{key.lower()}"


def test_every_container_runs_a_real_rheo_service(rendered: Rendered) -> None:
    commands = _subcommands()
    deployed = set()
    for w in rendered.workloads():
        for c in containers(w):
            assert "command" not in c, "the image's ENTRYPOINT is rheo; the chart passes only the subcommand"
            (cmd,) = c["args"]
            assert cmd in commands, f"`rheo {cmd}` is not a subcommand of services/cli.py"
            assert cmd in SERVICES, f"`rheo {cmd}` is not a service"
            deployed.add(cmd)
    assert deployed == set(SERVICES), "every service in services/cli.py SERVICES must be deployed"


def _dotted(cfg: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of a rendered config; a nested section (``controller.autoscale``) is walked into."""
    keys: set[str] = set()
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        walk = isinstance(value, dict) and dotted not in CONFIG_KEYS  # a section, not a dict-valued key
        keys |= _dotted(value, f"{dotted}.") if walk else {dotted}
    return keys


def test_every_config_key_the_chart_renders_is_real(rendered: Rendered) -> None:
    cfg = rendered.config_yaml()
    rendered_keys = _dotted(cfg)
    assert rendered_keys <= CONFIG_KEYS, rendered_keys - CONFIG_KEYS
    for w in rendered.workloads():
        for c in containers(w):
            for e in c["env"]:
                if e["name"].startswith("RHEO_") and e["name"] != "RHEO_CONFIG":
                    assert _env_key(e["name"]) in CONFIG_KEYS, e["name"]


def _container_settings(rendered: Rendered, container: dict[str, Any], tmp: Path,
                        monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What rheo itself makes of this container's config file and env (pydantic: unknown keys are errors)."""
    path = tmp / "config.yaml"
    path.write_text(rendered.get("ConfigMap", "rheo-config")["data"]["config.yaml"])
    env: dict[str, str] = {}
    for e in container["env"]:
        if "value" in e:
            value = e["value"]
            for name, resolved in env.items():
                value = value.replace(f"$({name})", resolved)
        elif "fieldRef" in e["valueFrom"]:
            value = DOWNWARD[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = SECRET_STANDINS[e["valueFrom"]["secretKeyRef"]["key"]]
        env[e["name"]] = value
    assert env.pop("RHEO_CONFIG") == "/etc/rheo/config.yaml"
    assert {"mountPath": "/etc/rheo", "name": "config", "readOnly": True} in container["volumeMounts"]
    env["RHEO_CONFIG"] = str(path)
    with monkeypatch.context() as m:
        for name in [n for n in __import__("os").environ if n.startswith("RHEO_")]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return Settings()


def test_rheo_accepts_the_rendered_config_of_every_container(rendered: Rendered, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for w in rendered.workloads():
        for c in containers(w):
            s = _container_settings(rendered, c, tmp_path, monkeypatch)
            assert s.nats.url == rendered.config_yaml()["nats"]["url"]
            assert s.controller.stages == rendered.merged["ditStage"]["stages"]
            if component(w) == "dit-stage":
                assert s.dit_stage.stage_id == "dit-3" and s.dit_stage.advertise_host == "10.1.2.3"
            if component(w) == "gateway":
                assert s.gateway.api_tokens == [] and s.gateway.allow_anonymous is False  # the tokens: a mounted file
                assert str(s.gateway.api_tokens_file) == "/var/run/secrets/rheo/api/api-tokens"
                assert {"mountPath": "/var/run/secrets/rheo/api", "name": "api-tokens", "readOnly": True} in \
                    c["volumeMounts"]
            if component(w) in ("gateway", "egress"):
                assert [k.get_secret_value() for k in s.playback.signing_keys] == ["s" * 48]
            if component(w) == "egress":
                assert s.egress.public_url == f"http://10.1.2.3:{s.egress.http_port}"
            auth = rendered.merged["nats"]["auth"]["type"]
            assert {"userPassword": s.nats.password, "creds": s.nats.creds_file}[auth]
            assert s.nats.inbox_prefix == inbox_prefix(component(w))  # its role's, the only inboxes it may read
            if auth == "userPassword":
                assert s.nats.user == user_name(component(w))


def test_ports_match_the_listeners(rendered: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for w in rendered.workloads():
        c = next(containers(w))
        s = _container_settings(rendered, c, tmp_path, monkeypatch)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == s.telemetry.metrics_port
        name_key = LISTENERS.get(component(w))
        if name_key:
            name, key = name_key
            section, field = key.split(".")
            assert ports[name] == getattr(getattr(s, section), field), (component(w), key)
            if rendered.values.get("config", {}).get(section, {}).get(field) is None:
                assert ports[name] == DEFAULTS[key], f"{key}: chart default differs from services/config.py"
        extra = {"rtmps": s.ingest.rtmps_port} if component(w) == "ingest" and s.ingest.rtmps_port else {}
        assert {n: ports.get(n) for n in extra} == extra
        assert set(ports) == {"metrics"} | ({name_key[0]} if name_key else set()) | set(extra)
    names = {p["name"] for w in rendered.workloads() for c in containers(w) for p in c["ports"]}
    if rendered.nats() is not None:
        names |= {p["name"] for c in containers(rendered.nats()) for p in c["ports"]}
    for svc in rendered.kind("Service"):
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, (svc["metadata"]["name"], p)


def test_chart_port_defaults_equal_the_config_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for section, keys in values["config"].items():
        for key, value in keys.items():
            if key.endswith("port"):
                assert value == DEFAULTS[f"{section}.{key}"], f"config.{section}.{key}"
    assert values["ingest"]["service"]["port"] == DEFAULTS["ingest.rtmp_port"]
    assert values["gateway"]["service"]["port"] == DEFAULTS["gateway.port"]


def test_block_map_stage_ids_are_the_statefulset_pod_names(rendered: Rendered) -> None:
    from services.controller.service import ControllerService

    stages = rendered.merged["ditStage"]["stages"]
    sts = rendered.get("StatefulSet", "dit")
    pods = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    controller = ControllerService(Settings(controller={"stages": stages}))
    assert controller.stage_ids() == pods[:stages]
