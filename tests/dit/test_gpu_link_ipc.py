"""The same-GPU link building block (services/link_cuda.py): a device tensor mapped by another process through
CUDA IPC fields (no pickle) is bitwise the sender's, and the sender's segment keeps it until released."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from services import link_cuda
from services.link_shm import SegmentPool, leftover_segments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _peer(fields: dict, conn) -> None:  # a separate process, as the next stage is
    t = link_cuda.open_shared(fields)
    conn.send((link_cuda.device_uuid(), t.cpu()))
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

