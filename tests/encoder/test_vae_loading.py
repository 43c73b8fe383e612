"""VAE loading: original ``Wan2.1_VAE.pth`` keys and diffusers folders round-trip to the same model."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from pydantic import ValidationError

from encoder.taehv import TAEHVDecoder
from encoder.vae import StreamVAE
from encoder.vae_loading import (
    TAEHV_FILE,
    WAN_VAE_FILE,
    StreamVAEConfig,
    VAEWeightsError,
    convert_wan_vae_state_dict,
    load_stream_vae,
    load_wan_vae,
    resolve_vae_path,
    wan_to_diffusers_vae_key,
)

_RESIDUAL_BACK = {"norm1.gamma": "residual.0.gamma", "conv1.": "residual.2.", "norm2.gamma": "residual.3.gamma",
                  "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}  # fmt: skip


def _residual_back(tail: str) -> str:
    for new, old in _RESIDUAL_BACK.items():
        if tail.startswith(new):
            return old + tail[len(new) :]
    return tail


def diffusers_to_wan_key(key: str, config) -> str:
    """The inverse rename, written independently of encoder/vae_loading.py (Wan's ``WanVAE_`` module names)."""
    for new, old in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if key.startswith(new):
            return old + key[len(new) :]
    side, rest = key.split(".", 1)
    for new, old in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(new):
            return f"{side}.{old}{rest[len(new) :]}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", rest)
    if m:
        slot = {"resnets": 2 * int(m.group(2)), "attentions": 1}[m.group(1)]
        tail = _residual_back(m.group(3)) if m.group(1) == "resnets" else m.group(3)
        return f"{side}.middle.{slot}.{tail}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{_residual_back(m.group(2))}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", rest)
    assert m, key
    stage, kind, slot, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
    per_stage = config.num_res_blocks + 2  # resnets + one upsampler (the last stage has none, and comes last)
    flat = stage * per_stage + (slot if kind == "resnets" else config.num_res_blocks + 1)
    return f"decoder.upsamples.{flat}.{_residual_back(tail) if kind == 'resnets' else tail}"


def to_wan_layout(vae: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    return {diffusers_to_wan_key(k, vae.config): v.clone() for k, v in vae.state_dict().items()}


def test_conversion_agrees_with_diffusers_on_the_full_size_layout():
    """On the real Wan2.1 VAE layout, our rename equals diffusers' own converter key for key."""
    with torch.device("meta"):
        full = AutoencoderKLWan()
    wan_keys = [diffusers_to_wan_key(k, full.config) for k in full.state_dict()]
    assert "decoder.upsamples.4.shortcut.weight" in wan_keys and "encoder.downsamples.5.time_conv.weight" in wan_keys
    theirs = convert_wan_vae_to_diffusers({k: torch.empty(0) for k in wan_keys})
    ours = {k: wan_to_diffusers_vae_key(k, full.config) for k in wan_keys}
    assert set(ours.values()) == set(full.state_dict())
    assert set(theirs) == set(ours.values())
    assert len(set(ours.values())) == len(wan_keys)


def test_wan_pth_and_diffusers_folder_load_the_same_model(tiny_vae, tiny_vae_config, video, tmp_path):
    torch.save(to_wan_layout(tiny_vae), tmp_path / WAN_VAE_FILE)
    tiny_vae.save_pretrained(tmp_path / "diffusers" / "vae")

    from_pth = load_wan_vae(tmp_path, config=tiny_vae_config)  # a model dir holding Wan2.1_VAE.pth
    from_file = load_wan_vae(tmp_path / WAN_VAE_FILE, config=tiny_vae_config)
    from_folder = load_wan_vae(tmp_path / "diffusers")  # a model dir holding vae/
    from_vae_dir = load_wan_vae(tmp_path / "diffusers" / "vae")

    reference = tiny_vae.state_dict()
    for model in (from_pth, from_file, from_folder, from_vae_dir):
        sd = model.state_dict()
        assert sd.keys() == reference.keys()
        assert all(torch.equal(sd[k], reference[k]) for k in reference)

    x = video(5, seed=20)
    outs = []
    for model in (tiny_vae, from_pth, from_folder):
        sv = StreamVAE(model)
        state = sv.new_state()
        outs.append(sv.decode(state, sv.encode(state, x)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_wrong_keys_and_shapes_are_named(tiny_vae, tiny_vae_config, tmp_path):
    model = AutoencoderKLWan(**tiny_vae_config)
    wan = to_wan_layout(tiny_vae)
    del wan["decoder.head.2.weight"]
    wan["encoder.bogus.0.weight"] = torch.zeros(1)
    with pytest.raises(VAEWeightsError) as err:
        convert_wan_vae_state_dict(wan, model)
    assert "decoder.conv_out.weight" in str(err.value) and "encoder.bogus.0.weight" in str(err.value)

    wan = to_wan_layout(tiny_vae)
    wan["conv2.weight"] = torch.zeros(1, 1, 1, 1, 1)
    torch.save(wan, tmp_path / WAN_VAE_FILE)
    with pytest.raises(VAEWeightsError, match=r"post_quant_conv\.weight: \(1, 1, 1, 1, 1\)"):
        load_wan_vae(tmp_path / WAN_VAE_FILE, config=tiny_vae_config)

    # A full-size config against tiny weights: every key mismatches in shape, and the error says so.
    with pytest.raises(VAEWeightsError, match="wrong shape"):
        convert_wan_vae_state_dict(to_wan_layout(tiny_vae), AutoencoderKLWan(**{**tiny_vae_config, "base_dim": 16}))


def test_missing_files_are_named(tmp_path, tiny_vae):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / WAN_VAE_FILE))):
        load_wan_vae(tmp_path)
    tiny_vae.save_config(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        load_wan_vae(tmp_path)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    """torch.load runs with weights_only=True: a checkpoint carrying arbitrary objects is not unpickled."""
    torch.save({"conv1.weight": _NotATensor()}, tmp_path / WAN_VAE_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_wan_vae(tmp_path / WAN_VAE_FILE)


def test_load_stream_vae_picks_the_decoder_by_config(tiny_vae, tiny_vae_config, video, tmp_path):
    torch.save(to_wan_layout(tiny_vae), tmp_path / WAN_VAE_FILE)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / TAEHV_FILE))):
        load_stream_vae(tmp_path, StreamVAEConfig(decoder="taehv"), vae_config=tiny_vae_config)
    torch.manual_seed(0)
    taehv = TAEHVDecoder(latent_channels=4).eval()
    torch.save(taehv.state_dict(), tmp_path / TAEHV_FILE)

    wan_sv = load_stream_vae(tmp_path, vae_config=tiny_vae_config)
    taehv_sv = load_stream_vae(
        tmp_path, StreamVAEConfig(decoder="taehv", latent_norm="normalized"), vae_config=tiny_vae_config
    )
    assert wan_sv.taehv is None and wan_sv.latent_norm == "reference"
    assert taehv_sv.taehv is not None and taehv_sv.latent_norm == "normalized"

    z = torch.randn(1, 4, 2, 2, 3, generator=torch.Generator().manual_seed(21))
    direct = StreamVAE(tiny_vae, taehv=taehv, latent_norm="normalized")
    out = taehv_sv.decode(taehv_sv.new_state(), z)
    assert out.shape == (1, 3, 5, 16, 24)
    assert torch.equal(out, direct.decode(direct.new_state(), z))
    with pytest.raises(ValidationError):
        StreamVAEConfig(encode_frames_per_pass=6)


def test_a_model_dir_with_the_dits_config_json_resolves_to_its_vae(tmp_path) -> None:
    """The Wan base folder holds the DiT's config.json; that must not be taken for a diffusers VAE folder."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / WAN_VAE_FILE).write_bytes(b"")
    assert resolve_vae_path(tmp_path) == tmp_path / WAN_VAE_FILE
