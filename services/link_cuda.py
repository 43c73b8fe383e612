"""The tensor link's same-GPU building block: CUDA IPC without pickle (guarded; runs only with a CUDA device).

Two stages on one GPU need not copy hidden states device → host → device at all: the sender exports each device
tensor's storage (``share``: the CUDA IPC memory handle, offsets, torch's producer ref counter and event, as plain
msgpack-safe fields, never a pickle from the peer), the receiver maps it (``open_shared``). ``same_device``
decides it from the peer's GPU UUID. The release rule is the shared-memory path's: the sender keeps the exported
tensors with the frame's segment (``SegmentPool.put(..., keep=...)``) until the receiver released the frame, so
the sender's allocator never hands that memory out while the peer reads it (torch's IPC ref counter also holds
it). ``CudaIpc`` is what the link uses (``services/link.py``: a ``DeviceIpc``; docs/tensor-link.md, Same GPU): the
codec's ``DEVICE_EXT`` carries ``share``'s fields, the path is chosen by ``link_shm.choose_path``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import torch

from proto.codec import DTYPE_NAMES, DTYPES


def available() -> bool:
    return torch.cuda.is_available()


def device_uuid(device: torch.device | int | None = None) -> str | None:
    """This GPU's UUID (what two processes compare to know they share a device), None without CUDA."""
    if not available():
        return None
    index = torch.device(device).index if isinstance(device, torch.device) else device
    return str(torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).uuid)


def same_device(peer_uuid: str | None, device: torch.device | int | None = None) -> bool:
    ours = device_uuid(device)
    return ours is not None and peer_uuid is not None and peer_uuid == ours


def share(t: torch.Tensor) -> dict[str, Any]:
    """A device tensor as fields a peer process on the same GPU can map (msgpack-safe: ints, bytes, lists)."""
    if t.device.type != "cuda":
        raise ValueError("share: a CUDA tensor only")
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(f"tensor dtype {t.dtype} has no wire encoding")
    t = t.detach()
    (device, handle, size_bytes, offset_bytes, rc_handle, rc_offset, event_handle,
     event_sync) = t.untyped_storage()._share_cuda_()
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "stride": list(t.stride()),
            "offset": t.storage_offset(), "device": int(device), "handle": bytes(handle),
            "size_bytes": int(size_bytes), "offset_bytes": int(offset_bytes), "rc_handle": bytes(rc_handle),
            "rc_offset": int(rc_offset), "event_handle": bytes(event_handle) if event_handle else b"",
            "event_sync": bool(event_sync)}


def open_shared(f: dict[str, Any]) -> torch.Tensor:
    """The tensor ``share`` described, mapped in this process (same GPU)."""
    if f["dtype"] not in DTYPES:
        raise ValueError(f"unknown tensor dtype {f['dtype']!r}")
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        f["device"], f["handle"], f["size_bytes"], f["offset_bytes"], f["rc_handle"], f["rc_offset"],
        f["event_handle"] or None, f["event_sync"])
    out = torch.empty(0, dtype=DTYPES[f["dtype"]], device=torch.device("cuda", f["device"]))
    return out.set_(storage, f["offset"], f["shape"], f["stride"])


class DeviceIpc(Protocol):
    """What the tensor link needs of a device to hand tensors over without bytes (``CudaIpc``; a CPU fake in the
    tests): an id two processes compare, and the export/map pair the codec calls."""

    id: bytes  # 16 bytes; equal ids: the same physical device

    def share(self, t: torch.Tensor) -> dict[str, Any] | None:
        """``t``'s IPC fields, or None when it is not on this device (it then goes as bytes)."""
        ...

    def open(self, fields: dict[str, Any]) -> torch.Tensor:
        """The tensor a peer shared (raises on fields it will not map)."""
        ...


_FIELDS = {"dtype": str, "shape": list, "stride": list, "offset": int, "device": int, "handle": bytes,
           "size_bytes": int, "offset_bytes": int, "rc_handle": bytes, "rc_offset": int, "event_handle": bytes,
           "event_sync": bool}


class CudaIpc:
    """One CUDA device of this process as a ``DeviceIpc``: ids from the GPU UUID (the ordinal differs between
    processes with other ``CUDA_VISIBLE_DEVICES``, so a mapped tensor takes this process's ordinal)."""

    def __init__(self, device: torch.device) -> None:
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = device_uuid(self.index)
        assert uuid is not None
        self.id = hashlib.blake2b(uuid.encode(), digest_size=16).digest()

    @classmethod
    def for_device(cls, device: torch.device | str) -> CudaIpc | None:
        """The device's IPC when it is a CUDA device here, else None (CPU: the link has no device path)."""
        device = torch.device(device)
        return cls(device) if device.type == "cuda" and available() else None

    def share(self, t: torch.Tensor) -> dict[str, Any] | None:
        if t.device.type != "cuda" or t.device.index != self.index or t.dtype not in DTYPE_NAMES or t.numel() == 0:
            return None
        return share(t)

    def open(self, fields: dict[str, Any]) -> torch.Tensor:
        if set(fields) != set(_FIELDS) or not all(isinstance(fields[k], t) for k, t in _FIELDS.items()):
            raise ValueError("not CUDA IPC tensor fields")
        return open_shared(fields | {"device": self.index})
