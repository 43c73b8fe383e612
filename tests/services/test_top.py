"""``rheo top --once``: one table of streams (gateway API, operator token) and stages (the services' /metrics)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.cli import main

TOKEN = "op-token-123"
STREAMS = [{"id": "cam-1", "state": "live", "state_reason": "", "spec": {"fps": 8.0},
            "ingest": {"published": 41, "dropped": {"deadline": 2, "queue_overflow": 1}},
            "stats": {"output_fps": 7.9, "latency_ms": 850.0, "viewers": 2, "published": 41,
                      "dropped": {"deadline": 2, "queue_overflow": 1}, "dropped_total": 3, "deadline_misses": 2}}]


def _stage_metrics() -> bytes:
    """A stage's /metrics as prometheus_client writes it (the same metric names as dit_stage/telemetry.py)."""
    r = CollectorRegistry()
    Counter("rheo_dit_stage_micro_steps_total", "", ["stage"], registry=r).labels(stage="dit-1").inc(12)
    Histogram("rheo_dit_stage_compute_seconds", "", ["stage"], registry=r).labels(stage="dit-1").observe(0.5)
    block = Histogram("rheo_dit_stage_block_seconds", "", ["stage", "block"], registry=r)
    for b in (2, 3):
        block.labels(stage="dit-1", block=str(b)).observe(0.01)
    Gauge("rheo_dit_stage_epoch", "", ["stage"], registry=r).labels(stage="dit-1").set(3)
    Histogram("rheo_stage_chunk_seconds", "", ["stage"], registry=r).labels(stage="1").observe(0.25)
    Histogram("rheo_glass_to_glass_seconds", "", registry=r).observe(1.5)
    return generate_latest(r)


@pytest.fixture
def server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body = _stage_metrics()
            elif self.path == "/v1/streams" and self.headers.get("Authorization") == f"Bearer {TOKEN}":
                body = json.dumps(STREAMS).encode()
            else:
                self.send_response(401)
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_top_once_prints_streams_and_stages(server: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("RHEO_API_TOKEN", raising=False)
    (tmp_path / "secrets.json").write_text(json.dumps({"api_token": TOKEN}))  # rheo up's state folder
    assert main(["top", "--once", "--url", server, "--workdir", str(tmp_path), "--metrics", f"{server}/metrics"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "cam-1" in line)
    assert "live" in row and "41" in row and " 3 " in row  # published, dropped
    assert "7.9" in row and "850" in row and " 2 " in row  # output fps, latency, viewers (from the stream's stats)
    stage = next(line for line in out.splitlines() if "dit-1" in line)
    assert "2–4" in stage and " 3 " in stage and "12" in stage  # blocks 2..3, epoch, micro-steps
    assert "250.0" in out and "glass-to-glass (mean) 1.50 s" in out


def test_top_once_says_when_the_token_is_refused(server: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["top", "--once", "--url", server, "--token", "wrong", "--metrics", f"{server}/nope"]) == 1
    assert "401" in capsys.readouterr().out
