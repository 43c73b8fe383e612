"""The AsyncAPI document matches the code; subjects are built in one place and refuse bad tokens."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, create_model

import proto.messages as messages
from proto import CHANNELS, MESSAGE_TYPES, InvalidToken, Subjects, blockmap_key
from proto.asyncapi import build_document, load_committed

ROOT = Path(__file__).resolve().parents[2]


def test_asyncapi_document_matches_code() -> None:
    assert load_committed() == build_document(), "proto/asyncapi.yaml drifted: run `rheo proto asyncapi --write`"


def test_asyncapi_document_covers_every_channel_and_message() -> None:
    doc = load_committed()
    assert doc["asyncapi"].startswith("3.")
    assert set(doc["channels"]) == set(CHANNELS)
    assert set(doc["components"]["messages"]) == set(MESSAGE_TYPES)
    for name, ch in CHANNELS.items():
        assert doc["channels"][name]["address"] == ch.pattern
        assert doc["operations"][f"send_{name}"]["channel"]["$ref"] == f"#/channels/{name}"


def test_drift_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a field added in code without regenerating the document fails the comparison."""
    committed = load_committed()
    changed = create_model("Ack", __base__=messages.Ack, extra_field=(int, Field(0)))
    monkeypatch.setitem(MESSAGE_TYPES, "Ack", changed)
    assert committed != build_document()
    doc = copy.deepcopy(committed)
    doc["channels"]["stream_latent"]["address"] = "rheo.stream.{stream_id}.latents"
    assert doc != committed


def test_cli_check_passes() -> None:
    out = subprocess.run([sys.executable, "-m", "services.cli", "proto", "asyncapi", "--check"],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr


def test_subjects() -> None:
    assert Subjects.stream_latent("cam-1") == "rheo.stream.cam-1.latent.0"  # the default ring
    assert Subjects.stream_latent("cam-1", "2") == "rheo.stream.cam-1.latent.2"
    assert Subjects.ring_latents("2") == "rheo.stream.*.latent.2"  # a first stage takes its own ring's only
    assert blockmap_key("2") == "blockmap.2" and blockmap_key("0") != blockmap_key("1")
    assert Subjects.blockmap() == "rheo.ctl.blockmap"
    assert Subjects.heartbeat("dit-stage", "stage-0") == "rheo.ctl.heartbeat.dit-stage.stage-0"
    assert CHANNELS["ctl_heartbeat"].param("rheo.ctl.heartbeat.decoder.m-1", "role") == "decoder"
    assert CHANNELS["ctl_heartbeat"].param("rheo.ctl.blockmap", "role") is None
    assert CHANNELS["stream_latent"].wildcard() == "rheo.stream.*.latent.*"
    for bad in ["a.b", "*", ">", "", "x" * 65, "a b", "ü"]:
        with pytest.raises(InvalidToken):
            Subjects.stream_latent(bad)
        with pytest.raises(InvalidToken):
            Subjects.stream_latent("cam-1", bad)


def test_no_subject_strings_outside_proto() -> None:
    """Subjects are written only in proto/subjects.py: no other module spells 'rheo.<something>.'."""
    pattern = re.compile(r"""["']rheo\.(stream|ctl|credit)\b""")
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "tests", "build"} or rel == Path("proto/subjects.py"):
            continue
        if pattern.search(path.read_text(errors="ignore")):
            offenders.append(str(rel))
    assert offenders == []
