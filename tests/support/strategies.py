"""Hypothesis strategies derived from the message classes themselves, so a new field is covered automatically."""

from __future__ import annotations

import types
import typing
from typing import Any

import annotated_types as at
import torch
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from proto.codec import DTYPES

INT64 = (-(2**63), 2**63 - 1)


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, at.Ge):
            out["min"] = m.ge
        elif isinstance(m, at.Gt):
            out["min_ex"] = m.gt
        elif isinstance(m, at.Le):
            out["max"] = m.le
        elif isinstance(m, at.Lt):
            out["max_ex"] = m.lt
        elif isinstance(m, at.MultipleOf):
            out["multiple_of"] = m.multiple_of
        elif isinstance(m, at.MinLen):
            out["min_len"] = m.min_length
        elif isinstance(m, at.MaxLen):
            out["max_len"] = m.max_length
        elif getattr(m, "pattern", None):
            out["pattern"] = m.pattern
    return out


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    n = 1
    for d in shape:
        n *= d
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).view(shape).clone()
    if dtype == torch.bool:
        t = t.view(torch.uint8).bool()  # only 0/1 are valid bools
    return t


def for_annotation(ann: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    b = _bounds(metadata)
    if origin is typing.Annotated:
        if args[0] is torch.Tensor:
            return tensors()
        return for_annotation(args[0], [*metadata, *ann.__metadata__])
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(for_annotation(a, metadata) for a in args))
    if ann is type(None):
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(for_annotation(args[0], []), max_size=5)
    if origin is dict:
        return st.dictionaries(for_annotation(args[0], []), for_annotation(args[1], []), max_size=4)
    if ann is bool:
        return st.booleans()
    if ann is bytes:
        return st.binary(max_size=64)
    if ann is int:
        lo = b.get("min", b["min_ex"] + 1 if "min_ex" in b else INT64[0])
        hi = b.get("max", b["max_ex"] - 1 if "max_ex" in b else INT64[1])
        m = b.get("multiple_of", 1)
        return st.integers(-(-lo // m), hi // m).map(lambda k: k * m)
    if ann is float:
        return st.floats(
            min_value=b.get("min", b.get("min_ex")), max_value=b.get("max", b.get("max_ex")),
            exclude_min="min_ex" in b, exclude_max="max_ex" in b, allow_nan=False,
        )
    if ann is str:
        if "pattern" in b:
            return st.from_regex(b["pattern"], fullmatch=True)
        return st.text(min_size=b.get("min_len", 0), max_size=min(b.get("max_len", 40), 40))
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return models(ann)
    if ann is torch.Tensor:
        return tensors()
    raise NotImplementedError(f"no strategy for {ann!r}")


def models(cls: type[BaseModel]) -> st.SearchStrategy[BaseModel]:
    """Valid instances of ``cls``: field draws within each field's bounds; those a cross-field validator refuses
    (e.g. ``RingConfig``'s sink < window) are filtered out."""
    fields = {name: for_annotation(f.annotation, list(f.metadata)) for name, f in cls.model_fields.items()}
    return st.fixed_dictionaries(fields).map(lambda kw: _build(cls, kw)).filter(lambda m: m is not None)


def _build(cls: type[BaseModel], kw: dict[str, Any]) -> BaseModel | None:
    try:
        return cls(**kw)
    except ValidationError:
        return None
