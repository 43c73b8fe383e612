"""The pass-through VAE of the measurement mode (``model.passthrough``): pixels survive the whole chain.

``bench/serve.py`` times glass-to-glass by content: the publisher stamps each frame's number as a block code and
the reader finds it in the HLS output. A random VAE would scramble it, so in this mode the codec is a block average
(encode: each latent pixel = the RGB mean of its ``spatial_factor``² block in channels 0–2, each latent frame = the
first source frame of its temporal group, the stream's first frame alone) and its inverse (decode: nearest-neighbour
upsampling, each latent frame shown for the group's frames). The first frame of a group is the oldest, so the
glass-to-glass time read from it is the chunk's longest. Shapes, factors, device and dtype are those of the VAE
it stands in for, so every message, cache rule and size check stays what the real mode has; only the numbers differ.

The VAE still runs, as the DiT's blocks do in this mode (``dit_stage/passthrough.py``): ``around(vae)`` keeps the
real VAE (Wan, or TAEHV in the fast mode) and each call first does its encode/decode with the stream's caches, then
returns the block-average codec's output. So the served path's timings (FPS, chunk latency, streams per GPU) pay for
the VAE, and only the pixels are the publisher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from encoder.vae import StreamVAE, StreamVAEError, StreamVAEState

__all__ = ["PassthroughVAE"]


class PassthroughVAE(StreamVAE):
    """``StreamVAE`` whose encode/decode output is the block-average codec above; with ``runs_vae`` (``around``) the
    real VAE's work is done first and its output dropped."""

    runs_vae = False

    @classmethod
    def around(cls, vae: StreamVAE) -> PassthroughVAE:
        """The pass-through codec in place of ``vae``, which still runs (module docstring)."""
        out = cls(vae.vae, latent_norm=vae.latent_norm, taehv=vae.taehv, taehv_encoder=vae.taehv_encoder,
                  encode_frames_per_pass=vae.encode_frames_per_pass,
                  decode_latents_per_pass=vae.decode_latents_per_pass)
        out.runs_vae = True
        return out

    @torch.no_grad()
    def encode(self, state: StreamVAEState, frames: torch.Tensor) -> torch.Tensor:
        self._check_pixels(frames)
        t, tf = frames.shape[2], self.temporal_factor
        first = state.frames_encoded == 0
        if (first and (t - 1) % tf) or (not first and (t == 0 or t % tf)):
            raise StreamVAEError(f"{t} frames do not make whole latent frames (first chunk 1 + {tf}k, then {tf}k)")
        if self.runs_vae:
            super().encode(state, frames)  # the work and the caches; it counts the frames
        else:
            state.frames_encoded += t
        picks = ([0] if first else []) + list(range(int(first), t, tf))
        x = frames[:, :, picks].to(device=self.device, dtype=torch.float32)
        b, c, f, h, w = x.shape
        pooled = F.avg_pool2d(x.transpose(1, 2).reshape(b * f, c, h, w), self.spatial_factor)
        z = torch.zeros(b, f, self.z_dim, *pooled.shape[-2:], device=self.device)
        z[:, :, :c] = pooled.view(b, f, c, *pooled.shape[-2:])
        return z.transpose(1, 2).to(self.dtype)

    @torch.no_grad()
    def decode(self, state: StreamVAEState, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        first = state.latents_decoded == 0
        if self.runs_vae:
            super().decode(state, latents)  # the work and the caches; it counts the latents
        else:
            state.latents_decoded += latents.shape[2]
        z = latents[:, :3].to(device=self.device, dtype=torch.float32)
        b, c, n, h, w = z.shape
        up = F.interpolate(z.transpose(1, 2).reshape(b * n, c, h, w), scale_factor=self.spatial_factor,
                           mode="nearest").view(b, n, c, h * self.spatial_factor, w * self.spatial_factor)
        repeats = torch.full((n,), self.temporal_factor, device=up.device)
        if first:
            repeats[0] = 1  # a stream's first latent is its first frame alone, as the Wan decoder has it
        return up.repeat_interleave(repeats, dim=1).transpose(1, 2).clamp(-1.0, 1.0).to(self.dtype)
