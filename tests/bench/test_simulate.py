"""The cluster simulator (bench/simulate.py): tiny scenarios of rheo's own batcher, admission, placement and
autoscaler against the H100-calibrated cost model (a few seconds in all)."""

from __future__ import annotations

import dataclasses
import json

from PIL import Image

from bench.sim.calibration import CALIBRATIONS
from bench.sim.cluster import POLICIES, Policy, SimConfig, Simulation
from bench.sim.report import plot, summary
from bench.sim.traces import Arrival, trace
from services.controller.autoscale import ScaleLimits

WAN = CALIBRATIONS["wan"]


def _fixed(rings: int, decoders: int = 16, ingests: int = 8) -> SimConfig:
    """A cluster that does not scale: the batcher and admission alone decide."""
    return SimConfig(limits={"rings": ScaleLimits(rings, rings), "decoders": ScaleLimits(decoders, decoders),
                             "ingests": ScaleLimits(ingests, ingests)})


def _mixed(n: int, duration_s: float) -> list[Arrival]:
    """n streams joining within a second: both sizes, 1/2/4 steps, every other one a tight (400 ms) SLO."""
    return [Arrival(0.1 * k, duration_s, *((512, 512) if k % 3 else (480, 832)), steps=(1, 2, 4)[k % 3],
                    slo_ms=400.0 if k % 2 else 3000.0) for k in range(n)]


def _run(policy: Policy, arrivals: list[Arrival], cfg: SimConfig, horizon_s: float = 20.0) -> dict:
    return summary(Simulation(policy, WAN, arrivals, horizon_s, seed=1, cfg=cfg).run(), "test", "wan")


def test_a_tiny_scenario_runs_and_reports_well_formed_lines(tmp_path):
    arrivals = trace("diurnal", horizon_s=240.0, rate_per_s=0.1, seed=3, day_s=240.0)
    assert arrivals and len({(a.height, a.width) for a in arrivals}) == 2
    sims = [Simulation(POLICIES[p], WAN, arrivals, 240.0, seed=3).run() for p in ("edf_knee", "one_per_gpu")]
    for sim in sims:
        line = json.loads(json.dumps(summary(sim, "tiny", "wan")))
        assert line["bench"] == "simulate" and line["policy"] == sim.policy.name and line["commit"]
        c = sim.counts
        assert line["chunks"] == c["ok"] + c["late"] + c["deadline_infeasible"] > 0  # every chunk ends counted
        assert 0.0 <= line["attainment"] <= 1.0 and line["ttff_p99_s"] > 0 and line["gpu_hours"] > 0
        assert c["admitted"] + c["refused"] <= len(arrivals)
    assert sims[1].counts["admitted"] == len(arrivals)  # one GPU per stream: never refused
    plot(sims, tmp_path / "p.png", "tiny")
    assert Image.open(tmp_path / "p.png").size == (900, 560)


def test_edf_knee_beats_static_batch_on_a_mixed_slo_trace():
    """Ten mixed streams on one ring, admission off for both so the ring runs near its capacity: the batcher
    alone makes the difference (greedy batches by capture time up to 16 and keeps tight items waiting)."""
    arrivals = _mixed(10, 20.0)
    knee = _run(dataclasses.replace(POLICIES["edf_knee"], admission=False), arrivals, _fixed(1))
    static = _run(dataclasses.replace(POLICIES["static_batch"], admission=False), arrivals, _fixed(1))
    assert knee["chunks"] > 600 and static["chunks"] > 600
    assert knee["attainment"] >= static["attainment"] + 0.05, (knee, static)


def test_admission_refuses_rather_than_letting_attainment_collapse():
    """Fourteen streams for one ring: admission refuses some and keeps every admitted chunk on time; without
    admission (the negative control) attainment collapses."""
    arrivals = _mixed(14, 20.0)
    admitted = _run(POLICIES["edf_knee"], arrivals, _fixed(1))
    everyone = _run(POLICIES["no_admission"], arrivals, _fixed(1))
    assert admitted["refusals"] > 0 and admitted["streams_admitted"] < 14
    assert admitted["attainment"] >= 0.99, admitted
    assert everyone["streams_admitted"] == 14 and everyone["attainment"] < 0.6, everyone
