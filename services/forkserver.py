"""Service processes forked from one that has already imported what every service imports (``LocalStack``).

A service process spends 2.4–5.6 CPU-seconds importing torch, diffusers, transformers, fastapi and pydantic before it
does anything; a stack of eight starts about 26 CPU-seconds of imports, 13 s on two cores, at every ``rheo up`` and
in every stack test. Here one multiprocessing fork server imports them once (``PRELOAD``) and forks each service
from it: the child applies the service's environment, becomes its own session (``os.killpg`` reaches it as it
reached a ``Popen`` child), sends its output to the service's log and runs ``rheo <service>`` as ``services.cli``
would. ``ForkedService`` answers ``pid``, ``poll()``, ``returncode`` and ``wait()`` as ``subprocess.Popen`` does
(exit codes included: negative for a signal), so the supervisor cannot tell the difference.

The children are daemonic: when the process that owns the stack exits without stopping it, multiprocessing ends
them (SIGTERM) instead of leaving them running. Nothing here starts a thread before the fork (torch's own pools
start lazily); a machine with an NVIDIA driver forks only CPU services (``can_fork``). Torch's thread count, fixed
by ``OMP_NUM_THREADS`` when libgomp loads in the server, is set again from the service's environment in the child.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from multiprocessing.context import ForkServerContext

__all__ = ["PRELOAD", "ForkedService", "can_fork", "fork_service"]

PRELOAD = ["torch", "numpy", "pydantic", "fastapi", "uvicorn", "nats", "av", "diffusers", "transformers",
           "services.runtime", "services.cli"]
"""What the fork server imports once: the imports every service pays for (ingest's and the decoder's the most)."""

_CTX: ForkServerContext | None = None


def _context() -> ForkServerContext:
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def can_fork(argv: list[str], env: dict[str, str]) -> bool:
    """Whether ``argv`` is a ``rheo`` service this module forks: ``[python, -m, services.cli, ...]`` on Linux, and
    not one that may use a GPU. CUDA is not fork-safe once initialised, and a preloaded library may initialise it at
    import (``torch.cuda.is_available()``), so where an NVIDIA driver is present only a service held to
    ``model.device: cpu`` is forked; the others start as fresh interpreters."""
    if sys.platform != "linux" or len(argv) < 4 or argv[0] != sys.executable or argv[1:3] != ["-m", "services.cli"]:
        return False
    return env.get("RHEO_MODEL__DEVICE") == "cpu" or not os.path.exists("/dev/nvidiactl")


def _run(args: list[str], env: dict[str, str], log_path: str) -> None:
    """The forked child: the service's environment, session and log, then ``rheo <args>``."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  # the process's own streams, to its end
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    from services.cli import main

    sys.argv = ["rheo", *args]
    sys.exit(main(args))


class ForkedService:
    """``subprocess.Popen``'s view of a forked service: ``pid``, ``poll``, ``returncode``, ``wait``."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid: int = process.pid  # type: ignore[assignment]
        self.args = ["rheo (forked)"]

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code


def fork_service(argv: list[str], env: dict[str, str], log_path: str) -> ForkedService:
    """Start ``argv`` (``can_fork``) forked from the preloaded server, its output appended to ``log_path``."""
    process = _context().Process(target=_run, args=(argv[3:], dict(env), log_path), daemon=True,
                                 name=f"rheo-{argv[3]}")
    process.start()
    return ForkedService(process)
