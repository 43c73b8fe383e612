"""``/docs`` works offline: the project's own page renders ``/openapi.json`` in Chromium with every other origin
unreachable (no CDN); the console (``/``) links to it."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field

from services.gateway.docs import DOCS_HTML, make_docs_router
from support.browser import CHROMIUM, CHROMIUM_FLAGS, NO_CHROMIUM


class Thing(BaseModel):
    """A thing to make."""

    name: str = Field(description="what it is called")
    size: int = 3


def _app() -> FastAPI:
    app = FastAPI(title="docs test", version="7", docs_url=None, redoc_url=None)

    @app.post("/v1/things/{thing_id}", response_model=Thing, summary="Make a thing")
    async def make(thing_id: str, body: Thing) -> Thing:
        return body

    app.include_router(make_docs_router())
    return app


def test_the_page_names_no_other_origin() -> None:
    assert not re.search(r"(src|href)=\"?(https?:)?//", DOCS_HTML), "an external asset"


async def test_docs_page_is_self_contained() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(_app()), base_url="http://t") as http:
        page = await http.get("/docs")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert "player_url" in page.text  # says where the player is


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
async def test_docs_render_offline_in_chromium() -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="playwright (PyPI) not installed")
    from media_io.mediakit import serve_app

    async with serve_app(_app()) as port, playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = await browser.new_page()
        foreign: list[str] = []
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        async def offline(route) -> None:  # no network but this server
            if route.request.url.startswith(f"http://127.0.0.1:{port}/"):
                await route.continue_()
            else:
                foreign.append(route.request.url)
                await route.abort()

        await page.route("**/*", offline)
        await page.goto(f"http://127.0.0.1:{port}/docs")
        # a function, not an expression: Playwright evals an expression again on every poll, which this page's CSP
        # (no 'unsafe-eval') refuses once the first check has found docsReady still unset
        await page.wait_for_function("() => window.docsReady === true", timeout=15000)
        text = await page.inner_text("body")
        await browser.close()
    assert not foreign and not errors, (foreign, errors)
    for want in ("docs test 7", "POST", "/v1/things/{thing_id}", "Make a thing", "thing_id *", "Thing",
                 "what it is called", "default 3"):
        assert want in text, want
