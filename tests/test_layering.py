"""Folders match what runs where (design §1): which package may import which, read from the source with ``ast``.

Every ``import``/``from ... import`` counts, also those inside functions and ``TYPE_CHECKING`` blocks: a lazy
import is still a dependency of the process that runs it. The libraries (``media``, ``wan``) import no service;
egress imports nothing from ingest, the decoder nothing from ingest or egress; no service but the DiT stage
imports ``dit_stage`` or ``pipeline`` internals; ``pipeline`` (the single-process path) imports no RTMP/HLS
service. Entry points that start every service (``services/cli.py``, ``services/stack.py``) are not services.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SERVICES = (
    "ingest",
    "encoder",
    "decoder",
    "egress",
    "dit_stage",
    "pipeline",
    "services.controller",
    "services.gateway",
    "jobs",
)
STAGE_INTERNALS = ("dit_stage", "pipeline")

# package (a folder under ROOT, dotted) → packages it must not import
RULES: dict[str, tuple[str, ...]] = {
    "media": SERVICES,
    "wan": SERVICES,
    "egress": ("ingest", *STAGE_INTERNALS),
    "decoder": ("ingest", "egress", *STAGE_INTERNALS),
    "ingest": STAGE_INTERNALS,
    "encoder": STAGE_INTERNALS,
    "services.controller": STAGE_INTERNALS,
    "services.gateway": ("ingest", "egress", "decoder", *STAGE_INTERNALS),
    "pipeline": ("ingest", "egress", "decoder"),
    "jobs": ("ingest", "egress", "decoder", "dit_stage"),  # runs the offline engine (pipeline), nothing live
}

# (importing file, imported module) pairs allowed despite RULES, each with the reason it cannot go. None today.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; ``from a import b`` yields ``a.b`` and ``a``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (the project imports absolutely)"
            assert node.module is not None
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    folder = ROOT / package.replace(".", "/")
    assert folder.is_dir(), f"no package folder {folder}"
    out: list[str] = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, name in imported_modules(path):
            bad = [f for f in forbidden if _within(name, f) and not _within(package, f)]
            if bad and (rel, name) not in EXCEPTIONS:
                out.append(f"{rel}:{line} imports {name}")
    return sorted(set(out))


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_follow_the_layering(package: str) -> None:
    assert violations(package, RULES[package]) == []


def test_the_rules_see_imports() -> None:
    """Negative control: the walker finds a known import (ingest's server runs the shared chunk-stream parser)."""
    assert any(name == "media.chunkstream" for _, name in imported_modules(ROOT / "ingest/server.py"))
    assert violations("ingest", ("media",))
