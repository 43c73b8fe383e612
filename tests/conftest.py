"""Shared fixtures: a real nats-server for the session, buses connected to it, an in-memory span exporter."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.bus import Bus
from services.config import NatsSettings
from services.natsd import NatsServer
from support.playback import ENV as PLAYBACK_ENV

os.environ.update({k: v for k, v in PLAYBACK_ENV.items() if k not in os.environ})  # gateway and egress share it

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """Spans of this test process (the global tracer provider is set once per process)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    return _EXPORTER


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A real nats-server (JetStream, random port, max_payload 8 MB) for the whole session."""
    server = NatsServer(Path(tmp_path_factory.mktemp("nats")), anonymous=True)  # a test fixture, not a deployment
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_settings(nats_server: NatsServer) -> NatsSettings:
    return NatsSettings(url=nats_server.url, initial_connect_attempts=2, connect_timeout_s=1.0)


@pytest.fixture
async def bus(nats_settings: NatsSettings) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_settings, name="test")
    yield b
    await b.close()


@pytest.fixture
async def bus2(nats_settings: NatsSettings) -> AsyncIterator[Bus]:
    """A second connection, so publisher and subscriber really go through the server."""
    b = await Bus.connect(nats_settings, name="test2")
    yield b
    await b.close()


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.01) -> None:
    """Poll until ``predicate()`` is true (raises ``TimeoutError``); an ``async`` predicate is awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


@pytest.fixture
def eventually():
    return wait_for

