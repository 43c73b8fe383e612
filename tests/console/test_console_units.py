"""The console's routes, assets and CSP, the hls.js-missing message, and the stats' watch (in-process)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
from fastapi import FastAPI

from media.player import HLSJS_MISSING, HLSJS_URL, check_hlsjs, make_player_router
from proto import IngestStatus, StreamOutput, StreamRecord, StreamSpec, StreamStatus
from services.gateway.console import CSP, STATIC, make_console_router
from services.gateway.stats import STALE_S, StreamWatch, stream_stats

IMPORT = re.compile(r"""from\s+['"]\./([\w-]+\.js)['"]""")


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")


async def test_front_door_is_the_console_and_every_asset_it_names_is_served() -> None:
    app = FastAPI()
    app.include_router(make_console_router())
    async with _client(app) as http:
        front = await http.get("/")
        index = await http.get("/console/")
        named = {"style.css", "app.js"} | {m for f in STATIC.glob("*.js") for m in IMPORT.findall(f.read_text())}
        answers = {name: await http.get(f"/console/{name}") for name in named}
        refused = [await http.get(p) for p in ("/console/__init__.py", "/console/..%2F__init__.py", "/console/x.js")]
    assert front.status_code == 307 and front.headers["location"] == "/console/"
    assert index.status_code == 200 and index.headers["content-security-policy"] == CSP
    assert f'src="{HLSJS_URL}"' in index.text
    assert all(r.status_code == 200 for r in answers.values()), {n: r.status_code for n, r in answers.items()}
    assert all(answers[n].headers["content-type"].startswith("text/javascript") for n in named if n.endswith(".js"))
    assert [r.status_code for r in refused] == [404, 404, 404]


def test_the_console_is_same_origin_only_with_no_inline_script() -> None:
    assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP and "http" not in CSP
    index = (STATIC / "index.html").read_text()
    assert all('src="/' in tag for tag in re.findall(r"<script[^>]*>", index)), "an inline or foreign script"
    for f in STATIC.iterdir():
        text = f.read_text()
        assert not re.search(r"https?://|//cdn|style=\"", text), f"{f.name}: an external asset or inline style"
        assert "innerHTML" not in text, f"{f.name}: text must be set as text"


async def test_hlsjs_missing_is_said_once_at_start_and_by_the_script_url(tmp_path: Path, caplog) -> None:
    missing = tmp_path / "hls.min.js"
    with caplog.at_level(logging.WARNING, logger="t"):
        assert check_hlsjs(logging.getLogger("t"), missing) is False
    assert [r.getMessage().count(HLSJS_MISSING) for r in caplog.records] == [1]
    app = FastAPI()
    app.include_router(make_player_router(hlsjs=missing))
    async with _client(app) as http:
        r = await http.get(HLSJS_URL)
        module = await http.get("/player/play.js")
    assert r.status_code == 404 and r.json()["detail"] == HLSJS_MISSING
    assert module.status_code == 200 and module.headers["content-type"].startswith("text/javascript")
    assert f"HLSJS_MISSING = '{HLSJS_MISSING}'" in module.text  # what the console and the page show


def _out(sid: str, seq: int, decoded: int, at: float, late: int = 0) -> StreamOutput:
    return StreamOutput(stream_id=sid, seq=seq, decoded=decoded, late=late, at=at)


def test_stream_watch_keeps_the_last_reports_and_stays_bounded() -> None:
    watch = StreamWatch(max_streams=2)
    watch.outputs.note(_out("st-a", 10, 1, 100.0))
    watch.outputs.note(_out("st-a", 11, 2, 100.5))
    assert watch.last_output("st-a").seq == 11
    watch.statuses.note(StreamStatus(stream_id="st-a", at=100.0, output_fps=16.0, viewers=2))
    assert watch.statuses.fresh("st-a", 100.0 + STALE_S).viewers == 2
    assert watch.statuses.fresh("st-a", 100.0 + STALE_S + 1) is None  # no report: unknown, not the old numbers
    watch.outputs.note(_out("st-b", 1, 1, 103.0))
    watch.outputs.note(_out("st-c", 1, 1, 103.0))
    assert watch.last_output("st-a") is None and watch.last_output("st-c") is not None  # the oldest forgotten


def test_stream_stats_from_the_record_and_the_reports() -> None:
    spec = StreamSpec(stream_id="st-a", width=64, height=64, fps=16.0, steps=2, prompt="p", seed=5)
    record = StreamRecord(spec=spec, key_hash="0" * 64, state="live", created_at=1.0, updated_at=1.0,
                          prompt_version=3, ingest=IngestStatus(published=40, dropped={"deadline": 2, "credit": 1},
                                                                last_seq=39, at=100.0))
    watch = StreamWatch()
    s = stream_stats(record, watch, interval_s=1.0, now=100.2)
    assert (s.output_fps, s.latency_ms, s.viewers) == (None, None, None)  # nothing reported yet
    watch.outputs.note(_out("st-a", 34, 14, 100.0, late=4))
    watch.statuses.note(StreamStatus(stream_id="st-a", at=100.0, output_fps=15.9, latency_p50_s=1.2345,
                                     latency_samples=30, viewers=2))
    s = stream_stats(record, watch, interval_s=1.0, now=100.2)
    assert (s.state, s.output_fps, s.latency_ms, s.viewers) == ("live", 15.9, 1234.5, 2)
    assert (s.late_chunks, s.deadline_misses) == (4, 2 + 4)  # ingest's deadline drops + the decoder's late ones
    assert (s.chunks_in_flight, s.last_output_seq, s.dropped_total, s.prompt_version) == (5, 34, 3, 3)
