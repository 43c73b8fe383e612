"""services/link_staging.py on CPU: the host buffer pool reuses a buffer only once the link let go of its bytes.

(The CUDA copy path is checked by tests/dit/test_gpu_paths.py, skipped without a GPU.)"""

from __future__ import annotations

import collections

import torch

from proto.codec import tensor_bytes
from services.link_staging import HostBufferPool, LinkStaging


def test_pool_reuses_buffers_once_the_link_released_them() -> None:
    """A link keeps ``max_unacked`` frames' bytes until acknowledged: the pool allocates that many, then reuses."""
    pool = HostBufferPool()
    unacked: collections.deque[tuple[int, memoryview]] = collections.deque()
    like = torch.zeros(4, 64, 32, dtype=torch.bfloat16)
    for step in range(40):
        host = pool.like(like)
        host.fill_(step)
        unacked.append((step, tensor_bytes(host)))  # what LinkSender holds: the frame's byte views
        del host
        if len(unacked) > 3:  # the oldest frame is acknowledged: its bytes are dropped
            unacked.popleft()
        for s, view in unacked:  # no frame still held was overwritten by a reuse
            assert torch.frombuffer(view, dtype=torch.bfloat16).eq(s).all(), (step, s)
    assert pool.allocations == 4 and pool.reuses == 36 and pool.size == 4  # no per-chunk allocation growth


def test_pool_without_releases_keeps_allocating_and_stays_bounded() -> None:
    """Negative control: buffers still referenced are never handed out again; the pool keeps at most its bound."""
    pool = HostBufferPool(max_buffers=3)
    held = [pool.take(1024) for _ in range(5)]
    assert pool.allocations == 5 and pool.reuses == 0 and pool.size == 3
    assert len({t.data_ptr() for t in held}) == 5
    del held
    pool.take(512)  # a smaller request fits a free larger buffer
    assert pool.reuses == 1


def test_cpu_stage_has_no_staging() -> None:
    """On CPU the link path is today's: nothing is staged."""
    assert LinkStaging.for_device(torch.device("cpu")) is None
