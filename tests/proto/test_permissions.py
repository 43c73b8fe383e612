"""The bus permissions derived from the wire contract: each channel's publishers and nobody else may publish it,
its subscribers may subscribe, every role can do its KV work and only that."""

from __future__ import annotations

import pytest

from proto.permissions import (
    PERMISSIONS_PATH,
    ROLES,
    UnknownRole,
    allows,
    inbox_prefix,
    permissions,
    render_json,
    subject_matches,
)
from proto.subjects import BUCKET_ACCESS, CHANNELS, Buckets, stage_prepared_key


def _instance(pattern: str, role: str = "ingest") -> str:
    return (pattern.replace("{stream_id}", "s1").replace("{member_id}", "m1").replace("{stage_id}", "dit-0")
            .replace("{role}", role))


def test_roles_are_the_contracts() -> None:
    named = {r for c in CHANNELS.values() for r in (*c.publishers, *c.subscribers)}
    assert named == set(ROLES)
    with pytest.raises(UnknownRole):
        permissions("attacker")


@pytest.mark.parametrize("channel", sorted(CHANNELS))
def test_channel_publishers_and_subscribers_exactly(channel: str) -> None:
    c = CHANNELS[channel]
    for role in ROLES:
        p = permissions(role)
        subject = _instance(c.pattern, role)
        assert allows(p.publish, subject) == (role in c.publishers), (role, subject)
        assert allows(p.subscribe, subject) == (role in c.subscribers), (role, subject)
        if c.role_param:  # only under its own role
            assert not any(allows(p.publish, _instance(c.pattern, other)) for other in ROLES if other != role)


def test_state_changing_messages_have_one_owner() -> None:
    """The forgeries of issue #13, as a negative control of the derivation."""
    may = {role: permissions(role).publish for role in ROLES}
    assert not allows(may["egress"], "rheo.stream.s1.event")
    assert not allows(may["decoder"], "rheo.stream.s1.event")
    assert [r for r in ROLES if allows(may[r], "rheo.ctl.blockmap")] == ["controller"]
    assert sorted(r for r in ROLES if allows(may[r], "rheo.ctl.admission")) == ["gateway", "ingest"]
    assert [r for r in ROLES if allows(may[r], "rheo.stream.s1.x0")] == ["dit-stage"]
    assert [r for r in ROLES if allows(may[r], "rheo.ctl.heartbeat.dit-stage.dit-0")] == ["dit-stage"]
    assert not any(allows(may[r], "rheo.anything.else") or allows(may[r], "_INBOX.x") for r in ROLES)
    assert not any(allows(may[r], "_INBOX.egress.x") for r in ROLES)  # egress asks nobody anything


def test_replies_only_to_whom_a_role_serves() -> None:
    for role in ROLES:
        p = permissions(role)
        for asker in ROLES:
            serves = any(c.replies and role in c.subscribers and asker in c.publishers for c in CHANNELS.values())
            assert allows(p.publish, f"{inbox_prefix(asker)}.abc.1") == serves, (role, asker)
        assert allows(p.subscribe, f"{inbox_prefix(role)}.abc.1")
        others = [r for r in ROLES if r != role]
        assert not any(allows(p.subscribe, f"{inbox_prefix(o)}.abc.1") for o in others)
        assert not allows(p.subscribe, "_INBOX.abc")
    assert allows(permissions("dit-stage").publish, "_INBOX.ingest.w1")  # credit for the latent window
    assert allows(permissions("controller").publish, "_INBOX.gateway.r1.t")  # admission answers
    assert not allows(permissions("gateway").publish, "_INBOX.ingest.w1")


def test_kv_access_as_declared() -> None:
    assert set(BUCKET_ACCESS) == set(Buckets.ALL)
    for access in BUCKET_ACCESS.values():
        stream = f"OBJ_{access.bucket}" if access.object_store else f"KV_{access.bucket}"
        key = f"$O.{access.bucket}.C.anychunk" if access.object_store else f"$KV.{access.bucket}.anykey"
        for role in ROLES:
            p = permissions(role)
            uses = role in access.roles
            assert allows(p.publish, f"$JS.API.STREAM.INFO.{stream}") == uses
            assert allows(p.publish, f"$JS.API.CONSUMER.CREATE.{stream}.c1.{key}") == uses
            writes = dict(access.writers).get(role)
            if writes == ">":
                assert allows(p.publish, key)
            elif writes is None:
                assert not allows(p.publish, key), (role, access.bucket)
            assert not allows(p.publish, f"$JS.API.STREAM.DELETE.{stream}")
            # an object store's writers purge the chunks of a replaced or deleted object; KV never purges
            assert allows(p.publish, f"$JS.API.STREAM.PURGE.{stream}") == (access.object_store and writes is not None)
    stage = permissions("dit-stage").publish
    assert allows(stage, f"$KV.{Buckets.BLOCKMAP}.{stage_prepared_key('dit-0')}")
    assert not allows(stage, f"$KV.{Buckets.BLOCKMAP}.current")  # only the controller writes the map


def test_subject_matching() -> None:
    assert subject_matches("a.*.c", "a.b.c") and not subject_matches("a.*.c", "a.b.d")
    assert subject_matches("a.>", "a.b.c") and not subject_matches("a.>", "a")
    assert not subject_matches("a.b", "a.b.c") and not subject_matches("a.b.c", "a.b")


def test_chart_copy_is_up_to_date() -> None:
    assert PERMISSIONS_PATH.read_text() == render_json(), "run `rheo proto permissions --write`"
