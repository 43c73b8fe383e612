"""The stream page's "New stream key" in headless Chromium against a real gateway and nats-server (no ingest): a
dismissed confirm changes nothing; an accepted one shows the new key with its copy button, fills it in for going
live, and only the new key opens the stream."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from proto import Buckets
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.gateway.service import GatewayService
from services.streams import StreamTable
from support.browser import CHROMIUM, CHROMIUM_FLAGS, NO_CHROMIUM

TOKEN = "console-operator-token-0123"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


@contextlib.asynccontextmanager
async def _gateway(nats_settings: NatsSettings, eventually):
    service = GatewayService(Settings(nats=nats_settings, telemetry={"metrics_port": 0},
                                      lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2},
                                      gateway={"host": "127.0.0.1", "port": 0, "api_tokens": [TOKEN]}))
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.api_port != 0 and service.ready)
    try:
        yield f"http://127.0.0.1:{service.api_port}"
    finally:
        service.stop()
        assert await asyncio.wait_for(task, 20) == 0


async def test_new_stream_key_from_the_stream_page(nats_settings: NatsSettings, bus: Bus, eventually) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="playwright (PyPI) not installed")
    table = StreamTable(await bus.kv(Buckets.STREAMS))
    async with _gateway(nats_settings, eventually) as url, playwright_api.async_playwright() as pw:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            created = (await http.post("/v1/streams", json={"prompt": "a key that leaked"})).json()
        sid, old = created["id"], created["stream_key"]
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(url + "/console/")
            await page.fill("#token", TOKEN)
            await page.click("#signin")
            await page.wait_for_selector("#streams", state="attached")
            await page.goto(f"{url}/console/#/s/{sid}")
            await page.wait_for_selector("#golive-rotate")

            page.once("dialog", lambda d: asyncio.ensure_future(d.dismiss()))
            await page.click("#golive-rotate")
            await asyncio.sleep(0.5)
            assert await page.query_selector("#obs-key") is None
            assert (await table.lookup_key(old)).spec.stream_id == sid  # dismissed: nothing changed

            page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
            await page.click("#golive-rotate")
            await page.wait_for_selector("#golive-rotated #obs-key")
            new = await page.input_value("#obs-key")
            assert new and new != old and new in await page.inner_text("#obs-ffmpeg")
            assert await page.input_value("#golive-key") == new  # what "Go live" publishes with
            assert await page.is_visible("#golive-rotated .copy button")
            assert not errors, errors
        finally:
            await browser.close()
    assert await table.lookup_key(old) is None
    assert (await table.lookup_key(new)).spec.stream_id == sid
    await table.delete(sid)
