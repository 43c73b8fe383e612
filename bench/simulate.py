"""The cluster simulator: rheo's batcher, admission, placement and autoscaler against simulated H100 GPUs.

A discrete-event simulation (no real time; bench/sim/): streamers arrive (Poisson, diurnal, bursty; mixed sizes,
steps and latency SLOs), are admitted and placed by the controller's code, their chunks go through ingest GPUs
(VAE encode), rings (the DiT; the first stage's batcher) and decoder GPUs (VAE decode), whose costs are calibrated
from BENCHMARKS.md's H100 rows (bench/sim/calibration.py says which). One JSON line per scenario × policy, and a
PNG of GPUs and attainment over time. Policies: ``edf_knee`` (rheo), ``static_batch`` (greedy, cap 16, no SLO),
``no_admission``, ``one_per_gpu`` (the official code). docs/scheduling.md (Cluster simulator) reads the results.

    python bench/simulate.py                          # every scenario, both calibrations; PNG in docs/img/
    python bench/simulate.py --scenario diurnal --policy edf_knee one_per_gpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sim.calibration import CALIBRATIONS  # noqa: E402
from bench.sim.cluster import POLICIES, SimConfig, Simulation  # noqa: E402
from bench.sim.report import plot, summary  # noqa: E402
from bench.sim.traces import trace  # noqa: E402

SCENARIOS = {
    # name: (trace kind, horizon s, rate per s (diurnal: the peak), extra trace arguments)
    "poisson": ("poisson", 1800.0, 0.15, {}),
    "diurnal": ("diurnal", 7200.0, 0.3, {"day_s": 7200.0}),  # a day compressed into 2 simulated hours
    "bursty": ("bursty", 1800.0, 0.08, {"burst_size": 15, "burst_every_s": 400.0}),
}


def run(scenario: str, policy: str, calibration: str, seed: int, cfg: SimConfig | None = None) -> Simulation:
    kind, horizon, rate, extra = SCENARIOS[scenario]
    arrivals = trace(kind, horizon_s=horizon, rate_per_s=rate, seed=seed, **extra)
    return Simulation(POLICIES[policy], CALIBRATIONS[calibration], arrivals, horizon, seed, cfg).run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--policy", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--calibration", nargs="+", default=list(CALIBRATIONS), choices=list(CALIBRATIONS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plot-dir", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args()
    for cal in args.calibration:
        print(json.dumps({"bench": "simulate", "calibration": CALIBRATIONS[cal].describe()}), flush=True)
        for scenario in args.scenario:
            sims = [run(scenario, p, cal, args.seed) for p in args.policy]
            for sim in sims:
                print(json.dumps(summary(sim, scenario, cal)), flush=True)
            if scenario == "diurnal":
                plot(sims, args.plot_dir / f"simulate-{scenario}-{cal}.png",
                     f"simulated cluster, {scenario} trace, calibration {cal} (H100 rows)")


if __name__ == "__main__":
    main()
