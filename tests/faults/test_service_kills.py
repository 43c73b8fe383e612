"""SIGKILL of every service type but the DiT stages (controller, gateway, decoder, egress, ingest) mid-stream with two
streams, on the supervised stack: each is restarted, both streams' styled output comes back within a bound relative
to the measured pre-failure chunk latency, and the API says what happened (docs/recovery.md, Liveness). The DiT
stages are killed in test_stage_churn.py and test_stack_faults.py; what a viewer's playlist does across decoder and
egress restarts is test_viewer_continuity.py's.
"""

from __future__ import annotations

import shutil
import urllib.error
from collections.abc import Iterator

import pytest

from services.stack import LocalStack, Ports

from .stackkit import create_stream, current_map, decoded, encoded, encoded_at, publisher, shown_at, stored_map, wait

SIZE, FPS, STEPS = 64, 4, 2
SLO_MS = 60000  # a loaded 2-core machine must not turn this into a deadline test


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    work = tmp_path_factory.mktemp("kills")
    s = LocalStack(work, stages=1, ports=Ports.ephemeral(), extra_env={
        "RHEO_INGEST__STREAM_LINGER_S": "5",
        "RHEO_INGEST__DEBUG_TAP_DIR": str(work / "tap-in"),
        "RHEO_DECODER__DEBUG_TAP_DIR": str(work / "tap-out"),
        "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2",
        "RHEO_CONTROLLER__MODE": "static",
        "OMP_NUM_THREADS": "1",
    })
    try:
        s.start(timeout=300)
        yield s
    finally:
        codes = s.stop(timeout=60)
        assert all(c == 0 for c in codes.values()), f"services did not exit cleanly: {codes}"


@pytest.fixture(scope="module")
def streams(stack: LocalStack) -> Iterator[dict[str, str]]:
    created = [create_stream(stack, SIZE, FPS, STEPS, "kill bars", seed, SLO_MS) for seed in (5, 6)]
    pubs = [publisher(stack, c["stream_key"], FPS, seconds=900, reconnect=True) for c in created]
    ids = {f"s{i}": c["id"] for i, c in enumerate(created)}
    try:
        wait(lambda: all(len(decoded(stack, sid)) >= 4 for sid in ids.values()), 180, "4 chunks of each stream")
        yield ids
    finally:
        for p in pubs:
            p.terminate()
            p.wait(30)


def _bound(stack: LocalStack, ids: dict[str, str]) -> float:
    """Recovery bound: a service restart on this machine (the slowest start of the stack, measured by the
    supervisor's first start: one model load) plus a few chunk latencies measured so far."""
    lat = sorted(shown_at(stack, sid, s) - encoded_at(stack, sid, s) for sid in ids.values()
                 for s in decoded(stack, sid))
    return 90.0 + 4 * lat[len(lat) // 2]


def _styled_after(stack: LocalStack, ids: dict[str, str], since: dict[str, int], n: int = 2) -> bool:
    return all(len([s for s in decoded(stack, sid) if s > since[name]]) >= n for name, sid in ids.items())


def _last(stack: LocalStack, ids: dict[str, str]) -> dict[str, int]:
    return {name: max(encoded(stack, sid), default=-1) for name, sid in ids.items()}


def _states(stack: LocalStack, ids: dict[str, str]) -> dict[str, str]:
    """Each stream's state; ``missing`` while its record is gone (a lost store, before ingest writes it back)."""
    states = {}
    for name, sid in ids.items():
        try:
            states[name] = stack.api("GET", f"/v1/streams/{sid}")["state"]
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
            states[name] = "missing"
    return states


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("victim", ["controller", "gateway", "decoder", "egress", "ingest"])
def test_a_killed_service_is_restarted_and_no_stream_is_lost(stack: LocalStack, streams: dict[str, str],
                                                             victim: str) -> None:
    bound = _bound(stack, streams)
    epoch = current_map(stack).epoch
    before = _last(stack, streams)
    info = {name: stack.api("GET", f"/v1/streams/{sid}")["ingest"] for name, sid in streams.items()}
    members = {name: i["member"] for name, i in info.items()}
    segments = {name: i["segment"] for name, i in info.items()}
    took = stack.restart(victim)  # SIGKILL; the supervisor brings it back
    assert stack.restarts[victim] >= 1
    back = wait(lambda: _styled_after(stack, streams, before), bound, f"styled output after the {victim} restart")
    print(f"{victim}: ready again after {took:.1f} s, both streams styled {back:.1f} s later (bound {bound:.0f} s)")
    # the API tells the truth once it is settled: both streams live again
    wait(lambda: set(_states(stack, streams).values()) == {"live"}, bound, "both streams reported live")
    if victim == "ingest":
        # the publishers reconnected to the new ingest: its new session is a new segment, above the old one
        info = {name: stack.api("GET", f"/v1/streams/{sid}")["ingest"] for name, sid in streams.items()}
        assert all(i["member"] != members[name] and i["segment"] > segments[name] for name, i in info.items()), info
    if victim == "controller":
        assert current_map(stack).epoch == epoch, "a restarted controller changed the block map"
    stages = {name: n for name, n in stack.restarts.items() if name.startswith("dit-")}
    assert set(stages.values()) == {0}, f"a kill of the {victim} made a DiT stage restart: {stages}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_nats_store_is_rebuilt_and_no_stream_is_lost(stack: LocalStack, streams: dict[str, str]) -> None:
    """nats-server comes back on an empty store (a pod without a persistent volume): every bucket is gone. The
    owners write back what they hold: the controller the block map (same epoch), the stages their endpoints,
    ingest the records of its live streams; the API works at once, and the streams go on."""
    bound = _bound(stack, streams)
    epoch = current_map(stack).epoch
    before = _last(stack, streams)
    assert stack.nats is not None
    port = int(stack.nats.url.rsplit(":", 1)[1])
    stack.nats.stop()
    shutil.rmtree(stack.workdir / "nats" / "js")
    stack.start_nats(port)
    created = create_stream(stack, SIZE, FPS, STEPS, "after the loss", 7, SLO_MS)  # the table is created again
    assert created["state"] == "created"
    wait(lambda: _styled_after(stack, streams, before), bound, "styled output after the store was lost")
    wait(lambda: set(_states(stack, streams).values()) == {"live"}, bound, "the live streams' records back")
    # the controller writes the map back once it leads again (its lock went with the store): after the records
    wait(lambda: stored_map(stack) is not None, bound, "the block map back")
    assert current_map(stack).epoch == epoch
    stack.api("DELETE", f"/v1/streams/{created['id']}")
