"""Load the Wan2.1 VAE into diffusers' ``AutoencoderKLWan`` from the original ``Wan2.1_VAE.pth`` or a ``vae/`` folder.

The original checkpoint is a plain state dict of Wan's ``WanVAE_`` (keys like
``encoder.downsamples.3.residual.2.weight``, ``decoder.upsamples.4.shortcut.weight``, ``conv1.weight``);
``wan_to_diffusers_vae_key`` renames it structurally from the config, so it also
works for tiny test configs (diffusers' own converter hard-codes the full-size indices).
Nothing is downloaded; ``torch.load`` runs with ``weights_only=True``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKLWan
from pydantic import BaseModel, ConfigDict, Field

from encoder.checkpoints import state_dict_mismatch
from encoder.taehv import load_taehv_decoder, load_taehv_encoder, make_tiny_taehv
from encoder.vae import LatentNorm, StreamVAE

WAN_VAE_FILE = "Wan2.1_VAE.pth"
DIFFUSERS_VAE_DIR = "vae"
_DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# Inside a residual block: Wan's nn.Sequential indices → diffusers attribute names.
_RESIDUAL_RENAMES = (
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.", "conv1."),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_TOP_RENAMES = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_SIDE_RENAMES = {"conv1.": "conv_in.", "head.0.": "norm_out.", "head.2.": "conv_out."}


class VAEWeightsError(ValueError):
    """A VAE checkpoint whose keys or shapes do not match the model (the message names the keys)."""


def _rename_residual(rest: str) -> str:
    for old, new in _RESIDUAL_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise VAEWeightsError(f"unknown residual-block parameter {rest!r}")


def _decoder_upsample_index(config: Any) -> dict[int, tuple[str, bool]]:
    """Wan's flat ``decoder.upsamples`` index → (diffusers prefix, whether it is the stage's upsampler)."""
    table: dict[int, tuple[str, bool]] = {}
    flat = 0
    n_stages = len(config.dim_mult)
    for stage in range(n_stages):
        for r in range(config.num_res_blocks + 1):
            table[flat] = (f"up_blocks.{stage}.resnets.{r}.", False)
            flat += 1
        if stage != n_stages - 1:
            table[flat] = (f"up_blocks.{stage}.upsamplers.0.", True)
            flat += 1
    return table


def wan_to_diffusers_vae_key(key: str, config: Any) -> str:
    """One original Wan VAE key → its ``AutoencoderKLWan`` name (raises ``VAEWeightsError`` if unknown)."""
    for old, new in _TOP_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise VAEWeightsError(f"unknown VAE key {key!r}")
    for old, new in _SIDE_RENAMES.items():
        if rest.startswith(old):
            return f"{side}.{new}{rest[len(old) :]}"
    m = re.match(r"middle\.(\d+)\.(.*)", rest)
    if m:
        idx, tail = int(m.group(1)), m.group(2)
        if idx == 1:
            return f"{side}.mid_block.attentions.0.{tail}"
        if idx in (0, 2):
            return f"{side}.mid_block.resnets.{idx // 2}.{_rename_residual(tail)}"
        raise VAEWeightsError(f"unknown VAE key {key!r}")
    m = re.match(r"(downsamples|upsamples)\.(\d+)\.(.*)", rest)
    if not m:
        raise VAEWeightsError(f"unknown VAE key {key!r}")
    group, idx, tail = m.group(1), int(m.group(2)), m.group(3)
    is_residual = tail.startswith(("residual.", "shortcut."))
    if side == "encoder" and group == "downsamples":
        return f"encoder.down_blocks.{idx}.{_rename_residual(tail) if is_residual else tail}"
    if side == "decoder" and group == "upsamples":
        table = _decoder_upsample_index(config)
        if idx not in table:
            raise VAEWeightsError(f"unknown VAE key {key!r}")
        prefix, is_upsampler = table[idx]
        if is_upsampler == is_residual:
            raise VAEWeightsError(f"VAE key {key!r} does not fit the config's block layout")
        return f"decoder.{prefix}{_rename_residual(tail) if is_residual else tail}"
    raise VAEWeightsError(f"unknown VAE key {key!r}")


def convert_wan_vae_state_dict(state_dict: dict[str, torch.Tensor], model: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    """Rename an original Wan VAE state dict for ``model`` and check it covers every parameter with the right shape."""
    if any(model.config.attn_scales):
        raise VAEWeightsError("attn_scales are not supported (Wan2.1's VAE has none)")
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        try:
            converted[wan_to_diffusers_vae_key(key, model.config)] = value
        except VAEWeightsError:
            unknown.append(key)
    problem = state_dict_mismatch(converted, model.state_dict(), unknown)
    if problem:
        raise VAEWeightsError(f"VAE checkpoint does not match the model config: {problem}")
    return converted


def resolve_vae_path(path: str | Path) -> Path:
    """Find the VAE under ``path``: a ``.pth`` file, a diffusers VAE folder, or a model dir holding either."""
    path = Path(path)
    if path.is_file():
        return path
    # a model dir first: the Wan base folder has a config.json of its own (the DiT's)
    for candidate in (path / DIFFUSERS_VAE_DIR, path / WAN_VAE_FILE):
        if candidate.is_file() or (candidate / "config.json").is_file():
            return candidate
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"no VAE at {path}: expected {path / WAN_VAE_FILE}, {path / DIFFUSERS_VAE_DIR}/config.json, "
        "or a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors)"
    )


def load_wan_vae(
    path: str | Path,
    *,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> AutoencoderKLWan:
    """Load the Wan2.1 VAE from a model dir, ``Wan2.1_VAE.pth`` or a diffusers ``vae/`` folder.

    ``config`` (``AutoencoderKLWan`` keyword arguments) applies to ``.pth`` files, which carry no config;
    the default is the Wan2.1 VAE.
    """
    src = resolve_vae_path(path)
    if src.is_dir():
        if not any((src / f).is_file() for f in _DIFFUSERS_WEIGHT_FILES):
            raise FileNotFoundError(f"VAE weights missing: {src / _DIFFUSERS_WEIGHT_FILES[0]}")
        vae = AutoencoderKLWan.from_pretrained(src, torch_dtype=dtype, local_files_only=True)
        return vae.to(device).eval()
    state_dict = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise VAEWeightsError(f"{src} is not a state dict")
    vae = AutoencoderKLWan(**(config or {}))
    vae.load_state_dict(convert_wan_vae_state_dict(state_dict, vae), strict=True)
    return vae.to(device=device, dtype=dtype).eval()


TAEHV_FILE = "taew2_1.pth"


class StreamVAEConfig(BaseModel):
    """How a service builds its Stream-VAE (the pipeline's and decoder service's config section)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latent_norm: LatentNorm = "reference"
    encoder: Literal["wan", "taehv"] = "wan"
    decoder: Literal["wan", "taehv"] = "wan"
    taehv_path: Path | None = Field(None, description=f"TAEHV weights; default <model dir>/{TAEHV_FILE}")
    encode_frames_per_pass: int = Field(4, ge=4, multiple_of=4)
    decode_latents_per_pass: int = Field(1, ge=1)


def load_stream_vae(
    model_dir: str | Path,
    config: StreamVAEConfig | None = None,
    *,
    vae_config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StreamVAE:
    """The Wan VAE from ``model_dir`` (see ``load_wan_vae``), with the TAEHV decoder when the config asks for it."""
    config = config or StreamVAEConfig()
    vae = load_wan_vae(model_dir, config=vae_config, dtype=dtype, device=device)
    taehv = taehv_enc = None
    path = config.taehv_path or Path(model_dir) / TAEHV_FILE
    if config.decoder == "taehv":
        taehv = load_taehv_decoder(path, latent_channels=vae.config.z_dim).to(device=device, dtype=dtype)
    if config.encoder == "taehv":
        taehv_enc = load_taehv_encoder(path, latent_channels=vae.config.z_dim).to(device=device, dtype=dtype)
    return StreamVAE(
        vae,
        latent_norm=config.latent_norm,
        taehv=taehv,
        taehv_encoder=taehv_enc,
        encode_frames_per_pass=config.encode_frames_per_pass,
        decode_latents_per_pass=config.decode_latents_per_pass,
    )


def tiny_stream_vae(config: StreamVAEConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> StreamVAE:
    """The tiny random Stream-VAE every tiny service builds alike (``wan.tiny``'s VAE; the tiny TAEHV when the
    config asks for it): the plumbing twin of ``load_stream_vae``."""
    from wan.tiny import make_tiny_vae

    config = config or StreamVAEConfig()
    vae = make_tiny_vae(seed, dtype).to(device)
    enc, dec = make_tiny_taehv(vae.config.z_dim, seed, dtype)
    return StreamVAE(
        vae,
        latent_norm=config.latent_norm,
        taehv=dec.to(device) if config.decoder == "taehv" else None,
        taehv_encoder=enc.to(device) if config.encoder == "taehv" else None,
        encode_frames_per_pass=config.encode_frames_per_pass,
        decode_latents_per_pass=config.decode_latents_per_pass,
    )


def random_stream_vae(config: StreamVAEConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> StreamVAE:
    """The Wan2.1 VAE (and full-size TAEHV, when the config asks for it) on random weights of ``seed``: the VAE of
    ``model.random_weights`` (services/model_source.py), the same in every process that builds it (global RNG
    untouched). Real sizes and timings, noise output."""
    from encoder.taehv import TAEHVDecoder, TAEHVEncoder

    config = config or StreamVAEConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan().eval()  # diffusers' defaults: the Wan2.1 VAE
        z = vae.config.z_dim
        enc = TAEHVEncoder(latent_channels=z) if config.encoder == "taehv" else None
        dec = TAEHVDecoder(latent_channels=z) if config.decoder == "taehv" else None
    return StreamVAE(
        vae.to(device=device, dtype=dtype),
        latent_norm=config.latent_norm,
        taehv=dec.to(device=device, dtype=dtype).eval() if dec is not None else None,
        taehv_encoder=enc.to(device=device, dtype=dtype).eval() if enc is not None else None,
        encode_frames_per_pass=config.encode_frames_per_pass,
        decode_latents_per_pass=config.decode_latents_per_pass,
    )


def channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Every 5-D parameter (Conv3d weights) channels-last-3d, every 4-D one (Conv2d weights, the 3-D norms' gains)
    channels-last, in place. ``Module.to(memory_format=channels_last_3d)`` cannot do it: it converts 4-D tensors too
    and raises on them, and the Wan VAE has both ranks."""
    for p in module.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        elif p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return module


def compile_stream_vae(sv: StreamVAE) -> bool:
    """``encoder.compile``: channels-last and ``torch.compile`` of the VAE's encoder/decoder (and TAEHV) modules,
    recompiled per input shape. CUDA only (on CPU it would cost minutes of compile for no gain): False when skipped.
    """
    if sv.device.type != "cuda":
        return False
    for m in (sv.vae.encoder, sv.vae.decoder, sv.taehv, sv.taehv_encoder):
        if m is not None:  # TAEHV runs block by block (its memory): channels-last only
            channels_last(m)
    sv.vae.encoder = torch.compile(sv.vae.encoder, dynamic=False)
    sv.vae.decoder = torch.compile(sv.vae.decoder, dynamic=False)
    return True
