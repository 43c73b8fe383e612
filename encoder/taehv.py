"""TAEHV decoder (madebyollin/taehv, ``taew2_1`` layout) with a per-stream memory, for fast preview decoding.

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


class TAEHVDecoderError(ValueError):
    """A TAEHV checkpoint that does not fit the decoder layout."""


@dataclass
class TAEHVDecoderState:
    """One stream's TAEHV memory: the last input frame of every MemBlock, and frames emitted so far."""

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
        x = z.permute(0, 2, 1, 3, 4).reshape(n * t, -1, h, w)
        for i, block in enumerate(self.decoder):
            if isinstance(block, MemBlock):
                nt, c, hh, ww = x.shape
                seq = x.reshape(n, nt // n, c, hh, ww)
                prev = state.memory.get(i)
                prev = torch.zeros_like(seq[:, :1]) if prev is None else prev.to(seq.dtype).unsqueeze(1)
                past = torch.cat([prev, seq[:, :-1]], dim=1).reshape(x.shape)
                state.memory[i] = seq[:, -1].clone()
                x = block(x, past)
            else:
                x = block(x)
        nt, c, hh, ww = x.shape
        out = x.reshape(n, nt // n, c, hh, ww).clamp(0.0, 1.0)
        trim = max(0, self.frames_to_trim - state.frames_out)
        state.frames_out += out.shape[1]
        return out[:, trim:].permute(0, 2, 1, 3, 4)


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
