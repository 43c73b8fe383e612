"""Dockerfile and .dockerignore, checked structurally (there is no Docker engine on the test machines)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil

import pytest
from deploy.chartkit import ROOT

DOCKERFILE = ROOT / "Dockerfile"
WEIGHT_PATTERNS = ("*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.bin", "*.gguf", "*.onnx")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += (" " if pending else "") + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            word, _, args = pending.partition(" ")
            out.append((word.upper(), args.strip()))
            pending = ""
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


INSTRUCTIONS = instructions(DOCKERFILE.read_text())


def stages() -> list[tuple[str, str]]:
    """(base, name) of every FROM."""
    out = []
    for word, args in INSTRUCTIONS:
        if word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", args, re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            out.append((m[1], m[2]))
    return out


def test_multi_stage_with_gpu_default_and_cpu_variant() -> None:
    names = [name for _, name in stages()]
    assert len(names) >= 3 and len(set(names)) == len(names)
    first_from = next(i for i, (w, _) in enumerate(INSTRUCTIONS) if w == "FROM")
    args = dict(a.partition("=")[::2] for w, a in INSTRUCTIONS[:first_from] if w == "ARG")  # global build args
    assert args["VARIANT"] == "gpu"
    assert "nvidia/cuda" in args["CUDA_IMAGE"] and "runtime" in args["CUDA_IMAGE"]
    bases = dict((name, base) for base, name in stages())
    assert bases["runtime-gpu"] == "${CUDA_IMAGE}" and "runtime-cpu" in bases
    assert stages()[-1][0] == "runtime-${VARIANT}", "the final stage is picked by --build-arg VARIANT"
    builder = " ".join(a for w, a in INSTRUCTIONS if w == "RUN")
    assert "download.pytorch.org/whl/cpu" in builder and "pip install ." in builder


def test_final_stage_runs_rheo_as_a_non_root_user() -> None:
    last_from = max(i for i, (w, _) in enumerate(INSTRUCTIONS) if w == "FROM")
    final = INSTRUCTIONS[last_from:]
    users = [a for w, a in final if w == "USER"]
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"} and user.isdigit(), "numeric non-root USER (runAsNonRoot can check it)"
    assert user == "10001", "the chart's runAsUser"
    (entrypoint,) = [a for w, a in final if w == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["rheo"]


def test_copies_exist_and_carry_no_weights() -> None:
    copies = [a for w, a in INSTRUCTIONS if w in {"COPY", "ADD"}]
    assert copies
    assert not [a for w, a in INSTRUCTIONS if w == "ADD"], "COPY, not ADD (no remote fetches into the image)"
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        sources = parts[:-1]
        assert sources, args
        for src in sources:
            assert not any(fnmatch.fnmatch(src, p) for p in WEIGHT_PATTERNS), f"weights copied: {args}"
            assert not re.search(r"(^|/)(models?|weights|checkpoints?)(/|$)", src), f"weights copied: {args}"
            if "--from=" not in args:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist"
                assert src not in {".", "./"}, "copy named folders, not the whole context"


def test_the_image_installs_every_package_pyproject_ships() -> None:
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in meta["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {a.split()[0] for w, a in INSTRUCTIONS if w == "COPY" and "--from=" not in a}
    assert packages <= copied, f"packages missing from the image: {packages - copied}"
    assert meta["project"]["scripts"]["rheo"] == "services.cli:main"


def test_dockerignore_keeps_weights_and_local_state_out() -> None:
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "tests"} <= lines
    for pattern in WEIGHT_PATTERNS:
        assert f"**/{pattern}" in lines
    ignored_copies = [a.split()[0] for w, a in INSTRUCTIONS if w == "COPY" and "--from=" not in a
                      if a.split()[0].rstrip("/") in lines]
    assert not ignored_copies, f".dockerignore hides what the Dockerfile copies: {ignored_copies}"


def test_docker_build_is_not_run_here() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker client: the image is checked structurally only")
    pytest.skip("no Docker engine on the test machines: `docker build .` is left to CI with an engine")
