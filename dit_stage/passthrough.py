"""The pass-through stage of the measurement mode (``model.passthrough``): the DiT runs, its output is the input.

Every block still runs (the ring's timing, links, batching and caches are those of the real mode), but the last
stage replaces each item's x0 by the clean latent its noisy input was made from. The noise of every draw is known
(``draw_noise`` keyed by seed, chunk, step and purpose), so x0 = (x_t − s·ε) / (1 − s) inverts it exactly: s is the
chunk's ``noise_scale`` at step 0 (``FirstStage`` mixes it in directly), σ(t_k) at a re-noised step k. With the
pass-through VAE (``encoder.passthrough``) a frame's content reaches the HLS output, where ``bench/serve.py``
reads the publisher's frame-number marker for content-based glass-to-glass latency.
"""

from __future__ import annotations

import torch

from dit_stage.micro_step import MicroStep, StageOutput, SwitchStep
from dit_stage.stage_stream import is_clean
from dit_stage.worker import StageWorker
from proto import RingItem
from proto.clock import segment_seed
from wan.scheduler import draw_noise

__all__ = ["PassthroughStageWorker"]


class PassthroughStageWorker(StageWorker):
    _noisy: dict[int, torch.Tensor]

    def compute(self, step: MicroStep | SwitchStep) -> StageOutput:
        if self.is_last and isinstance(step, MicroStep):
            self._noisy = {id(m): step.noisy[r : r + 1] for r, m in enumerate(step.items)}
        return super().compute(step)

    def _finish(self, items: list[RingItem], x0: torch.Tensor, out: StageOutput) -> None:
        rows = [x0[r : r + 1] if is_clean(m) else self._clean(m, self._noisy[id(m)].to(x0.device, torch.float32))
                for r, m in enumerate(items)]
        self._noisy = {}
        super()._finish(items, torch.cat(rows).to(x0.dtype), out)

    def _clean(self, meta: RingItem, noisy: torch.Tensor) -> torch.Tensor:
        """The latent ``noisy`` was made from, by the draw that made it."""
        st = self.streams.get(meta.stream_id)
        c = meta.seq - (st.segment_start if st is not None else 0)
        seed = segment_seed(meta.seed, meta.segment)
        if meta.step == 0:
            s, purpose = meta.noise_scale, "input"
        else:
            s, purpose = self.scheduler.sigma(meta.timesteps[meta.step]), "renoise"
        eps = draw_noise(tuple(noisy.shape), seed, c, meta.step, purpose, noisy.device)
        return (noisy - s * eps) / max(1.0 - s, 1e-6)
