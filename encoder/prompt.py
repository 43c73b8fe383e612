"""umT5 prompt encoder: clean → tokenize to 512 → ``UMT5EncoderModel`` → zero the padding rows; LRU-cached.

Matches Wan2.1 (``wan/modules/t5.py``, ``tokenizers.py``) as StreamDiffusionV2 uses it: prompts are cleaned
(ftfy-style fixes, ``html.unescape`` twice, whitespace collapsed), tokenized with
``padding="max_length", max_length=512, truncation=True`` (EOS appended), encoded with the attention mask,
and the rows past the real length are set to zero. The DiT cross-attends to all 512 rows with no mask.

Weights come from the model directory, in either layout:
  * diffusers: ``text_encoder/`` (``UMT5EncoderModel``) and ``tokenizer/``;
  * Wan: ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's ``T5Encoder`` state dict, renamed here) and ``google/umt5-xxl/``.
Nothing is downloaded; ``torch.load`` runs with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from encoder.checkpoints import state_dict_mismatch

MAX_PROMPT_TOKENS = 512
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
DIFFUSERS_TEXT_ENCODER_DIR = "text_encoder"
DIFFUSERS_TOKENIZER_DIR = "tokenizer"

# google/umt5-xxl, encoder only (what Wan2.1 ships as models_t5_umt5-xxl-enc-bf16.pth).
UMT5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "tie_word_embeddings": False,
}


class PromptEncoderFilesError(FileNotFoundError):
    """Text-encoder weights or tokenizer missing from the model directory (the message names the files)."""


class T5WeightsError(ValueError):
    """A Wan T5 checkpoint whose keys or shapes do not match the config (the message names the keys)."""


# -- cleaning -------------------------------------------------------------------------------------------------

# The parts of ftfy.fix_text (Wan's first cleaning step) that apply to typed prompts: terminal escapes, control
# characters, Latin ligatures, full-width characters, curly quotes, NFC. Mojibake repair (ftfy's fix_encoding) is
# left out: it needs ftfy's tables and only matters for text that was already decoded with the wrong codec.
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]")
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_LIGATURES = str.maketrans(
    {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "ſt", "\ufb06": "st",
     "\u0132": "IJ", "\u0133": "ij", "\u013f": "L·", "\u0140": "l·", "\u01c7": "LJ", "\u01c8": "Lj", "\u01c9": "lj",
     "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj"}
)  # fmt: skip
_WIDTH = {0x3000: " "} | {
    i: unicodedata.normalize("NFKC", chr(i))
    for i in range(0xFF01, 0xFFF0)
    if len(unicodedata.normalize("NFKC", chr(i))) == 1 and unicodedata.normalize("NFKC", chr(i)) != chr(i)
}
_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'``: ftfy-style fixes, ``html.unescape`` twice, strip, collapse whitespace."""
    text = _TERMINAL_ESCAPE.sub("", text)
    text = _CONTROL_CHARS.sub("", text)
    text = text.translate(_LIGATURES).translate(_WIDTH)
    text = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", text))
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def prompt_hash(text: str) -> str:
    """Cache key of a prompt: SHA-256 of its cleaned form (prompts that clean the same share embeddings)."""
    return hashlib.sha256(clean_prompt(text).encode("utf-8")).hexdigest()


# -- Wan checkpoint conversion --------------------------------------------------------------------------------

_WAN_BLOCK_RENAMES = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)


def wan_to_hf_t5_key(key: str) -> list[str]:
    """One key of Wan's ``T5Encoder`` → its ``UMT5EncoderModel`` name(s) (the embedding is shared twice)."""
    if key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        for old, new in _WAN_BLOCK_RENAMES:
            if m.group(2) == old:
                return [f"encoder.block.{m.group(1)}.{new}"]
    raise T5WeightsError(f"unknown Wan T5 key {key!r}")


def convert_wan_t5_state_dict(state_dict: dict[str, torch.Tensor], model: UMT5EncoderModel) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        try:
            for new in wan_to_hf_t5_key(key):
                converted[new] = value
        except T5WeightsError:
            unknown.append(key)
    problem = state_dict_mismatch(converted, model.state_dict(), unknown)
    if problem:
        raise T5WeightsError(f"T5 checkpoint does not match the config: {problem}")
    return converted


def load_text_encoder(
    model_dir: str | Path,
    *,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> UMT5EncoderModel:
    """``text_encoder/`` (diffusers) if present, else Wan's ``models_t5_umt5-xxl-enc-bf16.pth``.

    ``config`` (``UMT5Config`` keyword arguments) applies to the ``.pth`` file; default: umT5-XXL.
    """
    model_dir = Path(model_dir)
    hf_dir = model_dir / DIFFUSERS_TEXT_ENCODER_DIR
    wan_file = model_dir / WAN_T5_FILE
    if (hf_dir / "config.json").is_file():
        if not any(hf_dir.glob("*.safetensors")) and not any(hf_dir.glob("*.bin")):
            raise PromptEncoderFilesError(f"text encoder weights missing: no *.safetensors in {hf_dir}")
        model = UMT5EncoderModel.from_pretrained(hf_dir, dtype=dtype, local_files_only=True)
        return model.to(device).eval()
    if not wan_file.is_file():
        raise PromptEncoderFilesError(
            f"text encoder weights missing: expected {wan_file} or {hf_dir}/config.json + model.safetensors"
        )
    state_dict = torch.load(wan_file, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise T5WeightsError(f"{wan_file} is not a state dict")
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**(config or UMT5_XXL_CONFIG)))
    model.load_state_dict(convert_wan_t5_state_dict(state_dict, model), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """``tokenizer/`` (diffusers) if present, else Wan's ``google/umt5-xxl/``."""
    model_dir = Path(model_dir)
    for sub in (DIFFUSERS_TOKENIZER_DIR, WAN_TOKENIZER_DIR):
        folder = model_dir / sub
        if folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    raise PromptEncoderFilesError(
        f"tokenizer missing: expected {model_dir / DIFFUSERS_TOKENIZER_DIR}/tokenizer.json or "
        f"{model_dir / WAN_TOKENIZER_DIR}/tokenizer.json (or spiece.model)"
    )


# -- encoder --------------------------------------------------------------------------------------------------


def trim_padding(embedding: torch.Tensor) -> torch.Tensor:
    """``[L, D]`` (or ``[1, L, D]``) without its trailing all-zero rows — the prompt's real tokens, as it travels.

    Lossless by construction: the receiver zero-pads back to ``text_len`` (``CausalWanDiT.set_prompt``), which
    restores exactly the tensor that was trimmed, whatever its rows hold (Wan itself trims to the token count and
    zero-pads to 512 before ``text_embedding``; cross-attention then runs over all 512 rows, unmasked). At least
    one row is kept."""
    rows = embedding.reshape(-1, embedding.shape[-1]).ne(0).any(dim=-1).nonzero()
    keep = max(1, int(rows[-1]) + 1 if len(rows) else 1)
    return embedding[..., :keep, :]


class PromptEncoder:
    """Prompt → ``[1, max_length, d_model]`` embeddings with padding rows zeroed, cached by prompt hash (LRU)."""

    def __init__(
        self,
        text_encoder: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = MAX_PROMPT_TOKENS,
        cache_size: int = 32,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        *,
        config: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        max_length: int = MAX_PROMPT_TOKENS,
        cache_size: int = 32,
    ) -> PromptEncoder:
        tokenizer = load_tokenizer(model_dir)
        text_encoder = load_text_encoder(model_dir, config=config, dtype=dtype, device=device)
        return cls(text_encoder, tokenizer, max_length=max_length, cache_size=cache_size)

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.d_model)

    def __len__(self) -> int:
        return len(self._cache)

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """Embeddings ``[1, max_length, d_model]`` of ``prompt`` (a fresh tensor; the cache keeps its own copy)."""
        key = prompt_hash(prompt)
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return cached.clone()
        self.misses += 1
        embeds = self._encode_uncached(clean_prompt(prompt))
        if self.cache_size:
            self._cache[key] = embeds.clone()
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embeds

    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` after cleaning (EOS included, at most ``max_length``): the rows it fills."""
        tokens = self.tokenizer([clean_prompt(prompt)], max_length=self.max_length, truncation=True,
                                add_special_tokens=True)
        return len(tokens["input_ids"][0])

    def clear_cache(self) -> None:
        self._cache.clear()

    def _encode_uncached(self, cleaned: str) -> torch.Tensor:
        tokens = self.tokenizer(
            [cleaned],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        valid = mask.bool().unsqueeze(-1)
        return torch.where(valid, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
