"""``rheo up``'s supervision without the services: fake service processes (a tiny HTTP server answering ``/readyz``)
under ``LocalStack``'s supervisor thread, killed with SIGKILL: restarted with a doubling backoff that resets after
a stay ready, a crash loop detected and named, strict mode unchanged, and ``stop()`` leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.stack import CrashLoopError, LocalStack, Ports, Proc, RestartPolicy, StackError, free_port
from services.supervisor import Supervisor

FAKE = """
import http.server, os, signal, sys, threading
if os.environ.get("FAKE_EXIT"):
    print("fake: failing at start", flush=True)
    sys.exit(int(os.environ["FAKE_EXIT"]))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["FAKE_PORT"])), H)
print(f"fake: serving pid {os.getpid()}", flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
signal.pause()
"""


class FakeStack(LocalStack):
    """``LocalStack`` (nats-server, supervisor thread, ``stop``) over fake services."""

    def __init__(self, workdir: Path, names: list[str], fail: dict[str, int] | None = None, **kw) -> None:
        super().__init__(workdir, ports=Ports.ephemeral(), **kw)
        self._names = names
        self._fail = fail or {}

    def _plan(self) -> list[Proc]:
        script = self.workdir / "fake.py"
        script.write_text(FAKE)
        procs = []
        for name in self._names:
            port = free_port()
            env = {**os.environ, "FAKE_PORT": str(port)}
            if name in self._fail:
                env["FAKE_EXIT"] = str(self._fail[name])
            procs.append(Proc(name, [sys.executable, str(script)], env, port, self.workdir / "logs" / f"{name}.log"))
        return procs


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def lines() -> list[str]:
    return []


@pytest.fixture
def stack(tmp_path: Path, lines: list[str]) -> Iterator[FakeStack]:
    s = FakeStack(tmp_path, ["a", "b"], report=lines.append,
                  policy=RestartPolicy(initial_backoff_s=0.2, max_backoff_s=0.8, reset_after_s=1.0,
                                       crash_loop_restarts=10, crash_loop_window_s=60))
    s.start(timeout=60)
    try:
        yield s
    finally:
        s.stop()


def _kill(stack: FakeStack, name: str) -> int:
    proc = next(p for p in stack.procs if p.name == name)
    assert proc.popen is not None
    pid = proc.popen.pid
    os.killpg(pid, signal.SIGKILL)
    return pid


def _backoffs(lines: list[str], name: str) -> list[float]:
    return [float(m.group(1)) for line in lines if (m := re.match(rf"rheo up: {name} .* in ([\d.]+)s", line))]


def test_a_killed_service_is_restarted_with_a_doubling_backoff_and_stop_leaves_nothing(stack: FakeStack,
                                                                                       lines: list[str]) -> None:
    pids = []
    for n in range(1, 4):
        pids.append(_kill(stack, "a"))
        _wait(lambda n=n: stack.restarts["a"] == n, 30, f"restart #{n}")
        _wait(lambda n=n: any(f"a is ready again (restart #{n})" in line for line in lines), 30, f"ready #{n}")
    assert stack.restarts == {"a": 3, "b": 0}
    assert _backoffs(lines, "a") == [0.2, 0.4, 0.8]  # doubling, capped at max_backoff_s
    first = next(line for line in lines if line.startswith("rheo up: a "))
    assert "killed by SIGKILL; restart #1 in 0.2s" in first and "fake: serving pid" in first  # reason + log tail
    log = (stack.workdir / "logs" / "a.log").read_text()
    assert log.count("fake: serving pid") == 4  # one log, appended by every run
    # ready for reset_after_s: the next crash waits the initial backoff again
    time.sleep(stack.policy.reset_after_s + 0.5)
    pids.append(_kill(stack, "a"))
    _wait(lambda: stack.restarts["a"] == 4, 30, "restart #4")
    assert _backoffs(lines, "a")[-1] == 0.2
    stack.check_alive()  # restarts are no failure
    _wait(lambda: next(p for p in stack.procs if p.name == "a").ready(), 30, "a ready")
    procs = list(stack.procs)
    codes = stack.stop()
    assert codes == {"a": 0, "b": 0}  # the restarted process drains like any other
    assert not stack._thread.is_alive()  # type: ignore[union-attr]
    assert not [pid for pid in pids + [p.popen.pid for p in procs if p.popen] if _alive(pid)]


def test_a_crash_loop_gives_up_with_the_reason(tmp_path: Path) -> None:
    lines: list[str] = []
    s = FakeStack(tmp_path, ["steady", "flaky"], report=lines.append,
                  policy=RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.1, crash_loop_restarts=3,
                                       crash_loop_window_s=60))
    try:
        s.start(timeout=60)
        flaky = next(p for p in s.procs if p.name == "flaky")
        flaky.env["FAKE_EXIT"] = "3"  # from now on it fails at once, every time
        _kill(s, "flaky")
        _wait(lambda: s.failure is not None, 30, "the supervisor to give up")
        with pytest.raises(CrashLoopError, match=r"flaky is crash-looping: exit code 3 after 3 restarts within 60s"):
            s.check_alive()
        assert "fake: failing at start" in str(s.failure)  # its log tail
        assert s.restarts == {"steady": 0, "flaky": 3}
        assert [line.split(";")[0] for line in lines] == ["rheo up: flaky killed by SIGKILL"] + [
            "rheo up: flaky exit code 3"] * 2
    finally:
        codes = s.stop()
    assert codes["steady"] == 0 and codes["flaky"] == 3


def test_restarts_that_never_become_ready_are_a_crash_loop_however_slow(tmp_path: Path) -> None:
    """A service that takes longer to fail than the window (a port taken, a slow import) still crash-loops."""
    s = FakeStack(tmp_path, ["slowfail"], report=lambda _: None,
                  policy=RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.1, crash_loop_restarts=3,
                                       crash_loop_window_s=0.001))  # the window rule cannot fire
    try:
        s.start(timeout=60)
        next(iter(s.procs)).env["FAKE_EXIT"] = "2"
        _kill(s, "slowfail")
        _wait(lambda: s.failure is not None, 30, "the supervisor to give up")
        assert "slowfail is crash-looping: exit code 2 after 3 restarts in a row that never became ready" in str(
            s.failure)
        assert s.restarts == {"slowfail": 3}
    finally:
        s.stop()


def test_no_restart_leaves_a_service_down_and_strict_mode_raises(tmp_path: Path) -> None:
    lines: list[str] = []
    s = FakeStack(tmp_path / "x", ["a", "b"], no_restart={"b"}, report=lines.append)
    s.start(timeout=60)
    try:
        _kill(s, "b")
        _wait(lambda: any("b killed by SIGKILL; not restarted" in line for line in lines), 30, "b left down")
        s.check_alive()
        assert s.restarts == {"a": 0, "b": 0}
    finally:
        assert s.stop() == {"a": 0, "b": -signal.SIGKILL}
    strict = FakeStack(tmp_path / "y", ["a"], strict=True)
    strict.start(timeout=60)
    try:
        _kill(strict, "a")
        _wait(lambda: next(iter(strict.procs)).popen.poll() is not None, 30, "a dead")  # type: ignore[union-attr]
        with pytest.raises(StackError, match="a exited with -9"):
            strict.check_alive()
        assert strict.supervisor is None and strict.restarts == {"a": 0}
    finally:
        strict.stop()


def test_a_service_that_dies_while_the_stack_starts_fails_the_start(tmp_path: Path) -> None:
    s = FakeStack(tmp_path, ["a", "broken"], fail={"broken": 2})
    try:
        with pytest.raises(StackError, match="broken exited with 2"):
            s.start(timeout=60)
    finally:
        s.stop()


def test_one_poll_never_waits_for_a_restart(tmp_path: Path) -> None:
    """The loop that restarts one service keeps watching the others: a restart is only due, never slept on."""
    (tmp_path / "logs").mkdir()
    slow = Proc("slow", [sys.executable, "-c", "import sys; sys.exit(1)"], dict(os.environ), free_port(),
                tmp_path / "logs" / "slow.log")
    slow.spawn()
    assert slow.popen is not None
    slow.popen.wait()
    sup = Supervisor([slow], RestartPolicy(initial_backoff_s=30.0), report=lambda _: None)
    t0 = time.monotonic()
    sup.poll()
    assert time.monotonic() - t0 < 5.0 and sup.restarts == {"slow": 0}  # scheduled in 30 s, not waited for
    sup.poll(now=time.monotonic() + 31)
    assert sup.restarts == {"slow": 1}
    slow.popen.wait()


def test_a_log_tail_shows_a_retry_loop_once_and_what_came_before_it(tmp_path: Path) -> None:
    """A service stuck in a retry loop logs one line twice a second: the tail must still show the line that says
    why (the first GPU run of the served path showed 1500 bytes of the same retry warning and nothing else)."""
    log = tmp_path / "ingest.log"
    retry = "WARNING rheo.runtime: ingest: block maps watch failed (nats: connection closed); retrying"
    log.write_text("2026-12-04 14:53:30,001 INFO rheo.ingest: loading\n"
                   "2026-12-04 14:53:31,002 ERROR rheo.bus: nats ingest: the connection was closed (the reason)\n"
                   + "".join(f"2026-12-04 14:{53 + (32 + i // 2) // 60}:{(32 + i // 2) % 60:02d},{i % 2 * 500:03d} "
                             f"{retry}\n" for i in range(400)))
    tail = Proc("ingest", [], {}, 0, log).log_tail(1500)
    assert "the connection was closed (the reason)" in tail
    assert tail.count(retry) == 1 and "(the line above 399 more times)" in tail
    raw = log.read_bytes()[-1500:].decode()
    assert "the reason" not in raw  # the negative control: the last 1500 bytes alone lose it


def test_a_forked_service_runs_with_its_own_environment_log_and_exit_code(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """services/forkserver.py: the child takes the service's environment (not the parent's), writes to the
    service's log and exits with what ``rheo <service>`` returns, as a ``Popen`` child would."""
    from services.forkserver import can_fork, fork_service

    argv = [sys.executable, "-m", "services.cli", "dit-stage"]
    env = {"PATH": os.environ.get("PATH", ""), "RHEO_DIT_STAGE__KV_WINDOW": "not-a-number",
           "RHEO_MODEL__DEVICE": "cpu"}
    assert can_fork(argv, env) and not can_fork([sys.executable, "-c", "pass"], env)
    with monkeypatch.context() as m:  # an NVIDIA driver present: only a service held to the CPU is forked
        exists = os.path.exists
        m.setattr(os.path, "exists", lambda path: path == "/dev/nvidiactl" or exists(path))
        assert can_fork(argv, env) and not can_fork(argv, {**env, "RHEO_MODEL__DEVICE": "auto"})
    log = tmp_path / "dit-stage.log"
    child = fork_service(argv, env, str(log))
    assert child.wait(60) == 2 and child.returncode == 2 and child.poll() == 2
    assert "RHEO_DIT_STAGE__KV_WINDOW" in log.read_text()  # set in the child's environment only
