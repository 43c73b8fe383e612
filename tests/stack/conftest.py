"""The stack every module of this package shares (package scope): one LocalStack's start and stop (≈ 30–60 s on
the 2-core CI machine) serves the pipeline-equality tests and the console's browser journey alike."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.stack import LocalStack
from support.otlp import OtlpReceiver
from support.stackkit import chunk_span, running_stack


@pytest.fixture(scope="package")
def otlp() -> Iterator[OtlpReceiver]:
    """What the module stack's services export over OTLP/HTTP (docs/observability.md)."""
    receiver = OtlpReceiver(keep=chunk_span).start()
    yield receiver
    receiver.close()


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> Iterator[LocalStack]:
    """Three stages: every live-change test crosses two link hops and the ring return (1 and 2 stages have
    their own tests in test_stack.py). Traces go to ``otlp``."""
    env = {"RHEO_TELEMETRY__OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "500",
           "RHEO_EGRESS__VIEWER_WINDOW_S": "3"}  # the console test's viewers lapse in seconds
    with running_stack(tmp_path_factory.mktemp("stack"), stages=3, env=env) as s:
        yield s
