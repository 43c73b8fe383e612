"""Helpers of the decoder/egress service tests: latent chunks on the bus, LL-HLS read back and decoded with PyAV."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import httpx
import m3u8
import numpy as np
import torch

from decoder.service import frames_from_decoded
from encoder.vae import StreamVAE
from proto import LatentChunk, StreamEvent, Subjects
from services.bus import Bus
from support.playback import signed

Z_DIM = 4  # the tiny VAE's latent channels (wan.tiny.TINY_VAE_CONFIG)
SPATIAL = 8  # the tiny VAE's spatial factor


def random_latents(n_chunks: int, height: int, width: int, seed: int) -> list[torch.Tensor]:
    """[F, C, h, w] latents per chunk, as the last DiT stage sends them: 2 latent frames for chunk 0, then 1."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 if c == 0 else 1, Z_DIM, height // SPATIAL, width // SPATIAL, generator=g)
            for c in range(n_chunks)]


def latent_chunk(stream_id: str, seq: int, latent: torch.Tensor, fps: float = 16.0,
                 capture_lag_s: float = 0.0) -> LatentChunk:
    """Chunk ``seq`` as the last stage sends it, captured ``capture_lag_s`` before now."""
    now = time.time()
    start = 0 if seq == 0 else seq + 1
    return LatentChunk(stream_id=stream_id, seed=0, fps=fps, seq=seq, epoch=0, latent_start=start, rope_start=start,
                       capture_time=now - capture_lag_s, deadline=now + 30.0, prompt_version=0, noise_scale=0.8,
                       timesteps=[700], latent=latent)


async def feed_chunks(bus: Bus, stream_id: str, latents: list[torch.Tensor], fps: float,
                      skip: frozenset[int] = frozenset(), end: bool = True, pace: float | None = None,
                      capture_lag_s: float = 0.0) -> None:
    """Publish chunk c at its real-time slot (4 frames apart at ``pace``, default the stream's ``fps``) through a
    credit window, then the 'ended' event; each chunk says it was captured ``capture_lag_s`` before it is sent."""
    window = await bus.credit_window(Subjects.stream_x0(stream_id)).start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        for c, z in enumerate(latents):
            await asyncio.sleep(max(0.0, t0 + c * 4 / (pace or fps) - loop.time()))
            if c not in skip:
                await window.publish(latent_chunk(stream_id, c, z, fps, capture_lag_s))
    finally:
        await window.close()
    if end:
        await bus.publish(Subjects.stream_event(stream_id),
                          StreamEvent(stream_id=stream_id, kind="ended", seq=len(latents) - 1, at=time.time()))


def reference_frames(vae: StreamVAE, latents: list[torch.Tensor]) -> list[np.ndarray]:
    """What the decoder must tap: ``StreamVAE.decode`` of the same latents, in order, on a fresh stream state."""
    state = vae.new_state()
    return [frames_from_decoded(vae.decode(state, z.permute(1, 0, 2, 3).unsqueeze(0)))[0] for z in latents]


def load_tap(tap_dir: Path, stream_id: str, seqs: list[int]) -> list[np.ndarray]:
    return [np.load(tap_dir / stream_id / f"{s}.npy") for s in seqs]


@dataclass
class HlsOutput:
    playlist: m3u8.M3U8
    frames: np.ndarray  # [N, H, W, 3] uint8
    times: list[Fraction]  # presentation time of every frame (s)


async def read_ended_hls(base_url: str, stream_id: str, timeout: float = 20.0) -> HlsOutput:
    """Poll the LL-HLS playlist until it has EXT-X-ENDLIST; fetch init + every segment; decode with PyAV."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as http:
        deadline = time.monotonic() + timeout
        while True:
            r = await http.get(f"{signed(stream_id)}/index.m3u8")
            if r.status_code == 200 and "#EXT-X-ENDLIST" in r.text:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no EXT-X-ENDLIST for {stream_id}: {r.status_code} {r.text[-300:]}")
            await asyncio.sleep(0.1)
        playlist = m3u8.loads(r.text)
        assert playlist.media_sequence == 0, "the playlist window no longer holds the whole stream"
        data = (await http.get(f"{signed(stream_id)}/init.mp4")).content
        for seg in playlist.segments:
            resp = await http.get(f"{signed(stream_id)}/{seg.uri}")
            resp.raise_for_status()
            data += resp.content
    frames, times = [], []
    with av.open(io.BytesIO(data), format="mp4") as container:
        for f in container.decode(container.streams.video[0]):
            frames.append(f.to_ndarray(format="rgb24"))
            times.append(f.pts * f.time_base)
    return HlsOutput(playlist, np.stack(frames), times)


def match_frames(output: np.ndarray, expected: np.ndarray) -> tuple[list[int], list[float]]:
    """For each output frame, the index of the closest expected frame and its mean absolute error (0–255)."""
    out = output.astype(np.float32)[:, None]
    ref = expected.astype(np.float32)[None]
    err = np.abs(out - ref).mean(axis=(2, 3, 4))
    idx = err.argmin(axis=1)
    return [int(i) for i in idx], [float(err[k, i]) for k, i in enumerate(idx)]


def to_uint8(frames01: list[np.ndarray]) -> np.ndarray:
    return (np.concatenate(frames01) * 255.0).round().clip(0, 255).astype(np.uint8)
