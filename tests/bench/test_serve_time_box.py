"""``bench/serve.py`` cut off by the GPU suite's time box (``timeout`` sends SIGTERM) stops its stack: the services
run in sessions of their own, so a killed bench would leave them holding the GPU for the suite's next steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A subreaper: the bench's orphans become this wrapper's children, which it lists after the bench has exited.
WRAPPER = r"""
import ctypes, json, os, signal, subprocess, sys, threading, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
bench = subprocess.Popen([sys.executable, "bench/serve.py", "--seconds", "60"], stderr=subprocess.PIPE, text=True)
said, coming_up = [], threading.Event()
def read():  # in a thread: an orphan holding the pipe open must not block this wrapper
    for line in bench.stderr:
        said.append(line)
        if " ready after " in line:
            coming_up.set()
threading.Thread(target=read, daemon=True).start()
coming_up.wait(120)
bench.send_signal(signal.SIGTERM)  # the stack is coming up: cut it off there, as the suite's timeout does
bench.wait(60)
def orphans():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.append((int(pid), open(f"/proc/{pid}/cmdline").read().replace("\0", " ")))
        except OSError:
            continue
    return found
deadline = time.monotonic() + 10  # what exits by itself once the bench is gone (the fork server: ~1 s) is no orphan
while orphans() and time.monotonic() < deadline:
    time.sleep(0.1)
left = []
for pid, cmdline in orphans():
    left.append(cmdline)
    os.kill(pid, signal.SIGKILL)
while True:  # reap whatever was left
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
print(json.dumps({"rc": bench.returncode, "left": left, "said": "".join(said)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a subreaper is Linux's (prctl)")
def test_a_terminated_serve_bench_stops_every_service_and_says_what_they_logged() -> None:
    import json

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", WRAPPER], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240, start_new_session=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["rc"] == 128 + signal.SIGTERM, out["said"][-3000:]
    assert out["left"] == [], out  # no service, nats-server or publisher outlived the bench
    assert "serve: SystemExit" in out["said"] and "(last lines of its log)" in out["said"]
