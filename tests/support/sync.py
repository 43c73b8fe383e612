"""Making NATS tests deterministic."""

from __future__ import annotations

from services.bus import Bus


async def settle(*buses: Bus) -> None:
    """Round-trip every connection once, so a subscription made on one is seen by publishes from the others.

    Measured here under CPU load: after ``subscribe`` + ``flush`` on the subscriber, a publish from another
    connection was still not routed to it in ~10% of trials; one more round trip on the publisher made it 0/60.
    """
    for b in buses:
        await b.nc.flush()
