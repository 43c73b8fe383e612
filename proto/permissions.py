"""Each role's NATS publish/subscribe allow-lists, derived from the wire contract (``CHANNELS``, ``BUCKET_ACCESS``).

The one place bus permissions are decided: the private nats-server of ``rheo up`` (services/natsd.py), the chart's
NATS (charts/rheo/files/nats-permissions.json, written by ``rheo proto permissions --write``) and the block an
operator pastes into an external server (``rheo proto nats-config``) all render this. Everything not listed is
denied by the server. Pure: no I/O.

- A role publishes exactly the channels it is a publisher of (a channel with ``role_param``: only under its own
  role) and subscribes exactly those it is a subscriber of.
- Replies (request/reply answers, bulk-channel ``Credit``): a subscriber of a channel that declares ``replies``
  may publish to the inboxes of that channel's publishers (``_INBOX.<publisher role>.>``), nobody else's. Not
  ``allow_responses``: nats-server records the reply grant only after it has queued the message to the
  responder, and a fast responder on a loaded machine races it (measured: credits refused, a window stalled).
- Its own replies arrive on its inbox prefix ``_INBOX.<role>`` (``nats.inbox_prefix``), the only inboxes it may
  subscribe to: no role reads another's replies.
- JetStream KV: the JetStream API subjects binding, creating (buckets are created again when lost), reading and
  watching need, for the buckets the role uses, and ``$KV.<bucket>.<keys>`` only for the keys it writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from proto.messages import Role
from proto.subjects import BUCKET_ACCESS, CHANNELS, kv_subject

ROLES: tuple[str, ...] = get_args(Role)
"""Every service identity on the bus (``rheo <role>``)."""

JS_API = "$JS.API"
PERMISSIONS_PATH = Path(__file__).resolve().parent.parent / "charts" / "rheo" / "files" / "nats-permissions.json"
"""The chart's copy (``.Files.Get``), kept equal to ``render_json()`` by a test."""


class UnknownRole(ValueError):
    """A role the wire contract does not know."""


def inbox_prefix(role: str) -> str:
    """Where ``role``'s replies arrive (nats-py ``inbox_prefix``); nobody else may subscribe there."""
    return f"_INBOX.{role}"


def user_name(role: str) -> str:
    """The NATS user of a role (chart users, log lines of the server)."""
    return f"rheo-{role}"


@dataclass(frozen=True)
class Permissions:
    """One role's allow-lists (NATS subject wildcards)."""

    role: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def server_block(self) -> dict[str, object]:
        """The ``permissions`` map of this role's user in nats-server's config."""
        return {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching (``*`` one token, ``>`` one or more trailing tokens), as the server applies it."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, p in enumerate(pat):
        if p == ">":
            return len(sub) > i
        if i >= len(sub) or (p != "*" and p != sub[i]):
            return False
    return len(pat) == len(sub)


def allows(patterns: tuple[str, ...] | list[str], subject: str) -> bool:
    return any(subject_matches(p, subject) for p in patterns)


def _kv_publish(bucket: str, write_keys: str | None, object_store: bool = False) -> list[str]:
    """JetStream API subjects nats-py's KV (or object store) uses (bind, create on loss, get, watch/keys, stop),
    and the keys it may write (``None``: read only; an object store's writers also purge replaced chunks)."""
    stream = f"OBJ_{bucket}" if object_store else f"KV_{bucket}"
    subjects = [
        f"{JS_API}.STREAM.INFO.{stream}",
        f"{JS_API}.STREAM.CREATE.{stream}",
        f"{JS_API}.STREAM.MSG.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.INFO.{stream}.>",
        f"{JS_API}.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]
    if object_store:  # nats-py's object get subscribes by subject alone: it looks the stream up by name first
        subjects.append(f"{JS_API}.STREAM.NAMES")
    if write_keys is not None and object_store:
        subjects += [f"$O.{bucket}.>", f"{JS_API}.STREAM.PURGE.{stream}"]
    elif write_keys is not None:
        subjects.append(kv_subject(bucket, write_keys))
    return subjects


def permissions(role: str) -> Permissions:
    """What ``role`` may publish and subscribe to; raises ``UnknownRole``."""
    if role not in ROLES:
        raise UnknownRole(f"unknown bus role {role!r} (one of {', '.join(ROLES)})")
    publish = [c.publishable_by(role) for c in CHANNELS.values() if role in c.publishers]
    subscribe = [c.wildcard() for c in CHANNELS.values() if role in c.subscribers]
    publish += [inbox_prefix(requester) + ".>" for c in CHANNELS.values() if c.replies and role in c.subscribers
                for requester in c.publishers]
    for access in BUCKET_ACCESS.values():
        if role not in access.roles:
            continue
        writes = dict(access.writers).get(role)
        publish += _kv_publish(access.bucket, writes, access.object_store)
    subscribe.append(inbox_prefix(role) + ".>")
    return Permissions(role, tuple(dict.fromkeys(publish)), tuple(dict.fromkeys(subscribe)))


def all_permissions() -> dict[str, Permissions]:
    return {role: permissions(role) for role in ROLES}


def render_json() -> str:
    """``charts/rheo/files/nats-permissions.json``: per role, its user, inbox prefix and server permissions."""
    doc = {"_comment": "generated by `rheo proto permissions --write` from proto/permissions.py; do not edit",
           "roles": {role: {"user": user_name(role), "inbox_prefix": inbox_prefix(role),
                            "permissions": p.server_block()} for role, p in all_permissions().items()}}
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def authorization_block(credentials: dict[str, dict[str, str]]) -> str:
    """nats-server's ``authorization { users: [...] }`` for the given roles; ``credentials[role]`` holds the
    user's login fields (``{"nkey": "U..."}`` or ``{"user": ..., "password": <bcrypt hash>}``). No anonymous
    user, no ``no_auth_user``: a client without credentials is refused."""
    users = [{**credentials[role], "permissions": permissions(role).server_block()} for role in credentials]
    notes = "".join(f"# {user_name(r)}: the service sets nats.inbox_prefix={inbox_prefix(r)}\n" for r in credentials)
    return notes + "authorization {\n  users: " + json.dumps(users, indent=2).replace("\n", "\n  ") + "\n}\n"


__all__ = ["PERMISSIONS_PATH", "ROLES", "Permissions", "UnknownRole", "all_permissions", "allows",
           "authorization_block", "inbox_prefix", "permissions", "render_json", "subject_matches", "user_name"]
