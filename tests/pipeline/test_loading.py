"""Loading a pipeline from a model directory: the documented layout, strictly, with named errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_stage.model import make_tiny_dit
from encoder.prompt import DIFFUSERS_TEXT_ENCODER_DIR, DIFFUSERS_TOKENIZER_DIR
from pipeline import PipelineConfig, StreamSpec
from pipeline.loading import ModelDirError, build_tiny_pipeline, load_pipeline
from support.pipekit import SIZE, moving_frames
from wan.tiny import make_tiny_t5, make_tiny_tokenizer, make_tiny_vae

CONFIG = PipelineConfig(width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's weights written in the layout README documents (diffusers VAE/T5 folders, Wan config.json,
    the causal checkpoint as SDv2 ships it: a torch container with a ``generator`` state dict)."""
    root = tmp_path_factory.mktemp("model")
    dit = make_tiny_dit()
    cfg = dit.config
    (root / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "t2v", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim,
        "text_dim": cfg.text_dim, "text_len": cfg.text_len, "freq_dim": cfg.freq_dim, "eps": cfg.eps,
    }))  # fmt: skip
    (root / "causal").mkdir()
    torch.save({"generator": {f"model.{k}": v for k, v in dit.state_dict().items()}}, root / "causal" / "model.pt")
    make_tiny_vae().save_pretrained(root / "vae")
    make_tiny_t5().save_pretrained(root / DIFFUSERS_TEXT_ENCODER_DIR)
    make_tiny_tokenizer().save_pretrained(root / DIFFUSERS_TOKENIZER_DIR)
    return root


def _frames(pipe) -> np.ndarray:
    sid = pipe.open_stream(StreamSpec("a red cat", seed=2))
    return np.concatenate([pipe.push(sid, moving_frames(13)), pipe.finish(sid)])


def test_model_dir_loads_the_same_model_as_the_preset(model_dir):
    loaded = load_pipeline(model_dir, CONFIG, device="cpu", dtype=torch.float32)
    assert "causal" in loaded.description or "model.pt" in loaded.description
    assert np.array_equal(_frames(loaded), _frames(build_tiny_pipeline(CONFIG)))


def test_missing_pieces_are_named(model_dir, tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        load_pipeline(tmp_path / "nope", CONFIG, device="cpu")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ModelDirError, match=r"causal/model\.pt"):
        load_pipeline(tmp_path, CONFIG, device="cpu")
    with pytest.raises(ModelDirError, match=r"other\.pt does not exist"):
        load_pipeline(model_dir, CONFIG, checkpoint=model_dir / "other.pt", device="cpu")
