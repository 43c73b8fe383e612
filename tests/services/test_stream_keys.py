"""Stream key rotation in the stream table over a real nats-server: once ``rotate_key`` returns the old key opens
nothing and the new one opens the stream; the index holds the new key's entry only; concurrent writers lose
nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proto import StreamSpec
from services.bus import Bus
from services.streams import StreamNotFound, StreamTable, hash_key, new_stream_id


@pytest.fixture
async def table(bus: Bus) -> AsyncIterator[StreamTable]:
    yield await StreamTable.open(bus)


async def _stream(table: StreamTable) -> tuple[str, str]:
    spec = StreamSpec(stream_id=new_stream_id(), width=64, height=64, fps=16.0, steps=2, prompt="a key to rotate")
    _, key = await table.create(spec)
    return spec.stream_id, key


async def _indexed(table: StreamTable, key: str) -> str | None:
    """The stream id the index entry of ``key`` names (None: no entry)."""
    entry = await table.kv.get("k." + hash_key(key))
    return entry.value.decode() if entry is not None and entry.value else None


async def test_the_old_key_opens_nothing_and_the_new_one_opens_the_stream(table: StreamTable) -> None:
    sid, old = await _stream(table)
    before = await table.get(sid)
    try:
        record, new = await table.rotate_key(sid)
        assert new != old and len(new) == len(old)
        assert record.key_hash == hash_key(new) != before.key_hash
        assert await table.lookup_key(old) is None
        assert (await table.lookup_key(new)).spec.stream_id == sid
        assert await _indexed(table, new) == sid and await _indexed(table, old) is None
        after = await table.get(sid)
        assert after.model_copy(update={"key_hash": before.key_hash, "updated_at": before.updated_at}) == before
    finally:
        await table.delete(sid)
    assert await _indexed(table, new) is None  # a deleted stream leaves no entry of its rotated key


async def test_an_unknown_stream_gets_no_key_and_leaves_no_entry(table: StreamTable) -> None:
    entries = set(await table.kv.keys())
    with pytest.raises(StreamNotFound):
        await table.rotate_key(new_stream_id())
    with pytest.raises(ValueError):
        await table.rotate_key("a.b")
    assert set(await table.kv.keys()) == entries


async def test_concurrent_rotations_and_updates_lose_nothing(table: StreamTable) -> None:
    """Two rotations racing each other and five unrelated updates: every update lands, and exactly one of the two
    new keys opens the stream, its entry the only one left."""
    sid, old = await _stream(table)
    try:
        bump = lambda r: r.model_copy(update={"prompt_version": r.prompt_version + 1})  # noqa: E731
        results = await asyncio.gather(table.rotate_key(sid), table.rotate_key(sid),
                                       *(table.update(sid, bump) for _ in range(5)))
        keys = [key for _, key in results[:2]]
        record = await table.get(sid)
        assert record.prompt_version == 5
        opening = [k for k in keys if await table.lookup_key(k) is not None]
        assert len(opening) == 1 and record.key_hash == hash_key(opening[0])
        assert [await _indexed(table, k) for k in (old, *keys)].count(sid) == 1
        assert await table.lookup_key(old) is None
    finally:
        await table.delete(sid)
