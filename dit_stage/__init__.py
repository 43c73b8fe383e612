"""rheo dit_stage: the causal Wan2.1 DiT, its block ranges, KV-cache shards and stream-batch (docs/dit.md).

Modules are imported directly (``from dit_stage.model import CausalWanDiT``); this package init stays empty so
the model and bench import on a bare torch machine without the service stack.
"""
