"""Random weights at every preset (``model.random_weights``): each stage draws only its own blocks and gets exactly
the single-process model's weights; a real preset without weights or the opt-in is refused by every service."""

from __future__ import annotations

import pytest
import torch

from dit_stage.random_weights import random_dit
from dit_stage.stage_model import load_stage_model, slice_stage
from encoder.prompt import trim_padding
from encoder.random_prompt import RandomPromptEncoder
from ingest.models import IngestModels, largest_messages
from services.config import ModelSettings, Settings
from services.gpu_budget import one_gpu_budget
from services.runtime import ServiceStartError
from wan.config import WanDiTConfig

SMALL = WanDiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=5, in_dim=4, out_dim=4, text_dim=32, text_len=16,
                     freq_dim=16, rope_max_seq_len=1024)
"""Small enough for CPU, 5 blocks so a 3-stage split has an interior stage."""


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stage_split_random_weights_equal_the_single_process_model(dtype: torch.dtype) -> None:
    whole = random_dit(SMALL, seed=7, dtype=dtype)
    for split in ([(0, 5)], [(0, 2), (2, 5)], [(0, 1), (1, 4), (4, 5)]):
        for rng in split:
            stage = random_dit(SMALL, rng, seed=7, dtype=dtype)  # only its blocks are drawn
            assert list(stage.blocks) == [str(i) for i in range(*rng)]
            _same(stage, slice_stage(whole, rng))
    other = random_dit(SMALL, (1, 4), seed=8, dtype=dtype)  # negative control: the seed matters
    assert not torch.equal(other.blocks["2"].ffn[0].weight, whole.blocks["2"].ffn[0].weight)
    assert not torch.equal(whole.blocks["1"].ffn[0].weight, whole.blocks["2"].ffn[0].weight)  # a seed per block


def test_a_real_preset_needs_weights_or_the_explicit_opt_in() -> None:
    refused = Settings(model={"preset": "1.3b", "device": "cpu"})
    with pytest.raises(ServiceStartError, match="random_weights"):
        load_stage_model(refused, (29, 30), 30)
    with pytest.raises(ServiceStartError, match="random_weights"):
        IngestModels.load(refused.model)
    opted = Settings(model={"preset": "1.3b", "device": "cpu", "random_weights": True})
    last = load_stage_model(opted, (29, 30), 30)  # the last stage of a 1.3B ring: one block and the head
    assert last.config == WanDiTConfig.named("1.3b") and list(last.blocks) == ["29"] and last.head is not None
    _same(last.blocks["29"], random_dit(WanDiTConfig.named("1.3b"), (29, 30), seed=0).blocks["29"])
    assert largest_messages(opted) > largest_messages(Settings())  # ingest sizes its messages for the real VAE
    budget = one_gpu_budget(opted, None, 1).parts  # the one-GPU check counts the real VAE, no umT5
    assert budget["VAE ×2"] > 0 and budget["umT5"] == 0 and budget["DiT"] > 2e9


def test_the_random_prompt_encoder_has_umt5s_shape_and_padding() -> None:
    enc = RandomPromptEncoder(dim=4096, max_length=512)
    emb = enc.encode("a red fish in the sky")
    assert emb.shape == (1, 512, 4096) and enc.token_count("a red fish in the sky") == 7
    assert trim_padding(emb[0]).shape == (7, 4096)
    assert torch.equal(emb, RandomPromptEncoder(dim=4096, max_length=512).encode("a  red fish in the sky"))
    assert not torch.equal(emb, enc.encode("a blue fish"))
    assert ModelSettings(random_weights=True).preset == "tiny"  # the opt-in alone changes nothing for tiny
