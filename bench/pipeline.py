"""Distributed vs single-process pipeline: sustained output FPS of the real stack against ``StreamPipeline``.

One run, the tiny model, the same input for both: the moving test pattern of ``ingest.testpattern``
(``pattern_frame``) at the model size.

1. **single** — ``StreamPipeline`` in this process (torch threads = ``--threads``), one stream, frames fed as fast
   as it takes them (4 per chunk, 5 for the prepare chunk), after a warm-up stream. ``fps`` = output frames after
   the first ``--skip`` output chunks / their wall time (steady state: no prepare, no stream-batch warm-up).
2. **distributed** — ``LocalStack`` (``rheo up``'s layout: nats-server, controller, ``--stages`` DiT stage
   processes over the tensor link, decoder, egress, ingest, gateway), the single process stopped first so both
   get the same cores. A stream is created through the gateway and the test pattern is published over RTMP in
   real time for ``--seconds``.

The distributed pipeline is paced by its input: it can never be faster than the publisher's frame rate. So the
publisher sends ``--overdrive`` × the single-process FPS (default 1.0; rounded up, at most 60, the API's limit):
as fast as the reference can process, so a distributed pipeline slower than the reference is saturated, and its
bounded queues (ingest's chunk queue, the first stage's queue) drop what it cannot take. The distributed ``fps`` is
its sustained processing rate: output frames in the decoder's debug tap (frames before H.264, written as each
chunk is decoded) after the first ``--skip`` chunks, over the time between the first and the last of them (file
times). ``capped: true`` marks a run whose output reached the input rate (the ratio is then a lower bound).
Overdriving further (``--overdrive 1.5``) measures overload instead: chunks the first stage drops from a full
queue were already encoded and sent, and that wasted work lowers the output (see BENCHMARKS.md).

One JSON line per result: ``single``, ``distributed``, and ``ratio`` (distributed / single; issue 6's target is
≥ 0.9). Run it on an otherwise idle machine: every process of the stack competes for the same cores.

    python bench/pipeline.py                 # CPU: tiny model at 64x64, 2 steps, 2 DiT stages
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_commit, stop_on_sigterm  # noqa: E402
from ingest.testpattern import pattern_frame  # noqa: E402
from pipeline.loading import build_tiny_pipeline  # noqa: E402
from pipeline.pipeline import PipelineConfig, StreamPipeline  # noqa: E402
from pipeline.state import StreamSpec  # noqa: E402
from services.stack import LocalStack, Ports  # noqa: E402

SEED = 7


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _pattern(n: int, size: int, fps: float) -> np.ndarray:
    return np.stack([pattern_frame(i, size, size, fps) for i in range(n)])


def run_single(pipe: StreamPipeline, frames: np.ndarray, skip: int) -> dict:
    """One stream through ``push`` as fast as it goes; steady FPS after ``skip`` output chunks."""
    sid = pipe.open_stream(StreamSpec("a test pattern in watercolour", seed=SEED))
    outputs: list[tuple[float, int]] = []  # (time, frames) per push that produced frames
    cpu0 = time.process_time()
    fed = 0
    while fed + 4 <= len(frames):
        n = 5 if fed == 0 else 4
        got = pipe.push(sid, frames[fed : fed + n])
        fed += n
        if len(got):
            outputs.append((time.perf_counter(), len(got)))
    pipe.close_stream(sid)
    row = _steady(outputs, skip)
    row["cpu_ms_per_chunk"] = round(1000 * (time.process_time() - cpu0) / len(outputs), 1)
    return row


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the test pattern publisher)."""
    usage = os.times()
    return usage.children_user + usage.children_system


def _steady(outputs: list[tuple[float, int]], skip: int) -> dict:
    """FPS over output chunks ``skip``.. : frames after the first of them / time from the first to the last."""
    window = outputs[skip:]
    if len(window) < 3:
        raise SystemExit(f"too few output chunks to measure ({len(outputs)}); run longer")
    frames = sum(n for _, n in window[1:])
    seconds = window[-1][0] - window[0][0]
    return {"fps": round(frames / seconds, 2), "chunks": len(window), "seconds": round(seconds, 2)}


def run_distributed(work: Path, stages: int, size: int, steps: int, fps: int, seconds: float, skip: int,
                    threads: int | None) -> dict:
    env = {"RHEO_DECODER__DEBUG_TAP_DIR": str(work / "tap-out"), "RHEO_INGEST__STREAM_LINGER_S": "1"}
    stack = LocalStack(work, stages=stages, ports=Ports.ephemeral(), extra_env=env, torch_threads=threads)
    t0 = time.perf_counter()
    try:
        stack.start(timeout=300)
        start_s = time.perf_counter() - t0
        created = stack.api("POST", "/v1/streams", {"prompt": "a test pattern in watercolour", "width": size,
                                                    "height": size, "fps": fps, "steps": steps, "seed": SEED,
                                                    "slo_latency_ms": 600000})
        sid = created["id"]
        url = f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/{created['stream_key']}"
        cpu0 = {p.name: _cpu_seconds(p.popen.pid) for p in stack.procs if p.popen is not None}
        out = subprocess.run([sys.executable, "-m", "ingest.testpattern", url, "--size", f"{size}x{size}",
                              "--fps", str(fps), "--seconds", str(seconds)], capture_output=True, text=True,
                             timeout=seconds + 120, cwd=ROOT)
        out_cpu = _children_cpu()
        if out.returncode:
            raise SystemExit(f"test pattern publisher failed: {out.stderr}")
        deadline = time.monotonic() + 120
        while stack.api("GET", f"/v1/streams/{sid}")["state"] != "ended" and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3.0)  # the ring's last chunks
        cpu = {p.name: _cpu_seconds(p.popen.pid) - cpu0[p.name] for p in stack.procs if p.popen is not None}
        tap = sorted((work / "tap-out" / sid).glob("*.npy"), key=lambda p: int(p.stem))
        outputs = sorted((p.stat().st_mtime, int(np.load(p, mmap_mode="r").shape[0])) for p in tap)
        published = None
        for line in (work / "logs" / "ingest.log").read_text(errors="replace").splitlines():
            if f"stream {sid} ended after chunk" in line:
                published = line.rsplit("(", 1)[-1].rstrip(")")
        row = _steady(outputs, skip)
        per_chunk = {name: round(1000 * c / len(tap), 1) for name, c in cpu.items()}
        row.update(cpu_ms_per_chunk=round(sum(per_chunk.values()), 1), cpu_ms_per_chunk_by_service=per_chunk,
                   publisher_cpu_s=round(out_cpu, 1), chunks_out=len(tap),
                   input_chunks=math.floor((seconds * fps - 5) / 4) + 1, ingest=published,
                   stack_start_s=round(start_s, 1))
        return row
    finally:
        stack.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="model size (square)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--stages", type=int, default=2, help="DiT stage processes")
    p.add_argument("--seconds", type=float, default=30.0, help="distributed: seconds of input published")
    p.add_argument("--frames", type=int, default=161, help="single: input frames (1 + 4k)")
    p.add_argument("--overdrive", type=float, default=1.0, help="input fps = this × the single-process fps")
    p.add_argument("--skip", type=int, default=3, help="output chunks left out of the steady-state window")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the single process")
    p.add_argument("--service-threads", type=int, default=1,
                   help="torch threads of every service process (LocalStack's default: 1; 0: torch's, one per core)")
    args = p.parse_args()
    stop_on_sigterm()

    torch.set_num_threads(args.threads)
    common = {"bench": "pipeline", "preset": "tiny", "device": "cpu", "size": f"{args.size}x{args.size}",
              "steps": args.steps, "cpus": os.cpu_count(), "commit": git_commit()}
    pipe = build_tiny_pipeline(PipelineConfig(width=args.size, height=args.size, steps=args.steps, output="float"))
    warm = _pattern(21, args.size, 16)
    run_single(pipe, warm, skip=0)
    single = run_single(pipe, _pattern(args.frames, args.size, 16), args.skip)
    del pipe
    _emit({**common, "mode": "single", "threads": args.threads, **single})

    fps = min(60, math.ceil(single["fps"] * args.overdrive))
    with tempfile.TemporaryDirectory(prefix="rheo-bench-") as tmp:
        dist = run_distributed(Path(tmp), args.stages, args.size, args.steps, fps, args.seconds, args.skip,
                               args.service_threads)
    capped = dist["fps"] >= 0.95 * fps
    _emit({**common, "mode": "distributed", "stages": args.stages, "input_fps": fps,
           "service_threads": args.service_threads or "torch default", "capped": capped, **dist})
    _emit({**common, "mode": "ratio", "stages": args.stages, "ratio": round(dist["fps"] / single["fps"], 3),
           "target": 0.9, "lower_bound": capped})


if __name__ == "__main__":
    main()
