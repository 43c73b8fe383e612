"""One stream's restream: an ``RtmpPush`` per destination, started and stopped as the destination list changes.

Destinations are the stream record's own list (``StreamRecord.restream``, set with ``PUT /v1/streams/{id}/restream``)
or, when it is empty, ``egress.rtmp_push_url`` with ``{stream_id}`` filled in (docs/restream.md). Each push has its
own queue, reconnect loop and backoff (``RtmpPush.run``): a failing destination is retried and counted
(``rheo_egress_rtmp_push_failures_total``) and never disturbs another destination or the HLS output.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from egress.rtmp_push import RtmpPush
from media.aac import AacConfig
from media.h264 import VideoConfig
from media.rtmp_url import redact_rtmp_url
from proto import VideoUnit
from services.config import EgressSettings

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


def rtmp_push_url(template: str, stream_id: str) -> str:
    """The push URL of one stream: ``{stream_id}`` in the template is replaced by the stream id."""
    return template.replace("{stream_id}", stream_id)


def destinations(own: list[str], settings: EgressSettings, stream_id: str) -> list[str]:
    """Where a stream is pushed: its own list, else the configured template (none: not restreamed)."""
    if own:
        return list(dict.fromkeys(own))
    return [rtmp_push_url(settings.rtmp_push_url, stream_id)] if settings.rtmp_push_url else []


class Restream:
    """The pushes of one stream; ``push``/``push_audio`` fan out to every destination."""

    def __init__(self, stream_id: str, config: VideoConfig, settings: EgressSettings, spawn: Spawn,
                 silent_audio: bool) -> None:
        self.stream_id, self.config, self.settings = stream_id, config, settings
        self.silent_audio = silent_audio
        self.pushes: dict[str, RtmpPush] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._spawn = spawn

    def sync(self, urls: list[str]) -> None:
        """Start pushes to new destinations, stop those no longer listed (a stopped one is cancelled at once: a
        destination being retried must not hold its removal)."""
        for url in [u for u in self.pushes if u not in urls]:
            self.pushes.pop(url)
            self.tasks.pop(url).cancel()
            log.info("stream %s: restream to %s stopped", self.stream_id, redact_rtmp_url(url))
        for url in urls:
            if url in self.pushes:
                continue
            try:
                push = RtmpPush.from_settings(self.config, self.settings, url=url)
            except ValueError:  # the API validates; a bad template lands here
                log.warning("stream %s: restream destination %s is not an rtmp[s]://host/app/key URL", self.stream_id,
                            redact_rtmp_url(url))
                continue
            push.muxer.silent_audio = self.silent_audio
            self.pushes[url] = push
            self.tasks[url] = self._spawn(push.run(), f"rtmp-push-{self.stream_id}")
            log.info("stream %s: restreaming to %s", self.stream_id, redact_rtmp_url(url))

    def push(self, unit: VideoUnit) -> None:
        for url, push in self.pushes.items():
            try:
                push.push(unit)
            except Exception as e:
                log.warning("stream %s: access unit pts %d not pushed to %s: %s", self.stream_id, unit.pts,
                            redact_rtmp_url(url), e)

    def push_audio(self, time_s: float, config: AacConfig, frames: list[bytes]) -> None:
        for push in self.pushes.values():
            push.push_audio(time_s, config, frames)

    def finish(self) -> None:
        """The stream ended: every push sends what it holds and unpublishes."""
        for url, push in self.pushes.items():
            self._spawn(push.finish(), f"rtmp-finish-{self.stream_id}")
            log.debug("stream %s: finishing the push to %s", self.stream_id, redact_rtmp_url(url))
