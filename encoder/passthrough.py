"""The pass-through VAE of the measurement mode (``model.passthrough``): pixels survive the whole chain.

``bench/serve.py`` times glass-to-glass by content: the publisher stamps each frame's number as a block code and
the reader finds it in the HLS output. A random VAE would scramble it, so in this mode the codec is a block average
(encode: each latent pixel = the RGB mean of its ``spatial_factor``² block in channels 0–2, each latent frame = the
first source frame of its temporal group, the stream's first frame alone) and its inverse (decode: nearest-neighbour
upsampling, each latent frame shown for the group's frames). The first frame of a group is the oldest, so the
glass-to-glass time read from it is the chunk's longest. Shapes, factors, device and dtype are those of the VAE
it stands in for, so every message, cache rule and size check stays what the real mode has; only the numbers differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from encoder.vae import StreamVAE, StreamVAEError, StreamVAEState

__all__ = ["PassthroughVAE"]


class PassthroughVAE(StreamVAE):
    """``StreamVAE`` whose encode/decode is the block-average codec above (no convolution runs)."""

    @torch.no_grad()
    def encode(self, state: StreamVAEState, frames: torch.Tensor) -> torch.Tensor:
        self._check_pixels(frames)
        t, tf = frames.shape[2], self.temporal_factor
        first = state.frames_encoded == 0
        if (first and (t - 1) % tf) or (not first and (t == 0 or t % tf)):
            raise StreamVAEError(f"{t} frames do not make whole latent frames (first chunk 1 + {tf}k, then {tf}k)")
        picks = ([0] if first else []) + list(range(int(first), t, tf))
        x = frames[:, :, picks].to(device=self.device, dtype=torch.float32)
        b, c, f, h, w = x.shape
        pooled = F.avg_pool2d(x.transpose(1, 2).reshape(b * f, c, h, w), self.spatial_factor)
        z = torch.zeros(b, f, self.z_dim, *pooled.shape[-2:], device=self.device)
        z[:, :, :c] = pooled.view(b, f, c, *pooled.shape[-2:])
        state.frames_encoded += t
        return z.transpose(1, 2).to(self.dtype)

    @torch.no_grad()
    def decode(self, state: StreamVAEState, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        z = latents[:, :3].to(device=self.device, dtype=torch.float32)
        b, c, n, h, w = z.shape
        up = F.interpolate(z.transpose(1, 2).reshape(b * n, c, h, w), scale_factor=self.spatial_factor,
                           mode="nearest").view(b, n, c, h * self.spatial_factor, w * self.spatial_factor)
        repeats = torch.full((n,), self.temporal_factor, device=up.device)
        if state.latents_decoded == 0:
            repeats[0] = 1  # a stream's first latent is its first frame alone, as the Wan decoder has it
        state.latents_decoded += n
        return up.repeat_interleave(repeats, dim=1).transpose(1, 2).clamp(-1.0, 1.0).to(self.dtype)
