"""Checkpoint loading: both key layouts, every container, strict errors, block ranges, real-size key sets."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from dit_stage.loading import (
    CheckpointError,
    diffusers_to_original,
    expected_keys,
    infer_config,
    load_dit,
    load_state_dict,
    original_to_diffusers,
)
from wan.config import WanDiTConfig

from .helpers import make_reference, ours_from, tiny_config


@pytest.fixture(scope="module")
def ref():
    return make_reference(num_layers=2).float()


@pytest.fixture(scope="module")
def original(ref) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in ours_from(ref, dtype=torch.float32).state_dict().items()}


def _assert_loaded(model, original, block_range=None):
    got = model.state_dict()
    want_keys = set(expected_keys(tiny_config(2), block_range))
    assert set(got) == want_keys
    for k in want_keys:
        assert torch.equal(got[k], original[k]), k


def test_key_maps_round_trip_and_match_diffusers(ref, original):
    diff = original_to_diffusers(original)
    assert set(diff) == set(ref.state_dict())
    for k, t in ref.state_dict().items():
        assert torch.equal(diff[k], t.float()), k
    assert diffusers_to_original(diff).keys() == original.keys()
    # the trap: the affine cross-attn LayerNorm is norm3 in Wan and norm2 in diffusers
    assert "blocks.0.norm3.weight" in original and "blocks.0.norm2.weight" in diff


def _write(tmp_path, kind: str, sd: dict[str, torch.Tensor]):
    if kind == "safetensors":
        save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
        return tmp_path / "diffusion_pytorch_model.safetensors"
    if kind == "sharded":
        keys = sorted(sd)
        half = len(keys) // 2
        weight_map = {}
        for i, part in enumerate((keys[:half], keys[half:])):
            name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, tmp_path / name)
            weight_map |= dict.fromkeys(part, name)
        index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return tmp_path  # a directory holding an index
    containers = {
        "raw": lambda: sd,
        "generator_ema": lambda: {"generator_ema": {f"model.{k}": v for k, v in sd.items()}, "step": torch.tensor(1)},
        "generator": lambda: {"generator": {f"model.{k}": v for k, v in sd.items()}},
        "state_dict": lambda: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "comfy": lambda: {f"model.diffusion_model.{k}": v for k, v in sd.items()},
        "fsdp": lambda: {"generator": {f"model._fsdp_wrapped_module.{k}": v for k, v in sd.items()}},
    }
    path = tmp_path / "model.pt"
    torch.save(containers[kind](), path)
    return path


KINDS = ["safetensors", "sharded", "raw", "generator_ema", "generator", "state_dict", "comfy", "fsdp"]


@pytest.mark.parametrize("layout", ["original", "diffusers"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_container_and_layout_loads_strictly(tmp_path, original, layout, kind):
    sd = original if layout == "original" else original_to_diffusers(original)
    path = _write(tmp_path, kind, sd)
    model = load_dit(path, tiny_config(2), dtype=torch.float32)
    _assert_loaded(model, original)


def test_generator_ema_is_preferred(tmp_path, original):
    other = {k: torch.zeros_like(v) for k, v in original.items()}
    torch.save({"generator": other, "generator_ema": original}, tmp_path / "m.pt")
    _assert_loaded(load_dit(tmp_path / "m.pt", tiny_config(2), dtype=torch.float32), original)
    sd = load_state_dict(tmp_path / "m.pt", container_key="generator")
    assert all(not t.any() for t in sd.values())


def test_block_range_loads_only_its_blocks(tmp_path, original):
    path = _write(tmp_path, "sharded", original)
    for rng in ((0, 1), (1, 2)):
        model = load_dit(path, tiny_config(2), block_range=rng, dtype=torch.float32)
        _assert_loaded(model, original, rng)
        assert model.block_ids == list(range(*rng))
        assert (model.patch_embedding is not None) == (rng[0] == 0)
        assert (model.head is not None) == (rng[1] == 2)


def test_config_is_inferred_from_shapes(original):
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    cfg = infer_config(shapes, head_dim=16, text_len=16)
    assert cfg == tiny_config(2)


def test_mismatch_names_missing_and_unexpected_keys(tmp_path, original):
    bad = dict(original)
    del bad["blocks.1.self_attn.k.weight"]
    bad["blocks.1.self_attn.extra.weight"] = torch.zeros(1)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_dit(tmp_path / "bad.safetensors", tiny_config(2))
    msg = str(err.value)
    assert "missing keys (1): blocks.1.self_attn.k.weight" in msg
    assert "unexpected keys (1): blocks.1.self_attn.extra.weight" in msg


def test_wrong_architecture_names_shapes(tmp_path, original):
    save_file(original, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*ffn\.0\.weight"):
        load_dit(tmp_path / "m.safetensors", WanDiTConfig(**(tiny_config(2).to_dict() | {"ffn_dim": 64})))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_dit(tmp_path / "m.safetensors", tiny_config(1))


def test_not_a_checkpoint(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_dit(tmp_path / "list.pt", tiny_config(2))


@pytest.mark.parametrize(
    ("cfg", "total", "per_block"),
    [(WanDiTConfig.t2v_1_3b(), 1_418_996_800, 46_440_704), (WanDiTConfig.t2v_14b(), 14_288_491_584, 351_394_304)],
)
def test_real_configs_have_the_published_parameter_counts(cfg, total, per_block):
    shapes = expected_keys(cfg)
    assert sum(math.prod(s) for s in shapes.values()) == total
    block = {k: s for k, s in shapes.items() if k.startswith("blocks.0.")}
    assert sum(math.prod(s) for s in block.values()) == per_block
    assert infer_config(shapes) == cfg
