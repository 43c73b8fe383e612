"""What ingest runs on its model thread (the Stream-VAE encoder side and the umT5 prompt encoder), and the sizes of
the largest messages they make, known before anything is loaded (every publisher checks them at start)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from encoder.prompt import PromptEncoder
from encoder.random_prompt import RandomPromptEncoder
from encoder.vae import StreamVAE
from encoder.vae_loading import StreamVAEConfig, compile_stream_vae, random_stream_vae, tiny_stream_vae
from services.config import EncoderSettings, ModelSettings, Settings
from services.model_source import model_source
from services.workmeter import SMALL_SEED, WorkMeter, seed_size
from wan.config import WanDiTConfig

__all__ = ["TINY_SEED", "IngestModels", "largest_messages", "latent_chunk_bytes", "max_prompt_tokens"]

TINY_SEED = 0
"""Seed of the tiny random models: the same as ``rheo run``'s tiny preset, so every service builds the same ones."""

_LATENT_BYTES = 4  # latents travel as fp32, as the single-process pipeline hands them to the DiT
_MESSAGE_MARGIN = 64 * 1024  # frame header, msgpack body, prompt text (the gateway caps prompts at 2000 chars)


@dataclass
class IngestModels:
    """What ingest runs: the Stream-VAE (encoder side) and the prompt encoder."""

    vae: StreamVAE
    prompt: PromptEncoder | RandomPromptEncoder
    description: str

    @classmethod
    def tiny(cls, vae: StreamVAEConfig | None = None) -> IngestModels:
        """The tiny random VAE (TAEHV: the tiny one) and umT5 of seed ``TINY_SEED``, as every tiny service builds."""
        from wan.tiny import make_tiny_t5, make_tiny_tokenizer

        text_len = WanDiTConfig.tiny().text_len
        return cls(tiny_stream_vae(vae, seed=TINY_SEED),
                   PromptEncoder(make_tiny_t5(TINY_SEED), make_tiny_tokenizer(), max_length=text_len),
                   "tiny random model (no weights)")

    @classmethod
    def load(cls, model: ModelSettings, encoder: EncoderSettings | None = None) -> IngestModels:
        vae_config = StreamVAEConfig(encoder=encoder.vae, taehv_path=encoder.taehv_path) if encoder else None
        source = model_source(model, "ingest")
        if source == "tiny":
            tiny = cls.tiny(vae_config)
            return tiny.passing_through(model.passthrough_runs_vae) if model.passthrough else tiny
        from encoder.vae_loading import load_stream_vae
        from wan.device import resolve_device, resolve_dtype

        device = resolve_device(model.device)
        dtype = resolve_dtype(model.dtype, device)
        text_len = WanDiTConfig.named("1.3b").text_len
        if source == "random":
            vae = random_stream_vae(vae_config, dtype=dtype, device=device)  # the decoder builds the same one
            prompt: PromptEncoder | RandomPromptEncoder = RandomPromptEncoder(
                4096, text_len, TINY_SEED, dtype=dtype, device=device)
            description = f"RANDOM weights at preset {model.preset} (model.random_weights)"
        else:
            assert model.model_dir is not None
            vae = load_stream_vae(model.model_dir, vae_config, dtype=dtype, device=device)
            prompt = PromptEncoder.from_model_dir(model.model_dir, dtype=dtype, device=device, max_length=text_len)
            description = f"weights from {model.model_dir}"
        if encoder is not None and encoder.compile:
            compile_stream_vae(vae)
        loaded = cls(vae, prompt, description)
        return loaded.passing_through(model.passthrough_runs_vae) if model.passthrough else loaded

    def passing_through(self, runs_vae: bool) -> IngestModels:
        """The measurement mode's models (``model.passthrough``): the pass-through codec in place of this VAE, which
        still runs unless ``runs_vae`` is off (``model.passthrough_runs_vae``)."""
        from encoder.passthrough import PassthroughVAE

        vae = PassthroughVAE.around(self.vae) if runs_vae else PassthroughVAE(self.vae.vae)
        return IngestModels(vae, self.prompt, self.description + ", pass-through VAE")

    def warm_up(self, meter: WorkMeter | None = None, stream_size: tuple[int, int] = SMALL_SEED) -> None:
        """Run each model once (first calls pay for kernel selection and allocation; chunk 0 must not); the last
        encode, a steady chunk, is the first measurement of what an encode costs here (``meter``), at
        ``seed_size`` of the default stream size."""
        h, w = seed_size(self.vae.device.type, stream_size)
        frames = torch.zeros(1, 3, 5, h, w, device=self.vae.device, dtype=self.vae.dtype)
        state = self.vae.new_state()
        self.vae.encode(state, frames)
        self.vae.encode(state, frames[:, :, :4])  # a steady chunk's first call pays for its kernels
        with meter.measure("vae_encode", 4 * h * w / 1e6) if meter else contextlib.nullcontext():
            self.vae.encode(state, frames[:, :, :4]).cpu()  # (the copy waits for an asynchronous device)
        self.prompt.encode("warm up")
        self.prompt.clear_cache()


def _model_sizes(settings: Settings) -> tuple[int, int, int, int, int]:
    """(VAE latent channels, VAE spatial factor, text_len, text_dim, bytes per embedding value)."""
    from wan.tiny import TINY_T5_CONFIG, TINY_VAE_CONFIG

    model = settings.model
    if model.model_dir is None and (model.preset == "tiny" or not model.random_weights):
        z_dim, spatial = TINY_VAE_CONFIG["z_dim"], 2 ** (len(TINY_VAE_CONFIG["dim_mult"]) - 1)
        return z_dim, spatial, WanDiTConfig.tiny().text_len, TINY_T5_CONFIG["d_model"], 4
    from wan.device import resolve_device, resolve_dtype

    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    text_bytes = torch.empty((), dtype=dtype).element_size()
    return 16, 8, WanDiTConfig.named("1.3b").text_len, 4096, text_bytes  # the Wan2.1 VAE, umT5-XXL (or random)


def max_prompt_tokens(settings: Settings) -> int:
    """Most prompt tokens whose embedding fits one message: a ``PromptUpdate`` carries only the prompt's real
    tokens ``[L, D]`` (``encoder.prompt.trim_padding``; the DiT zero-pads back to text_len, losslessly). In bf16
    all 512 of umT5 fit (4 MiB); in fp32 a 512-token embedding alone is 8 MiB, over NATS' 8 MB ``max_payload``,
    so longer prompts are refused with a clear error instead of being cut or cast."""
    _, _, text_len, text_dim, text_bytes = _model_sizes(settings)
    return max(1, min(text_len, (settings.nats.max_send_bytes - _MESSAGE_MARGIN) // (text_dim * text_bytes)))


def latent_chunk_bytes(settings: Settings, width: int, height: int, latent_frames: int) -> int:
    """Bytes of a ``LatentChunk`` of ``latent_frames`` latent frames at ``width × height`` (fp32 latents)."""
    z_dim, spatial, _, _, _ = _model_sizes(settings)
    return z_dim * latent_frames * -(-height // spatial) * -(-width // spatial) * _LATENT_BYTES + _MESSAGE_MARGIN


def largest_messages(settings: Settings) -> tuple[int, int]:
    """Bytes of the largest ``LatentChunk`` and ``PromptUpdate`` this configuration can publish (before loading).

    The largest latent chunk counted is a V2V prepare chunk (2 latent frames) at the largest model size; a T2V
    stream whose chunks (``t2v_frames`` latent frames) would not fit a message is refused when it starts."""
    ing = settings.ingest
    _, _, _, text_dim, text_bytes = _model_sizes(settings)
    latent = latent_chunk_bytes(settings, ing.max_model_width, ing.max_model_height, 2)
    return latent, max_prompt_tokens(settings) * text_dim * text_bytes + _MESSAGE_MARGIN
