"""An acknowledged epoch: every stage of a block map has announced it can run it.

Each DiT stage writes ``prepared.<stage id>`` = the newest epoch it has applied with its inputs and link up, in the
``rheo-blockmap`` bucket (``dit_stage/epochs.py``). Two waiters read it, with this one rule: the first stage before
an online switch (docs/rebalance.md), and ingest before it replays a failure epoch (docs/recovery.md), so a replay
never races the stages' own block-map watches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from proto import BlockMap, stage_prepared_key
from services.bus import KV

__all__ = ["POLL_S", "announced", "wait_prepared"]

POLL_S = 0.05


async def announced(kv: KV, stage_id: str, epoch: int) -> bool:
    """Whether ``stage_id`` has announced ``epoch`` (or a later one)."""
    entry = await kv.get(stage_prepared_key(stage_id))
    try:
        return entry is not None and bool(entry.value) and int(entry.value.decode()) >= epoch
    except ValueError:
        return False


async def wait_prepared(kv: KV, bm: BlockMap, *, timeout_s: float | None = None,
                        still: Callable[[], bool] = lambda: True) -> list[str]:
    """Wait until every stage of ``bm`` has announced its epoch; returns the stages still missing when
    ``timeout_s`` ran out or ``still()`` turned false (empty: acknowledged)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waiting = [s.stage_id for s in bm.stages]
    while True:
        waiting = [sid for sid in waiting if not await announced(kv, sid, bm.epoch)]
        if not waiting or not still() or (deadline is not None and time.monotonic() >= deadline):
            return waiting
        await asyncio.sleep(POLL_S)
