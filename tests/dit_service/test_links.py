"""``NextLink`` when the next stage changes under it (issue #12 item 2, the link race), over real sockets and a
real endpoints bucket: nothing of the new epoch is queued to the sender being replaced, a send caught on it goes
again to the new next stage, and every frame the old sender discards is counted."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from dit_stage.links import NextLink
from dit_stage.telemetry import DROPPED, StageTelemetry
from proto import Buckets, RingReturn
from services.bus import Bus
from services.link import LinkListener, LinkOptions

STAGE = "nl-test"


def _msg(epoch: int, tag: float) -> RingReturn:
    return RingReturn(epoch=epoch, items=[], latents=torch.full((4,), tag))


def _dropped(reason: str) -> float:
    return DROPPED.labels(stage=STAGE, reason=reason)._value.get()


async def test_a_replaced_next_stage_gets_every_message_of_the_new_epoch(bus: Bus, eventually) -> None:
    endpoints = await bus.kv(Buckets.ENDPOINTS)
    old = LinkListener().start()
    new = LinkListener().start()
    states: list[bool] = []
    link = NextLink(STAGE, endpoints, LinkOptions(max_frame_bytes=1 << 20), StageTelemetry(STAGE), states.append)
    replaced0, changed0 = _dropped("link_replaced"), _dropped("link_changed")
    try:
        await endpoints.put("nl-old", old.endpoint.encode())
        link.follow("nl-old", 1)
        await asyncio.wait_for(link.ready.wait(), 10)
        assert await link.send(_msg(1, 1.0))
        with (await old.recv(timeout=5)) as frame:
            assert frame.message.latents[0].item() == 1.0
        old.close()  # the next stage dies (SIGKILL): its sender retries, and holds what it was given
        assert link.sender is not None
        handed = 0  # sends the dead stage's sender took (queued or written, never acknowledged): lost, but counted
        while True:
            blocked_old = asyncio.create_task(link.send(_msg(1, 100.0 + handed)))
            await asyncio.sleep(0.3)
            if not blocked_old.done():
                break  # this one waits for a slot of the dead sender
            assert blocked_old.result()
            handed += 1
            assert handed < 50
        blocked_new = asyncio.create_task(link.send(_msg(2, 5.0)))  # a send of the new epoch caught on it too
        await asyncio.sleep(0.2)
        assert not blocked_new.done()

        link.follow("nl-new", 2)  # the failure map: the link goes down at once ...
        assert not link.ready.is_set() and states[-1] is False
        # ... so the replayed prepare item, admitted right after, waits for the new sender (it once went to the old
        # one, whose close discarded it: the stream was never prepared again)
        replay = asyncio.create_task(link.send(_msg(2, 6.0)))
        await endpoints.put("nl-new", new.endpoint.encode())
        assert await asyncio.wait_for(replay, 10)
        assert await asyncio.wait_for(blocked_new, 10)  # sent again on the new link
        assert not await asyncio.wait_for(blocked_old, 10)  # stale for the new next stage: dropped, counted
        got = set()
        for _ in range(2):
            with (await new.recv(timeout=5)) as frame:
                got.add(frame.message.latents[0].item())
                assert frame.message.epoch == 2
        assert got == {5.0, 6.0}
        await eventually(lambda: _dropped("link_replaced") - replaced0 == handed, timeout=10)
        assert _dropped("link_changed") - changed0 == 1  # the blocked send of the old epoch
        assert link.sender_stage == "nl-new" and states[-1] is True
    finally:
        await link.close()
        old.close()
        new.close()
        for key in ("nl-old", "nl-new"):
            with contextlib.suppress(Exception):
                await endpoints.delete(key)


def test_a_stage_beyond_loopback_needs_a_link_key() -> None:
    from dit_stage.links import link_options
    from services.config import DitStageSettings

    with pytest.raises(ValueError, match="link_key is required"):
        link_options(DitStageSettings())  # listens on 0.0.0.0 by default
    assert link_options(DitStageSettings(link_host="127.0.0.1")).key is None
    assert link_options(DitStageSettings(link_key="s3cret")).key == b"s3cret"
