"""Arrival traces of streamers (seeded): Poisson, diurnal (a day compressed), bursty; mixed sizes, steps, SLOs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["TRACES", "Arrival", "Mix", "trace"]


@dataclass(frozen=True)
class Arrival:
    t: float
    duration_s: float
    height: int
    width: int
    steps: int
    slo_ms: float
    fps: float = 16.0


@dataclass(frozen=True)
class Mix:
    """What streamers ask for: sizes, steps and latency SLOs with their shares; session lengths lognormal."""

    sizes: tuple[tuple[tuple[int, int], float], ...] = (((512, 512), 0.6), ((480, 832), 0.4))
    steps: tuple[tuple[int, float], ...] = ((1, 0.3), (2, 0.5), (4, 0.2))
    slos_ms: tuple[tuple[float, float], ...] = ((500.0, 0.3), (1000.0, 0.7))
    session_mean_s: float = 120.0
    session_sigma: float = 0.8


def _pick(rng: np.random.Generator, choices: tuple) -> object:
    p = np.array([w for _, w in choices], dtype=float)
    return choices[int(rng.choice(len(choices), p=p / p.sum()))][0]


def _draw(rng: np.random.Generator, t: float, mix: Mix) -> Arrival:
    mu = math.log(mix.session_mean_s) - mix.session_sigma ** 2 / 2  # lognormal with that mean
    (h, w) = _pick(rng, mix.sizes)  # type: ignore[misc]
    return Arrival(t, float(rng.lognormal(mu, mix.session_sigma)), h, w, int(_pick(rng, mix.steps)),  # type: ignore[arg-type]
                   float(_pick(rng, mix.slos_ms)))  # type: ignore[arg-type]


def trace(kind: str, *, horizon_s: float, rate_per_s: float, seed: int, mix: Mix | None = None,
          day_s: float | None = None, burst_size: int = 12, burst_every_s: float = 300.0) -> list[Arrival]:
    """Arrivals over ``horizon_s``. ``rate_per_s`` is the mean (poisson, bursty's background) or the peak
    (diurnal: a day of ``day_s`` simulated seconds, trough at 15 % of the peak, peak at mid-day)."""
    rng = np.random.default_rng(seed)
    mix = mix or Mix()
    out: list[Arrival] = []
    t = 0.0
    day = day_s or horizon_s
    while True:
        t += float(rng.exponential(1.0 / rate_per_s))
        if t >= horizon_s:
            break
        if kind == "diurnal":  # thinning of a peak-rate Poisson process
            if rng.random() > 0.15 + 0.85 * (1 - math.cos(2 * math.pi * t / day)) / 2:
                continue
        elif kind not in ("poisson", "bursty"):
            raise ValueError(f"unknown trace {kind!r}")
        out.append(_draw(rng, t, mix))
    if kind == "bursty":  # a crowd joins within seconds (a raid, a scheduled show)
        tb = float(rng.exponential(burst_every_s))
        while tb < horizon_s:
            out += [_draw(rng, tb + float(rng.uniform(0, 5.0)), mix) for _ in range(burst_size)]
            tb += float(rng.exponential(burst_every_s))
    return sorted(out, key=lambda a: a.t)


TRACES = ("poisson", "diurnal", "bursty")
