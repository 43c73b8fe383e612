"""The tensor link's same-device path, on CPU: ``link_shm.choose_path`` picks CUDA IPC only for the same host and the
same device, and a link whose ends share a (fake, in-process) device hands tensors over as handles, no bytes: the
receiver's tensor is the sender's memory, held by the frame's segment until released. The CUDA twin of the
transfer is tests/dit/test_gpu_link_ipc.py (skipped without a GPU)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Any, ClassVar

import pytest
import torch

from proto import PromptUpdate, ProtocolError, decode_with_headers
from services import link_shm
from services.link import LinkListener, LinkOptions, LinkSender, _Outgoing, parse_endpoint
from services.link_shm import CHOICE, HELLO, choose_path

GPU_A, GPU_B = b"A" * 16, b"B" * 16


class FakeIpc:
    """An in-process stand-in for ``link_cuda.CudaIpc``: float32 tensors are "on the device"; a handle is a key
    into a registry both ends of an in-process link share."""

    _registry: ClassVar[dict[int, torch.Tensor]] = {}
    _keys = itertools.count(1)

    def __init__(self, device_id: bytes) -> None:
        self.id = device_id
        self.opened = 0

    def share(self, t: torch.Tensor) -> dict[str, Any] | None:
        if t.dtype != torch.float32:
            return None
        key = next(self._keys)
        self._registry[key] = t
        return {"key": key}

    def open(self, fields: dict[str, Any]) -> torch.Tensor:
        self.opened += 1
        return self._registry.pop(fields["key"])


def _msg(i: int, dtype: torch.dtype = torch.float32) -> PromptUpdate:
    g = torch.Generator().manual_seed(i)
    return PromptUpdate(stream_id="s", version=i, prompt=f"p{i}", embedding=torch.randn(4096, generator=g).to(dtype))


@pytest.mark.parametrize(("ours", "peer", "peer_host", "shm", "want"), [
    (GPU_A, GPU_A, "same", True, "cuda"),
    (GPU_A, GPU_B, "same", True, "shm"),  # another GPU of this host
    (GPU_A, None, "same", True, "shm"),  # the peer offers no device (CPU stage, or link_cuda_ipc off)
    (None, GPU_A, "same", True, "shm"),  # we have none
    (GPU_A, GPU_A, "other", True, "tcp"),  # same device id seen through another /dev/shm: not the same host
    (GPU_A, GPU_A, "same", False, "tcp"),  # shared memory off: the device path rides on it
])
def test_the_path_is_cuda_only_on_the_same_host_and_the_same_device(
        ours: bytes | None, peer: bytes | None, peer_host: str, shm: bool, want: str) -> None:
    hello = link_shm.hello(True, device=peer)
    if peer_host == "other":
        magic, token, uid, dev = HELLO.unpack(hello)
        hello = HELLO.pack(magic, bytes(reversed(token)), uid, dev)
    assert choose_path(hello, shm, ours) == want


async def _link(sender_id: bytes, listener_id: bytes) -> tuple[LinkListener, LinkSender, FakeIpc]:
    listener_ipc = FakeIpc(listener_id)
    listener = LinkListener(device=listener_ipc).start()
    sender = LinkSender(listener.endpoint, device=FakeIpc(sender_id)).start()
    return listener, sender, listener_ipc


async def test_same_device_frames_carry_handles_not_bytes_and_the_segment_holds_them_until_released() -> None:
    listener, sender, ipc = await _link(GPU_A, GPU_A)
    try:
        await sender.send(_msg(0))  # the first frame may go before the path is known: as bytes
        (await listener.recv(timeout=5)).release()
        assert sender.on_device
        sent = [_msg(i) for i in range(1, 6)]
        for m in sent:
            n = await sender.send(m)
            assert n < 1024  # a descriptor of the tensor, not its 16 KiB
            with await listener.recv(timeout=5) as frame:
                assert frame.message.embedding.data_ptr() == m.embedding.data_ptr()  # one memory: no copy
                held = [s for s in sender.segments._segments if s.busy]
                assert any(s.keep and s.keep[0] is m.embedding for s in held)  # kept until released
        assert sender.stats.device_frames == len(sent) and sender.stats.reencoded == 0
        assert ipc.opened == len(sent) and listener.stats.frames == len(sent) + 1
        await sender.send(_msg(9, torch.bfloat16))  # a tensor the device does not hold: its bytes, in a segment
        with await listener.recv(timeout=5) as frame:
            assert torch.equal(frame.message.embedding, _msg(9, torch.bfloat16).embedding)
        assert sender.stats.device_frames == len(sent)
    finally:
        sender.close()
        listener.close()


async def test_another_device_gets_bytes_in_shared_memory() -> None:
    listener, sender, ipc = await _link(GPU_A, GPU_B)
    try:
        for i in range(3):
            m = _msg(i)
            await sender.send(m)
            with await listener.recv(timeout=5) as frame:
                assert torch.equal(frame.message.embedding, m.embedding)
                assert frame.message.embedding.data_ptr() != m.embedding.data_ptr()
        assert sender.path == "shm" and sender.stats.device_frames == 0 and ipc.opened == 0
    finally:
        sender.close()
        listener.close()


async def test_a_frame_of_handles_is_encoded_again_as_bytes_when_the_path_changes() -> None:
    sender = LinkSender("127.0.0.1:9", device=FakeIpc(GPU_A))
    sender.path, sender._slots = "cuda", asyncio.Semaphore(1)
    m = _msg(3)
    await sender.send(m)
    out, _ = sender._queue.get_nowait()
    assert isinstance(out, _Outgoing) and out.keep == [m.embedding]
    sender.path = "tcp"  # the reconnect found a peer on another device, or another host
    frame = sender._framed(1, out)
    body = memoryview(b"".join(bytes(memoryview(p).cast("B")) for p in frame[1:]))
    got, _ = decode_with_headers(body)
    assert torch.equal(got.embedding, m.embedding) and sender.stats.reencoded == 1 and out.keep == []


async def test_handles_are_refused_where_the_device_path_was_not_offered() -> None:
    frame = b"".join(bytes(memoryview(p).cast("B"))
                     for p in _msg(1).encode_parts(device=FakeIpc(GPU_A).share))
    assert len(frame) < 1024  # the tensor's 16 KiB are not in it
    with pytest.raises(ProtocolError, match="extension"):
        decode_with_headers(frame)  # NATS, or a link connection without the device path
    listener = LinkListener().start()  # no device offered
    try:
        sock = socket.create_connection(parse_endpoint(listener.endpoint))
        assert len(sock.recv(HELLO.size, socket.MSG_WAITALL)) == HELLO.size
        sock.sendall(CHOICE.pack(link_shm.new_tag(), 1))
        assert sock.recv(1) == b""  # closed
        assert listener.stats.refused_connections == 1
        sock.close()
    finally:
        listener.close()


@pytest.mark.parametrize(("own", "registered", "want"), [(False, True, "cuda"), (True, True, "local"),
                                                         (True, False, "shm")])
async def test_a_link_to_this_process_hands_the_message_over_in_process(own: bool, registered: bool,
                                                                        want: str) -> None:
    """A one-stage ring returns its items to itself over its own listener: the message object itself, no copy
    (CUDA IPC cannot map a process's own allocations: ``invalid device context`` on an H200). Should the listener not
    be found in this process, the socket without the device path."""
    options = LinkOptions(device=FakeIpc(GPU_A))
    listener = options.listener().start()
    if not registered:
        del LinkListener._running[listener.port]
    sender = options.sender(listener.endpoint, own=own).start()
    try:
        for i in range(2):  # the first frame may go before the path is known
            m = _msg(i)
            await sender.send(m)
            with await listener.recv(timeout=5) as frame:
                assert torch.equal(frame.message.embedding, m.embedding)
                assert (frame.message is m) == (want == "local") == frame.local
        assert sender.path == want
    finally:
        sender.close()
        listener.close()
