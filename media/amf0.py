"""AMF0: the value encoding of RTMP command and data messages (only what publishers send and expect back)."""

from __future__ import annotations

import struct
from typing import Any


class AmfError(ValueError):
    """The bytes are not valid AMF0 (or nest deeper than a publisher ever needs)."""


class Undefined:
    """AMF0 ``undefined`` (distinct from ``null``, which is ``None``)."""

    _instance: Undefined | None = None

    def __new__(cls) -> Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "Undefined"


UNDEFINED = Undefined()

_NUMBER, _BOOL, _STRING, _OBJECT, _NULL, _UNDEFINED, _ECMA_ARRAY, _OBJECT_END, _STRICT_ARRAY, _DATE, _LONG_STRING = (
    0x00,
    0x01,
    0x02,
    0x03,
    0x05,
    0x06,
    0x08,
    0x09,
    0x0A,
    0x0B,
    0x0C,
)
_MAX_DEPTH = 16


def decode_all(data: bytes) -> list[Any]:
    """Every AMF0 value in ``data``, in order."""
    view = memoryview(data)
    out: list[Any] = []
    pos = 0
    while pos < len(view):
        value, pos = _decode(view, pos, 0)
        out.append(value)
    return out


def _need(view: memoryview, pos: int, n: int) -> None:
    if pos + n > len(view):
        raise AmfError(f"truncated AMF0 value at byte {pos}")


def _string(view: memoryview, pos: int, long: bool = False) -> tuple[str, int]:
    width = 4 if long else 2
    _need(view, pos, width)
    n = int.from_bytes(view[pos : pos + width], "big")
    pos += width
    _need(view, pos, n)
    return bytes(view[pos : pos + n]).decode("utf-8", errors="replace"), pos + n


def _properties(view: memoryview, pos: int, depth: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while True:
        _need(view, pos, 3)
        if view[pos] == 0 and view[pos + 1] == 0 and view[pos + 2] == _OBJECT_END:
            return out, pos + 3
        key, pos = _string(view, pos)
        out[key], pos = _decode(view, pos, depth + 1)


def _decode(view: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_DEPTH:
        raise AmfError("AMF0 nesting too deep")
    _need(view, pos, 1)
    marker = view[pos]
    pos += 1
    if marker == _NUMBER:
        _need(view, pos, 8)
        return struct.unpack_from(">d", view, pos)[0], pos + 8
    if marker == _BOOL:
        _need(view, pos, 1)
        return view[pos] != 0, pos + 1
    if marker == _STRING:
        return _string(view, pos)
    if marker == _LONG_STRING:
        return _string(view, pos, long=True)
    if marker == _OBJECT:
        return _properties(view, pos, depth)
    if marker == _ECMA_ARRAY:
        _need(view, pos, 4)
        return _properties(view, pos + 4, depth)
    if marker == _STRICT_ARRAY:
        _need(view, pos, 4)
        n = int.from_bytes(view[pos : pos + 4], "big")
        pos += 4
        if n > len(view) - pos:
            raise AmfError(f"strict array declares {n} items in {len(view) - pos} bytes")
        items = []
        for _ in range(n):
            item, pos = _decode(view, pos, depth + 1)
            items.append(item)
        return items, pos
    if marker == _NULL:
        return None, pos
    if marker == _UNDEFINED:
        return UNDEFINED, pos
    if marker == _DATE:
        _need(view, pos, 10)
        return struct.unpack_from(">d", view, pos)[0], pos + 10
    raise AmfError(f"unsupported AMF0 marker 0x{marker:02x}")


def encode(*values: Any) -> bytes:
    """AMF0 bytes of ``values`` (numbers, bools, str, None, UNDEFINED, dicts, lists)."""
    return b"".join(_encode(v) for v in values)


def _encode_str(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def _encode(value: Any) -> bytes:
    if value is None:
        return bytes([_NULL])
    if value is UNDEFINED:
        return bytes([_UNDEFINED])
    if isinstance(value, bool):
        return bytes([_BOOL, int(value)])
    if isinstance(value, int | float):
        return bytes([_NUMBER]) + struct.pack(">d", float(value))
    if isinstance(value, str):
        raw = value.encode()
        if len(raw) > 0xFFFF:
            return bytes([_LONG_STRING]) + len(raw).to_bytes(4, "big") + raw
        return bytes([_STRING]) + _encode_str(value)
    if isinstance(value, dict):
        body = b"".join(_encode_str(str(k)) + _encode(v) for k, v in value.items())
        return bytes([_OBJECT]) + body + b"\x00\x00" + bytes([_OBJECT_END])
    if isinstance(value, list | tuple):
        return bytes([_STRICT_ARRAY]) + len(value).to_bytes(4, "big") + b"".join(_encode(v) for v in value)
    raise TypeError(f"cannot encode {type(value).__name__} as AMF0")
