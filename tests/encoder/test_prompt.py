"""Prompt encoder: a tiny UMT5 and a tiny Unigram tokenizer built here, saved in both model-directory layouts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import UMT5Config, UMT5EncoderModel

from encoder.prompt import (
    DIFFUSERS_TEXT_ENCODER_DIR,
    DIFFUSERS_TOKENIZER_DIR,
    WAN_T5_FILE,
    WAN_TOKENIZER_DIR,
    PromptEncoder,
    PromptEncoderFilesError,
    T5WeightsError,
    clean_prompt,
    convert_wan_t5_state_dict,
    prompt_hash,
    trim_padding,
)
from wan.tiny import TINY_T5_CONFIG as TINY_T5
from wan.tiny import make_tiny_t5 as make_t5
from wan.tiny import make_tiny_tokenizer as make_tokenizer


def hf_to_wan_t5(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a UMT5 encoder in Wan's ``T5Encoder`` key layout (independent of encoder/prompt.py)."""
    out: dict[str, torch.Tensor] = {"token_embedding.weight": state_dict["shared.weight"].clone()}
    out["norm.weight"] = state_dict["encoder.final_layer_norm.weight"].clone()
    names = {"layer.0.layer_norm": "norm1", "layer.0.SelfAttention.q": "attn.q", "layer.0.SelfAttention.k": "attn.k",
             "layer.0.SelfAttention.v": "attn.v", "layer.0.SelfAttention.o": "attn.o",
             "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
             "layer.1.layer_norm": "norm2", "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
             "layer.1.DenseReluDense.wi_1": "ffn.fc1", "layer.1.DenseReluDense.wo": "ffn.fc2"}  # fmt: skip
    for key, value in state_dict.items():
        m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.weight", key)
        if m:
            out[f"blocks.{m.group(1)}.{names[m.group(2)]}.weight"] = value.clone()
    return out


@pytest.fixture(scope="module")
def t5() -> UMT5EncoderModel:
    return make_t5()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, t5) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompt")
    hf, wan = root / "diffusers", root / "wan"
    t5.save_pretrained(hf / DIFFUSERS_TEXT_ENCODER_DIR)
    make_tokenizer().save_pretrained(hf / DIFFUSERS_TOKENIZER_DIR)
    (wan / WAN_TOKENIZER_DIR).mkdir(parents=True)
    torch.save(hf_to_wan_t5(t5.state_dict()), wan / WAN_T5_FILE)
    make_tokenizer().save_pretrained(wan / WAN_TOKENIZER_DIR)
    return {"diffusers": hf, "wan": wan}


def test_both_layouts_load_and_agree(model_dirs, t5):
    hf = PromptEncoder.from_model_dir(model_dirs["diffusers"], dtype=torch.float32)
    wan = PromptEncoder.from_model_dir(model_dirs["wan"], config=TINY_T5, dtype=torch.float32)
    for enc in (hf, wan):
        sd = enc.text_encoder.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in t5.state_dict().items())
    prompt = "a red cat on the mat"
    assert torch.equal(hf.encode(prompt), wan.encode(prompt))


def test_embeddings_are_512_rows_with_padding_zeroed(model_dirs, t5):
    enc = PromptEncoder.from_model_dir(model_dirs["diffusers"], dtype=torch.float32)
    prompt = "a blue fish in the sky"
    emb = enc.encode(prompt)
    assert emb.shape == (1, 512, 32) and emb.dtype == torch.float32
    ids = enc.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    assert ids[-1] == enc.tokenizer.eos_token_id
    n = len(ids)  # 6 words + EOS
    assert n == 7
    assert torch.count_nonzero(emb[0, n:]) == 0
    assert bool((emb[0, :n].abs().sum(-1) > 0).all())
    # Wan's "trim then zero-pad": the kept rows equal the encoder run on the real tokens alone.
    with torch.no_grad():
        unpadded = t5(input_ids=torch.tensor([ids])).last_hidden_state
    torch.testing.assert_close(emb[:, :n], unpadded, rtol=0, atol=1e-5)


def test_padding_mask_matters(model_dirs, t5):
    """Negative control: encoding the padded ids without the attention mask changes the real rows."""
    enc = PromptEncoder.from_model_dir(model_dirs["diffusers"], dtype=torch.float32)
    emb = enc.encode("a cat")
    ids = enc.tokenizer(["a cat"], padding="max_length", max_length=512, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unmasked = t5(input_ids=ids).last_hidden_state
    assert (unmasked[:, :3] - emb[:, :3]).abs().max() > 1e-3


def test_truncation_at_512_tokens(model_dirs):
    enc = PromptEncoder.from_model_dir(model_dirs["diffusers"], dtype=torch.float32)
    emb = enc.encode("the cat " * 400)
    assert emb.shape == (1, 512, 32)
    assert bool((emb[0].abs().sum(-1) > 0).all())


def test_lru_cache_by_prompt_hash(model_dirs):
    enc = PromptEncoder.from_model_dir(model_dirs["diffusers"], dtype=torch.float32, cache_size=2)
    first = enc.encode("a cat")
    assert (enc.hits, enc.misses) == (0, 1)
    again = enc.encode("  a   cat ")  # cleans to the same prompt → same hash → hit
    assert (enc.hits, enc.misses) == (1, 1)
    assert torch.equal(first, again)
    again.zero_()  # callers get a copy; the cached tensor is untouched
    assert torch.equal(enc.encode("a cat"), first)
    enc.encode("a dog")
    enc.encode("a fish")  # evicts the least recently used ("a cat" was used last before "a dog")
    assert len(enc) == 2
    misses = enc.misses
    enc.encode("a cat")
    assert enc.misses == misses + 1
    assert prompt_hash("a cat") == prompt_hash("a  cat\n")
    assert prompt_hash("a cat") != prompt_hash("a dog")


def test_missing_files_are_named(tmp_path, model_dirs):
    with pytest.raises(PromptEncoderFilesError, match=r"tokenizer\.json"):
        PromptEncoder.from_model_dir(tmp_path)
    make_tokenizer().save_pretrained(tmp_path / DIFFUSERS_TOKENIZER_DIR)
    with pytest.raises(PromptEncoderFilesError, match=re.escape(WAN_T5_FILE)):
        PromptEncoder.from_model_dir(tmp_path)
    UMT5Config(**TINY_T5).save_pretrained(tmp_path / DIFFUSERS_TEXT_ENCODER_DIR)
    with pytest.raises(PromptEncoderFilesError, match="safetensors"):
        PromptEncoder.from_model_dir(tmp_path)


def test_wan_checkpoint_key_errors_are_named(t5):
    wan = hf_to_wan_t5(t5.state_dict())
    del wan["blocks.1.ffn.fc2.weight"]
    wan["blocks.0.attn.extra.weight"] = torch.zeros(1)
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**TINY_T5))
    with pytest.raises(T5WeightsError) as err:
        convert_wan_t5_state_dict(wan, model)
    assert "encoder.block.1.layer.1.DenseReluDense.wo.weight" in str(err.value)
    assert "blocks.0.attn.extra.weight" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a   cat\n\ton the\u00a0mat  ", "a cat on the mat"),
        ("Tom &amp;amp; Jerry", "Tom & Jerry"),
        ("\u201cquoted\u201d and \u2018single\u2019", "\"quoted\" and 'single'"),
        ("\ufb01sh \uff21\uff22\u3000c", "fish AB c"),
        ("e\u0301t\u00e9", "\u00e9t\u00e9"),
        ("red\x1b[31m cat\x07", "red cat"),
    ],
    ids=["whitespace", "double-html-unescape", "curly-quotes", "ligature-fullwidth", "nfc", "control-chars"],
)
def test_prompt_cleaning(raw, clean):
    assert clean_prompt(raw) == clean


def test_trimmed_embedding_is_the_real_tokens_and_pads_back_exactly() -> None:
    """What travels is the prompt's real tokens: trimming the zeroed padding rows and zero-padding back (as the DiT
    does) restores the encoder's output bit for bit; a row of a real token that is all zero would survive too."""
    enc = PromptEncoder(make_t5(0), make_tokenizer(), max_length=16)
    for prompt in ("a cat", "a red cat on a blue chair in the sun"):  # the second fills all 16 rows
        full = enc.encode(prompt)[0]
        trimmed = trim_padding(full)
        assert trimmed.shape == (enc.token_count(prompt), full.shape[1])
        assert torch.equal(torch.nn.functional.pad(trimmed, (0, 0, 0, 16 - trimmed.shape[0])), full)
    assert enc.token_count("a cat") < 16
    inner_zero = torch.randn(6, 4)
    inner_zero[2] = 0
    inner_zero[4:] = 0
    assert torch.equal(trim_padding(inner_zero), inner_zero[:4])
    assert trim_padding(torch.zeros(3, 4)).shape == (1, 4)
