"""The tensor link's same-host path (services/link_shm.py): chosen automatically, bitwise equal to TCP, segments
reused only after release, and nothing left in /dev/shm after a close or a crash."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys

import pytest
import torch
from prometheus_client import REGISTRY

from proto import PromptUpdate
from services import link_shm
from services.link import LinkListener, LinkSender, parse_endpoint
from services.link_shm import CHOICE, HELLO, SegmentPool, leftover_segments


def _msg(i: int, n: int = 1024, dtype: torch.dtype = torch.float32) -> PromptUpdate:
    g = torch.Generator().manual_seed(i)
    return PromptUpdate(stream_id="s", version=i, prompt=f"p{i}", embedding=torch.randn(n, generator=g).to(dtype))


def _ours(tag: int) -> list[str]:
    return [n for n in leftover_segments() if n.startswith(f"rheo-lnk-{tag:016x}-")]


async def _pair(listener_shm: bool = True, **listener_kw) -> tuple[LinkListener, LinkSender]:
    listener = LinkListener(shared_memory=listener_shm, **listener_kw).start()
    sender = LinkSender(listener.endpoint).start()
    return listener, sender


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _paths(path: str) -> float:
    return REGISTRY.get_sample_value("rheo_link_path_total", {"path": path}) or 0.0


async def test_same_host_frames_go_through_shared_memory_bitwise_equal_to_tcp() -> None:
    sent = [_msg(i, n, dt) for i, (n, dt) in enumerate(
        [(1024, torch.float32), (3, torch.bfloat16), (600_000, torch.float16), (1, torch.float32)] * 3)]
    received: dict[str, list[bytes]] = {}
    shm_before, tcp_before = _paths("shm"), _paths("tcp")
    for path in ("shm", "tcp"):
        listener, sender = await _pair(listener_shm=path == "shm")
        try:
            for m in sent:
                await sender.send(m)
            got = []
            for m in sent:
                with await listener.recv(timeout=5) as frame:
                    assert frame.message.version == m.version and frame.message.embedding.dtype == m.embedding.dtype
                    assert torch.equal(frame.message.embedding, m.embedding)
                    got.append(frame.message.embedding.view(torch.uint8).numpy().tobytes())
            received[path] = got
            assert sender.path == path
            assert listener.stats.shm_frames == (len(sent) if path == "shm" else 0)
        finally:
            sender.close()
            listener.close()
    assert received["shm"] == received["tcp"]
    assert (_paths("shm") - shm_before, _paths("tcp") - tcp_before) == (1, 1)


@pytest.mark.parametrize("differs", ["host", "uid", "sender_off"])
async def test_another_host_another_uid_or_off_keeps_tcp(monkeypatch: pytest.MonkeyPatch, differs: str) -> None:
    real = link_shm.hello

    def peer_hello(enabled: bool, **kw) -> bytes:
        magic, token, uid, device = HELLO.unpack(real(enabled, **kw))
        if differs == "host":
            token = bytes(reversed(token))  # another /dev/shm: another token
        elif differs == "uid":
            uid += 1
        return HELLO.pack(magic, token, uid, device)

    monkeypatch.setattr(link_shm, "hello", peer_hello)
    listener = LinkListener().start()
    sender = LinkSender(listener.endpoint, shared_memory=differs != "sender_off").start()
    try:
        await sender.send(_msg(1))
        with await listener.recv(timeout=5) as frame:
            assert torch.equal(frame.message.embedding, _msg(1).embedding)
        assert sender.path == "tcp" and listener.stats.shm_frames == 0
    finally:
        sender.close()
        listener.close()


async def test_segments_are_reused_and_written_again_only_after_release() -> None:
    listener, sender = await _pair()
    try:
        held = None
        for i in range(50):
            await sender.send(_msg(i))
            frame = await listener.recv(timeout=5)
            if i == 0:
                held = frame  # the consumer keeps frame 0's tensors: its segment must not be written again
            else:
                assert torch.equal(frame.message.embedding, _msg(i).embedding)
                frame.release()
        assert held is not None
        assert torch.equal(held.message.embedding, _msg(0).embedding)
        held.release()
        pool = sender.segments
        assert pool.allocations <= 3 and pool.reuses >= 47, (pool.allocations, pool.reuses)
        assert _ours(pool.tag) == []  # the receiver unlinked every name it mapped
    finally:
        sender.close()
        listener.close()


async def test_close_unlinks_the_segments_the_receiver_never_mapped() -> None:
    listener, sender = await _pair(buffers=1)
    try:
        for i in range(4):
            await sender.send(_msg(i))
        first = await listener.recv(timeout=5)  # held: the reader waits for the pool and maps nothing more
        tag = sender.segments.tag
        await _until(lambda: len(_ours(tag)) >= 1)
        sender.close()
        assert _ours(tag) == []
        first.release()
    finally:
        sender.close()
        listener.close()


async def test_a_sender_that_crashes_leaves_nothing_in_dev_shm() -> None:
    """A crash between writing a segment and sending its descriptor: the receiver unlinks the connection's
    names when the connection ends."""
    listener = LinkListener().start()
    pool = SegmentPool()
    try:
        sock = socket.create_connection(parse_endpoint(listener.endpoint))
        assert len(sock.recv(HELLO.size, socket.MSG_WAITALL)) == HELLO.size
        tag = pool.new_connection(True)
        sock.sendall(CHOICE.pack(tag, 0))
        parts = _msg(0).encode_parts()
        assert pool.put(parts, sum(memoryview(p).nbytes for p in parts)) is not None
        assert len(_ours(tag)) == 1
        sock.close()  # the process died: no close of the pool, no descriptor
        await _until(lambda: _ours(tag) == [])
    finally:
        pool.close()
        listener.close()


def test_the_host_token_is_private_to_this_uid() -> None:
    path = os.path.join(link_shm.SHM_DIR, f"rheo-link-host-{os.getuid()}")
    link_shm.host_token()
    assert os.stat(path).st_mode & 0o777 == 0o600


_CRASHING_SENDER = """
import asyncio, sys, torch
from proto import PromptUpdate
from services.link import LinkSender

async def main() -> None:
    sender = LinkSender(sys.argv[1]).start()
    for i in range(6):
        await sender.send(PromptUpdate(stream_id="s", version=i, prompt="p", embedding=torch.zeros(1024)))
    await sender.flush()
    print(sender.segments.tag, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_killed_sender_process_leaves_nothing_in_dev_shm() -> None:
    listener = LinkListener(buffers=1).start()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _CRASHING_SENDER, listener.endpoint,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        first = await listener.recv(timeout=30)  # held: the frames behind it stay unmapped, their names in /dev/shm
        assert proc.stdout is not None
        tag = int((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
        assert _ours(tag), "nothing named before the crash: the check below would prove nothing"
        proc.kill()
        await proc.wait()
        first.release()
        with contextlib.suppress(TimeoutError):
            while True:
                (await listener.recv(timeout=0.5)).release()
        await _until(lambda: _ours(tag) == [])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        listener.close()


async def test_a_sender_side_break_loses_no_frame_whose_segment_was_retired() -> None:
    """The old connection still holds descriptors of segments the reconnected sender retired: it must not mark
    them delivered (the resends on the new connection would be dropped as duplicates)."""
    listener, sender = await _pair(buffers=1)
    try:
        for i in range(4):
            await sender.send(_msg(i))
        await sender.flush()
        first = await listener.recv(timeout=5)  # held: frames 1-3 wait in the old connection, unmapped
        old_tag = sender.segments.tag
        sender._drop_socket()  # a break seen by the sender only: the next send reconnects, resends 1-3 in new
        await sender.send(_msg(4))  # segments, then sends 4
        await _until(lambda: sender.segments.tag != old_tag)
        first.release()
        versions = [first.message.version]
        for _ in range(4):
            with await listener.recv(timeout=5) as frame:
                versions.append(frame.message.version)
                assert torch.equal(frame.message.embedding, _msg(frame.message.version).embedding)
        assert versions == [0, 1, 2, 3, 4] and listener.stats.malformed == 0
    finally:
        sender.close()
        listener.close()


_DYING_POOL = """
import sys, time
from services.link_shm import SegmentPool
pool = SegmentPool()
tag = pool.new_connection(True)
for _ in range(2):
    pool.put([b"x" * 100], 100)
print(tag, flush=True)
time.sleep(3600)
"""


async def test_segments_of_a_sender_killed_with_its_receiver_are_swept() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _DYING_POOL, stdout=asyncio.subprocess.PIPE)
    live = SegmentPool()
    try:
        assert proc.stdout is not None
        tag = int((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
        assert len(_ours(tag)) == 2
        link_shm.sweep()
        assert len(_ours(tag)) == 2  # its sender lives: nothing of it is touched
        proc.kill()
        await proc.wait()
        live.new_connection(True)  # a new connection sweeps
        live.put([b"y"], 1)
        assert _ours(tag) == [] and not os.path.exists(os.path.join(link_shm.SHM_DIR, f"rheo-lnkl-{tag:016x}"))
        assert len(_ours(live.tag)) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        live.close()
    assert _ours(live.tag) == []
