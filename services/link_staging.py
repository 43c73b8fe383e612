"""Device ↔ host staging for the tensor link: reused (pinned) host buffers and copies on a dedicated CUDA stream.

Without it a GPU stage's hidden states leave through ``proto.codec.tensor_bytes``: a blocking, pageable
device→host copy on the event loop, into fresh memory every micro-step. With a CUDA device, ``LinkStaging``:

* **send**: records an event on the compute stream, copies each device tensor with ``non_blocking=True`` on its own
  copy stream into a pinned host buffer taken from ``HostBufferPool``, and waits for that copy off the event loop;
  the message then carries host tensors, which the codec sends without another copy. The socket write (link
  thread) overlaps the next micro-step, as before;
* **receive**: copies the tensors from the link's pool buffer to the device on the copy stream (off the event loop),
  so the stage's compute finds them on the device and the link buffer goes back to its pool at once.

A pool buffer is reused only once nothing else holds its storage (the link keeps a frame's bytes until the peer
acknowledges it, and may resend them after a reconnect), so reuse never overwrites bytes still to be sent.
On CPU (no CUDA device) nothing here runs: ``LinkStaging.for_device`` returns None and the link is today's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

import torch

__all__ = ["HostBufferPool", "LinkStaging"]


def _storage_users(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class HostBufferPool:
    """Host byte buffers kept for reuse, by size; pinned (page-locked) when ``pin``. ``take`` returns a free buffer
    of at least ``nbytes`` (or allocates one); a buffer is free again once no tensor, array or memoryview made from
    it is alive. ``max_buffers`` bounds the pool: beyond it, buffers in use are not kept for later."""

    def __init__(self, pin: bool = False, max_buffers: int = 32) -> None:
        self.pin = pin
        self.max_buffers = max_buffers
        self._buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, storage use count when free)
        self._lock = threading.Lock()
        self.allocations = 0
        self.reuses = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of exactly ``nbytes`` (a view on a pooled buffer)."""
        with self._lock:
            fits = [(buf.numel(), i) for i, (buf, idle) in enumerate(self._buffers)
                    if buf.numel() >= nbytes and _storage_users(buf) == idle]
            if fits:
                self.reuses += 1
                return self._buffers[min(fits)[1]][0][:nbytes]
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
            self.allocations += 1
            if len(self._buffers) < self.max_buffers:
                self._buffers.append((buf, _storage_users(buf)))
            return buf[:nbytes]

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor of ``t``'s shape and dtype on a pooled buffer."""
        nbytes = t.numel() * t.element_size()
        return self.take(nbytes).view(t.dtype).view(t.shape)

    @property
    def size(self) -> int:
        return len(self._buffers)


_SHARED: dict[torch.device, LinkStaging] = {}
_SHARED_LOCK = threading.Lock()


class LinkStaging:
    """The copies of one CUDA stage's link traffic (module docstring); one per stage process."""

    def __init__(self, device: torch.device, pool: HostBufferPool | None = None) -> None:
        if device.type != "cuda":
            raise ValueError("LinkStaging is the CUDA path; on CPU the link sends the tensors as they are")
        self.device = device
        self.pool = pool or HostBufferPool(pin=True)
        self.stream = torch.cuda.Stream(device)

    @classmethod
    def for_device(cls, device: torch.device) -> LinkStaging | None:
        """This process's staging of a CUDA device (one copy stream and pool per device), None elsewhere (CPU:
        nothing to stage, the path stays as it was)."""
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        with _SHARED_LOCK:
            if device not in _SHARED:
                _SHARED[device] = cls(device)
            return _SHARED[device]

    def to_host_start(self, tensors: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Enqueue device→host copies of ``tensors`` (host ones are returned as they are) after everything the
        current stream has queued; returns the host tensors and the event that marks the copies done."""
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        done = torch.cuda.Event()
        out: list[torch.Tensor] = []
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for t in tensors:
                if t.device.type != "cuda":
                    out.append(t)
                    continue
                t = t.detach()
                t.record_stream(self.stream)  # the allocator must not hand its memory out before the copy ran
                host = self.pool.like(t)
                host.copy_(t, non_blocking=True)
                out.append(host)
            done.record(self.stream)
        return out, done

    async def to_host(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``to_host_start`` and wait for it off the event loop."""
        out, done = self.to_host_start(tensors)
        await asyncio.to_thread(done.synchronize)
        return out

    def to_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host→device copies on the copy stream, complete on return (call it off the event loop); the device
        tensors belong to the current stream, which the stage's compute uses."""
        outs = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in tensors]
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(compute)
            for dst, src in zip(outs, tensors, strict=True):
                dst.copy_(src, non_blocking=src.is_pinned())
        self.stream.synchronize()
        return outs
