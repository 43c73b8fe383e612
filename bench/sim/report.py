"""A simulation's result line (bench/common.py's conventions) and the PNG of GPUs and attainment over time."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from bench.common import git_commit, percentile
from bench.sim.cluster import Simulation

__all__ = ["plot", "summary"]

COLOURS = {"edf_knee": (31, 119, 180), "static_batch": (255, 127, 14), "no_admission": (214, 39, 40),
           "one_per_gpu": (90, 90, 90)}


def summary(sim: Simulation, scenario: str, calibration: str) -> dict[str, object]:
    c = sim.counts
    ended = c["ok"] + c["late"] + c["deadline_infeasible"]
    return {"bench": "simulate", "scenario": scenario, "policy": sim.policy.name, "calibration": calibration,
            "horizon_s": sim.horizon, "attainment": round(c["ok"] / ended, 4) if ended else None,
            "chunks": ended, "late": c["late"], "dropped_deadline_infeasible": c["deadline_infeasible"],
            "ttff_p99_s": round(percentile(sim.ttff, 99), 3) if sim.ttff else None,
            "streams_admitted": c["admitted"], "streams_refused": c["refused"], "refusals": c["refusals"],
            "gpu_hours": round(sim.gpu_seconds / 3600, 3), "gpus_mean": round(sim.gpu_seconds / sim.horizon, 2),
            "gpus_peak": max((p["gpus"] for p in sim.timeline), default=0),
            "gpus_mean_by_pool": {k: round(v / sim.horizon, 2) for k, v in sim.pool_seconds.items() if v},
            "busy_by_pool": {k: round(sim.busy_seconds[k] / v, 3) for k, v in sim.pool_seconds.items() if v},
            "moves": c["moves"],
            "scale_ups": c["scale_ups"], "scale_downs": c["scale_downs"], "commit": git_commit()}


def plot(sims: list[Simulation], path: Path, title: str) -> None:
    """Two panels over simulated time: GPUs in use, and the share of chunks on time per window."""
    w, h, pad = 900, 560, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    t_max = max(s.horizon for s in sims)
    g_max = max(max((p["gpus"] for p in s.timeline), default=1) for s in sims) or 1
    panels = [("GPUs", 20, 260, lambda p: p["gpus"] / g_max, f"0..{g_max}"),
              ("chunks on time per 30 s", 300, 520, lambda p: (p["attainment"] - 0.9) / 0.1, "90%..100%, clipped")]
    draw.text((pad, 4), title, fill="black")
    for name, top, bottom, y_of, scale in panels:
        draw.rectangle((pad, top, w - 10, bottom), outline="black")
        draw.text((pad + 4, top + 2), f"{name} ({scale})", fill="black")
        for sim in reversed(sims):  # the first policy (rheo's) drawn last, on top
            pts = [(pad + (w - 10 - pad) * p["t"] / t_max,
                    bottom - 8 - (bottom - top - 24) * min(max(y_of(p), 0.0), 1.0))
                   for p in sim.timeline if not (isinstance(p["attainment"], float) and math.isnan(y_of(p)))]
            if len(pts) > 1:
                draw.line(pts, fill=COLOURS.get(sim.policy.name, (0, 0, 0)), width=2)
    for i, sim in enumerate(sims):
        draw.text((pad + 160 * i, h - 30), sim.policy.name, fill=COLOURS.get(sim.policy.name, (0, 0, 0)))
    draw.text((w - 160, h - 30), f"t: 0..{t_max / 3600:.1f} h simulated", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
