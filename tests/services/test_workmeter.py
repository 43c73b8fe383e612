"""The VAE cost seeds: measured at a size that prices a real stream right on the device at hand."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from decoder.service import _warm_up as decoder_warm_up
from ingest.models import IngestModels
from services.workmeter import WorkMeter, seed_size


@dataclass
class _RecordingVAE:
    """A Stream-VAE that records the shapes it is called with (its results are CPU tensors, whatever its device)."""

    device: torch.device
    z_dim: int = 16
    spatial_factor: int = 8
    dtype: torch.dtype = torch.float32
    calls: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def new_state(self) -> object:
        return object()

    def encode(self, state: object, frames: torch.Tensor) -> torch.Tensor:
        self.calls.append(("encode", tuple(frames.shape)))
        return torch.zeros(1)

    def decode(self, state: object, latents: torch.Tensor) -> torch.Tensor:
        self.calls.append(("decode", tuple(latents.shape)))
        return torch.zeros(1)


class _NoPrompt:
    def encode(self, text: str) -> None:
        pass

    def clear_cache(self) -> None:
        pass


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_warm_ups_seed_the_vae_costs_at_the_default_stream_size_off_the_cpu(device):
    """On an accelerator ("meta" stands for one: any device type but the CPU) the warm-up encode and decode that
    seed the cost per megapixel-frame run at the default stream size, 512 × 768 here; on the CPU at 64², where the
    cost is per pixel. Negative control: the CPU's calls, which must differ from the accelerator's."""
    h, w = seed_size(device, (512, 768))
    assert (h, w) == ((64, 64) if device == "cpu" else (512, 768))

    enc, meter = _RecordingVAE(torch.device(device)), WorkMeter()
    IngestModels(enc, _NoPrompt(), "recording").warm_up(meter, (512, 768))  # type: ignore[arg-type]
    assert enc.calls[-1] == ("encode", (1, 3, 4, h, w))

    dec = _RecordingVAE(torch.device(device))
    decoder_warm_up(dec, meter, (512, 768))  # type: ignore[arg-type]
    assert dec.calls[-1] == ("decode", (1, 16, 1, h // 8, w // 8))
    measured = {c.unit for c in meter.report()}
    assert measured == {"vae_encode", "vae_decode"}
