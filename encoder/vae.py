"""Stream-VAE: the Wan2.1 causal VAE driven chunk by chunk with a per-stream feature cache.

The model is diffusers' ``AutoencoderKLWan`` (the one VAE definition; the decoder service imports this module).
Its public ``encode()``/``decode()`` clear the causal-conv cache on entry and exit, so streaming calls
``vae.encoder`` / ``vae.decoder`` directly with a cache list owned by the stream (``StreamVAEState``).

First-call rules (the ``downsample3d`` / ``upsample3d`` first-call branches apply to the whole first call):
the first encoder pass of a stream must be exactly 1 frame, the first decoder pass exactly 1 latent.
``StreamVAE.encode`` takes the chunk the pipeline has (SDv2's first chunk is 5 frames = 1 + 4, later chunks 4 frames)
and splits it into passes that obey the rules. See docs/encoder.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import AutoencoderKLWan

from encoder.taehv import TAEHVDecoder, TAEHVDecoderState, TAEHVEncoder
from encoder.vae_batch import Result, decode_batch, encode_batch

LatentNorm = Literal["reference", "normalized"]
LATENT_NORMS: tuple[str, ...] = ("reference", "normalized")

# A cache slot is empty, holds the last input frames of its causal conv, or is diffusers' 'Rep' first-call marker.
CacheSlot = torch.Tensor | str | None


class StreamVAEError(ValueError):
    """A chunk that breaks the streaming rules (wrong frame count, first-call rule, shape)."""


@dataclass
class StreamVAEState:
    """Everything one stream's VAE keeps between chunks: encoder and decoder caches plus counters.

    A fresh or reset state holds no tensors; dropping the object frees the stream's cache memory.
    ``to_dict``/``from_dict`` give a plain structure of tensors, strings and ints (``torch.save`` /
    ``torch.load(weights_only=True)`` safe) so the state can be moved between processes.
    """

    encoder_cache: list[CacheSlot] = field(default_factory=list)
    decoder_cache: list[CacheSlot] = field(default_factory=list)
    frames_encoded: int = 0
    latents_decoded: int = 0
    taehv: TAEHVDecoderState | None = None
    taehv_encoder: TAEHVDecoderState | None = None

    def reset(self) -> None:
        """Start over as a new stream (next encode/decode calls are first calls again)."""
        self.encoder_cache = []
        self.decoder_cache = []
        self.frames_encoded = 0
        self.latents_decoded = 0
        self.taehv = None
        self.taehv_encoder = None

    def nbytes(self) -> int:
        """Bytes of tensor memory held by this stream's caches."""
        slots = [*self.encoder_cache, *self.decoder_cache]
        total = sum(s.numel() * s.element_size() for s in slots if isinstance(s, torch.Tensor))
        return total + sum(t.nbytes() for t in (self.taehv, self.taehv_encoder) if t is not None)

    def to(self, device: torch.device | str) -> StreamVAEState:
        """Move every cached tensor to ``device`` in place (for moving a stream between GPUs)."""
        self.encoder_cache = [s.to(device) if isinstance(s, torch.Tensor) else s for s in self.encoder_cache]
        self.decoder_cache = [s.to(device) if isinstance(s, torch.Tensor) else s for s in self.decoder_cache]
        for t in (self.taehv, self.taehv_encoder):
            if t is not None:
                t.to(device)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder_cache": list(self.encoder_cache),
            "decoder_cache": list(self.decoder_cache),
            "frames_encoded": self.frames_encoded,
            "latents_decoded": self.latents_decoded,
            "taehv": self.taehv.to_dict() if self.taehv is not None else None,
            "taehv_encoder": self.taehv_encoder.to_dict() if self.taehv_encoder is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamVAEState:
        taehv, taehv_enc = data.get("taehv"), data.get("taehv_encoder")
        return cls(
            encoder_cache=list(data["encoder_cache"]),
            decoder_cache=list(data["decoder_cache"]),
            frames_encoded=int(data["frames_encoded"]),
            latents_decoded=int(data["latents_decoded"]),
            taehv=TAEHVDecoderState.from_dict(taehv) if taehv is not None else None,
            taehv_encoder=TAEHVDecoderState.from_dict(taehv_enc) if taehv_enc is not None else None,
        )


def _pass_slices(n: int, first: bool, per_pass: int) -> list[tuple[int, int]]:
    """Split ``n`` frames/latents into passes: a lone first one when the stream starts, then ``per_pass`` each."""
    start = 1 if first else 0
    slices = [(0, 1)] if first else []
    slices += [(a, min(a + per_pass, n)) for a in range(start, n, per_pass)]
    return slices


class StreamVAE:
    """Chunk-wise encode/decode of many streams with one shared ``AutoencoderKLWan``.

    Pixels are NCTHW in [-1, 1]; latents are NCTHW with ``z_dim`` channels.

    ``latent_norm``:
      * ``"reference"`` — the official StreamDiffusionV2 code: encode returns the raw posterior mean μ,
        decode applies ``z·std + mean`` (an asymmetry the official code keeps on purpose);
      * ``"normalized"`` — encode returns ``(μ − mean) / std``, decode applies ``z·std + mean``.

    ``taehv``: when given, decoding uses this TAEHV decoder (latents passed as they are, as SDv2 does)
    instead of the Wan decoder. ``taehv_encoder``: when given, encoding uses it instead of the Wan encoder (its
    output is TAEHV's normalised space: returned as is under ``"normalized"``, as ``z·std + mean`` (≈ μ) under
    ``"reference"``). The Wan VAE still gives the sizes (z_dim, factors) and the latent statistics.

    ``encode_batch``/``decode_batch`` run many streams' chunks as one call (stacked along batch, each stream's
    caches gathered before and scattered after), equal to the per-stream calls (docs/encoder.md).

    ``encode_frames_per_pass`` (a multiple of 4) and ``decode_latents_per_pass`` set how many frames/latents go
    through one encoder/decoder pass after the first. 4 and 1 are diffusers' one-shot loops: a whole video in one
    call is bit-identical to ``vae.encode()``/``vae.decode()``; across calls only the 1×1×1 quant convs see other
    lengths (≈1e-7 in fp32). Other pass sizes agree to ≈1e-6 (docs/encoder.md).
    """

    def __init__(
        self,
        vae: AutoencoderKLWan,
        *,
        latent_norm: LatentNorm = "reference",
        taehv: TAEHVDecoder | None = None,
        taehv_encoder: TAEHVEncoder | None = None,
        encode_frames_per_pass: int = 4,
        decode_latents_per_pass: int = 1,
    ) -> None:
        if latent_norm not in LATENT_NORMS:
            raise ValueError(f"latent_norm must be one of {LATENT_NORMS}, got {latent_norm!r}")
        cfg = vae.config
        if cfg.patch_size is not None or cfg.is_residual:
            raise ValueError("StreamVAE supports the Wan2.1 VAE layout (no patch_size, not residual)")
        self.temporal_factor = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1)
        if encode_frames_per_pass < self.temporal_factor or encode_frames_per_pass % self.temporal_factor:
            raise ValueError(f"encode_frames_per_pass must be a positive multiple of {self.temporal_factor}")
        if decode_latents_per_pass < 1:
            raise ValueError("decode_latents_per_pass must be >= 1")
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"latents_mean/std must have z_dim={cfg.z_dim} entries")
        if taehv is not None and taehv.latent_channels != cfg.z_dim:
            raise ValueError(f"TAEHV decoder has {taehv.latent_channels} latent channels, the VAE z_dim={cfg.z_dim}")
        if taehv_encoder is not None and taehv_encoder.latent_channels != cfg.z_dim:
            raise ValueError(f"TAEHV encoder has {taehv_encoder.latent_channels} latent channels, the VAE "
                             f"z_dim={cfg.z_dim}")
        self.vae = vae.eval()
        self.taehv = taehv.eval() if taehv is not None else None
        self.taehv_encoder = taehv_encoder.eval() if taehv_encoder is not None else None
        self.latent_norm: LatentNorm = latent_norm
        self.encode_frames_per_pass = encode_frames_per_pass
        self.decode_latents_per_pass = decode_latents_per_pass
        self.z_dim: int = cfg.z_dim
        self._n_enc = vae._cached_conv_counts["encoder"]
        self._n_dec = vae._cached_conv_counts["decoder"]
        shape = (1, cfg.z_dim, 1, 1, 1)
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float64).view(shape)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float64).view(shape)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def new_state(self) -> StreamVAEState:
        return StreamVAEState()

    # -- chunk API -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, state: StreamVAEState, frames: torch.Tensor) -> torch.Tensor:
        """Encode the next chunk of a stream: first chunk 1 + 4k frames (SDv2: 5), later chunks 4k frames."""
        self._check_pixels(frames)
        t = frames.shape[2]
        tf = self.temporal_factor
        first = state.frames_encoded == 0
        if first and (t - 1) % tf:
            raise StreamVAEError(
                f"the first chunk of a stream must have 1 + {tf}k frames (the causal first frame, then groups of "
                f"{tf}; StreamDiffusionV2 sends 5), got {t}"
            )
        if not first and (t == 0 or t % tf):
            raise StreamVAEError(f"chunks after the first must have a positive multiple of {tf} frames, got {t}")
        if self.taehv_encoder is not None:
            return self._encode_taehv(state, frames)
        passes = _pass_slices(t, first, self.encode_frames_per_pass)
        hidden = [self._encoder_run(state, frames[:, :, a:b]) for a, b in passes]
        # quant_conv is 1×1×1: applied once per chunk, as diffusers applies it once per video.
        return self._to_latent(torch.cat(hidden, dim=2))

    @torch.no_grad()
    def decode(self, state: StreamVAEState, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next latents of a stream: the first latent gives 1 frame, every later latent 4 frames."""
        self._check_latents(latents)
        if self.taehv is not None:
            return self._decode_taehv(state, latents)
        n = latents.shape[2]
        x = self._from_latent(latents)
        passes = _pass_slices(n, state.latents_decoded == 0, self.decode_latents_per_pass)
        outs = [self._decoder_run(state, x[:, :, a:b]) for a, b in passes]
        return torch.cat(outs, dim=2).clamp(-1.0, 1.0)

    def encode_batch(self, states: list[StreamVAEState], chunks: list[torch.Tensor]) -> list[Result]:
        """``encode`` for many streams in as few model calls as their caches allow; per item a latent or the
        exception that stream's chunk raised (encoder/vae_batch.py)."""
        return encode_batch(self, states, chunks)

    def decode_batch(self, states: list[StreamVAEState], latents: list[torch.Tensor]) -> list[Result]:
        """``decode`` for many streams in as few model calls as their caches allow (encoder/vae_batch.py)."""
        return decode_batch(self, states, latents)

    # -- single passes (the first-call rules live here) -------------------------------------------------------

    @torch.no_grad()
    def encoder_pass(self, state: StreamVAEState, frames: torch.Tensor) -> torch.Tensor:
        """One ``vae.encoder`` pass with the stream's cache: exactly 1 frame the first time, then 4k frames."""
        self._check_pixels(frames)
        if self.taehv_encoder is not None:
            raise StreamVAEError("encoder_pass drives the Wan encoder; this StreamVAE encodes with TAEHV")
        return self._to_latent(self._encoder_run(state, frames))

    @torch.no_grad()
    def decoder_pass(self, state: StreamVAEState, latents: torch.Tensor) -> torch.Tensor:
        """One ``vae.decoder`` pass with the stream's cache: exactly 1 latent the first time, then any number."""
        self._check_latents(latents)
        if self.taehv is not None:
            raise StreamVAEError("decoder_pass drives the Wan decoder; this StreamVAE decodes with TAEHV")
        return self._decoder_run(state, self._from_latent(latents)).clamp(-1.0, 1.0)

    def _encoder_run(self, state: StreamVAEState, frames: torch.Tensor) -> torch.Tensor:
        t = frames.shape[2]
        tf = self.temporal_factor
        if state.frames_encoded == 0 and t != 1:
            raise StreamVAEError(
                f"the first encoder pass of a stream must be exactly 1 frame, got {t} "
                f"(a {t}-frame first pass would emit {t} latents instead of {1 + (t - 1) // tf}); "
                "use StreamVAE.encode, which splits the first chunk as 1 + 4k"
            )
        if state.frames_encoded > 0 and (t == 0 or t % tf):
            raise StreamVAEError(f"encoder passes after the first must be a positive multiple of {tf} frames, got {t}")
        if not state.encoder_cache:
            state.encoder_cache = [None] * self._n_enc
        x = frames.to(device=self.device, dtype=self.dtype)
        h = self.vae.encoder(x, feat_cache=state.encoder_cache, feat_idx=[0])
        state.frames_encoded += t
        return h

    def _decoder_run(self, state: StreamVAEState, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2]
        first = state.latents_decoded == 0
        if first and n != 1:
            raise StreamVAEError(
                f"the first decoder pass of a stream must be exactly 1 latent, got {n} "
                f"(a {n}-latent first pass would emit {n} frames instead of {1 + 4 * (n - 1)}); "
                "use StreamVAE.decode, which decodes the first latent alone"
            )
        if not state.decoder_cache:
            state.decoder_cache = [None] * self._n_dec
        out = self.vae.decoder(x, feat_cache=state.decoder_cache, feat_idx=[0], first_chunk=first)
        state.latents_decoded += n
        return out

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """Latent mean/std in the dtype the (de)normalisation runs in: fp32, or fp64 for an fp64 model."""
        work = torch.float64 if like.dtype == torch.float64 else torch.float32
        return self._mean.to(like.device, work), self._std.to(like.device, work), work

    def _to_latent(self, hidden: torch.Tensor) -> torch.Tensor:
        mu = self.vae.quant_conv(hidden)[:, : self.z_dim]
        if self.latent_norm == "normalized":
            mean, std, work = self._stats(mu)
            mu = ((mu.to(work) - mean) / std).to(mu.dtype)
        return mu

    def _from_latent(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(device=self.device, dtype=self.dtype)
        mean, std, work = self._stats(z)
        return self.vae.post_quant_conv((z.to(work) * std + mean).to(self.dtype))

    # -- helpers ----------------------------------------------------------------------------------------------

    def _encode_taehv(self, state: StreamVAEState, frames: torch.Tensor) -> torch.Tensor:
        assert self.taehv_encoder is not None
        if state.taehv_encoder is None:
            state.taehv_encoder = self.taehv_encoder.new_state()
        z = self.taehv_encoder.encode(state.taehv_encoder, (frames + 1.0) / 2.0)
        state.frames_encoded += frames.shape[2]
        if self.latent_norm == "reference":
            mean, std, work = self._stats(z)
            z = (z.to(work) * std + mean).to(z.dtype)
        return z.to(self.dtype)

    def _decode_taehv(self, state: StreamVAEState, latents: torch.Tensor) -> torch.Tensor:
        assert self.taehv is not None
        if state.taehv is None:
            state.taehv = self.taehv.new_state()
        frames01 = self.taehv.decode(state.taehv, latents)
        state.latents_decoded += latents.shape[2]
        return (frames01 * 2.0 - 1.0).clamp(-1.0, 1.0).to(self.dtype)

    def _check_pixels(self, frames: torch.Tensor) -> None:
        in_ch = self.vae.config.in_channels
        if frames.ndim != 5 or frames.shape[1] != in_ch:
            raise StreamVAEError(f"frames must be [B, {in_ch}, T, H, W], got {tuple(frames.shape)}")
        h, w = frames.shape[-2:]
        if h % self.spatial_factor or w % self.spatial_factor:
            raise StreamVAEError(f"frame size {h}x{w} is not a multiple of {self.spatial_factor}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.z_dim or latents.shape[2] == 0:
            raise StreamVAEError(f"latents must be [B, {self.z_dim}, N>=1, h, w], got {tuple(latents.shape)}")
