"""Checkpoint loading: original Wan and diffusers layouts, safetensors and torch.load containers.

Accepted inputs:
* a ``.safetensors`` file, a sharded ``*.safetensors.index.json``, or a directory holding either;
* a ``torch.load`` file (``.pt``/``.pth``/``.bin``; loaded with ``weights_only=True``) that is a state dict
  or a container with ``generator_ema`` / ``generator`` / ``state_dict`` (tried in that order);
* key prefixes ``model.diffusion_model.``, ``module.``, ``model.`` and ``_fsdp_wrapped_module.`` anywhere.

Diffusers keys are mapped to the original layout (the rename table of diffusers'
``convert_wan_to_diffusers.py`` inverted, including the norm2/norm3 swap). Loading is strict: any missing,
unexpected or mis-shaped key is an error that names the keys. A block range reads only its own blocks'
tensors (safetensors are opened lazily). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from dit_stage.model import CausalWanDiT
from wan.config import WanDiTConfig

__all__ = [
    "CheckpointError",
    "diffusers_to_original",
    "expected_keys",
    "infer_config",
    "load_dit",
    "load_state_dict",
    "original_to_diffusers",
]

CONTAINER_KEYS = ("generator_ema", "generator", "state_dict")
_PREFIXES = ("model.diffusion_model.", "module.", "model.")

# (original, diffusers) name fragments, for keys below ``blocks.{i}.`` and at top level.
_BLOCK_RENAMES = (
    ("modulation", "scale_shift_table"),
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("norm3.", "norm2."),  # the affine cross-attn LayerNorm: norm3 in Wan, norm2 in diffusers
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
)
_TOP_RENAMES = (
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    ("patch_embedding.", "patch_embedding."),
)
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the offending keys."""


# ---------------------------------------------------------------------------------------------- key maps
def _rename(key: str, table: Iterable[tuple[str, str]], forward: bool) -> str | None:
    for orig, diff in table:
        src, dst = (orig, diff) if forward else (diff, orig)
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in sd.items():
        m = _BLOCK_KEY.match(key)
        new = (
            (f"blocks.{m.group(1)}." + (_rename(m.group(2), _BLOCK_RENAMES, True) or m.group(2)))
            if m
            else (_rename(key, _TOP_RENAMES, True) or key)
        )
        out[new] = t
    return out


def diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in sd.items():
        m = _BLOCK_KEY.match(key)
        new = (
            (f"blocks.{m.group(1)}." + (_rename(m.group(2), _BLOCK_RENAMES, False) or m.group(2)))
            if m
            else (_rename(key, _TOP_RENAMES, False) or key)
        )
        out[new] = t
    return out


def _is_diffusers(keys: Iterable[str]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k or k == "proj_out.weight" for k in keys)


def _strip(key: str) -> str:
    key = key.replace("_fsdp_wrapped_module.", "")
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


# ---------------------------------------------------------------------------------------------- reading
class _Source:
    """Lazy view of a checkpoint: normalised (original-layout) key → a thunk that reads the tensor."""

    def __init__(self, path: str | Path, container_key: str | None = None) -> None:
        path = Path(path)
        self.path = path
        self.readers: dict[str, tuple] = {}
        files = _safetensors_files(path)
        raw_keys: dict[str, tuple] = {}
        if files is not None:
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():  # noqa: SIM118 - safe_open handles have no __iter__
                        raw_keys[k] = ("st", f, k)
        else:
            obj = _torch_load(path)
            sd = _unwrap(obj, container_key)
            for k, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{path}: entry {k!r} is not a tensor")
                raw_keys[k] = ("t", t)
        stripped = {_strip(k): r for k, r in raw_keys.items()}
        self.layout = "diffusers" if _is_diffusers(stripped) else "original"
        if self.layout == "diffusers":
            stripped = dict(zip(diffusers_to_original(dict.fromkeys(stripped)), stripped.values(), strict=True))
        self.readers = stripped

    def names(self) -> list[str]:
        return list(self.readers)

    def shape(self, key: str) -> tuple[int, ...]:
        r = self.readers[key]
        if r[0] == "t":
            return tuple(r[1].shape)
        with safe_open(str(r[1]), framework="pt") as h:
            return tuple(h.get_slice(r[2]).get_shape())

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            r = self.readers[k]
            if r[0] == "t":
                out[k] = r[1]
            else:
                by_file.setdefault(r[1], []).append(k)
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for k in ks:
                    out[k] = h.get_tensor(self.readers[k][2])
        return out


def _safetensors_files(path: Path) -> list[Path] | None:
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            return _safetensors_files(index[0])
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files
        if files:
            raise CheckpointError(f"{path}: several .safetensors files and no index: {[f.name for f in files]}")
        pts = sorted([*path.glob("*.pt"), *path.glob("*.pth"), *path.glob("*.bin")])
        if len(pts) == 1:
            return None
        raise CheckpointError(f"{path}: no single checkpoint file found")
    if path.name.endswith(".safetensors.index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        return sorted({path.parent / name for name in weight_map.values()})
    if path.suffix == ".safetensors":
        return [path]
    return None


def _torch_load(path: Path) -> object:
    if path.is_dir():
        path = sorted([*path.glob("*.pt"), *path.glob("*.pth"), *path.glob("*.bin")])[0]
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(obj: object, container_key: str | None) -> Mapping[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint is a {type(obj).__name__}, not a state dict or container")
    if container_key is not None:
        if container_key not in obj:
            raise CheckpointError(f"checkpoint has no {container_key!r}; top-level keys: {sorted(obj)[:10]}")
        return _unwrap(obj[container_key], None)
    for key in CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj  # a raw state dict


def load_state_dict(path: str | Path, container_key: str | None = None) -> dict[str, torch.Tensor]:
    """The whole checkpoint as an original-layout state dict (prefixes stripped)."""
    src = _Source(path, container_key)
    return src.read(src.names())


# ---------------------------------------------------------------------------------------------- config and keys
def infer_config(shapes: Mapping[str, tuple[int, ...]], head_dim: int = 128, **overrides: object) -> WanDiTConfig:
    """Architecture from tensor shapes (original layout). The head count is not visible in the shapes
    (qk-norm spans all heads), so it is dim / ``head_dim`` unless ``num_heads`` is given."""
    try:
        dim, in_dim, *patch = shapes["patch_embedding.weight"]
        _, text_dim = shapes["text_embedding.0.weight"]
        _, freq_dim = shapes["time_embedding.0.weight"]
        ffn_dim, _ = shapes["blocks.0.ffn.0.weight"]
        head_out, _ = shapes["head.head.weight"]
    except KeyError as err:
        raise CheckpointError(f"cannot infer the DiT config: checkpoint lacks {err.args[0]!r}") from None
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k)))
    patch_size = tuple(int(p) for p in patch)
    kw: dict[str, object] = {
        "dim": dim,
        "ffn_dim": ffn_dim,
        "num_heads": dim // head_dim,
        "num_layers": layers,
        "in_dim": in_dim,
        "out_dim": head_out // (patch_size[0] * patch_size[1] * patch_size[2]),
        "text_dim": text_dim,
        "freq_dim": freq_dim,
        "patch_size": patch_size,
    }
    kw.update(overrides)
    return WanDiTConfig(**kw)  # type: ignore[arg-type]


def expected_keys(config: WanDiTConfig, block_range: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Keys and shapes a model (or a block range of it) has, without allocating it."""
    with torch.device("meta"):
        model = CausalWanDiT(config, block_range)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check(src_shapes: Mapping[str, tuple[int, ...]], config: WanDiTConfig, path: object) -> None:
    want = expected_keys(config)
    missing = sorted(set(want) - set(src_shapes))
    unexpected = sorted(set(src_shapes) - set(want))
    wrong = sorted(k for k in set(want) & set(src_shapes) if tuple(want[k]) != tuple(src_shapes[k]))
    if missing or unexpected or wrong:
        parts = [f"checkpoint {path} does not match the DiT config {config}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
        if wrong:
            parts.append("shape mismatches: " + ", ".join(f"{k} {src_shapes[k]} vs {want[k]}" for k in wrong[:10]))
        raise CheckpointError("\n".join(parts))


def _names(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_dit(
    path: str | Path,
    config: WanDiTConfig | None = None,
    block_range: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    container_key: str | None = None,
    fp32_modulation: bool = True,
) -> CausalWanDiT:
    """Load blocks [a, b) (default: all) of a Wan2.1 DiT checkpoint, strictly.

    The whole checkpoint's key set is checked against ``config`` (inferred from shapes when None); then only
    the tensors the block range needs are read.
    """
    src = _Source(path, container_key)
    shapes = {k: src.shape(k) for k in src.names()}
    config = config or infer_config(shapes)
    _check(shapes, config, path)
    with torch.device("meta"):
        model = CausalWanDiT(config, block_range, fp32_modulation=fp32_modulation)
    wanted = list(model.state_dict())
    tensors = src.read(wanted)
    tensors = {k: t.to(device=device, dtype=dtype) for k, t in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


CAUSAL_CHECKPOINT_NAMES = ("causal/model.pt", "causal/model.safetensors", "model.pt")
"""Where a model dir keeps its causal DiT checkpoint, in search order (README, "Model weights")."""


def find_causal_checkpoint(model_dir: Path) -> Path | None:
    for name in CAUSAL_CHECKPOINT_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    return None
