"""Faults on the supervised local stack, one JSON line per scenario (issue #12; docs/recovery.md).

``LocalStack`` (``rheo up``'s layout, the tiny model, 3 DiT stages) serves two streams of the moving test pattern,
published in real time by publishers that reconnect as OBS does. Each scenario breaks one thing mid-stream, and is
measured from the debug taps (ingest's encoded chunks, the decoder's decoded ones, with their file times):

- ``recovery_s``: from the fault until both streams show a styled chunk encoded after it;
- ``longest_freeze_s``: the longest time between two decoded chunks of a stream, over the scenario (what a viewer
  sees as a frozen frame: the CFR output repeats meanwhile);
- ``chunks_lost``: chunks encoded from just before the fault to the recovery that were never decoded (the chunks
  that died in flight: counted drops, never silent ones);
- ``permanent_losses``: streams that did not come back within ``--bound`` seconds.

Scenarios: SIGKILL of each service type (``kill-dit-1``, ``kill-decoder``, ``kill-egress``, ``kill-ingest``,
``kill-controller``, ``kill-gateway``: the supervisor restarts it), ``sigstop-dit-1`` (paused for twice the miss
budget), ``pause-nats`` (nats-server stopped with SIGSTOP for 2 s) and ``lost-store`` (nats-server restarted on an
empty store). Absolute times depend on the machine and its load; compare scenarios within one run.

    python bench/faults.py                     # every scenario (≈ 5 min on 2 cores)
    python bench/faults.py --only kill-dit-1 pause-nats
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from faults.stackkit import create_stream, decoded, encoded, publisher, shown_at  # noqa: E402

from bench.common import git_commit, stop_on_sigterm  # noqa: E402
from services.stack import LocalStack, Ports  # noqa: E402

SIZE, FPS, STEPS, MISS_S = 64, 4, 2, 1.5


def _kill(name: str) -> Callable[[LocalStack], None]:
    def run(stack: LocalStack) -> None:
        stack.restart(name)  # SIGKILL; the supervisor brings it back

    return run


def _sigstop(name: str, seconds: float) -> Callable[[LocalStack], None]:
    def run(stack: LocalStack) -> None:
        proc = next(p for p in stack.procs if p.name == name)
        assert proc.popen is not None
        os.killpg(proc.popen.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.killpg(proc.popen.pid, signal.SIGCONT)

    return run


def _pause_nats(stack: LocalStack) -> None:
    assert stack.nats is not None and stack.nats.proc is not None
    os.kill(stack.nats.proc.pid, signal.SIGSTOP)
    time.sleep(2.0)
    os.kill(stack.nats.proc.pid, signal.SIGCONT)


def _lost_store(stack: LocalStack) -> None:
    assert stack.nats is not None
    port = int(stack.nats.url.rsplit(":", 1)[1])
    stack.nats.stop()
    shutil.rmtree(stack.workdir / "nats" / "js", ignore_errors=True)
    stack.start_nats(port)


SCENARIOS: dict[str, Callable[[LocalStack], None]] = {
    **{f"kill-{name}": _kill(name) for name in ("dit-1", "decoder", "egress", "ingest", "controller", "gateway")},
    "sigstop-dit-1": _sigstop("dit-1", 2 * MISS_S),
    "pause-nats": _pause_nats,
    "lost-store": _lost_store,
}


def measure(stack: LocalStack, ids: dict[str, str], name: str, bound: float) -> dict:
    before = {s: max(encoded(stack, sid), default=-1) for s, sid in ids.items()}
    t0 = time.time()
    SCENARIOS[name](stack)
    back: dict[str, float] = {}
    while len(back) < len(ids) and time.time() - t0 < bound:
        for s, sid in ids.items():
            if s not in back and any(q > before[s] for q in decoded(stack, sid)):
                back[s] = time.time() - t0
        time.sleep(0.1)
    time.sleep(2.0)  # a little of the steady state after it
    freeze, lost = 0.0, 0
    for s, sid in ids.items():
        shown = sorted(shown_at(stack, sid, q) for q in decoded(stack, sid))
        window = [t for t in shown if t >= t0 - 5.0]
        gaps = [b - a for a, b in itertools.pairwise(window)]
        if window and shown and shown[0] < t0 - 5.0:
            gaps.append(window[0] - max(t for t in shown if t < t0 - 5.0))
        freeze = max(freeze, *gaps, 0.0)
        done = set(decoded(stack, sid))
        last = max(encoded(stack, sid), default=-1)
        lost += sum(1 for q in encoded(stack, sid) if before[s] - 2 <= q <= last - 8 and q not in done)
    return {"bench": "faults", "scenario": name, "recovery_s": round(max(back.values()), 2) if back else None,
            "longest_freeze_s": round(freeze, 2), "chunks_lost": lost, "permanent_losses": len(ids) - len(back),
            "restarts": {k: v for k, v in stack.restarts.items() if v}, "commit": git_commit(),
            "device": "cpu", "date": time.strftime("%Y-%m-%d")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="scenarios to run (default: all)")
    ap.add_argument("--bound", type=float, default=120.0, help="seconds before a stream counts as lost for good")
    args = ap.parse_args()
    stop_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="rheo-faults-"))
    stack = LocalStack(work, stages=3, ports=Ports.ephemeral(), report=lambda line: None, extra_env={
        "RHEO_INGEST__DEBUG_TAP_DIR": str(work / "tap-in"),
        "RHEO_DECODER__DEBUG_TAP_DIR": str(work / "tap-out"),
        "RHEO_INGEST__STREAM_LINGER_S": "5",
        "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2",
        "RHEO_CONTROLLER__MODE": "static",
        "RHEO_CONTROLLER__HEARTBEAT_MISS_S": str(MISS_S),
        "OMP_NUM_THREADS": "1",
    })
    pubs = []
    try:
        stack.start(timeout=300)
        created = [create_stream(stack, SIZE, FPS, STEPS, "fault bars", seed, 60000) for seed in (1, 2)]
        pubs = [publisher(stack, c["stream_key"], FPS, seconds=3600, reconnect=True) for c in created]
        ids = {f"s{i}": c["id"] for i, c in enumerate(created)}
        t0 = time.time()
        while not all(len(decoded(stack, sid)) >= 6 for sid in ids.values()):
            if time.time() - t0 > 300:
                raise SystemExit("the streams did not start")
            time.sleep(0.5)
        for name in args.only or SCENARIOS:
            print(json.dumps(measure(stack, ids, name, args.bound)), flush=True)
    finally:
        for p in pubs:
            p.terminate()
        stack.stop(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
