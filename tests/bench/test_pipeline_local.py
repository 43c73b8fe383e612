"""bench/pipeline_local.py's exactness check of a compiled VAE row (``vae_agreement``), on CPU with the tiny VAE."""

from __future__ import annotations

import copy

import torch

from bench.pipeline_local import vae_agreement
from encoder.vae import StreamVAE
from wan.tiny import make_tiny_vae


def test_vae_agreement_is_zero_for_a_copy_and_sees_one_changed_weight() -> None:
    vae = make_tiny_vae(0)
    same, changed = StreamVAE(copy.deepcopy(vae)), copy.deepcopy(vae)
    assert vae_agreement(StreamVAE(vae), same, 16, 16) == 0.0
    with torch.no_grad():  # the negative control: one decoder weight moved by 1e-2
        next(p for p in changed.decoder.parameters() if p.dim() == 5).view(-1)[0] += 1e-2
    assert vae_agreement(StreamVAE(vae), StreamVAE(changed), 16, 16) > 1e-6
