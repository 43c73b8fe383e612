"""The chart's own NATS: one user per component with exactly its generated permissions, TLS on, nothing anonymous;
and the rendered config, certificate and passwords run in a real nats-server that enforces them."""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from deploy.chartkit import RELEASE, Rendered, component, containers, render

from proto.permissions import ROLES, all_permissions, user_name
from services.natsd import NatsServer

USER = re.compile(r'^\s*\{user: "([^"]+)", password: \$(\w+), permissions: (\{.*\})\}$')


def _conf(r: Rendered) -> str:
    return r.get("ConfigMap", f"{RELEASE}-nats-config")["data"]["nats.conf"]


def _users(conf: str) -> dict[str, tuple[str, dict[str, Any]]]:
    import json

    out = {}
    for line in conf.splitlines():
        m = USER.match(line)
        if m:
            out[m.group(1)] = (m.group(2), json.loads(m.group(3)))
    return out


@pytest.mark.parametrize("value_set", ["default", "nats-cert-manager"])
def test_one_user_per_component_with_exactly_its_permissions(value_set: str) -> None:
    r = render(value_set)
    conf = _conf(r)
    users = _users(conf)
    assert set(users) == {user_name(role) for role in ROLES}
    for role, p in all_permissions().items():
        assert users[user_name(role)][1] == p.server_block(), role
    assert conf.count("user:") == len(ROLES)  # nobody else, and nothing anonymous
    for forbidden in ("no_auth_user", "allow_anonymous", "token:", "nkey:"):
        assert forbidden not in conf
    assert re.search(r'tls \{\s*cert_file: "/etc/nats-tls/tls.crt"', conf)
    assert "max_payload: 8388608" in conf and "jetstream {" in conf
    # each password is the component's key in the auth Secret, handed to the server as the referenced variable
    sts = r.nats()
    assert sts is not None
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in next(containers(sts))["env"]}
    for role in ROLES:
        var = users[user_name(role)][0]
        assert env[var] == {"name": f"{RELEASE}-nats-auth", "key": role}
    assert r.config_yaml()["nats"]["url"].startswith("tls://")
    assert r.config_yaml()["nats"]["tls_ca_file"] == "/var/run/secrets/rheo/nats-ca/ca.crt"


def test_the_nats_pod_is_locked_down() -> None:
    sts = render("default").nats()
    assert sts is not None
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    (c,) = containers(sts)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    policy = render("default").get("NetworkPolicy", f"{RELEASE}-nats")
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 4222, "protocol": "TCP"}]  # no monitor port from outside the pod


def test_tls_by_cert_manager_or_a_kept_self_signed_ca() -> None:
    own = render("default")
    tls = own.get("Secret", f"{RELEASE}-nats-tls")
    assert set(tls["data"]) == {"tls.crt", "tls.key", "ca.crt"} and own.kind("Certificate") == []
    cm = render("nats-cert-manager")
    (cert,) = cm.kind("Certificate")
    assert cert["spec"]["secretName"] == f"{RELEASE}-nats-tls"
    assert cert["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}
    assert f"{RELEASE}-nats.rheo.svc" in cert["spec"]["dnsNames"]
    assert [s for s in cm.kind("Secret") if s["metadata"]["name"] == f"{RELEASE}-nats-tls"] == []
    for w in own.workloads():  # every component verifies the server with the CA (and only gets ca.crt)
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        assert vols["nats-ca"]["secret"] == {"secretName": f"{RELEASE}-nats-tls",
                                             "items": [{"key": "ca.crt", "path": "ca.crt"}]}, component(w)


def test_the_rendered_server_enforces_it(tmp_path: Path) -> None:
    """The default render's config, certificate and generated passwords in a real nats-server: a component
    connects over TLS (verified with the CA) and publishes what it owns; its forgery is refused; a client
    without a password, or with another's user, cannot connect."""
    r = render("default")
    tls = {k: base64.b64decode(v) for k, v in r.get("Secret", f"{RELEASE}-nats-tls")["data"].items()}
    for name, data in tls.items():
        (tmp_path / name).write_bytes(data)
    passwords = {k: base64.b64decode(v).decode() for k, v in r.get("Secret", f"{RELEASE}-nats-auth")["data"].items()}
    conf = _conf(r).replace("/etc/nats-tls/", f"{tmp_path}/").replace('"/data"', f'"{tmp_path / "js"}"')
    users = _users(conf)
    env = {users[user_name(role)][0]: passwords[role] for role in ROLES}
    server = NatsServer(tmp_path / "server", config=conf, env=env).start()
    try:
        asyncio.run(_exercise(server.url.replace("nats://", "tls://"), tmp_path / "ca.crt", passwords))
    finally:
        server.stop()


async def _exercise(url: str, ca: Path, passwords: dict[str, str]) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    host = f"{RELEASE}-nats.rheo.svc"

    async def connect(user: str | None, password: str | None) -> nats.NATS:
        errors: list[Exception] = []

        async def on_error(e: Exception) -> None:
            errors.append(e)

        nc = await nats.connect(url, tls=ctx, tls_hostname=host, user=user, password=password, error_cb=on_error,
                                allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)
        nc._test_errors = errors  # type: ignore[attr-defined]
        return nc

    for user, password in ((None, None), (user_name("egress"), passwords["ingest"])):
        with pytest.raises((nats.errors.NoServersError, nats.errors.Error, OSError)):
            await connect(user, password)
    controller = await connect(user_name("controller"), passwords["controller"])
    egress = await connect(user_name("egress"), passwords["egress"])
    ingest = await connect(user_name("ingest"), passwords["ingest"])
    got: list[str] = []

    async def on(msg: Any) -> None:
        got.append(msg.data.decode())

    await controller.subscribe("rheo.stream.*.event", cb=on)
    await controller.flush()
    await egress.publish("rheo.stream.s1.event", b"forged")
    await egress.flush()
    await ingest.publish("rheo.stream.s1.event", b"real")
    await ingest.flush()
    for _ in range(100):
        if got and egress._test_errors:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.02)
    assert got == ["real"]
    assert "permissions violation" in str(egress._test_errors[0]).lower()  # type: ignore[attr-defined]
    for nc in (controller, egress, ingest):
        await nc.close()
