"""Restarts of ``rheo up``'s service processes, as Kubernetes restarts a pod's container (CrashLoopBackOff).

A process that exits while the stack runs is started again with the same argv, env and log file (appended) after
a backoff that doubles from ``initial_backoff_s`` to ``max_backoff_s`` and returns to the start once the process
has stayed ready for ``reset_after_s``. The supervisor gives up only on a crash loop: a service that exits again
after ``crash_loop_restarts`` restarts within ``crash_loop_window_s``, or after that many restarts in a row that
never became ready (a service that takes longer to fail than the window, e.g. a port taken). One ``poll()`` never
waits for a process to come up, so a slow restart does not delay noticing another service's exit
(docs/supervision.md).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.forkserver import ForkedService, can_fork, fork_service


class StackError(RuntimeError):
    """The stack could not start or keep running; the message names the service and shows its log tail."""


class CrashLoopError(StackError):
    """A service kept exiting: the supervisor gave up on it (and ``rheo up`` exits non-zero with this reason)."""


@dataclass
class Proc:
    """One service process: how to start it, and the running ``Popen`` (replaced on each restart)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health_port: int
    log_path: Path
    popen: subprocess.Popen[bytes] | ForkedService | None = None
    fork: bool = False
    """Fork a ``rheo`` service from the preloaded fork server instead of starting a new interpreter."""

    def log_tail(self, n: int = 3000) -> str:
        """About the last ``n`` bytes of its log (which grows across restarts: never read whole), a line repeated
        over and over (a retry loop) shown once with its count, so that what came before it still shows."""
        if not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - max(16 * n, 1 << 18)))  # a retry loop of minutes, collapsed below
            lines = f.read().decode(errors="replace").splitlines()
        out: list[str] = []
        repeats = 0
        for line in lines:
            if out and _without_time(line) == _without_time(out[-1]):
                repeats += 1
                continue
            if repeats:
                out.append(f"    (the line above {repeats} more times)")
            out.append(line)
            repeats = 0
        if repeats:
            out.append(f"    (the line above {repeats} more times)")
        return "\n".join(out)[-n:]

    def spawn(self) -> None:
        """Start (or start again) the process; its output is appended to its log file. A ``rheo`` service is forked
        from the preloaded fork server when ``fork`` is set (services/forkserver.py: its imports paid once)."""
        if self.fork and can_fork(self.argv, self.env):
            self.popen = fork_service(self.argv, self.env, str(self.log_path))
            return
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.popen = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def ready(self) -> bool:
        return http_ready(self.health_port)


_LOG_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ ")


def _without_time(line: str) -> str:
    """A log line without its leading timestamp (``configure_logging``'s format)."""
    return _LOG_TIME.sub("", line, count=1)


def http_ready(port: int) -> bool:
    """``/readyz`` of the service whose health port this is answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    reset_after_s: float = 30.0
    """ready this long after a restart: the next crash waits ``initial_backoff_s`` again"""
    crash_loop_restarts: int = 5
    crash_loop_window_s: float = 60.0
    """a service that exits again after ``crash_loop_restarts`` restarts within this window, or after as many
    restarts in a row that never became ready, is crash-looping"""


@dataclass
class _State:
    backoff_s: float
    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)  # monotonic times of restarts within the window
    restart_at: float | None = None  # a restart is pending: when it is due
    ready_at: float | None = None  # when a restarted process was first seen ready
    failed_starts: int = 0  # restarts in a row whose process exited before it was seen ready
    left_down: bool = False  # exited, and not to be restarted (``no_restart``)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def tail_lines(text: str, n: int = 8) -> str:
    return "\n".join("    | " + line for line in text.rstrip().splitlines()[-n:])


class Supervisor:
    """Watches processes and restarts those that exit; ``poll()`` is one non-blocking pass."""

    def __init__(self, procs: list[Proc], policy: RestartPolicy | None = None, *, no_restart: set[str] | None = None,
                 report: Callable[[str], None] = print) -> None:
        self.procs = procs
        self.policy = policy or RestartPolicy()
        self.no_restart = set(no_restart or ())
        self.report = report
        self._state = {p.name: _State(self.policy.initial_backoff_s) for p in procs}

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far, per service (every service listed)."""
        return {name: st.restarts for name, st in self._state.items()}

    def poll(self, now: float | None = None) -> None:
        """Notice exits, start due restarts, reset the backoff of services that stayed ready; raises
        ``CrashLoopError`` when a service crash-loops."""
        now = time.monotonic() if now is None else now
        for p in self.procs:
            st = self._state[p.name]
            if st.left_down or p.popen is None:
                continue
            code = p.popen.poll()
            if code is None:
                self._running(p, st, now)
            elif st.restart_at is None:
                self._exited(p, st, code, now)
            elif now >= st.restart_at:
                st.restart_at, st.ready_at = None, None
                p.spawn()  # first: whoever reads the count sees the new process
                st.restarts += 1
                st.recent.append(now)

    def _running(self, p: Proc, st: _State, now: float) -> None:
        if st.restarts == 0:
            return
        if st.ready_at is None:
            if p.ready():
                st.ready_at, st.failed_starts = now, 0
                self.report(f"rheo up: {p.name} is ready again (restart #{st.restarts})")
        elif st.backoff_s != self.policy.initial_backoff_s and now - st.ready_at >= self.policy.reset_after_s:
            st.backoff_s = self.policy.initial_backoff_s

    def _exited(self, p: Proc, st: _State, code: int, now: float) -> None:
        why = describe_exit(code)
        if p.name in self.no_restart:
            st.left_down = True
            self.report(f"rheo up: {p.name} {why}; not restarted (restart off for it)")
            return
        pol = self.policy
        while st.recent and now - st.recent[0] > pol.crash_loop_window_s:
            st.recent.popleft()
        if st.restarts and st.ready_at is None:
            st.failed_starts += 1
        loop = None
        if len(st.recent) >= pol.crash_loop_restarts:
            loop = f"after {len(st.recent)} restarts within {pol.crash_loop_window_s:g}s"
        elif st.failed_starts >= pol.crash_loop_restarts:
            loop = f"after {st.failed_starts} restarts in a row that never became ready"
        if loop is not None:
            raise CrashLoopError(f"{p.name} is crash-looping: {why} {loop}; giving up. Its log ({p.log_path}) "
                                 f"ends:\n{tail_lines(p.log_tail(), 20)}")
        st.restart_at = now + st.backoff_s
        self.report(f"rheo up: {p.name} {why}; restart #{st.restarts + 1} in {st.backoff_s:g}s "
                    f"(log {p.log_path}):\n{tail_lines(p.log_tail())}")
        st.backoff_s = min(st.backoff_s * 2, pol.max_backoff_s)
