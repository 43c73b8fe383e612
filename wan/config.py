"""Architecture configs of the Wan2.1 DiT (T2V-1.3B, T2V-14B and tiny test models)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class WanDiTConfig:
    """Shape of a Wan2.1 DiT. Field names follow the original Wan ``WanModel`` config."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_max_seq_len: int = 1024

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 for the 3D RoPE split")
        if self.freq_dim % 2:
            raise ValueError("freq_dim must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axis_dims(self) -> tuple[int, int, int]:
        """(t, h, w) RoPE dims: 44/42/42 for head_dim 128 (Wan's split, interleaved complex pairs)."""
        d = self.head_dim
        hw = 2 * (d // 6)
        return d - 2 * hw, hw, hw

    @property
    def patch_numel(self) -> int:
        return math.prod(self.patch_size)

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        _, ph, pw = self.patch_size
        if latent_h % ph or latent_w % pw:
            raise ValueError(f"latent {latent_h}x{latent_w} is not divisible by the patch {ph}x{pw}")
        return (latent_h // ph) * (latent_w // pw)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def with_layers(self, num_layers: int) -> WanDiTConfig:
        return replace(self, num_layers=num_layers)

    @classmethod
    def t2v_1_3b(cls) -> WanDiTConfig:
        return cls(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)

    @classmethod
    def t2v_14b(cls) -> WanDiTConfig:
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

    @classmethod
    def tiny(cls, num_layers: int = 3) -> WanDiTConfig:
        """A CPU test model: 2 heads of 16 (RoPE split 8/4/4), 4 latent channels, 32-d text."""
        return cls(
            dim=32,
            ffn_dim=48,
            num_heads=2,
            num_layers=num_layers,
            in_dim=4,
            out_dim=4,
            text_dim=32,
            text_len=16,
            freq_dim=16,
            rope_max_seq_len=1024,
        )

    @classmethod
    def named(cls, name: str) -> WanDiTConfig:
        table = {"1.3b": cls.t2v_1_3b, "14b": cls.t2v_14b, "tiny": cls.tiny}
        try:
            return table[name.lower()]()
        except KeyError:
            raise ValueError(f"unknown DiT config {name!r}; known: {sorted(table)}") from None
