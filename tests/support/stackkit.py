"""Whole-stack test kit: a LocalStack configured for equality with the single-process pipeline."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from services.stack import LocalStack, Ports
from support.otlp import ReceivedSpan

STACK_TEST_ENV: dict[str, str] = {
    "RHEO_INGEST__STREAM_LINGER_S": "1",
    "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2",
    "RHEO_EGRESS__SEGMENT_SECONDS": "1.0",
    # equality with the single-process run needs one block map throughout: no rebalancing, and no failure
    # epoch for a stage the loaded CI machine starves of CPU for a moment (the controller suite tests those);
    # admission advisory: a loaded CPU runs the tiny model slower than these streams' real time, and measured
    # capacity would refuse them
    "RHEO_CONTROLLER__MODE": "static",
    "RHEO_CONTROLLER__ADVISORY": "true",
    "RHEO_CONTROLLER__HEARTBEAT_MISS_S": "30",
    "RHEO_CONTROLLER__STARTUP_GRACE_S": "600",
}
"""What every whole-stack test's services run with; a test's ``env`` adds to it or overrides it."""


@contextlib.contextmanager
def running_stack(work: Path, stages: int, env: dict[str, str] | None = None, *,
                  report: Callable[[str], None] | None = None, restarts_expected: bool = False,
                  taps: bool = True) -> Iterator[LocalStack]:
    """A started LocalStack (ephemeral ports) with ``STACK_TEST_ENV | env``, stopped at the end with every service
    exiting cleanly (and, unless ``restarts_expected``, none restarted by the supervisor). ``taps``: ingest's and
    the decoder's debug taps under ``work`` (what the equality checks read)."""
    extra = dict(STACK_TEST_ENV)
    if taps:
        extra |= {"RHEO_INGEST__DEBUG_TAP_DIR": str(work / "tap-in"),
                  "RHEO_DECODER__DEBUG_TAP_DIR": str(work / "tap-out")}
    kw = {"report": report} if report is not None else {}
    s = LocalStack(work, stages=stages, ports=Ports.ephemeral(), extra_env=extra | (env or {}), **kw)
    try:
        s.start(timeout=300)
        yield s
    finally:
        # the drain itself is bounded and tested (test_sigterm_...); on a loaded 2-core machine, the interpreters'
        # exit after it has taken over 10 s (the default wait before SIGKILL), so allow more here
        codes = s.stop(timeout=60)
        assert all(c == 0 for c in codes.values()), f"services did not exit cleanly: {codes}"
        assert restarts_expected or not any(s.restarts.values()), \
            f"services crashed and were restarted: {s.restarts}"


def chunk_span(span: ReceivedSpan) -> bool:
    """The spans a chunk's trace can hold (the bus's only on a stream's media subjects, not heartbeats)."""
    subject = str(span.attributes.get("messaging.destination.name", ""))
    return not span.name.startswith("rheo.") or subject.endswith((".latent", ".x0", ".video"))
