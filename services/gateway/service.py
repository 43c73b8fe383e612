"""The gateway service: subscribes to nothing, serves the control API and HLS routing on ``gateway.port``.

Publishes: ``rheo.stream.<id>.spec`` (create, parameter changes), ``rheo.stream.<id>.prompt`` (live prompt
changes, as requests to ingest), ``rheo.stream.<id>.error`` (stream deleted). Owns no per-stream state: the stream
table lives in JetStream KV (``services.streams``).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import httpx
import uvicorn

from media.player import check_hlsjs
from services.gateway.api import make_api
from services.gateway.auth import OperatorTokens
from services.gateway.jobs import JOBS_PATH
from services.gateway.stats import StreamWatch
from services.httpguard import guard
from services.playback_tokens import PlaybackKeys
from services.runtime import Service, ServiceStartError, listen_socket, main
from services.streams import StreamTable


class GatewayService(Service):
    role = "gateway"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.api_port = 0
        self._api: uvicorn.Server | None = None
        self._api_task: asyncio.Task[None] | None = None
        self._proxy: httpx.AsyncClient | None = None
        gw = self.settings.gateway
        if not OperatorTokens(gw.api_tokens, gw.api_tokens_file).any() and not gw.allow_anonymous:
            raise ServiceStartError("gateway: no API token configured (gateway.api_tokens, e.g. "
                                    "RHEO_GATEWAY__API_TOKENS='[\"<token>\"]', or gateway.api_tokens_file); set "
                                    "gateway.allow_anonymous=true only for local development")
        try:
            PlaybackKeys.of(self.settings.playback.signing_keys)
        except ValueError as e:
            raise ServiceStartError(f"gateway: {e}, e.g. RHEO_PLAYBACK__SIGNING_KEYS='[\"<32+ random "
                                    "characters>\"]' (egress needs the same list)") from e

    async def start(self) -> None:
        assert self.bus is not None
        check_hlsjs(logging.getLogger("rheo.gateway"))  # the console shows it too: said once here, for operators
        gw = self.settings.gateway
        table = await StreamTable.open(self.bus)
        self._proxy = httpx.AsyncClient(timeout=gw.proxy_timeout_s, limits=httpx.Limits(
            max_connections=gw.proxy_max_connections, max_keepalive_connections=min(64, gw.proxy_max_connections)))
        watch = StreamWatch()
        await watch.start(self.bus)
        app = guard(make_api(self.settings, self.bus, table, self._proxy, watch), gw.max_body_bytes,
                    {JOBS_PATH: (self.settings.jobs.max_upload_bytes, "jobs.max_upload_bytes")})
        sock = listen_socket(gw.host, gw.port, "the gateway API (gateway.port)")
        self.api_port = sock.getsockname()[1]
        self._api = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._api.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._api_task = asyncio.create_task(self._api.serve(sockets=[sock]), name="gateway-api")

    async def drain(self) -> None:
        if self._api is not None and self._api_task is not None:
            self._api.should_exit = True
            await self._api_task
        if self._proxy is not None:
            await self._proxy.aclose()


if __name__ == "__main__":
    sys.exit(main(GatewayService))
