"""values.schema.json: covers every value, accepts the value sets, rejects bad values, and speaks config.py's keys."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from deploy.chartkit import ALL_VALUE_SETS, CHART, helm

from services.config import iter_fields

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
CONFIG_KEYS = {key for key, _, _ in iter_fields()}
# Keys the chart sets itself (from other values, the downward API or Secrets): not settable under `config`.
CHART_OWNED = {"service", "nats.url", "nats.user", "nats.password", "nats.token", "nats.creds_file",
               "nats.nkey_seed_file", "nats.name", "nats.inbox_prefix", "nats.tls_ca_file",
               "controller.stages", "controller.rings", "dit_stage.ring_id",
               "lifecycle.member_id", "model.model_dir", "dit_stage.stage_id",
               "dit_stage.advertise_host", "dit_stage.link_key", "egress.public_url", "gateway.api_tokens",
               "gateway.api_tokens_file", "playback.signing_keys", "ingest.tls_cert_file", "ingest.tls_key_file",
               "controller.autoscale.ring_workload", "controller.autoscale.decoder_workload",
               "controller.autoscale.ingest_workload"}
# Keys the chart never offers: local development only (secure by default).
DEV_ONLY = {"gateway.allow_anonymous"}


@pytest.fixture(scope="module")
def chart() -> Any:
    return helm.Chart.load(str(CHART))


def _validate(chart: Any, values: dict[str, Any]) -> None:
    chart.validate_schema(values)


@pytest.mark.parametrize("value_set", sorted(ALL_VALUE_SETS))
def test_schema_accepts_every_value_set(chart: Any, value_set: str) -> None:
    _validate(chart, ALL_VALUE_SETS[value_set])


BAD_VALUES = {
    "negative replicas": {"gateway": {"replicas": -1}},
    "negative stage count": {"ditStage": {"stages": 0}},
    "negative gpus": {"ditStage": {"gpus": -1}},
    "http NATS address": {"nats": {"url": "http://nats:4222"}},
    "NATS address not a URL": {"nats": {"url": "nats server"}},
    "anonymous NATS": {"nats": {"auth": {"type": "none"}}},
    "NATS allow_anonymous": {"nats": {"allow_anonymous": True}},
    "anonymous API": {"config": {"gateway": {"allow_anonymous": True}}},
    "NATS no_auth_user": {"nats": {"no_auth_user": "rheo-gateway"}},
    "one shared NATS token": {"nats": {"auth": {"type": "token"}}},
    "unknown cert-manager issuer kind": {"nats": {"tls": {"certManager": {"kind": "Vault"}}}},
    "unknown config key": {"config": {"gateway": {"prot": 8080}}},
    "unknown config section": {"config": {"gatway": {"port": 8080}}},
    "chart-owned config key": {"config": {"controller": {"stages": 3}}},
    "plaintext secret in config": {"config": {"gateway": {"api_tokens": ["abc"]}}},
    "ephemeral listener port": {"config": {"ingest": {"rtmp_port": 0}}},
    "port out of range": {"config": {"gateway": {"port": 70000}}},
    "config value of the wrong type": {"config": {"stream": {"steps": "two"}}},
    "config value out of range": {"config": {"stream": {"steps": 9}}},
    "ClusterIP RTMP service": {"ingest": {"service": {"type": "ClusterIP"}}},
    "unknown weights source": {"model": {"source": "s3"}},
    "short API token": {"api": {"tokens": ["short"]}},
    "short playback key": {"playback": {"signingKeys": ["short"]}},
    "plaintext playback key in config": {"config": {"playback": {"signing_keys": ["k" * 40]}}},
    "CORS origin with a path": {"config": {"gateway": {"cors_origins": ["https://a.example/x"]}}},
    "unknown top-level value": {"replicaz": 2},
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(chart: Any, case: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        _validate(chart, BAD_VALUES[case])


def _schema_config_keys(node: dict[str, Any] | None = None, prefix: str = "") -> set[str]:
    """Dotted config keys the schema offers (nested sections such as ``controller.autoscale`` included)."""
    node = node if node is not None else SCHEMA["properties"]["config"]
    keys: set[str] = set()
    for key, child in node["properties"].items():
        nested = child.get("type") == "object" and "properties" in child
        keys |= _schema_config_keys(child, f"{prefix}{key}.") if nested else {f"{prefix}{key}"}
    return keys


def test_schema_config_keys_are_real_config_keys() -> None:
    keys = _schema_config_keys()
    assert keys <= CONFIG_KEYS, f"values.schema.json config keys unknown to services/config.py: {keys - CONFIG_KEYS}"
    assert not keys & (CHART_OWNED | DEV_ONLY)
    assert SCHEMA["properties"]["config"]["additionalProperties"] is False
    for node in SCHEMA["properties"]["config"]["properties"].values():
        assert node["additionalProperties"] is False


def test_schema_offers_every_config_key() -> None:
    """services/config.py is still growing: a key added there after the schema was written is reported here."""
    missing = sorted(CONFIG_KEYS - CHART_OWNED - DEV_ONLY - _schema_config_keys())
    if missing:
        pytest.skip(f"config keys not yet settable through the chart's `config` value (add them to "
                    f"values.schema.json): {', '.join(missing)}")


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, (*path, k))]
    return [path]


def test_schema_and_docs_describe_every_value_in_values_yaml() -> None:
    for path in _leaves(VALUES):
        node = SCHEMA
        for part in path:
            props = node.get("properties", {})
            if part in props:
                node = props[part]
            elif isinstance(node.get("additionalProperties"), dict):
                node = node["additionalProperties"]
            else:
                pytest.fail(f"values.yaml {'.'.join(path)} is not described by values.schema.json")
    docs = (CHART.parents[1] / "docs" / "deploy.md").read_text()
    for path in _leaves(VALUES):
        if path[-2:-1] in {("requests",), ("limits",)}:
            path = path[:-2]
        assert f"`{'.'.join(path)}`" in docs, f"docs/deploy.md does not list the value {'.'.join(path)}"
    for key in ("image", "nats", "api", "playback", "model", "gateway", "ingest", "decoder", "egress", "controller",
                "ditStage"):
        assert key in VALUES and key in SCHEMA["properties"]
