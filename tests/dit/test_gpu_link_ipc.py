"""The same-GPU link (services/link_cuda.py): a device tensor mapped by another process through CUDA IPC fields (no
pickle) is bitwise the sender's, and the sender's segment keeps it until released; two link ends on one GPU choose
the CUDA path in the handshake and deliver device tensors with no host copy. (CPU twin:
tests/services/test_link_device.py.)"""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import pytest
import torch

from proto import PromptUpdate
from services import link_cuda
from services.link import LinkSender
from services.link_shm import SegmentPool, leftover_segments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _peer(fields: dict, conn) -> None:  # a separate process, as the next stage is
    t = link_cuda.open_shared(fields)
    conn.send((link_cuda.device_uuid(), t.cpu().numpy()))
    t.add_(1)  # the receiver may use the tensor in place until it releases it
    torch.cuda.synchronize()
    conn.send("done")


def test_a_peer_process_maps_the_tensor_bitwise_and_the_segment_keeps_it() -> None:
    src = torch.randn(3, 256, 1536, device="cuda", dtype=torch.float32)
    want = src.cpu()
    fields = link_cuda.share(src)
    pool = SegmentPool()
    pool.new_connection(True)
    assert pool.put([b"frame"], 5, keep=[src]) is not None  # the sender holds src until the frame is released
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peer, args=(fields, child))
    proc.start()
    try:
        uuid, got = parent.recv()
        got = torch.from_numpy(got)
        assert parent.recv() == "done"
        assert link_cuda.same_device(uuid)
        assert torch.equal(got, want)
        torch.cuda.synchronize()
        assert torch.equal(src.cpu(), want + 1)  # one memory: the peer's in-place write is ours
    finally:
        proc.join(30)
        pool.close()
    assert proc.exitcode == 0
    assert not [n for n in leftover_segments() if n.startswith(f"rheo-lnk-{pool.tag:016x}-")]



def _listener(conn) -> None:  # the next stage: a process of its own on the same GPU
    from services.link import LinkListener

    async def main() -> None:
        listener = LinkListener(device=link_cuda.CudaIpc.for_device("cuda")).start()
        conn.send(listener.endpoint)
        for _ in range(2):
            with await listener.recv(timeout=30) as frame:
                t = frame.message.embedding
                # consumed (copied) before the release; numpy pickles by value, where a torch CPU tensor would be
                # shared by a descriptor this process must outlive
                conn.send((t.device.type, t.cpu().numpy()))
        conn.send(listener.stats.shm_frames)
        listener.close()

    asyncio.run(main())


def test_a_link_between_two_processes_on_one_gpu_sends_device_tensors_as_handles() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_listener, args=(child,))
    proc.start()

    async def send() -> tuple[LinkSender, torch.Tensor]:
        sender = LinkSender(parent.recv(), device=link_cuda.CudaIpc.for_device("cuda")).start()
        first = torch.arange(1024, device="cuda", dtype=torch.float32)
        await sender.send(PromptUpdate(stream_id="s", version=1, prompt="p", embedding=first))
        await sender.acknowledged()
        assert sender.path == "cuda" and sender.on_device
        second = torch.randn(4096, device="cuda") * 3  # produced on the compute stream, asynchronously
        await sender.send(PromptUpdate(stream_id="s", version=2, prompt="p", embedding=second))
        await sender.acknowledged()
        return sender, second.cpu()

    sender, want = asyncio.run(send())
    try:
        (_, first), (where, second) = parent.recv(), parent.recv()
        first, second = torch.from_numpy(first), torch.from_numpy(second)
        assert parent.recv() == 2
        assert torch.equal(first, torch.arange(1024, dtype=torch.float32))
        assert where == "cuda" and torch.equal(second, want)
        assert sender.stats.device_frames >= 1 and sender.stats.reencoded == 0
    finally:
        sender.close()
        proc.join(30)
    assert proc.exitcode == 0
