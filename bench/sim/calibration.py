"""GPU costs of the simulated cluster, calibrated from measured H100 numbers (BENCHMARKS.md).

DiT: the ``bench/dit.py`` rows of the 1.3B on one H100 80GB (graph+compile column, 2026-11-23, commit 332e8d7 +
tree): one forward of ``streams × steps`` slots (items) at 512² and 480×832, steps 1/2/4, streams 1/2/4 — nine
rows per resolution. A micro-step of n items of one resolution costs a + b·n, a least-squares fit over those nine
rows (a: the fixed cost of a forward, b: per item). A ring is one GPU running the whole model (the rows are
whole-model forwards). VAE: the same file's eager bf16 Wan VAE at 512×512 per 4-frame chunk (encode ≈ 43 ms,
decode ≈ 76 ms, the local-pipeline section), scaled by pixels to other sizes; the ``taehv`` variant replaces the
decode by docs/encoder.md's TAEHV reading (7.4 ms per chunk, fp16, a one-off reading, not a BENCHMARKS.md row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CALIBRATIONS", "H100_DIT_ROWS", "Calibration", "Sig"]

Sig = tuple[int, int]  # (height, width): items of one size share a forward
CHUNK_FRAMES = 4

H100_DIT_ROWS: dict[Sig, list[tuple[int, int, float]]] = {
    # (steps, streams, graph+compile ms per forward), BENCHMARKS.md "DiT", model 1.3b
    (512, 512): [(1, 1, 13.9), (1, 2, 26.1), (1, 4, 50.6), (2, 1, 21.8), (2, 2, 42.4), (2, 4, 82.8),
                 (4, 1, 36.2), (4, 2, 70.9), (4, 4, 143.4)],
    (480, 832): [(1, 1, 22.4), (1, 2, 42.4), (1, 4, 84.5), (2, 1, 33.9), (2, 2, 68.9), (2, 4, 137.5),
                 (4, 1, 62.1), (4, 2, 126.7), (4, 4, 253.4)],
}
WAN_ENCODE_MS_512 = 43.0  # per 4-frame chunk at 512×512 (BENCHMARKS.md, local pipeline)
WAN_DECODE_MS_512 = 76.0
TAEHV_DECODE_MS_512 = 7.4  # docs/encoder.md, one-off reading


def _fit(rows: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """(a, b, largest residual) of ms ≈ a + b·items over the rows."""
    n = np.array([steps * streams for steps, streams, _ in rows], dtype=float)
    t = np.array([ms for *_, ms in rows])
    design = np.vstack([np.ones_like(n), n]).T
    (a, b), *_ = np.linalg.lstsq(design, t, rcond=None)
    return float(a), float(b), float(np.abs(design @ [a, b] - t).max())


@dataclass(frozen=True)
class Calibration:
    name: str
    encode_ms_512: float = WAN_ENCODE_MS_512
    decode_ms_512: float = WAN_DECODE_MS_512
    fits: dict[Sig, tuple[float, float, float]] = field(
        default_factory=lambda: {sig: _fit(rows) for sig, rows in H100_DIT_ROWS.items()})

    def dit_s(self, sig: Sig, n: int) -> float:
        """One forward (micro-step) of ``n`` items of ``sig``."""
        a, b, _ = self.fits[sig]
        return (a + b * n) / 1000.0

    @property
    def encode_ms_per_mpx(self) -> float:
        return self.encode_ms_512 / (512 * 512 / 1e6 * CHUNK_FRAMES)

    @property
    def decode_ms_per_mpx(self) -> float:
        return self.decode_ms_512 / (512 * 512 / 1e6 * CHUNK_FRAMES)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "dit_rows": "BENCHMARKS.md DiT, 1.3b, H100, graph+compile, steps 1/2/4 x "
                "streams 1/2/4", "dit_ms_a_plus_b_n": {f"{h}x{w}": [round(a, 2), round(b, 2), round(r, 2)]
                                                       for (h, w), (a, b, r) in self.fits.items()},
                "encode_ms_per_chunk_512": self.encode_ms_512, "decode_ms_per_chunk_512": self.decode_ms_512}


CALIBRATIONS = {"wan": Calibration("wan"), "taehv": Calibration("taehv", decode_ms_512=TAEHV_DECODE_MS_512)}
