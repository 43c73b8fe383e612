"""Per-caller limits of the gateway: write rates per API token, concurrent playback requests per client address.

Both tables are bounded (the least recently used caller is forgotten), so a flood of new callers costs memory
once, not per request.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

MAX_CALLERS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: ``rate_per_s`` refill, ``burst`` capacity."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = MAX_CALLERS) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one token: 0.0 when allowed, else the seconds until one is available (the Retry-After)."""
        now = time.monotonic() if now is None else now
        b = self._buckets.pop(key, None) or _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
        b.at = now
        self._buckets[key] = b
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rate


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class ClientSlots:
    """At most ``per_client`` requests in flight per client key (what one viewer's blocking reloads may hold)."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._held: dict[str, int] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[bool]:
        """Yields whether a slot was free (the caller answers 429 when not); releases it on exit."""
        held = self._held.get(key, 0)
        if held >= self.per_client:
            yield False
            return
        self._held[key] = held + 1
        try:
            yield True
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]  # the table holds only clients with requests in flight
