"""The frame codec: msgpack body + zero-copy tensor payloads.

A frame is::

    0   b"RH"                      magic
    2   u8   FRAME_FORMAT          layout of this frame (not of the message schema)
    3   u8   0                     reserved
    4   u32  body length (LE)
    8   body                       msgpack: {"t": type name, "v": schema version, "d": fields}
        pad to 64
        tensor bytes, each at a 64-byte aligned offset, raw little-endian

Each tensor in the body is a msgpack extension (type ``TENSOR_EXT``) whose data is
``[dtype, shape, offset, nbytes]``, the offset counted from the data region (the first 64-byte boundary after
the body), so it does not depend on the body's own length. The raw bytes live after the body, not inside the
extension, because msgpack-python hands extension data to its hook as a fresh ``bytes`` copy.
Keeping them outside lets the decoder return ``torch.frombuffer`` views on the received buffer itself: a 4 MiB
prompt embedding is never copied.
The same framing serves NATS payloads and the tensor link between DiT stages. Only the tensor link between two
stages on one GPU (``services/link_cuda.py``) may carry a device tensor as a ``DEVICE_EXT`` extension instead: a
map of IPC fields naming memory the peer maps, no bytes at all; a decoder not given an opener refuses it.

Every way a frame can be wrong raises ``ProtocolError`` and nothing else.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from proto.errors import ProtocolError

MAGIC = b"RH"
FRAME_FORMAT = 1
TENSOR_EXT = 1
DEVICE_EXT = 2
ALIGN = 64
_HEADER = struct.Struct("<2sBBI")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts; defaults match ``ProtoSettings``."""

    max_message_bytes: int = 8 * 1024 * 1024
    max_tensor_bytes: int = 64 * 1024 * 1024
    max_tensor_dims: int = 8
    max_container_len: int = 1 << 16
    max_str_bytes: int = 1 << 20

    @classmethod
    def from_settings(cls, proto: Any) -> Limits:
        return cls(
            max_message_bytes=proto.max_message_bytes,
            max_tensor_bytes=proto.max_tensor_bytes,
            max_tensor_dims=proto.max_tensor_dims,
        )


DEFAULT_LIMITS = Limits()


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as a flat byte view (one device→host copy for GPU tensors, none on CPU)."""
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(f"tensor dtype {t.dtype} has no wire encoding")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


DeviceShare = Callable[[torch.Tensor], "dict[str, Any] | None"]
"""A tensor's IPC fields for a peer on the same device, or None: this tensor goes as bytes."""
DeviceOpen = Callable[[dict[str, Any]], torch.Tensor]
"""IPC fields → the tensor they name (raises on fields it will not map)."""


def encode_parts(body: dict[str, Any], *, default: Callable[[Any], Any] | None = None,
                 device: DeviceShare | None = None) -> list[memoryview | bytes]:
    """Encode a body into frame parts (header+body, padding, tensor views) for scatter-gather sends; ``device``
    (same-GPU tensor link only) turns the tensors it shares into IPC fields."""
    tensors: list[memoryview] = []
    offsets: list[int] = []  # relative to the data region
    cursor = 0

    def _default(obj: Any) -> Any:
        nonlocal cursor
        if isinstance(obj, torch.Tensor):
            shared = device(obj) if device is not None else None
            if shared is not None:
                return msgpack.ExtType(DEVICE_EXT, msgpack.packb(shared, use_bin_type=True))
            raw = tensor_bytes(obj)
            tensors.append(raw)
            offsets.append(cursor)
            header = [DTYPE_NAMES[obj.dtype], list(obj.shape), cursor, raw.nbytes]
            cursor = _align(cursor + raw.nbytes)
            return msgpack.ExtType(TENSOR_EXT, msgpack.packb(header))
        if default is not None:
            return default(obj)
        raise TypeError(f"cannot encode {type(obj).__name__}")

    body_bytes = msgpack.Packer(default=_default, use_bin_type=True).pack(body)
    head = _HEADER.pack(MAGIC, FRAME_FORMAT, 0, len(body_bytes)) + body_bytes
    parts: list[memoryview | bytes] = [head]
    written = len(head)
    data_start = _align(written)
    for rel, raw in zip(offsets, tensors, strict=True):
        target = data_start + rel
        if target > written:
            parts.append(bytes(target - written))
            written = target
        parts.append(raw)
        written += raw.nbytes
    return parts


def encode_frame(body: dict[str, Any], *, default: Callable[[Any], Any] | None = None) -> bytes:
    """Encode a body (which may contain tensors anywhere) into one frame."""
    return b"".join(encode_parts(body, default=default))


def decode_frame(buf: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS,
                 device: DeviceOpen | None = None) -> Any:
    """Decode one frame into its body, with tensors as zero-copy views on ``buf`` (device tensors mapped by
    ``device``, when given: anything else refuses them).

    Tensors decoded from an immutable ``bytes`` buffer are read-only views: copy before writing in place.
    """
    try:
        view = memoryview(buf).cast("B")
    except TypeError as e:
        raise ProtocolError(f"frame is not a byte buffer: {type(buf).__name__}") from e
    n = view.nbytes
    if n > limits.max_message_bytes:
        raise ProtocolError(f"frame of {n} bytes exceeds the {limits.max_message_bytes}-byte limit")
    if n < _HEADER.size:
        raise ProtocolError(f"truncated frame: {n} bytes, header needs {_HEADER.size}")
    magic, fmt, _reserved, body_len = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if fmt != FRAME_FORMAT:
        raise ProtocolError(f"unknown frame format {fmt} (this build reads {FRAME_FORMAT})")
    body_end = _HEADER.size + body_len
    if body_end > n:
        raise ProtocolError(f"truncated frame: body declares {body_len} bytes, {n - _HEADER.size} present")
    data_start = _align(body_end)

    def ext_hook(code: int, data: bytes) -> torch.Tensor:
        if code == DEVICE_EXT and device is not None:
            return _device_tensor(data, device)
        if code != TENSOR_EXT:
            raise ProtocolError(f"unknown msgpack extension type {code}")
        try:
            dtype_name, shape, offset, nbytes = msgpack.unpackb(data, raw=False, max_array_len=64)
        except ProtocolError:
            raise
        except Exception as e:
            raise ProtocolError(f"malformed tensor header: {e}") from e
        return _tensor_view(view, data_start, dtype_name, shape, offset, nbytes, limits)

    try:
        return msgpack.unpackb(
            view[_HEADER.size:body_end],
            raw=False,
            ext_hook=ext_hook,
            strict_map_key=True,
            max_str_len=limits.max_str_bytes,
            max_bin_len=limits.max_message_bytes,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=1024,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, KeyError, UnicodeDecodeError, RecursionError,
            msgpack.UnpackException) as e:
        raise ProtocolError(f"malformed body: {type(e).__name__}: {e}") from e


def _device_tensor(data: bytes, device: DeviceOpen) -> torch.Tensor:
    try:
        fields = msgpack.unpackb(data, raw=False, max_array_len=64, max_map_len=32)
        if not isinstance(fields, dict):
            raise ProtocolError("device tensor fields are not a map")
        return device(fields)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"device tensor not mapped: {type(e).__name__}: {e}") from e


def _tensor_view(
    view: memoryview, data_start: int, dtype_name: Any, shape: Any, offset: Any, nbytes: Any, limits: Limits
) -> torch.Tensor:
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(f"unknown tensor dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"tensor shape must be a list of ints, got {shape!r}")
    if len(shape) > limits.max_tensor_dims:
        raise ProtocolError(f"tensor rank {len(shape)} exceeds {limits.max_tensor_dims}")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"negative tensor dimension in {shape}")
    if not isinstance(offset, int) or not isinstance(nbytes, int) or isinstance(offset, bool):
        raise ProtocolError("tensor offset and length must be ints")
    dtype = DTYPES[dtype_name]
    itemsize = dtype.itemsize
    numel = math.prod(shape)
    if numel * itemsize != nbytes:
        raise ProtocolError(f"tensor {dtype_name}{shape} needs {numel * itemsize} bytes, header says {nbytes}")
    if nbytes > limits.max_tensor_bytes:
        raise ProtocolError(f"tensor of {nbytes} bytes exceeds the {limits.max_tensor_bytes}-byte limit")
    start = data_start + offset
    if offset < 0 or start + nbytes > view.nbytes:
        raise ProtocolError(f"tensor bytes [{start}, {start + nbytes}) lie outside the frame's {view.nbytes} bytes")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # bytes from the network are immutable; the view is documented read-only
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(view, dtype=torch.uint8, count=nbytes, offset=start)
    return flat.view(dtype).view(shape)
