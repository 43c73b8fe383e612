"""``rheo top``: streams and DiT stages at a glance in a terminal, for operators without Grafana
(docs/observability.md).

Streams come from the gateway API (``GET /v1/streams``, an operator token: ``--token``, ``RHEO_API_TOKEN``, or the
``rheo up`` state folder's ``secrets.json``) with each stream's ``stats`` (output FPS, median glass-to-glass
latency, viewers: measured by egress; drops and deadline misses); a number not measured yet shows as "–". Stages and
the stack-wide latency numbers come from the services' ``/metrics`` (``--metrics URL``, repeatable; for a local stack
the ``rheo up`` health ports are probed). ``--once`` prints one table and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["Snapshot", "StageRow", "add_parser", "collect", "render"]

LOCAL_HEALTH_PORTS = range(9464, 9464 + 24)
"""Where ``rheo up`` puts the services' /metrics (``Ports.first_health`` onwards; no port offset)."""


@dataclass
class StageRow:
    stage: str
    position: str | None = None  # index in the ring (the label of rheo_stage_chunk_seconds)
    blocks: str = "–"
    epoch: int | None = None
    micro_steps: float = 0.0
    compute_s: float = 0.0
    uptime_s: float = 0.0
    queue_wait_ms: float | None = None
    chunk_ms: float | None = None
    kv_streams: int | None = None

    @property
    def utilisation(self) -> float | None:
        return self.compute_s / self.uptime_s if self.uptime_s > 0 else None


@dataclass
class Snapshot:
    streams: list[dict] = field(default_factory=list)
    stages: dict[str, StageRow] = field(default_factory=dict)
    totals: dict[str, tuple[float, float]] = field(default_factory=dict)  # histogram → (sum, count), all services
    errors: list[str] = field(default_factory=list)


def _get(url: str, token: str | None = None, timeout: float = 3.0) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def api_token(args: argparse.Namespace) -> str | None:
    """``--token``, else ``RHEO_API_TOKEN``, else the state folder's (``rheo up``), else none."""
    if args.token:
        return args.token
    if os.environ.get("RHEO_API_TOKEN"):
        return os.environ["RHEO_API_TOKEN"]
    from services.up import SECRETS, default_state_dir

    path = (args.workdir or default_state_dir()) / SECRETS
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text()).get("api_token")
    return None


def local_metrics(gateway_url: str) -> list[str]:
    """The /metrics URLs of a local stack that answer (none unless the gateway is on this machine)."""
    if urlsplit(gateway_url).hostname not in ("localhost", "127.0.0.1", "::1"):
        return []
    found = []
    for port in LOCAL_HEALTH_PORTS:
        url = f"http://127.0.0.1:{port}/metrics"
        with contextlib.suppress(OSError):
            _get(url, timeout=0.3)
            found.append(url)
    return found


def _add_metrics(snap: Snapshot, text: str) -> None:
    start = None
    position: str | None = None
    stages: dict[str, StageRow] = {}
    blocks: dict[str, set[int]] = {}
    sums: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            stage = s.labels.get("stage")
            if s.name == "process_start_time_seconds":
                start = s.value
            elif s.name in ("rheo_ttff_seconds_sum", "rheo_glass_to_glass_seconds_sum",
                            "rheo_ttff_seconds_count", "rheo_glass_to_glass_seconds_count"):
                base, kind = s.name.rsplit("_", 1)
                total = snap.totals.get(base, (0.0, 0.0))
                snap.totals[base] = (total[0] + s.value, total[1]) if kind == "sum" else (total[0],
                                                                                         total[1] + s.value)
            if stage is not None and s.name.startswith("rheo_stage_chunk_seconds_"):  # labelled by ring index
                position = stage
                sums[("*", s.name)] = s.value
            if stage is None or not s.name.startswith("rheo_dit_stage_"):
                continue
            row = stages.setdefault(stage, StageRow(stage))
            if s.name == "rheo_dit_stage_micro_steps_total":
                row.micro_steps = s.value
            elif s.name == "rheo_dit_stage_compute_seconds_sum":
                row.compute_s = s.value
            elif s.name == "rheo_dit_stage_epoch":
                row.epoch = int(s.value)
            elif s.name == "rheo_dit_stage_kv_streams":
                row.kv_streams = int(s.value)
            elif s.name == "rheo_dit_stage_block_seconds_count" and s.value > 0:
                blocks.setdefault(stage, set()).add(int(s.labels["block"]))
            elif s.name.startswith("rheo_dit_stage_queue_wait_seconds_") and s.name.endswith(("_sum", "_count")):
                sums[(stage, s.name)] = s.value
    for stage, row in stages.items():
        row.uptime_s = time.time() - start if start else 0.0
        if stage in blocks:
            row.blocks = f"{min(blocks[stage])}–{max(blocks[stage]) + 1}"
        row.queue_wait_ms = _mean(sums, stage, "rheo_dit_stage_queue_wait_seconds")
        if len(stages) == 1:  # one stage per process: its ring position and chunk time are this process's
            row.position = position
            row.chunk_ms = _mean(sums, "*", "rheo_stage_chunk_seconds")
        if row.micro_steps or row.epoch is not None:
            snap.stages[stage] = row


def _mean(sums: dict[tuple[str, str], float], stage: str, name: str) -> float | None:
    n = sums.get((stage, name + "_count"), 0.0)
    return 1000 * sums.get((stage, name + "_sum"), 0.0) / n if n else None


def collect(gateway_url: str, token: str | None, metrics: Iterable[str]) -> Snapshot:
    """One reading of the gateway API and every /metrics URL (what fails is listed, never fatal)."""
    snap = Snapshot()
    try:
        snap.streams = json.loads(_get(gateway_url.rstrip("/") + "/v1/streams", token))
    except urllib.error.HTTPError as e:
        snap.errors.append(f"{gateway_url}: {e.code} {e.reason}" + (" (token?)" if e.code in (401, 403) else ""))
    except (OSError, ValueError) as e:
        snap.errors.append(f"{gateway_url}: {e}")
    for url in metrics:
        try:
            _add_metrics(snap, _get(url).decode(errors="replace"))
        except (OSError, ValueError) as e:
            snap.errors.append(f"{url}: {e}")
    return snap


def _num(v: object, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(snap: Snapshot) -> Group:
    streams = Table(title="streams", title_justify="left", expand=False)
    numeric = ("fps", "latency ms", "viewers", "published", "dropped", "late")
    for col in ("id", "state", *numeric, "why"):
        streams.add_column(col, justify="right" if col in numeric else "left")
    for s in snap.streams:
        stats = s.get("stats") or {}
        fps = stats.get("output_fps")
        streams.add_row(
            s.get("id", "?"), s.get("state", "?"),
            _num(fps) if fps is not None else f"({_num((s.get('spec') or {}).get('fps'), '{:g}')})",
            _num(stats.get("latency_ms"), "{:.0f}"),
            _num(stats.get("viewers"), "{:d}") + ("+" if stats.get("viewers_capped") else ""),
            _num(stats.get("published"), "{:d}"), _num(stats.get("dropped_total"), "{:d}"),
            _num(stats.get("deadline_misses"), "{:d}"), (s.get("state_reason") or "")[:60])
    stages = Table(title="DiT stages", title_justify="left", expand=False)
    for col in ("stage", "#", "blocks", "epoch", "micro-steps", "busy %", "queue wait ms", "chunk ms", "KV streams"):
        stages.add_column(col, justify="left" if col in ("stage", "#", "blocks") else "right")
    for row in sorted(snap.stages.values(), key=lambda r: (r.position or "", r.stage)):
        util = row.utilisation
        stages.add_row(row.stage, row.position or "–", row.blocks, _num(row.epoch, "{:d}"), f"{row.micro_steps:.0f}",
                       _num(None if util is None else 100 * util, "{:.0f}"), _num(row.queue_wait_ms),
                       _num(row.chunk_ms), _num(row.kv_streams, "{:d}"))
    parts: list = [streams, stages]
    means = {k: (v[0] / v[1] if v[1] else None) for k, v in snap.totals.items()}
    parts.append(Text(f"time to first frame (mean) {_num(means.get('rheo_ttff_seconds'), '{:.2f}')} s · "
                      f"glass-to-glass (mean) {_num(means.get('rheo_glass_to_glass_seconds'), '{:.2f}')} s · "
                      "fps in brackets: the stream's target (no output measured yet) · late: deadline misses"))
    parts.extend(Text(f"! {e}", style="yellow") for e in snap.errors)
    return Group(*parts)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="streams and DiT stages at a glance (gateway API and the services' /metrics)")
    p.add_argument("--url", default=os.environ.get("RHEO_GATEWAY_URL", "http://localhost:8080"),
                   help="the gateway (default RHEO_GATEWAY_URL or http://localhost:8080)")
    p.add_argument("--token", help="operator API token (default RHEO_API_TOKEN, else the rheo up state folder's)")
    p.add_argument("--workdir", type=Path, help="rheo up's state folder, for its token")
    p.add_argument("--metrics", action="append", default=None, metavar="URL",
                   help="a service's /metrics URL (repeatable; default: a local stack's health ports)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.set_defaults(func=cmd_top)


def cmd_top(args: argparse.Namespace) -> int:
    token = api_token(args)
    metrics = args.metrics if args.metrics is not None else local_metrics(args.url)
    console = Console()
    if args.once:
        snap = collect(args.url, token, metrics)
        console.print(render(snap))
        return 1 if snap.errors and not snap.streams and not snap.stages else 0
    with contextlib.suppress(KeyboardInterrupt), Live(render(collect(args.url, token, metrics)), console=console,
                                                      refresh_per_second=4) as live:
        while True:
            time.sleep(args.interval)
            live.update(render(collect(args.url, token, metrics)))
    return 0
