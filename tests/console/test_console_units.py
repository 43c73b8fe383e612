"""The console's routes, assets and CSP, the hls.js-missing message, and the stats' output watch (in-process)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
from fastapi import FastAPI

from media.player import HLSJS_MISSING, HLSJS_URL, check_hlsjs, make_player_router
from proto import IngestStatus, StreamOutput, StreamRecord, StreamSpec
from proto.spec import RingConfig
from services.gateway.console import CSP, STATIC, make_console_router
from services.gateway.stats import STALE_S, OutputWatch, stream_stats

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


def _out(sid: str, seq: int, decoded: int, at: float) -> StreamOutput:
    return StreamOutput(stream_id=sid, seq=seq, decoded=decoded, at=at)


def test_output_watch_measures_the_styled_rate_and_stays_bounded() -> None:
    watch = OutputWatch(max_streams=2)
    assert watch.chunk_rate("st-a", 100.0) is None
    for i in range(5):  # 2 chunks a second, reported every 0.5 s
        watch.note(_out("st-a", 10 + i, i, 100.0 + i * 0.5))
    assert watch.chunk_rate("st-a", 102.0) == 2.0
    assert watch.chunk_rate("st-a", 102.0 + STALE_S + 1) is None  # output stopped: unknown, not the old rate
    watch.note(_out("st-a", 15, 0, 102.5))  # another decoder took it over: its count starts again
    assert watch.chunk_rate("st-a", 102.5) is None and watch.last("st-a").seq == 15
    watch.note(_out("st-b", 1, 1, 103.0))
    watch.note(_out("st-c", 1, 1, 103.0))
    assert watch.last("st-a") is None and watch.last("st-c") is not None  # the oldest forgotten first


def test_stream_stats_from_the_record_and_the_watch() -> None:
    spec = StreamSpec(stream_id="st-a", width=64, height=64, fps=16.0, steps=2, prompt="p", seed=5)
    record = StreamRecord(spec=spec, key_hash="0" * 64, state="live", created_at=1.0, updated_at=1.0,
                          prompt_version=3, ingest=IngestStatus(published=40, dropped={"stale": 2, "credit": 1},
                                                                last_seq=39, at=100.0))
    watch = OutputWatch()
    watch.note(_out("st-a", 30, 10, 99.0))
    watch.note(_out("st-a", 34, 14, 100.0))
    s = stream_stats(record, watch, RingConfig(), interval_s=1.0, now=100.2)
    assert (s.state, s.output_chunks_per_s, s.output_fps) == ("live", 4.0, 16.0)  # V2V: 4 frames a chunk
    assert (s.chunks_in_flight, s.last_output_seq, s.dropped_total, s.prompt_version) == (5, 34, 3, 3)
