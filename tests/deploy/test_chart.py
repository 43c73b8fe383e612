"""charts/rheo: strict lint, Kubernetes schema validation and assertions on the rendered objects (no cluster)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy.chartkit import (
    ALL_VALUE_SETS,
    CHART,
    NEW_ONLY_VALUE_SETS,
    RELEASE,
    VALUE_SETS,
    Rendered,
    component,
    containers,
    helm,
    render,
)

from proto.rings import resolve_ring, ring_stage_ids

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

# The Kubernetes versions the chart supports: Chart.yaml kubeVersion's floor and the newest the validator knows.
OLDEST_K8S = "1.28.0"
NEWEST_K8S = "1.37.0"
CRD_KINDS = {"ServiceMonitor", "Certificate"}  # not in the core schemas; checked by hand below
STATELESS = {"gateway", "egress", "controller"}
ALL_COMPONENTS = {"gateway", "egress", "controller", "ingest", "decoder", "dit-stage", "jobs"}


# -- lint -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube", [OLDEST_K8S, NEWEST_K8S])
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_lint_strict(value_set: str, kube: str) -> None:
    result = helm.lint(str(CHART), ALL_VALUE_SETS[value_set], strict=True,
                       namespace="rheo", kube_version=f"v{kube}")
    problems = [m for m in result["messages"] if m["severity"] >= 2]  # 1 = INFO (e.g. "icon is recommended")
    assert result["errors"] == [] and problems == [], result


def test_chart_is_self_contained() -> None:
    """No chart dependency: the chart runs and configures its own NATS (templates/nats.yaml)."""
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and "dependencies" not in meta
    assert meta["kubeVersion"] == f">={OLDEST_K8S}-0"
    assert yaml.safe_load((CHART / "values.yaml").read_text())["nats"]["deploy"] is True


# -- Kubernetes schemas -----------------------------------------------------------------------------------------


def _validation_cases() -> list[tuple[str, str]]:
    cases = [(name, kube) for name in sorted(VALUE_SETS) for kube in (OLDEST_K8S, NEWEST_K8S)]
    return cases + [(name, NEWEST_K8S) for name in sorted(NEW_ONLY_VALUE_SETS)]


@pytest.mark.parametrize(("value_set", "kube"), _validation_cases())
def test_rendered_manifests_pass_kubernetes_validate_strict(value_set: str, kube: str) -> None:
    checked = 0
    for obj in render(value_set).objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {kube}: {e.message} "
                        f"at {'/'.join(map(str, e.path))}")
        checked += 1
    assert checked >= 20


def test_kubernetes_validate_command_line_strict(tmp_path: Path) -> None:
    """The same check as an operator would run it: the CLI on one multi-document file (oldest version: the
    API test above covers both ends)."""
    cli = Path(sys.executable).parent / "kubernetes-validate"
    if not cli.exists():
        pytest.skip(f"{cli} not found (the Python API check above still ran)")
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all([o for o in render("gpu-4-stages").objects if o["kind"] not in CRD_KINDS]))
    proc = subprocess.run([str(cli), "--strict", "--quiet", "-k", OLDEST_K8S, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_validator_can_fail() -> None:
    """Negative control: a port as a string and an unknown field are rejected."""
    svc = render("default").get("Service", f"{RELEASE}-rtmp")
    bad = json.loads(json.dumps(svc))
    bad["spec"]["ports"][0]["port"] = "1935"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, OLDEST_K8S, strict=True)
    bad = json.loads(json.dumps(svc))
    bad["spec"]["replicaz"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, OLDEST_K8S, strict=True)


def test_service_monitor_selects_every_metrics_service() -> None:
    r = render("gpu-4-stages")
    (sm,) = r.kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    selector = sm["spec"]["selector"]["matchLabels"]
    scraped = [s for s in r.kind("Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped} == ALL_COMPONENTS
    for svc in scraped:
        assert svc["spec"]["type"] == "ClusterIP" and [p["name"] for p in svc["spec"]["ports"]] == ["metrics"]
    assert render("default").kind("ServiceMonitor") == []


# -- what every pod must have -----------------------------------------------------------------------------------


def test_every_service_runs_once_per_release(rendered: Rendered) -> None:
    assert sorted(component(w) for w in rendered.workloads()) == sorted(ALL_COMPONENTS)
    controller = rendered.get("Deployment", f"{RELEASE}-controller")
    if rendered.merged["controller"]["leaderElection"]:  # one leader through the Lease, the others stand by
        assert controller["spec"]["replicas"] == rendered.merged["controller"]["replicas"]
        role = rendered.get("Role", f"{RELEASE}-controller-lease")  # (the autoscaler's own Role: test_autoscale)
        assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                  "verbs": ["get", "create", "update"]}]
        binding = rendered.get("RoleBinding", f"{RELEASE}-controller-lease")
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"][0]["name"] == controller["spec"]["template"]["spec"]["serviceAccountName"]
    else:
        assert controller["spec"]["replicas"] == 1 and controller["spec"]["strategy"]["type"] == "Recreate"
        assert rendered.kind("Role") == []


def test_leader_election_can_be_turned_off() -> None:
    rendered = Rendered({"controller": {"leaderElection": False}})
    controller = rendered.get("Deployment", f"{RELEASE}-controller")
    assert controller["spec"]["replicas"] == 1 and controller["spec"]["strategy"]["type"] == "Recreate"
    assert controller["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert rendered.kind("Role") == [] and rendered.kind("RoleBinding") == []


def test_jobs_workers_are_sized_by_their_values() -> None:
    """docs/jobs.md: the jobs Deployment runs ``rheo jobs`` with its own NATS user, replicas, GPUs and resources."""
    rendered = Rendered({"jobs": {"replicas": 3, "gpus": 1, "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                                                          "limits": {"memory": "16Gi"}}}})
    jobs = rendered.get("Deployment", f"{RELEASE}-jobs")
    assert jobs["spec"]["replicas"] == 3
    (c,) = containers(jobs)
    assert c["args"] == ["jobs"] and c["resources"]["requests"]["cpu"] == "2"
    assert c["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": 1}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RHEO_NATS__INBOX_PREFIX"] == "_INBOX.jobs"


def test_gpus_only_where_asked_and_never_on_stateless_services(rendered: Rendered) -> None:
    values = rendered.merged
    want = {"dit-stage": values["ditStage"]["gpus"], "ingest": values["ingest"]["gpus"],
            "decoder": values["decoder"]["gpus"], "jobs": values["jobs"]["gpus"], "gateway": 0, "egress": 0,
            "controller": 0}
    for w in rendered.workloads():
        for c in containers(w):
            res = c.get("resources", {})
            got = res.get("limits", {}).get("nvidia.com/gpu", 0)
            assert got == want[component(w)], (component(w), res)
            assert res.get("requests", {}).get("nvidia.com/gpu", 0) == got
    if rendered.values.get("ditStage", {}).get("gpus") == 1 or rendered.values == {}:
        stage = rendered.get("StatefulSet", "dit")
        assert next(containers(stage))["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_probes_resources_and_security_everywhere(rendered: Rendered) -> None:
    for w in rendered.workloads():
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        # the API token only where the leader Lease needs it
        want = component(w) == "controller" and rendered.merged["controller"]["leaderElection"]
        assert pod["automountServiceAccountToken"] is want
        tmp = [v for v in pod["volumes"] if v["name"] == "tmp"]
        assert tmp and "emptyDir" in tmp[0]
        for c in containers(w):
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_every_container_has_startup_liveness_and_readiness_probes(rendered: Rendered) -> None:
    """docs/supervision.md: liveness on /healthz (which fails on a stuck unit of work or a lagging loop) restarts a
    wedged pod, after a few failures; startup holds it off while the process starts; readiness gates traffic."""
    seen = set()
    for w in rendered.workloads():
        for c in containers(w):
            seen.add(component(w))
            probes = {kind: c[f"{kind}Probe"] for kind in ("startup", "liveness", "readiness")}
            assert {k: p["httpGet"] for k, p in probes.items()} == {
                "startup": {"path": "/healthz", "port": "metrics"},
                "liveness": {"path": "/healthz", "port": "metrics"},
                "readiness": {"path": "/readyz", "port": "metrics"}}
            for p in probes.values():
                assert p["timeoutSeconds"] < p["periodSeconds"] or p is probes["startup"]
            assert probes["liveness"]["failureThreshold"] >= 2  # one slow answer is no restart
            assert probes["startup"]["periodSeconds"] * probes["startup"]["failureThreshold"] >= 120
            # once /healthz reports a stuck unit, the pod is restarted within a couple of minutes
            assert probes["liveness"]["periodSeconds"] * probes["liveness"]["failureThreshold"] <= 120
    assert seen == ALL_COMPONENTS


def test_probe_timings_come_from_the_values() -> None:
    rendered = Rendered({"probes": {"liveness": {"periodSeconds": 20, "timeoutSeconds": 4, "failureThreshold": 6},
                                    "startup": {"periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 90}}})
    for w in rendered.workloads():
        c = next(containers(w))
        assert c["livenessProbe"]["periodSeconds"] == 20 and c["livenessProbe"]["failureThreshold"] == 6
        assert c["startupProbe"]["failureThreshold"] == 90
        assert c["readinessProbe"]["periodSeconds"] == 5  # the default, merged


def test_drain_fits_in_the_termination_grace_period(rendered: Rendered) -> None:
    drain = rendered.config_yaml()["lifecycle"]["drain_timeout_s"]
    for w in rendered.workloads():
        assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_every_workload_has_a_disruption_budget_except_the_single_controller(rendered: Rendered) -> None:
    budgets = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in rendered.kind("PodDisruptionBudget")}
    assert set(budgets) == ALL_COMPONENTS - {"controller"}
    for w in rendered.workloads():
        if component(w) in budgets:
            assert budgets[component(w)]["spec"]["selector"]["matchLabels"] == w["spec"]["selector"]["matchLabels"]


# -- exposure ---------------------------------------------------------------------------------------------------


def test_only_the_gateway_and_rtmp_can_be_exposed(rendered: Rendered) -> None:
    for svc in rendered.kind("Service"):
        if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
            assert svc["metadata"]["name"] in {f"{RELEASE}-gateway", f"{RELEASE}-rtmp"}, svc["metadata"]["name"]
    rtmp = rendered.get("Service", f"{RELEASE}-rtmp")
    assert rtmp["spec"]["type"] == rendered.merged["ingest"]["service"]["type"]
    if rtmp["spec"]["type"] == "NodePort" and rendered.merged["ingest"]["service"]["nodePort"]:
        assert rtmp["spec"]["ports"][0]["nodePort"] == rendered.merged["ingest"]["service"]["nodePort"]


def test_rtmps_listener_mounts_its_certificate_secret() -> None:
    on = render("existing-secrets")
    cfg = on.config_yaml()["ingest"]
    assert (cfg["rtmps_port"], cfg["tls_cert_file"]) == (1937, "/var/run/secrets/rheo/rtmps/tls.crt")
    pod = on.get("Deployment", f"{RELEASE}-ingest")["spec"]["template"]["spec"]
    assert {"name": "rtmps-tls", "secret": {"secretName": "corp-rtmps-tls"}} in pod["volumes"]
    (container,) = pod["containers"]
    assert {"name": "rtmps", "containerPort": 1937, "protocol": "TCP"} in container["ports"]
    assert any(m["mountPath"] == "/var/run/secrets/rheo/rtmps" for m in container["volumeMounts"])
    ports = {p["name"]: p for p in on.get("Service", f"{RELEASE}-rtmp")["spec"]["ports"]}
    assert ports["rtmps"]["port"] == 443 and ports["rtmps"]["targetPort"] == "rtmps"
    off = render("default")
    assert "rtmps" not in {p["name"] for p in off.get("Service", f"{RELEASE}-rtmp")["spec"]["ports"]}
    assert off.config_yaml()["ingest"].get("tls_cert_file") is None
    with pytest.raises(Exception, match=r"ingest\.tls\.secretName"):
        Rendered({"config": {"ingest": {"rtmps_port": 1936}}})


def test_network_policies_open_only_gateway_and_rtmp(rendered: Rendered) -> None:
    policies = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in rendered.kind("NetworkPolicy")}
    policies.pop("nats", None)  # test_nats.py
    assert set(policies) == ALL_COMPONENTS
    cfg = rendered.config_yaml()
    metrics = cfg["telemetry"]["metrics_port"]
    rtmps = (cfg["ingest"]["rtmps_port"],) if cfg["ingest"].get("rtmps_port") else ()
    open_ports = {"gateway": (cfg["gateway"]["port"],), "ingest": (cfg["ingest"]["rtmp_port"], *rtmps)}
    for name, policy in policies.items():
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]  # egress: tests/deploy/test_network_security.py
        for rule in policy["spec"]["ingress"]:
            ports = tuple(p["port"] for p in rule["ports"])
            if "from" not in rule:  # reachable from anywhere
                assert ports == open_ports[name], (name, rule)
            elif ports == (metrics,):
                assert rule["from"] == rendered.merged["networkPolicy"]["metricsFrom"]
            else:
                (peer,) = rule["from"]
                source = peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                assert (name, source, ports) in {("egress", "gateway", (cfg["egress"]["http_port"],)),
                                                 ("dit-stage", "dit-stage", (cfg["dit_stage"]["link_port"],))}
    assert any("from" not in r for r in policies["gateway"]["spec"]["ingress"])
    assert any("from" not in r for r in policies["ingest"]["spec"]["ingress"])


# -- DiT stages -------------------------------------------------------------------------------------------------


def test_stages_are_a_statefulset_named_like_the_block_map(rendered: Rendered) -> None:
    values = rendered.merged["ditStage"]
    sts = rendered.get("StatefulSet", "dit")
    assert sts["spec"]["replicas"] == values["stages"] * values["rings"]
    headless = rendered.get("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    env = {e["name"]: e for e in next(containers(sts))["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["RHEO_DIT_STAGE__STAGE_ID"]["value"] == "$(POD_NAME)"  # = dit-<ordinal>
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["RHEO_DIT_STAGE__ADVERTISE_HOST"]["value"] == "$(POD_IP)"
    assert rendered.config_yaml()["controller"]["stages"] == values["stages"]
    # one StatefulSet is every ring: each pod finds its ring from its ordinal, the controller keeps a map per ring
    assert env["RHEO_DIT_STAGE__RING_ID"]["value"] == "auto"
    assert rendered.config_yaml()["controller"]["rings"] == values["rings"]
    pods = [f"dit-{k}" for k in range(sts["spec"]["replicas"])]
    rings = {r: ring_stage_ids(r, values["stages"]) for r in map(str, range(values["rings"]))}
    assert sorted(sid for ids in rings.values() for sid in ids) == sorted(pods)
    assert all(resolve_ring("auto", sid, values["stages"]) == r for r, ids in rings.items() for sid in ids)


# -- secrets ----------------------------------------------------------------------------------------------------


def _secret_values(rendered: Rendered) -> list[str]:
    out = []
    for s in rendered.kind("Secret"):
        for v in s.get("data", {}).values():
            text = base64.b64decode(v).decode()
            out.append(text)
            if text.startswith("["):
                out.extend(json.loads(text))
    return [v for v in out if len(v) >= 8]


def test_no_plaintext_secrets_in_config_maps_or_env(rendered: Rendered) -> None:
    from services.config import Settings

    secret_keys = _secret_fields(Settings)
    for cm in rendered.kind("ConfigMap"):
        text = json.dumps(cm["data"])
        for value in _secret_values(rendered):
            assert value not in text
        if "config.yaml" not in cm["data"]:
            continue  # the NATS server's config: test_nats.py
        cfg = yaml.safe_load(cm["data"]["config.yaml"])
        present = {f"{section}.{key}" for section, keys in cfg.items() for key in keys}
        assert not present & secret_keys, present & secret_keys
    for w in rendered.workloads():
        for c in containers(w):
            for e in c["env"]:
                key = _env_key(e["name"])
                if key in secret_keys:
                    assert "secretKeyRef" in e["valueFrom"] and "value" not in e, e
    for value in _secret_values(rendered):
        assert value not in rendered.notes


def test_secure_defaults_generate_credentials() -> None:
    r = render("default")
    api = r.get("Secret", f"{RELEASE}-api")
    tokens = json.loads(base64.b64decode(api["data"]["api-tokens"]))
    assert len(tokens) == 1 and len(tokens[0]) >= 32
    nats = r.get("Secret", f"{RELEASE}-nats-auth")
    assert set(nats["data"]) == ALL_COMPONENTS  # one password per component
    assert all(len(base64.b64decode(v)) >= 32 for v in nats["data"].values())
    assert len(set(nats["data"].values())) == len(ALL_COMPONENTS)
    assert r.config_yaml()["nats"]["url"] == f"tls://{RELEASE}-nats.rheo.svc:4222"
    assert "allow_anonymous" not in r.config_yaml().get("gateway", {})
    keys = json.loads(base64.b64decode(r.get("Secret", f"{RELEASE}-playback")["data"]["signing-keys"]))
    assert len(keys) == 1 and len(keys[0]) >= 32  # playback needs signed URLs, with a generated key


def test_existing_secrets_are_used_not_created() -> None:
    r = render("existing-secrets")
    assert {s["metadata"]["name"] for s in r.kind("Secret")} == set()
    refs = {(e["name"], e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for w in r.workloads() for c in containers(w) for e in c["env"] if "valueFrom" in e
            and "secretKeyRef" in e["valueFrom"]}
    assert refs == {("RHEO_PLAYBACK__SIGNING_KEYS", "corp-rheo-playback", "signing-keys"),
                    ("RHEO_DIT_STAGE__LINK_KEY", "corp-link", "link-key")}
    mounted = {v["secret"]["secretName"] for w in r.workloads() for v in w["spec"]["template"]["spec"]["volumes"]
               if "secret" in v}
    assert "corp-rheo-api" in mounted  # the gateway's operator tokens: a file it re-reads (rotation, no restart)
    assert r.config_yaml()["nats"]["url"] == "tls://nats-a.infra:4222,tls://nats-b.infra:4222"
    assert r.nats() is None
    for w in r.workloads():  # each component mounts its own creds, and the CA of the external server
        spec = w["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["nats-creds"]["secret"] == {"secretName": "corp-nats", "items": [
            {"key": f"{component(w)}.creds", "path": f"{component(w)}.creds"}]}
        assert vols["nats-ca"]["secret"]["secretName"] == "corp-nats-ca"
        env = {e["name"]: e.get("value") for e in next(containers(w))["env"]}
        assert env["RHEO_NATS__CREDS_FILE"] == f"/var/run/secrets/rheo/nats/{component(w)}.creds"


def test_weights_volume_by_value() -> None:
    kinds = {"default": None, "gpu-4-stages": "persistentVolumeClaim", "existing-secrets": "hostPath",
             "image-weights": "image"}
    for name, kind in kinds.items():
        r = render(name)
        for w in r.workloads():
            vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
            if kind is None or component(w) in {"gateway", "egress"}:
                assert "weights" not in vols
                continue
            assert kind in vols["weights"]
            mount = next(m for c in containers(w) for m in c["volumeMounts"] if m["name"] == "weights")
            assert mount["readOnly"] is True and r.config_yaml()["model"]["model_dir"].startswith(mount["mountPath"])
        if kind is None:
            assert "model_dir" not in r.config_yaml().get("model", {})


def test_notes_explain_creating_a_stream_and_obs(rendered_any: Rendered) -> None:
    notes = rendered_any.notes
    assert "/v1/streams" in notes and "Authorization: Bearer" in notes
    assert "OBS" in notes and "stream_key" in notes and f"svc/{RELEASE}-rtmp" in notes


def _secret_fields(model: Any, prefix: str = "") -> set[str]:
    from pydantic import BaseModel, SecretStr

    out: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _secret_fields(ann, f"{prefix}{name}.")
        elif "SecretStr" in repr(ann) or ann is SecretStr:
            out.add(f"{prefix}{name}")
    return out


def _env_key(name: str) -> str | None:
    m = re.fullmatch(r"RHEO_([A-Z0-9_]+?)__([A-Z0-9_]+)", name)
    return f"{m[1].lower()}.{m[2].lower()}" if m else None
