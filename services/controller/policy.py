"""When to rebalance, and whether a stream fits: the controller's two decisions, free of I/O.

Rebalance: act only when the predicted gain (slowest stage now vs after) has stayed at or above a threshold for a
sustained window, and never within a cool-down after any block-map change (hysteresis: measurement noise and the
transient after a move do not make the map flap). Admission: a stream fits when every measured bottleneck of the
path (VAE encode, the DiT stages, VAE decode) holds every admitted stream's rate plus the newcomer's, and one chunk
fits the newcomer's latency SLO.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from proto import StreamSpec
from proto.clock import ChunkClock

__all__ = [
    "ADMISSION_QUEUE_KEY",
    "LATENCY_SHARE",
    "AdmissionDecision",
    "Fit",
    "PathCosts",
    "RebalancePolicy",
    "RebalanceVerdict",
    "StreamNeed",
    "admission_key",
    "batch_reached",
    "decide_admission",
    "ring_item_ms",
    "stream_items_per_s",
    "stream_need",
]

Verdict = Literal["hold", "pending", "cooldown", "act"]


@dataclass(frozen=True)
class RebalanceVerdict:
    verdict: Verdict
    gain: float
    reason: str


class RebalancePolicy:
    def __init__(self, gain_threshold: float, sustain_s: float, cooldown_s: float) -> None:
        self.gain_threshold, self.sustain_s, self.cooldown_s = gain_threshold, sustain_s, cooldown_s
        self.pending_since: float | None = None
        self.last_change = -math.inf

    def note_change(self, now: float) -> None:
        """A block-map change (of any reason) happened: start the cool-down, forget a pending gain."""
        self.last_change = now
        self.pending_since = None

    def decide(self, now_ms: float | None, best_ms: float | None, now: float) -> RebalanceVerdict:
        """``now_ms``/``best_ms``: predicted slowest-stage time of the current map and of the best one (None: no
        usable estimate, which resets the sustain window)."""
        if now_ms is None or best_ms is None or now_ms <= 0:
            self.pending_since = None
            return RebalanceVerdict("hold", 0.0, "no estimate of every stage in this epoch")
        gain = (now_ms - best_ms) / now_ms
        if gain < self.gain_threshold or gain <= 0:
            self.pending_since = None
            return RebalanceVerdict("hold", gain, f"gain {gain:.1%} below {self.gain_threshold:.1%}")
        if self.pending_since is None:
            self.pending_since = now
        held = now - self.pending_since
        if held < self.sustain_s:
            return RebalanceVerdict("pending", gain, f"gain {gain:.1%} held {held:.1f}s of {self.sustain_s:.1f}s")
        since = now - self.last_change
        if since < self.cooldown_s:
            return RebalanceVerdict("cooldown", gain, f"gain {gain:.1%}; {since:.1f}s since the last change, "
                                                      f"cool-down {self.cooldown_s:.1f}s")
        return RebalanceVerdict("act", gain, f"gain {gain:.1%} held {held:.1f}s")


def stream_items_per_s(spec: StreamSpec) -> float:
    """Ring items a stream needs per second: a chunk per ``input_frames_per_chunk`` frames, ``steps`` items each."""
    return spec.slo.target_fps / ChunkClock().input_frames_per_chunk * spec.steps


@dataclass(frozen=True)
class StreamNeed:
    """What an admitted stream asks of each bottleneck per second."""

    items_per_s: float
    decode_mpx_per_s: float = 0.0
    """Model-size megapixel-frames per second the decoder decodes (and ingest encodes, V2V)."""
    t2v: bool = False
    """Nothing to encode."""
    steps: int = 1
    """Denoising steps: items of the stream one micro-step can hold (one per step slot)."""
    slo_ms: float = math.inf
    """Its latency SLO (``slo.max_latency_ms``): bounds the batch its ring may be priced at."""

    @property
    def encode_mpx_per_s(self) -> float:
        return 0.0 if self.t2v else self.decode_mpx_per_s


def stream_need(spec: StreamSpec) -> StreamNeed:
    return StreamNeed(stream_items_per_s(spec), spec.width * spec.height / 1e6 * spec.fps, spec.t2v, spec.steps,
                      spec.slo.max_latency_ms)


def batch_reached(needs: Iterable[StreamNeed], max_items: int) -> int:
    """The largest micro-step these streams' items form at the first stage: one item per (stream, step slot) at
    the heads of its queues, at most ``dit_stage.max_batch_items`` (a saturated ring runs batches of this size)."""
    return max(1, min(max_items, sum(n.steps for n in needs)))


Fit = tuple[float, float, int]
"""A stage's fitted micro-step time of one grid: a ms + b ms per item, and its items measured (``LatencyFit``)."""


LATENCY_SHARE = 0.5
"""Of a stream's latency SLO, what its ring traversals may take at the batch it is priced at (the rest: queueing,
the VAE, the links)."""


def ring_item_ms(stages: Sequence[Sequence[Fit]], needs: Iterable[StreamNeed], max_items: int) -> float | None:
    """A ring's ms per item for these streams: L(n)/n at the batch n they reach, L(n) = a + b·n the stages' fitted
    micro-step times (``StageStats.latency_fits``: the batcher's ``LatencyModel``). Grids do not share a forward:
    a grid with a share s_g of a stage's items forms micro-steps of n_g = min(s_g·Σ steps, max_items, x) items; x,
    the largest batch whose traversal T(x) = Σ over stages and grids of L(n_g) lets every stream's ``steps``
    traversals fit ``LATENCY_SHARE`` of its SLO (the knee keeps deadlines by running smaller batches). The price is
    the items' mean of L_g(n_g)/n_g at the slowest stage. None without a fit (the caller falls back to the measured
    ms per item). docs/scheduling.md, "Ring pricing"."""
    needs = list(needs)
    stages = [fits for fits in stages if sum(k for _, _, k in fits) > 0]
    if not stages:
        return None
    items = batch_reached(needs, 1 << 30)  # one item per (stream, step slot)
    budget = min((LATENCY_SHARE * n.slo_ms / n.steps for n in needs), default=math.inf)

    def sizes(fits: Sequence[Fit], x: int) -> list[tuple[float, float]]:
        total = sum(k for _, _, k in fits)
        return [(k / total, max(1.0, min(max_items, x, k / total * items))) for _, _, k in fits]

    def traversal(x: int) -> float:
        return sum(a + b * ng for fits in stages for (a, b, _), (_, ng) in zip(fits, sizes(fits, x), strict=True))

    x = next((x for x in range(max_items, 1, -1) if traversal(x) <= budget), 1)
    return max(sum(share * (a + b * ng) / ng for (a, b, _), (share, ng) in zip(fits, sizes(fits, x), strict=True))
               for fits in stages)


@dataclass(frozen=True)
class PathCosts:
    """Measured costs of the path besides the DiT's throughput (None: not measured yet, so not checked)."""

    encode_ms_per_mpx: float | None = None
    """VAE encode (+ motion estimate) time per megapixel-frame at the slowest ingest."""
    decode_ms_per_mpx: float | None = None
    """VAE decode + H.264 time per megapixel-frame at the slowest decoder."""
    ring_ms: float | None = None
    """One denoising step through every stage: the sum of the stages' micro-step times."""

    def chunk_latency_ms(self, spec: StreamSpec) -> tuple[float, str] | None:
        """(ms, breakdown) one steady chunk of ``spec`` takes through the measured path (None: nothing measured)."""
        frames = ChunkClock().input_frames_per_chunk
        mpx = spec.width * spec.height / 1e6 * frames
        parts = {"encode": 0.0 if spec.t2v else (self.encode_ms_per_mpx or 0.0) * mpx,
                 "DiT": spec.steps * (self.ring_ms or 0.0),
                 "decode": (self.decode_ms_per_mpx or 0.0) * mpx}
        if not any(parts.values()):
            return None
        return sum(parts.values()), ", ".join(f"{k} {v:.0f}" for k, v in parts.items() if v)


@dataclass(frozen=True)
class AdmissionDecision:
    admit: bool
    reason: str
    need_items_per_s: float
    capacity_items_per_s: float | None


def ring_capacity(item_ms: float | None, headroom: float) -> float:
    """Ring items per second a ring sustains at ``headroom`` when its slowest stage takes ``item_ms`` per item
    (``inf``: not measured)."""
    return headroom * 1000.0 / item_ms if item_ms else math.inf


def decide_admission(spec: StreamSpec, admitted: dict[str, StreamNeed], item_ms: float | None, *,
                     headroom: float, prior_streams: int, bottleneck: str = "",
                     costs: PathCosts | None = None, decoders_placed: bool = False,
                     rings: int = 1) -> AdmissionDecision:
    """May ``spec`` start, next to ``admitted``? Every measured bottleneck must hold, at ``headroom``:

    - its latency: one chunk through encode, the ring (``steps`` passes) and decode within the stream's SLO
      (otherwise every chunk would miss its deadline and the stream show nothing);
    - the VAE encode and decode: every admitted stream's megapixel-frames per second at the measured cost;
    - the DiT: ``item_ms`` is the slowest stage's measured ms per item (time per micro-step / items per micro-step);
      None before any stage reported a busy window: then at most ``prior_streams`` streams are admitted.
      Linear-in-items is conservative: a micro-step's fixed cost is spread over more items as batches grow.

    ``decoders_placed``: each stream has its own decoder (placement checks each one's room), so the decode sum
    over every stream against the slowest decoder is not applied (it holds only while every decoder decodes all).
    ``rings``: rings streams are placed over (each its own ``item_ms``-bounded bin; placement checks each one's
    room): the DiT sum and the prior are per ring, times ``rings``, with ``item_ms`` the slowest ring's.
    """
    others = {k: v for k, v in admitted.items() if k != spec.stream_id}
    mine = stream_need(spec)
    need = sum(v.items_per_s for v in others.values()) + mine.items_per_s
    costs = costs or PathCosts()
    latency = costs.chunk_latency_ms(spec)
    slo_ms = spec.slo.max_latency_ms
    if latency is not None and latency[0] > headroom * slo_ms:
        return AdmissionDecision(False, f"too slow for its latency SLO: one chunk takes ≈ {latency[0]:.0f} ms here "
                                        f"({latency[1]}) against slo.max_latency_ms {slo_ms:.0f}: use a smaller "
                                        "size, fewer steps or a larger latency budget", need, None)
    everyone = [*others.values(), mine]
    for what, ms, mpx in (
            ("VAE encode (ingest)", costs.encode_ms_per_mpx, sum(v.encode_mpx_per_s for v in everyone)),
            ("VAE decode (decoder)", None if decoders_placed else costs.decode_ms_per_mpx,
             sum(v.decode_mpx_per_s for v in everyone))):
        if ms is not None and mpx * ms / 1000.0 > headroom:
            return AdmissionDecision(False, f"no capacity: {what} would be {mpx * ms / 10:.0f}% busy with "
                                            f"{len(others) + 1} streams ({mpx:.2f} megapixel-frames/s at {ms:.1f} ms "
                                            f"each; limit {headroom:.0%})", need, None)
    if item_ms is None or item_ms <= 0:
        n = len(others) + 1
        prior = prior_streams * max(rings, 1)
        ok = n <= prior
        per = "" if rings <= 1 else f" ({prior_streams} per ring × {rings} rings)"
        return AdmissionDecision(ok, (f"{n} streams within the prior of {prior}{per} (no stage timing yet)" if ok
                                      else f"no capacity: {len(others)} streams admitted, and until the stages "
                                           f"report timing at most {prior}{per} are (controller."
                                           f"admission_prior_streams)"), need, None)
    capacity = ring_capacity(item_ms, headroom) * max(rings, 1)
    ok = need <= capacity
    detail = (f"{need:.1f} items/s for {len(others) + 1} streams vs {capacity:.1f} sustainable "
              f"({headroom:.0%} of the slowest stage {bottleneck or '?'} at {item_ms:.1f} ms per item"
              f"{f', × {rings} rings' if rings > 1 else ''})")
    return AdmissionDecision(ok, detail if ok else f"no capacity: {detail}", need, capacity)


ADMISSION_QUEUE_KEY = "admission_queue"
"""The ``rheo-controller`` key of the admission queue: stream → its position, of how many, and why it waits."""


def admission_key(stream_id: str) -> str:
    """Where the controller keeps its last admission answer for a stream (``rheo-controller`` bucket), for the API."""
    return f"admission.{stream_id}"
