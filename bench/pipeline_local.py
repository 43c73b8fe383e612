"""Local (single-process) StreamPipeline benchmark: frames in → VAE encode → stream-batched DiT → VAE decode →
frames out, one JSON line per (preset, size, steps, streams).

Input is synthetic (a moving square over a texture), fed as fast as the pipeline takes it, offline-style: every
stream gets its next 4 frames (5 for the prepare chunk), then ``step_all`` runs one round (all streams' chunks in
one DiT forward), until ``--frames`` frames per stream are in; ``finish`` drains the slots. A warm-up stream runs
first (CUDA graphs are captured, kernels autotuned), so the numbers are a warm process's.

* ``fps``: output frames of all streams / wall time from the first frame fed to the last frame out.
* ``steady_fps``: the same after the first output frame (no prepare, no stream-batch warm-up).
* ``ttff_s``: first frame fed → first output frame (offline: the 5 prepare frames are all there at once; a live
  stream adds their capture time, 5/fps).
* ``vae_compile_max_diff`` (with ``--vae-compile`` on CUDA): the largest difference between the compiled VAE and an
  eager copy over a prepare chunk and the next chunk, encoded and decoded (``vae_agreement``), so a compiled row
  carries its own exactness check.

    python bench/pipeline_local.py                                # CPU: the tiny preset
    python bench/pipeline_local.py --device cuda --preset 1.3b    # 1.3B DiT + full-size Wan VAE, random weights

The 1.3b preset skips umT5 (its 11 GB of weights are not needed to time the video path): every prompt maps to one
fixed random [1, 512, 4096] embedding; the DiT's cross-attention K/V are computed from it as from a real one.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_stage.model import CausalWanDiT, init_weights_
from encoder.vae import StreamVAE
from pipeline.pipeline import FixedEmbedding, PipelineConfig, StreamPipeline
from pipeline.state import StreamSpec
from wan.config import WanDiTConfig


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _frames(n: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, (height // 16, width // 16, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    out = np.repeat(base[None], n, axis=0)
    side = max(8, height // 6)
    for i in range(n):
        x = (5 * i) % (width - side)
        out[i, height // 3 : height // 3 + side, x : x + side] = (250, 240, 30)
    return out


def build(preset: str, config: PipelineConfig, device: torch.device, dtype: torch.dtype, forward: str,
          vae_kind: str = "wan", vae_compile: bool = False):
    """(pipeline, note, eager VAE): the tiny preset, or real 1.3B/14B DiT shapes + the full-size VAE of ``vae_kind``
    (the Wan2.1 VAE, or TAEHV both ways: the fast mode) with random weights, as ``model.random_weights`` serves them;
    the eager VAE is an uncompiled copy when ``vae_compile`` compiled the pipeline's (else None)."""
    if preset == "tiny":
        from pipeline.loading import build_tiny_pipeline

        return build_tiny_pipeline(config, device=device, dtype=dtype, forward=forward), "tiny umT5 + tokenizer", None
    from encoder.vae_loading import StreamVAEConfig, compile_stream_vae, random_stream_vae

    cfg = WanDiTConfig.named(preset)
    with torch.device("meta"):
        dit = CausalWanDiT(cfg)
    dit = dit.to(dtype).to_empty(device=device)  # never materialise fp32 weights
    init_weights_(dit, std=0.02, generator=torch.Generator(device=device).manual_seed(0))
    vae = random_stream_vae(StreamVAEConfig(encoder=vae_kind, decoder=vae_kind), dtype=dtype, device=device)
    eager = None
    if vae_compile and device.type == "cuda":
        eager = copy.deepcopy(vae)  # before compiling: torch.compile wraps the modules, sharing their weights
        compile_stream_vae(vae)
    text = FixedEmbedding(cfg.text_len, cfg.text_dim)
    note = "umT5 skipped: one fixed random [1, 512, 4096] embedding for every prompt"
    return StreamPipeline(dit.eval(), vae, text, config, forward=forward), note, eager


@torch.no_grad()
def vae_agreement(vae: StreamVAE, reference: StreamVAE, height: int, width: int, seed: int = 7) -> float:
    """The largest absolute difference between two Stream-VAEs on one new stream: a prepare chunk (5 frames) and the
    next chunk (4), each encoded and the latents decoded, every output compared (latents and pixels)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(1, 3, 9, height, width, generator=g) * 2 - 1).to(vae.device, vae.dtype)
    a, b = vae.new_state(), reference.new_state()
    worst = 0.0
    for lo, hi in ((0, 5), (5, 9)):
        za, zb = vae.encode(a, x[:, :, lo:hi]), reference.encode(b, x[:, :, lo:hi])
        pa, pb = vae.decode(a, za), reference.decode(b, za)
        worst = max(worst, (za - zb).abs().max().item(), (pa - pb).abs().max().item())
    return worst


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_streams(pipe: StreamPipeline, streams: int, frames: int, seed: int) -> dict:
    cfg = pipe.config
    inputs = [_frames(frames, cfg.height, cfg.width, seed + s) for s in range(streams)]
    sids = [pipe.open_stream(StreamSpec(f"prompt {s}", seed=seed + s)) for s in range(streams)]
    device = pipe.device
    out_frames = 0
    first_out = None
    last_step = None
    frames_at_last_step = 0
    _sync(device)
    start = time.perf_counter()
    fed = 0
    while fed < frames:
        n = 5 if fed == 0 else 4
        for sid, video in zip(sids, inputs, strict=True):
            pipe.feed(sid, video[fed : fed + n])
        fed += n
        while pipe.ready():
            for got in pipe.step_all().values():
                out_frames += len(got)
                if len(got) and first_out is None:
                    first_out = time.perf_counter()
        last_step, frames_at_last_step = time.perf_counter(), out_frames
    for sid in sids:
        out_frames += len(pipe.finish(sid))
        pipe.close_stream(sid)
    _sync(device)
    end = time.perf_counter()
    assert first_out is not None and last_step is not None
    steady = (frames_at_last_step - len(sids) * 5) / max(last_step - first_out, 1e-9)
    return {
        "frames_out": out_frames,
        "fps": round(out_frames / (end - start), 2),
        "steady_fps": round(steady, 2),
        "ttff_s": round(first_out - start, 4),
        "seconds": round(end - start, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", choices=["tiny", "1.3b", "14b"], default=None, help="default: tiny on CPU, else 1.3b")
    p.add_argument("--size", default=None, help="comma list of WxH (default: 64x64,128x128 tiny; 512x512 else)")
    p.add_argument("--steps", default=None, help="comma list (default: 2 on CPU; 1,2,4 on CUDA)")
    p.add_argument("--streams", default="1,2", help="comma list")
    p.add_argument("--frames", type=int, default=None, help="input frames per stream (1 + 4k)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA)")
    p.add_argument("--forward", default="auto", choices=["auto", "eager", "graph", "compile"],
                   help="the DiT Forward's mode (auto: graph + compile on CUDA, eager on CPU)")
    p.add_argument("--vae", default="wan", choices=["wan", "taehv"],
                   help="the VAE both ways beyond the tiny preset: Wan2.1, or TAEHV (the fast mode)")
    p.add_argument("--vae-compile", action="store_true", help="torch.compile the VAE (encoder.compile; CUDA only)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = args.preset or ("tiny" if device.type == "cpu" else "1.3b")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sizes = args.size or ("64x64,128x128" if preset == "tiny" else "512x512")
    steps_list = [int(s) for s in (args.steps or ("2" if device.type == "cpu" else "1,2,4")).split(",")]
    frames = args.frames or (45 if preset == "tiny" else 69)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    for size in sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        for steps in steps_list:
            t0 = time.perf_counter()
            config = PipelineConfig(width=w, height=h, steps=steps)
            pipe, note, eager_vae = build(preset, config, device, dtype, args.forward, args.vae, args.vae_compile)
            load_s = time.perf_counter() - t0
            run_streams(pipe, 1, 21, seed=1000)  # warm-up: graph capture, autotuning, allocator
            agreement = {}
            if eager_vae is not None:
                agreement = {"vae_compile_max_diff": vae_agreement(pipe.vae, eager_vae, h, w)}
                del eager_vae
            for streams in [int(s) for s in args.streams.split(",")]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                row = run_streams(pipe, streams, frames, seed=0)
                _emit({
                    "bench": "pipeline_local", "preset": preset, "device": gpu or "cpu", "dtype": str(dtype)[6:],
                    "size": size, "steps": steps, "streams": streams, "frames_per_stream": frames,
                    "forward": args.forward, "vae": "tiny" if preset == "tiny" else args.vae,
                    "vae_compile": args.vae_compile and device.type == "cuda", **agreement, **row,
                    "build_s": round(load_s, 2),
                    "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if gpu else None,
                    "text_encoder": note,
                })  # fmt: skip
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
