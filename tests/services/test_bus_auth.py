"""Bus authorization against a real nats-server: forged state changes from a role without the permission are
refused by the server (the legit subscriber never sees them, the publisher is told and counts it); clients
without a known credential cannot connect; the legit paths (KV, request/reply, credit replies) still work."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.errors
import nkeys
import pytest
from prometheus_client import REGISTRY

from proto import Ack, Heartbeat, StreamEvent, StreamSpec, Subjects
from proto.permissions import ROLES, inbox_prefix
from proto.subjects import BUCKET_ACCESS, CHANNELS
from services.bus import Bus, BusError
from services.config import NatsSettings
from services.natsd import Identity, NatsServer, make_identities


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, dict[str, Identity]]]:
    d = Path(tmp_path_factory.mktemp("busauth"))
    ids = make_identities(d / "identities")
    server = NatsServer(d / "nats", identities=ids).start()
    yield server, ids
    server.stop()


def _settings(secured: tuple[NatsServer, dict[str, Identity]], role: str, **kw: object) -> NatsSettings:
    server, ids = secured
    return NatsSettings(url=server.url, nkey_seed_file=ids[role].seed_file, inbox_prefix=inbox_prefix(role),
                        initial_connect_attempts=1, connect_timeout_s=1.0, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def as_role(secured: tuple[NatsServer, dict[str, Identity]]) -> AsyncIterator:
    opened: list[Bus] = []

    async def connect(role: str) -> Bus:
        b = await Bus.connect(_settings(secured, role), name=f"test-{role}")
        opened.append(b)
        return b

    yield connect
    for b in opened:
        await b.close()


def _denied(op: str = "publish") -> float:
    return REGISTRY.get_sample_value("rheo_bus_permission_denied_total", {"op": op}) or 0.0


def test_identities_are_private(secured: tuple[NatsServer, dict[str, Identity]]) -> None:
    server, ids = secured
    assert set(ids) == set(ROLES)
    for ident in ids.values():
        assert ident.seed_file.stat().st_mode & 0o777 == 0o600
        assert ident.public_key.startswith("U")
    conf = (server.workdir / "nats.conf").read_text()
    assert "authorization" in conf and "no_auth_user" not in conf
    assert not any(ident.seed_file.read_text().strip() in conf for ident in ids.values())  # public keys only
    with pytest.raises(ValueError):
        NatsServer(server.workdir / "none")  # no credentials is not a default


async def test_unknown_clients_cannot_connect(secured: tuple[NatsServer, dict[str, Identity]],
                                              tmp_path: Path) -> None:
    server, _ = secured
    with pytest.raises(BusError):
        await Bus.connect(NatsSettings(url=server.url, initial_connect_attempts=1, connect_timeout_s=1.0))
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    with pytest.raises(BusError):
        await Bus.connect(NatsSettings(url=server.url, nkey_seed_file=stranger, initial_connect_attempts=1,
                                       connect_timeout_s=1.0))


async def _forgery_refused(as_role, forger: str, owner: str, listener: str, subject: str, message) -> None:
    """``forger`` publishes ``message`` on ``subject``: ``listener`` never gets it, ``forger`` is told; the same
    message from ``owner`` does arrive (the control: the subscription works)."""
    got: list[str] = []
    sub_bus, bad, good = await as_role(listener), await as_role(forger), await as_role(owner)
    arrived = asyncio.Event()

    async def on(msg) -> None:  # raw: what the server delivers, decodable or not
        got.append(msg.headers.get("Who", "") if msg.headers else "")
        arrived.set()

    await sub_bus.nc.subscribe(subject, cb=on)
    await sub_bus.nc.flush()
    before = _denied()
    await bad.publish(subject, message, headers={"Who": "forger"})
    await bad.nc.flush()
    for _ in range(100):
        if _denied() > before:
            break
        await asyncio.sleep(0.02)
    assert _denied() > before, "the server did not report the violation to the forger"
    await good.publish(subject, message, headers={"Who": "owner"})
    await asyncio.wait_for(arrived.wait(), 5)
    await sub_bus.nc.flush()
    assert got == ["owner"], got


async def test_forged_ended_event_refused(as_role) -> None:
    await _forgery_refused(as_role, "egress", "ingest", "controller", Subjects.stream_event("s1"),
                           StreamEvent(stream_id="s1", kind="ended", at=0.0))


async def test_forged_x0_refused(as_role) -> None:
    # the bytes do not matter: the server refuses the subject before anyone decodes them
    await _forgery_refused(as_role, "ingest", "dit-stage", "decoder", Subjects.stream_x0("s1"), b"\x00" * 16)


async def test_forged_heartbeat_refused(as_role) -> None:
    hb = Heartbeat(member_id="dit-0", role="dit-stage", epoch=1, sent_at=0.0, ready=True)
    await _forgery_refused(as_role, "decoder", "dit-stage", "controller", Subjects.heartbeat("dit-stage", "dit-0"), hb)


async def test_forged_admission_refused_and_legit_request_answered(as_role) -> None:
    controller, decoder, ingest = await as_role("controller"), await as_role("decoder"), await as_role("ingest")
    asked: list[str] = []

    async def answer(spec: StreamSpec, msg) -> None:
        asked.append(spec.stream_id)
        await controller.respond(msg, Ack(ref="1"))  # a reply to the requester's inbox

    await controller.subscribe(Subjects.admission(), answer, expected=StreamSpec)
    await controller.nc.flush()
    spec = StreamSpec(stream_id="s1", width=64, height=64, fps=8, steps=1, prompt="p")
    before = _denied()
    with pytest.raises(nats.errors.TimeoutError):  # refused: no responder ever sees it, the request times out
        await decoder.request(Subjects.admission(), spec, timeout=0.5)
    assert _denied() > before
    reply = await ingest.request(Subjects.admission(), spec, expected=Ack, timeout=5)
    assert reply.ref == "1" and asked == ["s1"]


async def test_credit_replies_flow(as_role) -> None:
    """A bulk consumer returns credit to the publisher's inbox by ``allow_responses`` alone."""
    ingest, stage = await as_role("ingest"), await as_role("dit-stage")
    subject = Subjects.stream_latent("s2")
    seen = asyncio.Event()

    async def on(_m, _msg) -> None:
        seen.set()

    await stage.subscribe(subject, on, credit=True)
    await stage.nc.flush()
    window = await ingest.credit_window(subject, 4096).start()
    try:
        for _ in range(8):  # 8 × 1 KiB through a 4 KiB window: only possible if credit comes back
            await window.publish(b"\x00" * 1024, timeout=5)
        assert window.acked > 0
    finally:
        await window.close()


async def test_every_role_does_its_kv_work(as_role) -> None:
    for access in BUCKET_ACCESS.values():
        for role in access.roles:
            b = await as_role(role)
            if access.object_store:  # the job files: each of its roles stores and reads back a file
                from jobs.table import JobTable

                files = (await JobTable.open(b)).files
                await files.put(f"probe-{role}", b"v")
                assert (await files.get(f"probe-{role}")).data == b"v"
                continue
            kv = await b.kv(access.bucket)
            writes = dict(access.writers).get(role)
            if writes is not None:
                key = "k1" if writes == ">" else writes.replace("*", "x").replace(">", "x")
                await kv.put(key, b"v")
                assert (await kv.get(key)).value == b"v"
            else:
                await kv.keys()


def test_every_channel_checked() -> None:
    """Keep the forgery tests in step with the state-changing channels of issue #13."""
    assert {"stream_event", "stream_x0", "ctl_heartbeat", "ctl_admission"} <= set(CHANNELS)
