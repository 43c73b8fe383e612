"""The playback signing key of the test session (set in the environment by tests/conftest.py, so every Settings()
and every service process a test starts shares it) and signed playback paths for tests that read egress directly."""

from __future__ import annotations

import json

from services.playback_tokens import PlaybackKeys

TEST_PLAYBACK_KEY = "test-playback-key-" + "k" * 32
ENV = {"RHEO_PLAYBACK__SIGNING_KEYS": json.dumps([TEST_PLAYBACK_KEY])}
KEYS = PlaybackKeys.of([TEST_PLAYBACK_KEY])


def signed(stream_id: str, ttl_s: float = 3600.0) -> str:
    """``/hls/<id>/<token>``: the base path of a stream's playlists and media."""
    return KEYS.path(stream_id, ttl_s)
