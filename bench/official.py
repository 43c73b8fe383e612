"""The official StreamDiffusionV2 code timed the way ``bench/pipeline_local.py`` times ours: the side-by-side slot.

``OFFICIAL_DIR`` names a copy of github.com/chenfengxu714/StreamDiffusionV2 fetched into an ignored folder (never
committed here). Its own single-GPU stream loop (``streamv2v.inference.SingleGPUInferencePipeline``: causal Wan
DiT with KV cache, its Stream-VAE, ``start_stream_session`` / ``run_stream_batch``) runs with random bf16 weights
at the 1.3B config: ``CausalWanModel.from_pretrained`` and the VAE loader build randomly initialised modules, and
umT5 is replaced by one fixed random ``[1, 512, 4096]`` embedding, as our bench does. Same warm-up (one throwaway
stream of ``--warmup-chunks`` chunks) and chunk count (``--frames``: the 5-frame prepare chunk, then 4-frame
chunks); ``steady_fps`` = output frames after the first output / their wall time, as ``pipeline_local`` reports.

Without ``OFFICIAL_DIR``, without the official code's own imports (``OFFICIAL_DEPS``) or without CUDA it prints one
line ``{"bench": "official", "skipped": "..."}``. Not yet run on a GPU: the patches follow the official code as of
2026-12-03 (c5a0f20); a failure prints ``{"error": ...}`` for that configuration and the suite goes on.
``--rheo-jsonl`` adds ``ratio`` lines: rheo / official FPS for the same (size, steps) from
``bench/pipeline_local.py`` rows in that file.

    OFFICIAL_DIR=.cache/official python bench/official.py --size 512x512 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_commit  # noqa: E402

CONFIG_1_3B = {"model_type": "t2v", "dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30,
               "in_dim": 16, "out_dim": 16, "text_len": 512, "text_dim": 4096}
"""Wan2.1-T2V-1.3B's DiT (its config.json)."""
OFFICIAL_DEPS = ("einops", "omegaconf", "torchvision", "ftfy")
"""What the official modules import beyond rheo's own dependencies (checked against its streamv2v.inference on
2026-12-03); a GPU machine without network needs them installed beforehand."""
TIMESTEPS = {1: [700, 0], 2: [700, 500, 0], 3: [700, 500, 400, 0], 4: [700, 500, 400, 200, 0]}
"""The official configs' denoising_step_list for 1–4 steps (configs/wan_causal_dmd_v2v*.yaml; 0 ends it)."""


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _random_weights() -> None:
    """Patch the official loaders: random modules instead of checkpoint files, a fixed prompt embedding."""
    import models.wan.wan_wrapper as wrapper
    import torch
    from models.wan.causal_model import CausalWanModel
    from models.wan.wan_base.modules.vae import WanVAE_

    def random_dit(cls, *_args, **_kwargs):
        torch.manual_seed(0)
        return CausalWanModel(**CONFIG_1_3B)

    def random_vae(pretrained_path=None, z_dim=16, **kwargs):
        torch.manual_seed(0)
        return WanVAE_(dim=96, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0)

    embedding = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(0))

    def text_init(self, model_type="T2V-1.3B"):
        torch.nn.Module.__init__(self)
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def text_forward(self, text_prompts):
        return {"prompt_embeds": embedding.to(self.anchor.device, torch.bfloat16).expand(len(text_prompts), -1, -1)}

    CausalWanModel.from_pretrained = classmethod(random_dit)
    # the causal wrapper's base __init__ loads the bidirectional WanModel first, then replaces it: a placeholder
    wrapper.WanModel.from_pretrained = classmethod(lambda cls, *_a, **_k: torch.nn.Identity())
    wrapper._video_vae = random_vae
    wrapper.WanTextEncoder.__init__ = text_init
    wrapper.WanTextEncoder.forward = text_forward


def run(official: Path, width: int, height: int, steps: int, frames: int, warmup_chunks: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(official))
    os.chdir(official)  # its loaders resolve paths against the project root
    torch.set_grad_enabled(False)  # as its main() does: else every chunk's activations stay alive in the KV cache
    _random_weights()
    from streamv2v.inference import SingleGPUInferencePipeline

    config = OmegaConf.load(official / "configs" / "wan_causal_dmd_v2v.yaml")
    config.update({"model_type": "T2V-1.3B", "height": height, "width": width, "t2v": False,
                   "denoising_step_list": TIMESTEPS[steps], "warp_denoising_step": False, "use_taehv": False,
                   "profile": False})
    device = torch.device("cuda")
    manager = SingleGPUInferencePipeline(config, device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def clip(n: int) -> torch.Tensor:
        return (torch.rand(1, 3, n, height, width, generator=g) * 2 - 1).to(device, torch.bfloat16)

    def stream(chunks: int) -> tuple[list[float], int]:
        """Times (after each chunk) and frames out of one stream of ``chunks`` chunks after the prepare chunk."""
        session, first = manager.start_stream_session("a test pattern in watercolour", clip(5), 0.7)
        torch.cuda.synchronize()
        times, out = [time.perf_counter()], len(first)
        for _ in range(chunks):
            got = manager.run_stream_batch(session, clip(4))
            torch.cuda.synchronize()
            times.append(time.perf_counter())
            out += sum(len(v) for v in got)
        return times, out

    stream(warmup_chunks)
    t0 = time.perf_counter()
    chunks = max(1, (frames - 5) // 4)
    times, out = stream(chunks)
    steady = times[steps:]  # the first output comes ``steps`` chunks in (stream batch warm-up)
    return {"fps": round(out / (times[-1] - t0), 2),
            "steady_fps": round(4 * (len(steady) - 1) / (steady[-1] - steady[0]), 2) if len(steady) > 1 else None,
            "frames_out": out, "chunks": chunks}


def ratios(path: Path, official_rows: list[dict]) -> list[dict]:
    """rheo / official steady FPS for each official row with a ``bench/pipeline_local.py`` row of the same
    size and steps (1 stream, the Wan VAE as the official code runs it) in ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    rheo = [r for r in rows if r.get("bench") == "pipeline_local" and r.get("vae", "wan") == "wan"]
    out = []
    for off in official_rows:
        for r in rheo:
            if (r.get("size") == off["size"] and r.get("steps") == off["steps"] and r.get("streams", 1) == 1
                    and r.get("steady_fps") and off.get("steady_fps")):
                out.append({"bench": "official_ratio", "size": off["size"], "steps": off["steps"],
                            "rheo_fps": r["steady_fps"], "rheo_vae_compile": r.get("vae_compile", False),
                            "official_fps": off["steady_fps"],
                            "ratio": round(r["steady_fps"] / off["steady_fps"], 3), "commit": git_commit()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512x512", help="comma list of WxH")
    ap.add_argument("--steps", default="2", help="comma list of 1–4")
    ap.add_argument("--frames", type=int, default=81, help="input frames of the timed stream (1 + 4k)")
    ap.add_argument("--warmup-chunks", type=int, default=8)
    ap.add_argument("--rheo-jsonl", type=Path, default=None, help="pipeline_local rows to print ratios against")
    args = ap.parse_args(argv)
    official = Path(os.environ.get("OFFICIAL_DIR", "")) if os.environ.get("OFFICIAL_DIR") else None
    if official is None or not (official / "streamv2v" / "inference.py").is_file():
        _emit({"bench": "official", "skipped": "official code not found (set OFFICIAL_DIR to a fetched copy of "
                                               "github.com/chenfengxu714/StreamDiffusionV2)"})
        return 0
    import importlib.util

    missing = [m for m in OFFICIAL_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        _emit({"bench": "official", "skipped": f"the official code's imports are missing: {', '.join(missing)} "
                                               f"(pip install {' '.join(missing)})"})
        return 0
    import torch

    if not torch.cuda.is_available():
        _emit({"bench": "official", "skipped": "the official code needs CUDA"})
        return 0
    rows = []
    for size in args.size.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        for steps in (int(s) for s in args.steps.split(",")):
            try:
                result = run(official.resolve(), w, h, steps, args.frames, args.warmup_chunks)
            except Exception as e:  # its code, our patches: say what broke, do not fail the suite
                _emit({"bench": "official", "size": size, "steps": steps, "error": f"{type(e).__name__}: {e}"})
                continue
            row = {"bench": "official", "size": size, "steps": steps, "model": "1.3b", "dtype": "bfloat16",
                   "gpu": torch.cuda.get_device_name(), **result, "commit": git_commit()}
            rows.append(row)
            _emit(row)
    if args.rheo_jsonl is not None and args.rheo_jsonl.is_file():
        for row in ratios(args.rheo_jsonl, rows):
            _emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
