"""Checking a converted state dict against a model before loading it, with an error that names the keys."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def state_dict_mismatch(
    loaded: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], unknown: Iterable[str] = ()
) -> str | None:
    """None when ``loaded`` has exactly the keys and shapes of ``expected``; otherwise a message naming the
    missing, unexpected (including ``unknown`` source keys that had no translation) and wrongly shaped keys."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted([*unknown, *(k for k in loaded if k not in expected)])
    bad_shape = sorted(
        f"{k}: {tuple(loaded[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(loaded) & set(expected)
        if loaded[k].shape != expected[k].shape
    )
    if not (missing or unexpected or bad_shape):
        return None
    return (
        f"{len(missing)} missing {missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}, "
        f"{len(bad_shape)} wrong shape {bad_shape[:10]}"
    )
