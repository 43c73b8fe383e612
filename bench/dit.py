"""DiT stream-batch forward benchmark: one JSON line per (model, resolution, steps, streams).

One forward = every stream's B = steps slots through all blocks + head + x0, against full KV rings
(steady state: 6-frame window, 3 sinks, adaptive sinks on), 1 latent frame (4 video frames) per chunk.
It yields one finished chunk per stream, so output FPS = 4 · streams / forward time.
FLOPs use model.md §7 (linear + self-attn over the 6-frame window + cross over 512 cached tokens);
``pct_roofline`` is achieved TFLOP/s over the 790 TFLOP/s H100 bf16 peak model.md §7 assumes.

    python bench/dit.py                        # CPU: a tiny config, so the script never rots
    python bench/dit.py --device cuda          # real 1.3B and 14B configs, random bf16 weights
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_stage.forward import Forward, ForwardMode, make_forward
from dit_stage.model import CausalWanDiT, init_weights_
from dit_stage.state import SlotItem
from wan.config import WanDiTConfig
from wan.scheduler import SDV2_STEPS, FlowMatchScheduler

PEAK_TFLOPS = 790.0
WINDOW, SINK = 6, 3


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _build(cfg: WanDiTConfig, device: torch.device, dtype: torch.dtype) -> CausalWanDiT:
    with torch.device("meta"):
        model = CausalWanDiT(cfg)
    model = model.to(dtype).to_empty(device=device)  # never materialise fp32 weights (14B: 57 GB)
    init_weights_(model, std=0.02)
    return model.eval()


def _kv_bytes(cfg: WanDiTConfig, tokens: int, slots: int, dtype: torch.dtype) -> int:
    return slots * cfg.num_layers * 2 * tokens * WINDOW * cfg.dim * torch.finfo(dtype).bits // 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(
    call: Forward,
    name: str,
    height: int,
    width: int,
    steps: int,
    streams: int,
    iters: int,
    warmup: int,
    check_syncs: bool,
) -> dict:
    model = call.model
    cfg, dev, dtype = model.config, model.device, model.dtype
    lh, lw = height // 8, width // 8
    tokens = cfg.tokens_per_frame(lh, lw)
    row = {
        "bench": "dit",
        "model": name,
        "res": f"{height}x{width}",
        "steps": steps,
        "streams": streams,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "mode": {"eager": "eager", "graph": "cuda_graph", "compile": "cuda_graph+compile"}[call.mode],
    }
    slots = steps * streams
    if dev.type == "cuda":
        need = _kv_bytes(cfg, tokens, slots, dtype) + slots * tokens * cfg.ffn_dim * 2 * 4 + (1 << 30)
        free, _ = torch.cuda.mem_get_info(dev)
        if need > free:
            return row | {"skipped": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
    gen = torch.Generator(device=dev).manual_seed(0)
    states = []
    for s in range(streams):
        state = model.new_state(f"s{s}", steps, (lh, lw), WINDOW, SINK, adaptive_threshold=0.2)
        ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, generator=gen)
        model.set_prompt(state, ctx)
        for b in state.shard.blocks:  # steady state: a full ring, frames 0..5 held
            state.shard.frame_pos[b].copy_(torch.arange(WINDOW, device=dev).expand(steps, -1))
            state.shard.k[b].normal_(generator=gen)
            state.shard.v[b].normal_(generator=gen)
        state.shard.frames_end = [WINDOW] * steps
        states.append(state)
    sched = FlowMatchScheduler()
    ts = [float(t) for t in SDV2_STEPS[:steps]]
    x = torch.randn(slots, cfg.in_dim, 1, lh, lw, device=dev, generator=gen)
    grid = model.grid_of(1, lh, lw)
    frame = [WINDOW]

    def forward() -> torch.Tensor:
        a = frame[0]
        rope = 5 + (a - 5) % 45  # SDv2 refresh cycle; any position inside the table costs the same
        items = [SlotItem(st, k, a, rope, ts[k]) for st in states for k in range(steps)]
        frame[0] += 1
        return call(x, items, grid, noisy=x, sigmas=[sched.sigma(t) for t in ts] * streams)

    for _ in range(warmup):
        forward()
    _sync(dev)
    if check_syncs and dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            forward()
            row["host_syncs"] = "none"
        except RuntimeError as err:
            row["host_syncs"] = f"found: {str(err).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _sync(dev)
    if dev.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            out = forward()
        stop.record()
        _sync(dev)
        ms = start.elapsed_time(stop) / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            out = forward()
        ms = (time.perf_counter() - t0) * 1000 / iters
    flops = slots * CausalWanDiT.flops_per_item(cfg, tokens, 1, WINDOW, cfg.num_layers)
    tflops = flops / (ms / 1000) / 1e12
    row |= {
        "ms_per_forward": round(ms, 3),
        "output_fps": round(4 * streams / (ms / 1000), 2),
        "tflop_per_forward": round(flops / 1e12, 6),
        "achieved_tflops": round(tflops, 4),
        "pct_roofline": round(100 * tflops / PEAK_TFLOPS, 1),
        "finite": bool(torch.isfinite(out).all()),
    }
    if dev.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None, help="comma list of 1.3b, 14b, tiny")
    p.add_argument("--res", default=None, help="comma list of HxW in pixels")
    p.add_argument("--steps", default=None, help="comma list, e.g. 1,2,4")
    p.add_argument("--streams", default=None, help="comma list, e.g. 1,2,4")
    p.add_argument("--layers", type=int, default=None, help="override the block count (CPU smoke runs)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-sync-check", action="store_true")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--eager", action="store_true", help="no CUDA graphs (measures launch-bound eager mode)")
    speed.add_argument("--compile", action="store_true", help="CUDA graphs over torch.compiled block pieces")
    args = p.parse_args()
    dev = torch.device(args.device)
    cpu = dev.type == "cpu"
    models = (args.models or ("tiny" if cpu else "1.3b,14b")).split(",")
    res_arg = args.res or ("64x64" if cpu else "512x512,480x832")
    res = [tuple(int(v) for v in r.split("x")) for r in res_arg.split(",")]
    steps = [int(v) for v in (args.steps or ("1,2" if cpu else "1,2,4")).split(",")]
    streams = [int(v) for v in (args.streams or ("1,2" if cpu else "1,2,4")).split(",")]
    iters = args.iters or (2 if cpu else 10)
    dtype = torch.float32 if cpu else torch.bfloat16
    mode: ForwardMode = "eager" if args.eager else "compile" if args.compile else "graph"
    torch.manual_seed(0)
    _emit({"bench": "dit", "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__})
    for name in models:
        cfg = WanDiTConfig.named(name)
        if args.layers:
            cfg = cfg.with_layers(args.layers)
        call = make_forward(_build(cfg, dev, dtype), mode)
        for h, w in res:
            for b in steps:
                for n in streams:
                    heavy = cfg.dim >= 5120 and b * n > 4
                    it = max(2, iters // 3) if heavy else iters
                    _emit(bench_one(call, name, h, w, b, n, it, args.warmup, not args.no_sync_check))
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(dev)
        del call
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
