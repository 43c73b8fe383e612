"""TAEHV decoder and encoder (madebyollin/taehv, ``taew2_1`` layout) with a per-stream memory, for the fast mode.

TAEHV's decoder is a stack of 2D convs whose ``MemBlock``s also see the previous frame's input at the same block.
Decoded in one shot, that memory is the sequence shifted by one frame (zeros before the first). Here each stream
keeps the last frame's input of every ``MemBlock`` between calls, so decoding chunk by chunk equals decoding the
whole sequence at once. Like TAEHV's ``decode_video``, the first ``frames_to_trim`` output frames of a stream are
dropped, which makes the first latent give 1 frame and every later one 4, as the Wan VAE does.

Conventions (TAEHV's): latents as the DiT sees them, pixels in [0, 1]. ``StreamVAE`` maps the pixels to [-1, 1].
Module indices (``decoder.{i}``) match the ``taew2_1.pth`` state dict, so its ``decoder.*`` keys load directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoder.checkpoints import state_dict_mismatch

TAEHV_CHANNELS: tuple[int, int, int, int] = (256, 128, 64, 64)


def _conv(n_in: int, n_out: int, **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out),
            nn.ReLU(inplace=True),
            _conv(n_out, n_out),
            nn.ReLU(inplace=True),
            _conv(n_out, n_out),
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """Temporal upsampling: one frame becomes ``stride`` frames (a 1×1 conv to ``stride``× channels)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _nt, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class TPool(nn.Module):
    """Temporal downsampling: ``stride`` consecutive frames become one (a 1×1 conv over their stacked channels)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _nt, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))


def run_with_memory(layers: nn.Sequential, x: torch.Tensor, n: int, memory: dict[int, torch.Tensor]) -> torch.Tensor:
    """Run ``layers`` on ``x`` (``[n·t, C, H, W]``, frames of each of the ``n`` streams consecutive), every MemBlock
    seeing the previous frame's input at the same block; ``memory`` holds each block's last frame across calls
    (zeros before a stream's first frame), so chunk-by-chunk equals TAEHV's one-shot parallel pass."""
    for i, block in enumerate(layers):
        if isinstance(block, MemBlock):
            nt, c, hh, ww = x.shape
            seq = x.reshape(n, nt // n, c, hh, ww)
            prev = memory.get(i)
            prev = torch.zeros_like(seq[:, :1]) if prev is None else prev.to(seq.dtype).unsqueeze(1)
            past = torch.cat([prev, seq[:, :-1]], dim=1).reshape(x.shape)
            memory[i] = seq[:, -1].clone()
            x = block(x, past)
        else:
            x = block(x)
    return x


class TAEHVDecoderError(ValueError):
    """A TAEHV checkpoint that does not fit the decoder layout."""


@dataclass
class TAEHVDecoderState:
    """One stream's TAEHV memory: the last input frame of every MemBlock, and frames emitted (decoder) or taken
    (encoder) so far. The encoder and the decoder each keep one."""

    memory: dict[int, torch.Tensor] = field(default_factory=dict)
    frames_out: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.memory.values())

    def to(self, device: torch.device | str) -> TAEHVDecoderState:
        self.memory = {i: t.to(device) for i, t in self.memory.items()}
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"memory": {str(i): t for i, t in self.memory.items()}, "frames_out": self.frames_out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TAEHVDecoderState:
        return cls(memory={int(i): t for i, t in data["memory"].items()}, frames_out=int(data["frames_out"]))


class TAEHVDecoder(nn.Module):
    """The TAEHV decoder for Wan2.1 latents (``taew2_1``: 16 channels, time upscale (False, True, True))."""

    def __init__(
        self,
        latent_channels: int = 16,
        channels: tuple[int, int, int, int] = TAEHV_CHANNELS,
        time_upscale: tuple[bool, bool, bool] = (False, True, True),
        space_upscale: tuple[bool, bool, bool] = (True, True, True),
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        n_f = channels
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, n_f[0]), nn.ReLU(inplace=True)]
        for stage in range(3):
            c = n_f[stage]
            layers += [MemBlock(c, c), MemBlock(c, c), MemBlock(c, c)]
            layers.append(nn.Upsample(scale_factor=2 if space_upscale[stage] else 1))
            layers.append(TGrow(c, 2 if time_upscale[stage] else 1))
            layers.append(_conv(c, n_f[stage + 1], bias=False))
        layers += [nn.ReLU(inplace=True), _conv(n_f[3], image_channels)]
        self.decoder = nn.Sequential(*layers)
        self.t_upscale = 2 ** sum(bool(t) for t in time_upscale)
        self.frames_to_trim = self.t_upscale - 1

    def new_state(self) -> TAEHVDecoderState:
        return TAEHVDecoderState()

    @torch.no_grad()
    def decode(self, state: TAEHVDecoderState, latents: torch.Tensor) -> torch.Tensor:
        """Latents NCTHW → pixels NCTHW in [0, 1]; continues the stream held in ``state``."""
        param = next(self.parameters())
        z = latents.to(device=param.device, dtype=param.dtype)
        n, _c, t, h, w = z.shape
        x = run_with_memory(self.decoder, z.permute(0, 2, 1, 3, 4).reshape(n * t, -1, h, w), n, state.memory)
        nt, c, hh, ww = x.shape
        out = x.reshape(n, nt // n, c, hh, ww).clamp(0.0, 1.0)
        trim = max(0, self.frames_to_trim - state.frames_out)
        state.frames_out += out.shape[1]
        return out[:, trim:].permute(0, 2, 1, 3, 4)



TAEHV_ENCODER_CHANNELS = 64


class TAEHVEncoder(nn.Module):
    """The TAEHV encoder for Wan2.1 (``taew2_1``: time downscale (True, True, False), 8× space), causal.

    Streaming: a stream's first chunk is ``1 + 4k`` frames, as for the Wan encoder; its first frame is repeated
    ``t_downscale − 1`` times in front (TAEHV pads a clip's end instead, which no stream can do), so latent 0 is
    frame 0 alone and latent j frames 4j−3…4j, the Wan latent/frame alignment the TAEHV decoder's trim assumes.
    Later chunks are ``4k`` frames. Chunk by chunk equals the whole clip at once (``state`` carries MemBlock memory).
    """

    def __init__(
        self,
        latent_channels: int = 16,
        channels: int = TAEHV_ENCODER_CHANNELS,
        time_downscale: tuple[bool, bool, bool] = (True, True, False),
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        c = channels
        layers: list[nn.Module] = [_conv(image_channels, c), nn.ReLU(inplace=True)]
        for stage in range(3):
            layers += [TPool(c, 2 if time_downscale[stage] else 1), _conv(c, c, stride=2, bias=False)]
            layers += [MemBlock(c, c), MemBlock(c, c), MemBlock(c, c)]
        layers.append(_conv(c, latent_channels))
        self.encoder = nn.Sequential(*layers)
        self.t_downscale = 2 ** sum(bool(t) for t in time_downscale)
        self.spatial_factor = 8

    def new_state(self) -> TAEHVDecoderState:
        return TAEHVDecoderState()

    @torch.no_grad()
    def encode(self, state: TAEHVDecoderState, frames01: torch.Tensor) -> torch.Tensor:
        """Pixels NCTHW in [0, 1] → latents NCTHW (TAEHV's space: normalised Wan latents); continues ``state``."""
        param = next(self.parameters())
        x = frames01.to(device=param.device, dtype=param.dtype)
        t = x.shape[2]
        if state.frames_out == 0:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.t_downscale - 1, -1, -1), x], dim=2)
        if x.shape[2] % self.t_downscale:
            raise ValueError(f"TAEHV encodes a stream as 1 + {self.t_downscale}k frames, then {self.t_downscale}k "
                             f"per chunk; got {t} frames after {state.frames_out}")
        n, c, tt, h, w = x.shape
        y = run_with_memory(self.encoder, x.permute(0, 2, 1, 3, 4).reshape(n * tt, c, h, w), n, state.memory)
        state.frames_out += t
        nt, cz, hh, ww = y.shape
        return y.reshape(n, nt // n, cz, hh, ww).permute(0, 2, 1, 3, 4)

def load_taehv_decoder(path: str | Path, *, latent_channels: int = 16, **kwargs: Any) -> TAEHVDecoder:
    """Build a TAEHVDecoder from a ``taew2_1.pth`` state dict (its ``decoder.*`` keys; ``encoder.*`` ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TAEHV checkpoint not found: {path}")
    model = TAEHVDecoder(latent_channels=latent_channels, **kwargs)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise TAEHVDecoderError(f"{path} is not a state dict")
    sd = {k: v for k, v in raw.items() if k.startswith("decoder.")}
    expected = model.state_dict()
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        # taew2_1 stores a stride-2 TGrow even where Wan2.1 needs stride 1; like TAEHV, keep the last frame's rows.
        if isinstance(layer, TGrow) and key in sd and sd[key].shape[0] > expected[key].shape[0]:
            sd[key] = sd[key][-expected[key].shape[0] :]
    problem = state_dict_mismatch(sd, expected)
    if problem:
        raise TAEHVDecoderError(f"{path} does not fit the taew2_1 decoder layout: {problem}")
    model.load_state_dict(sd)
    return model


def load_taehv_encoder(path: str | Path, *, latent_channels: int = 16, **kwargs: Any) -> TAEHVEncoder:
    """Build a TAEHVEncoder from a ``taew2_1.pth`` state dict (its ``encoder.*`` keys; ``decoder.*`` ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TAEHV checkpoint not found: {path}")
    model = TAEHVEncoder(latent_channels=latent_channels, **kwargs)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise TAEHVDecoderError(f"{path} is not a state dict")
    sd = {k: v for k, v in raw.items() if k.startswith("encoder.")}
    problem = state_dict_mismatch(sd, model.state_dict())
    if problem:
        raise TAEHVDecoderError(f"{path} does not fit the taew2_1 encoder layout: {problem}")
    model.load_state_dict(sd)
    return model


TINY_TAEHV_DECODER_CHANNELS: tuple[int, int, int, int] = (16, 8, 8, 8)
TINY_TAEHV_ENCODER_CHANNELS = 8


def make_tiny_taehv(latent_channels: int, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> tuple[TAEHVEncoder, TAEHVDecoder]:
    """Tiny random TAEHV encoder and decoder (the taew2_1 layout, fewer channels) for the tiny stack: every process
    building it with the same seed gets the same weights (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = TAEHVEncoder(latent_channels=latent_channels, channels=TINY_TAEHV_ENCODER_CHANNELS)
        dec = TAEHVDecoder(latent_channels=latent_channels, channels=TINY_TAEHV_DECODER_CHANNELS)
        with torch.no_grad():
            dec.decoder[-1].bias.add_(0.5)  # centre the output in [0, 1] so little of it is clamped
    return enc.to(dtype).eval(), dec.to(dtype).eval()
