"""``rheo up``: the local stack in the foreground, in a state folder that outlives it.

The state folder (``--workdir``, default ``$XDG_STATE_HOME/rheo`` or ``~/.local/state/rheo``) keeps the stream
table (nats-server's JetStream store), the roles' nkeys and ``secrets.json`` (0600: API token, playback and link
keys, the demo stream's id and stream key), so a restart prints the same token, OBS settings and stream key;
``--fresh`` rotates them all. One ``rheo up`` holds the folder (a lock): a second one says so in one line, as does a
taken port, a config mistake or a gateway that refuses this stack's token. ``--host`` binds the gateway, RTMP and
egress to another address (``0.0.0.0``: OBS on another machine), and the printed URLs use an address it can reach.
``RHEO_*`` bind addresses, public URLs and secrets that the user set win over the stack's (``stack.USER_SET``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from services.config import Settings, load_settings

if TYPE_CHECKING:
    from services.stack import LocalStack, Ports

PORT_FLAGS = {"gateway": ("the gateway", "--gateway-port or --port-offset N"),
              "rtmp": ("RTMP ingest", "--rtmp-port or --port-offset N"),
              "egress": ("egress HLS", "--egress-port or --port-offset N"),
              "nats": ("nats-server", "--nats-port or --port-offset N"),
              "first_health": ("a service's /healthz and /metrics", "--port-offset N"),
              "first_link": ("a DiT stage's tensor link", "--port-offset N")}
"""What each of ``Ports``' fields is for and the ``rheo up`` flag that moves it (health and link ports move with
the offset only)."""

SECRETS = "secrets.json"
ROTATED = (SECRETS, "identities", "nats", "hls")
"""What ``--fresh`` removes from the state folder: every credential and the stream table holding the keys."""


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "rheo"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the local stack: a private nats-server and every service")
    p.add_argument("--host", help="bind address of the gateway, RTMP ingest and egress (default 127.0.0.1, or "
                                  "RHEO_GATEWAY__HOST; 0.0.0.0: reachable from other machines)")
    p.add_argument("--gateway-port", "--port", type=int, help="gateway (API, player, HLS) port (default 8080)")
    p.add_argument("--rtmp-port", type=int, help="RTMP ingest port (default 1935)")
    p.add_argument("--egress-port", type=int, help="egress HLS port (default 8090)")
    p.add_argument("--nats-port", type=int, help="client port of the private nats-server (default 4222)")
    p.add_argument("--port-offset", "--port-base", type=int, default=0, metavar="N",
                   help="add N to every default port, health and link ports included (a second stack on this host)")
    p.add_argument("--stages", type=int, help="DiT stages (processes) the blocks are split over (default 2; "
                                              "--device cuda: 1)")
    p.add_argument("--device", help="torch device of every model process; cuda or cuda:N: one-GPU mode (one stage "
                                    "holding every block, ingest and decoder on the same GPU; memory checked first)")
    p.add_argument("--streams", type=int, help="streams the one-GPU memory check plans for (default "
                                               "controller.admission_prior_streams)")
    p.add_argument("--model-dir", help="Wan2.1 model folder (else the tiny random model)")
    p.add_argument("--prompt", default="a watercolour painting, soft brush strokes", help="the demo stream's prompt")
    p.add_argument("--testpattern", action="store_true", help="publish a moving test pattern to the demo stream")
    p.add_argument("--workdir", type=Path, help="the state folder: credentials, stream table, logs, HLS files "
                                                f"(default {default_state_dir()})")
    p.add_argument("--fresh", action="store_true", help="rotate every credential (API token, playback and link "
                                                        "keys, NATS identities, the demo stream and its key)")
    p.set_defaults(func=cmd_up)


def up_ports(args: argparse.Namespace) -> Ports:
    """The defaults moved by ``--port-offset``, then each port flag given."""
    from services.stack import Ports

    ports = Ports().offset(args.port_offset)
    for name in ("gateway", "rtmp", "egress", "nats"):
        given = getattr(args, f"{name}_port")
        if given is not None:
            setattr(ports, name, given)
    return ports


def reachable_host(host: str) -> str:
    """The host name the printed URLs use for a stack bound to ``host``: ``localhost`` for loopback; for a wildcard,
    this machine's address on its default route (what another machine reaches it by), else its name."""
    from services.stack import WILDCARDS

    if host in ("127.0.0.1", "localhost", "::1"):
        return "localhost"
    if host not in WILDCARDS:
        return host
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: picks the outgoing interface, sends nothing
        return s.getsockname()[0]
    return socket.gethostname()


@contextlib.contextmanager
def hold(workdir: Path) -> Iterator[IO[str] | None]:
    """The state folder's lock for the life of this ``rheo up``; ``None`` when another holds it."""
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(workdir / "up.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield f


def load_secrets(workdir: Path) -> dict:
    """The state folder's credentials, each made once (kept in ``secrets.json``, mode 0600)."""
    path = workdir / SECRETS
    state = json.loads(path.read_text()) if path.is_file() else {}
    for key, size in (("api_token", 24), ("playback_key", 32), ("link_key", 32)):
        state.setdefault(key, secrets.token_urlsafe(size))
    save_secrets(workdir, state)
    return state


def rotate(workdir: Path) -> None:
    """``--fresh``: forget every credential of the state folder (and the stream table that holds the keys)."""
    for name in ROTATED:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def save_secrets(workdir: Path, state: dict) -> None:
    path = workdir / SECRETS
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def user_secret(env_key: str, settings_value: list) -> str | None:
    """The first of a secret list the user set in the environment (the stack then uses it, not its own)."""
    if env_key in os.environ and settings_value:
        return settings_value[0].get_secret_value()
    return None


def demo_stream(stack: LocalStack, state: dict, workdir: Path, prompt: str, weights: bool) -> dict:
    """The demo stream of the last run (same id and stream key: OBS keeps working) if the table still has it,
    with the prompt asked for now; else a new one, remembered."""
    from services.stack import open_demo_stream, with_player_path

    saved = state.get("demo")
    if saved and saved.get("weights") == weights:
        try:
            info = stack.api("GET", f"/v1/streams/{saved['id']}")
            if info["spec"]["prompt"] != prompt:
                stack.api("PATCH", f"/v1/streams/{saved['id']}", {"prompt": prompt})
            return with_player_path({**info, "stream_key": saved["stream_key"],
                                     "publish_url": f"{info['rtmp_url']}/{saved['stream_key']}"})
        except urllib.error.HTTPError as e:
            if e.code not in (404, 409):
                raise
    created = open_demo_stream(stack, prompt, weights=weights)
    state["demo"] = {"id": created["id"], "stream_key": created["stream_key"], "weights": weights}
    save_secrets(workdir, state)
    return created


def one_gpu_problem(device: str, settings: Settings, model_dir: Path | None, streams: int) -> str | None:
    """``--device cuda[:N]``: None when a CUDA device is there and the one-GPU budget fits its free memory, else
    the one-line reason (services/gpu_budget.py)."""
    import torch

    from services.gpu_budget import check_one_gpu, one_gpu_budget

    if not torch.cuda.is_available():
        return (f"--device {device}: no CUDA device is visible to torch (torch.cuda.is_available() is False); run "
                "without --device on this machine, or on one with an NVIDIA GPU and a CUDA build of torch")
    try:
        free, total = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, ValueError, AssertionError) as e:
        return f"--device {device}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return check_one_gpu(one_gpu_budget(settings, model_dir, streams), free, total, device)


def _fail(message: str, code: int = 2) -> int:
    print(f"rheo up: {message}", file=sys.stderr)
    return code


def cmd_up(args: argparse.Namespace) -> int:
    """``rheo up``: start the stack, keep it running (restarting what crashes) until Ctrl-C/SIGTERM; exit 2 on a
    mistake found before starting (one line), 1 on a crash loop or a stack that cannot start."""
    workdir = (args.workdir or default_state_dir()).expanduser().resolve()
    with hold(workdir) as lock:
        if lock is None:
            pid = (workdir / "up.lock").read_text().strip() or "?"
            return _fail(f"another rheo up (pid {pid}) is running in {workdir}: stop it (Ctrl-C), or give this one "
                         "its own --workdir DIR and --port-offset N")
        return _up(args, workdir)


def _up(args: argparse.Namespace, workdir: Path) -> int:
    from services.stack import SINGLE_SERVICES, LocalStack, StackError, start_testpattern

    settings = load_settings()  # a config mistake: one line (services.cli.main) before anything starts
    model_dir = args.model_dir or settings.model.model_dir
    if args.device and args.device.startswith("cuda"):
        problem = one_gpu_problem(args.device, settings, Path(model_dir) if model_dir else None,
                                  args.streams or settings.controller.admission_prior_streams)
        if problem:
            return _fail(problem)
        if args.stages not in (None, 1):
            return _fail(f"--device {args.device} is one-GPU mode: one stage holds every block (drop --stages)")
        args.stages = 1
    args.stages = args.stages or 2
    host = args.host or os.environ.get("RHEO_GATEWAY__HOST") or "127.0.0.1"
    ports = up_ports(args)
    clashes = ports.in_use(args.stages, host)
    if clashes:
        name, port = clashes[0]
        what, flags = PORT_FLAGS[name]
        return _fail(f"port {port} ({what}) is already in use (another rheo up?): move it with {flags}")
    if model_dir is None:
        print("*" * 78 + "\n*  NO MODEL WEIGHTS CONFIGURED (--model-dir / RHEO_MODEL__MODEL_DIR):\n"
              "*  running the tiny RANDOM model on CPU. Output is noise-like restyling, for trying\n"
              "*  the plumbing only. See README 'Model weights' for real StreamDiffusionV2 weights.\n" + "*" * 78,
              file=sys.stderr, flush=True)
    if args.fresh:
        rotate(workdir)
    state = load_secrets(workdir)
    stack = LocalStack(workdir, stages=args.stages, ports=ports, model_dir=Path(model_dir) if model_dir else None,
                       host=host, public_host=reachable_host(host),
                       api_token=user_secret("RHEO_GATEWAY__API_TOKENS", settings.gateway.api_tokens)
                       or state["api_token"],
                       playback_key=user_secret("RHEO_PLAYBACK__SIGNING_KEYS", settings.playback.signing_keys)
                       or state["playback_key"],
                       link_key=state["link_key"], device=args.device)
    pattern: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(f"rheo up: starting nats-server and {SINGLE_SERVICES + args.stages} services (state and logs in "
              f"{workdir}) ...", flush=True)
        stack.start()
        created = demo_stream(stack, state, workdir, args.prompt, weights=model_dir is not None)
        base = f"http://{stack.public_host}:{ports.gateway}"
        print(f"""
rheo is up.
  console        {base}/console/#/s/{created['id']}   (sign in with the token: {stack.api_token})
  API            {base}/docs
  offline jobs   {base}/console/#/jobs   (upload a video or a prompt: an MP4 back; POST /v1/jobs)
  publish to     {created['publish_url']}
                 (OBS: Server {created['rtmp_url']}  Stream Key {created['stream_key']})
  watch          {base}{created['player_path']}
                 (a signed URL, valid until {time.strftime('%H:%M', time.localtime(created['playback_expires_at']))}; \
POST /v1/streams/{created['id']}/playback mints a fresh one)
The token and stream key are kept in {workdir} across restarts (--fresh rotates them).
A service that exits is restarted (with backoff); Ctrl-C stops everything.""", flush=True)
        if args.testpattern:
            pattern = start_testpattern(created["publish_url"])
            print("rheo up: publishing a moving test pattern to that stream", flush=True)
        while not stop.wait(0.5):
            stack.check_alive()  # raises once the supervisor gives up on a crash loop
        return 0
    except StackError as e:
        return _fail(str(e), 1)
    except urllib.error.HTTPError as e:  # e.g. 401: another stack's gateway answered on this port
        return _fail(f"the gateway at {stack.gateway_url} answered {e.code} {e.reason} to this stack's token: is "
                     f"another rheo up or server on port {ports.gateway}? (logs in {workdir}/logs)", 1)
    except urllib.error.URLError as e:
        return _fail(f"the gateway at {stack.gateway_url} is unreachable ({e.reason}) (logs in {workdir}/logs)", 1)
    finally:
        if pattern is not None and pattern.poll() is None:
            pattern.terminate()
            pattern.wait(5)
        codes = stack.stop()
        bad = {k: v for k, v in codes.items() if v not in (0, None)}
        restarted = {k: n for k, n in stack.restarts.items() if n}
        print(f"rheo up: stopped{' (exit codes: ' + str(bad) + ')' if bad else ''}"
              f"{' (restarts: ' + str(restarted) + ')' if restarted else ''}", flush=True)
