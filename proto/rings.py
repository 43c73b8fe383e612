"""Ring ids and the stage ids of each ring: the one naming rule the controller, the stages and the chart share.

A ring (pipeline) is a gang of ``stages`` DiT stages holding every block between them. Rings are numbered
``"0"``, ``"1"``, …; ring r's stages are ``dit-<r·stages>`` … ``dit-<r·stages + stages − 1>``, so one StatefulSet
``dit`` with ``stages × rings`` pods is every ring (pod ``dit-k`` is position ``k mod stages`` of ring
``k div stages``), and scaling it by whole gangs adds or removes whole rings (docs/scheduling.md, Many rings).
"""

from __future__ import annotations

import re

__all__ = ["AUTO_RING", "DEFAULT_RING", "resolve_ring", "ring_of_stage", "ring_stage_ids"]

DEFAULT_RING = "0"
"""The ring of a single-ring deployment, and where a stream without a ring assignment runs."""
AUTO_RING = "auto"
"""``dit_stage.ring_id`` that means: from this stage's ordinal (the chart's setting)."""
_ORDINAL = re.compile(r"^dit-(\d+)$")


def ring_stage_ids(ring_id: str, stages: int) -> list[str]:
    """The stage ids of ring ``ring_id``, in ring order (a ring id that is not a plain number, ``"01"`` included,
    has none by this rule: it is not a ring the controller keeps a map for)."""
    if not ring_id.isdigit() or str(int(ring_id)) != ring_id:
        return []
    base = int(ring_id) * stages
    return [f"dit-{base + i}" for i in range(stages)]


def ring_of_stage(stage_id: str, stages: int) -> str | None:
    """The ring stage ``stage_id`` belongs to by its ordinal (None: not a ``dit-<n>`` id)."""
    m = _ORDINAL.match(stage_id)
    return str(int(m.group(1)) // max(stages, 1)) if m else None


def resolve_ring(configured: str, stage_id: str, stages: int) -> str:
    """A stage's ring: the configured id, or with ``auto`` its ordinal's (``DEFAULT_RING`` when it has none)."""
    if configured != AUTO_RING:
        return configured
    return ring_of_stage(stage_id, stages) or DEFAULT_RING
