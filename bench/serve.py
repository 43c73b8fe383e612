"""The served path measured: the real services (LocalStack), RTMP in from the marker test pattern, LL-HLS out.

One stack (nats-server, controller, ``--stages`` DiT stage processes on the tensor link, decoder, egress, ingest,
gateway) in the measurement mode ``model.passthrough`` (every block and VAE pass runs, but frames pass unchanged:
see ``dit_stage/passthrough.py``, ``encoder/passthrough.py``; ``--codec-only`` leaves the VAE's work out),
``--streams`` publishers (``python -m ingest.testpattern --marker``), and in this process: a bus observer per role
(latent chunks, finished x0 chunks, H.264 units: the hop times the wire carries) and a viewer per stream that
fetches every LL-HLS part through the gateway as soon as it exists (blocking part requests, as hls.js does) and
decodes it. One JSON line per result:

* ``serve`` (per stream count): ``ttff_s`` (publisher's first frame → first part at the gateway; ``ttff_work_s``
  from the first chunk's last frame instead: the model and packaging time of the first chunk), ``fps`` per
  stream (finished chunks × frames per chunk / s, steady window) and ``aggregate_fps``, ``chunk_p50_s`` /
  ``chunk_p99_s`` (a chunk's last frame captured → its first H.264 unit published), ``g2g_edge_p50_s`` /
  ``g2g_edge_p99_s`` (CONTENT-BASED: frame k's marker read in a part − frame k's capture on the publisher's
  clock; the pass-through VAE shows each 4-frame group's first, oldest frame: the group's longest latency),
  ``g2g_player_s`` (edge + how far hls.js plays behind the edge: ``--player`` measures it in headless Chromium,
  ``player_latency_s``; else the playlist's PART-HOLD-BACK, its target), ``deadline_misses`` (chunks
  dropped for their deadline anywhere), ``frames_repeated`` (the decoder's CFR output held a frame while the
  publishers ran: a stutter a viewer sees), ``gpu_mem_mib`` (cuda), ``hops``: every hop's median share, and with
  ``--warmup`` ``warmup_s``: a throwaway stream's first ``--warmup-chunks`` chunks out (the stages' CUDA-graph
  captures, compile; ``warmup_chunks``: how many came out).
* ``search`` (``--search``): the largest stream count whose streams all keep ``--target-fps`` with
  ``chunk_p99_s`` ≤ ``--max-p99``.

Hops (medians over the steady chunks; docs/latency.md), from the publisher's capture clock: ``gather`` (the
chunk's first frame → its last frame captured: inherent), ``ingest`` (→ latent published: RTMP, decode, pacing,
chunk queue, ``ingest_encode`` from ingest's encode histogram, the rest ``ingest_wait``), ``dit`` (latent
published → x0 published; each stage's mean micro-step compute in ``dit_stages``), ``decode`` (x0 → the chunk's
first H.264 unit on the bus: VAE decode + CFR pacing + x264), ``package`` (a frame's H.264 unit on the bus →
its marker first seen in a part at the gateway), ``player`` (hls.latency measured, else PART-HOLD-BACK).
``stamp_offset``: how much later than the real capture the wire's ``capture_time`` says (ingest's pacer anchor).

    python bench/serve.py                                   # CPU, tiny, 1 stream at 128², 8 fps
    python bench/serve.py --streams 4
    python bench/serve.py --device cuda --model 1.3b --size 512 --fps 16 --search

Progress goes to stderr; cut off by SIGTERM (the GPU suite's time box), it stops its stack and prints each
service's log tail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import av
import m3u8

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_commit, percentile, stop_on_sigterm  # noqa: E402
from ingest.testpattern import read_marker  # noqa: E402
from proto import EncodedVideo, LatentChunk, decode  # noqa: E402
from proto.subjects import CHANNELS  # noqa: E402
from services.bus import Bus  # noqa: E402
from services.config import DitStageSettings, EncoderSettings  # noqa: E402
from services.stack import LocalStack, Ports, with_player_path  # noqa: E402

PROMPT = "a test pattern in watercolour"


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def _pct(xs: list[float], p: float) -> float | None:
    return round(percentile(xs, p), 4) if xs else None


@dataclass
class StreamTimes:
    """What the observers saw of one stream (all wall-clock seconds, this host)."""

    latent: dict[int, tuple[float, float, int]] = field(default_factory=dict)  # seq → (capture, arrival, frames)
    x0: dict[int, float] = field(default_factory=dict)  # seq → arrival
    units: list[tuple[float, float]] = field(default_factory=list)  # (unit capture_time, arrival)
    parts: list[tuple[float, list[int], float]] = field(default_factory=list)  # (available, markers, pdt of part)
    part_hold_back: float | None = None
    t0: float | None = None  # publisher: wall-clock capture time of frame 0


class Observer:
    """Bus subscribers with the roles' own identities: the first stage's, the decoder's and egress's inputs."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.streams: dict[str, StreamTimes] = {}
        self.buses: list[Bus] = []

    def of(self, sid: str) -> StreamTimes:
        return self.streams.setdefault(sid, StreamTimes())

    async def start(self) -> None:
        for role, channel, handler in (("dit-stage", "stream_latent", self._latent),
                                       ("decoder", "stream_x0", self._x0), ("egress", "stream_video", self._video)):
            bus = await Bus.connect(self.stack.nats_settings(role), name=f"bench-{role}")
            await bus.nc.subscribe(CHANNELS[channel].wildcard(), cb=handler)
            self.buses.append(bus)

    async def close(self) -> None:
        for bus in self.buses:
            with contextlib.suppress(Exception):
                await bus.close()

    async def _latent(self, msg) -> None:
        now = time.time()
        c = decode(msg.data, LatentChunk)
        if not c.replay:
            f = c.latent.shape[0]
            self.of(c.stream_id).latent[c.seq] = (c.capture_time, now, 4 * f - 3 if c.latent_start == 0 else 4 * f)

    async def _x0(self, msg) -> None:
        now = time.time()
        c = decode(msg.data, LatentChunk)
        self.of(c.stream_id).x0.setdefault(c.seq, now)

    async def _video(self, msg) -> None:
        now = time.time()
        v = decode(msg.data, EncodedVideo)
        self.of(v.stream_id).units += [(u.capture_time, now) for u in v.units if u.capture_time is not None]


class Viewer(threading.Thread):
    """Fetches every LL-HLS part of one stream through the gateway the moment it exists and reads the markers."""

    def __init__(self, stack: LocalStack, sid: str, times: StreamTimes, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"viewer-{sid}")
        self.base = stack.gateway_url + stack.playback(sid)
        self.times, self.stop_event = times, stop
        self.inits: dict[str, bytes] = {}
        self.prefetched: dict[str, tuple[bytes, float]] = {}  # the preload hint's part: (data, when it came)
        self.decoder: av.codec.context.CodecContext | None = None

    def _get(self, path: str, timeout: float = 10.0) -> bytes:
        with urllib.request.urlopen(f"{self.base}/{path}", timeout=timeout) as r:
            return r.read()

    def run(self) -> None:
        seen: set[str] = set()
        while not self.stop_event.is_set():
            try:
                text = self._get("index.m3u8").decode()
            except OSError:
                time.sleep(0.05)
                continue
            hold = re.search(r"PART-HOLD-BACK=([0-9.]+)", text)
            self.times.part_hold_back = float(hold.group(1)) if hold else None
            pl = m3u8.loads(text)
            hint = re.search(r'PRELOAD-HINT:TYPE=PART,URI="part_(\d+)_(\d+)\.m4s"', text)
            todo = [(seg, p) for seg in pl.segments for p in seg.parts
                    if p.uri not in seen]
            for seg, p in todo:
                self._take(self._init_of(seg), p.uri, seen)
            if not hint or self.stop_event.is_set():
                continue
            # then part after part as hls.js does: a blocking request for the next one (its name is known: the
            # next index, or the next segment's first part), the playlist again only when that fails
            per_segment = max((len(seg.parts) for seg in pl.segments if seg.uri), default=0)
            init = self._init_of(pl.segments[-1]) if pl.segments else "init.mp4"
            msn, index = int(hint.group(1)), int(hint.group(2))
            while not self.stop_event.is_set():
                uri = f"part_{msn}_{index}.m4s"
                try:  # blocks until the part exists: that is when it is available
                    self.prefetched[uri] = (self._get(uri, timeout=5.0), time.time())
                except OSError:
                    break
                self._take(init, uri, seen)
                if not per_segment:
                    break
                msn, index = (msn, index + 1) if index + 1 < per_segment else (msn + 1, 0)

    @staticmethod
    def _init_of(seg) -> str:
        return seg.init_section.uri if seg.init_section else "init.mp4"

    def _take(self, init_uri: str, uri: str, seen: set[str]) -> None:
        if uri in self.prefetched:
            data, available = self.prefetched.pop(uri)
        else:
            try:
                data = self._get(uri)
            except OSError:
                return
            available = time.time()
        seen.add(uri)
        if init_uri not in self.inits:
            self.inits[init_uri] = self._get(init_uri)
            self.decoder = None  # a new period: new parameter sets
        markers: list[int] = []
        try:  # demux the part alone (init + moof/mdat); decode its packets with the stream's one decoder
            with av.open(io.BytesIO(self.inits[init_uri] + data)) as container:
                stream = container.streams.video[0]
                if self.decoder is None:
                    self.decoder = av.CodecContext.create("h264", "r")
                    self.decoder.extradata = stream.codec_context.extradata
                    self.decoder.thread_count = 1  # frame threads would hold frames back
                for packet in container.demux(stream):
                    if packet.size == 0:  # the demuxer's end-of-file packet would drain the decoder for good
                        continue
                    for frame in self.decoder.decode(packet):
                        m = read_marker(frame.to_ndarray(format="rgb24"))
                        if m is not None:
                            markers.append(m)
        except av.error.FFmpegError:
            self.decoder = None
        self.times.parts.append((available, markers, math.nan))


PLAYING = "() => { const v = document.getElementById('v'); return v.readyState >= 3 && !v.paused }"


async def _watch(url: str, settle_s: float, until: threading.Event) -> list[float]:
    """``--player``: the gateway's hls.js page in headless Chromium; ``hls.latency`` (live edge → playhead)
    every 0.25 s from ``settle_s`` after playback starts until ``until`` is set ([] where no browser runs)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        return []
    if chromium is None:
        return []
    samples: list[float] = []
    started = time.time()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--autoplay-policy=no-user-gesture-required"])
        try:
            page = await browser.new_page()
            await page.goto(url)
            await page.wait_for_function(PLAYING, timeout=60000)
            print(f"serve: hls.js playing after {time.time() - started:.1f} s", file=sys.stderr, flush=True)
            await asyncio.sleep(settle_s)
            while not until.is_set():
                latency = await page.evaluate("window.hls.latency")
                if isinstance(latency, (int, float)) and latency > 0:
                    samples.append(float(latency))
                await asyncio.sleep(0.25)
        finally:
            await browser.close()
    return samples


def _scrape(port: int) -> dict[str, float]:
    """``name{labels}`` → value of a service's /metrics (rheo_ metrics only)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("rheo_"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def _metric(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def _gpu_mem_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(sum(float(v) for v in out.split()))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _hops(t: StreamTimes, fps: float, skip: int) -> dict[str, list[float]]:
    """Per-chunk hop durations of the steady chunks (seq ≥ skip). Capture is the publisher's clock (frame k at
    t0 + k/fps; chunk c holds frames 5 + 4(c − 1)… of the one segment a measurement publishes); the rest are
    arrival times on the bus and at the gateway. ``stamp_offset``: the wire's capture_time − the real one."""
    hops: dict[str, list[float]] = {k: [] for k in ("gather", "ingest", "stamp_offset", "dit", "decode",
                                                    "package", "chunk")}
    units = sorted(t.units)
    for seq, (wire_capture, published, frames) in sorted(t.latent.items()):
        if seq < skip or t.t0 is None:
            continue
        capture = t.t0 + (0 if seq == 0 else 5 + 4 * (seq - 1)) / fps
        ready = capture + (frames - 1) / fps
        hops["gather"].append(ready - capture)
        hops["ingest"].append(published - ready)
        hops["stamp_offset"].append(wire_capture - capture)
        done = t.x0.get(seq)
        if done is None:
            continue
        hops["dit"].append(done - published)
        unit = next((u for u in units if abs(u[0] - wire_capture) < 0.5 / fps), None)
        if unit is None:
            continue
        hops["decode"].append(unit[1] - done)
        hops["chunk"].append(unit[1] - ready)
    # package, by content: frame k's marker first seen at the gateway − the arrival of frame k's H.264 unit (the
    # unit whose capture_time is k's on the wire clock: the real one + the stamp offset)
    offset = statistics.median(hops["stamp_offset"]) if hops["stamp_offset"] else 0.0
    first_seen: dict[int, float] = {}
    for available, markers, _ in t.parts:
        for m in markers:
            first_seen.setdefault(m, available)
    for m, available in first_seen.items():
        if t.t0 is None or m < 4 * skip:
            continue
        wire = t.t0 + m / fps + offset
        unit = min(units, key=lambda u: abs(u[0] - wire), default=None)
        if unit is not None and abs(unit[0] - wire) < 0.5 / fps:
            hops["package"].append(available - unit[1])
    return hops


def _create(stack: LocalStack, args: argparse.Namespace) -> dict:
    return stack.api("POST", "/v1/streams", {"prompt": PROMPT, "width": args.size, "height": args.size,
                                             "fps": args.fps, "steps": args.steps, "seed": 7,
                                             "slo_latency_ms": args.slo_ms})


def _publisher(stack: LocalStack, args: argparse.Namespace, created: dict, seconds: float) -> subprocess.Popen:
    """The marker test pattern published to ``created``'s stream; prints frame 0's capture time first."""
    url = f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/{created['stream_key']}"
    return subprocess.Popen([sys.executable, "-m", "ingest.testpattern", url, "--size", f"{args.size}x{args.size}",
                             "--fps", str(args.fps), "--seconds", str(seconds), "--marker"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


async def _warm_up(stack: LocalStack, args: argparse.Namespace) -> dict:
    """One throwaway stream until ``--warmup-chunks`` finished chunks: on CUDA a stage's first forwards capture CUDA
    graphs (and compile, ``dit_stage.forward`` auto), which a measured stream should not pay for; the stream's
    storage, and with it its graphs, passes to the next stream (``StatePool``). Its time is reported."""
    observer = Observer(stack)
    await observer.start()
    created = _create(stack, args)
    started = time.monotonic()
    publisher = _publisher(stack, args, created, args.warmup)
    try:
        while len(observer.of(created["id"]).x0) < args.warmup_chunks and publisher.poll() is None:
            await asyncio.sleep(0.1)
    finally:
        publisher.terminate()
        publisher.wait()
        stack.api("DELETE", f"/v1/streams/{created['id']}")
        await observer.close()
    out = len(observer.of(created["id"]).x0)
    took = round(time.monotonic() - started, 2)
    _progress(f"warm-up stream: {out} chunk(s) out in {took} s")
    await _stages_hold_no_stream(stack, args, 10.0)
    return {"warmup_s": took if out >= args.warmup_chunks else None, "warmup_chunks": out}


async def _stages_hold_no_stream(stack: LocalStack, args: argparse.Namespace, timeout: float) -> None:
    """Wait (at most ``timeout``) until every DiT stage has let the warm-up stream go, so its storage, and with it its
    CUDA graphs, is there for the measured stream (``StatePool``). The stages report the streams they hold with
    their stats, every ``dit_stage.stats_interval_s``: a window has to pass before the gauge can say."""
    started = time.monotonic()
    stages = [p for p in stack.procs if p.name.startswith("dit-")]
    interval = _settings_env(args).get("RHEO_DIT_STAGE__STATS_INTERVAL_S", DitStageSettings().stats_interval_s)
    await asyncio.sleep(float(interval) + 0.5)
    while time.monotonic() < started + timeout:
        held = [[v for k, v in _scrape(p.health_port).items() if k.startswith("rheo_dit_stage_kv_streams")]
                for p in stages]
        if all(h and sum(h) == 0 for h in held):  # (not reported yet: not known to be let go)
            _progress(f"the stages let the warm-up stream go after {time.monotonic() - started:.1f} s")
            return
        await asyncio.sleep(0.2)
    _progress(f"the stages still held the warm-up stream after {timeout} s")


async def _measure(stack: LocalStack, args: argparse.Namespace, streams: int) -> dict:
    """Open ``streams`` streams, publish for ``--seconds``, return the ``serve`` row."""
    observer = Observer(stack)
    await observer.start()
    stop = threading.Event()
    created = [_create(stack, args) for _ in range(streams)]
    viewers = [Viewer(stack, c["id"], observer.of(c["id"]), stop) for c in created]
    for v in viewers:
        v.start()
    before = {p.name: _scrape(p.health_port) for p in stack.procs}
    publishers = [_publisher(stack, args, c, args.seconds) for c in created]
    for c, p in zip(created, publishers, strict=True):
        assert p.stdout is not None
        observer.of(c["id"]).t0 = json.loads(p.stdout.readline())["t0"]
    _progress(f"{streams} stream(s) publishing for {args.seconds:g} s")
    watching = threading.Event()
    player = asyncio.create_task(_watch(stack.gateway_url + with_player_path(created[0])["player_path"],
                                        args.player_settle, watching)) if args.player else None
    while any(p.poll() is None for p in publishers):
        await asyncio.sleep(0.1)
    # the decoder's repeats while the publishers ran (after them, every stream holds its last frame until it ends)
    published = {p.name: _scrape(p.health_port) for p in stack.procs if p.name == "decoder"}
    watching.set()
    player_latency = await player if player is not None else []
    await asyncio.sleep(args.tail)  # the last chunks through the pipeline
    stop.set()
    seen = [observer.of(c["id"]) for c in created]
    _progress(f"published; chunks seen: latent {sum(len(t.latent) for t in seen)}, x0 {sum(len(t.x0) for t in seen)}, "
              f"H.264 units {sum(len(t.units) for t in seen)}, parts {sum(len(t.parts) for t in seen)}")
    after = {p.name: _scrape(p.health_port) for p in stack.procs}
    gpu = _gpu_mem_mib() if args.device == "cuda" else None
    await observer.close()
    for v in viewers:
        v.join(10)

    def delta(name: str, prefix: str) -> float:
        return _metric(after.get(name, {}), prefix) - _metric(before.get(name, {}), prefix)

    encode_n = delta("ingest", "rheo_ingest_encode_seconds_count")
    encode_s = delta("ingest", "rheo_ingest_encode_seconds_sum") / encode_n if encode_n else None
    stage_s = {}
    for i in range(args.stages):
        n = delta(f"dit-{i}", "rheo_dit_stage_compute_seconds_count")
        stage_s[f"dit-{i}"] = round(delta(f"dit-{i}", "rheo_dit_stage_compute_seconds_sum") / n, 4) if n else None
    # the ring's link connections by path (cuda: two stages on one GPU, CUDA IPC; local: one stage returning items
    # to itself in process; docs/tensor-link.md)
    link_paths = {path: int(sum(_metric(after.get(f"dit-{i}", {}), f'rheo_link_path_total{{path="{path}"}}')
                                for i in range(args.stages))) for path in ("cuda", "shm", "tcp", "local")}
    misses = delta("ingest", 'rheo_ingest_chunks_dropped_total{reason="deadline"}') + delta(
        "decoder", 'rheo_decoder_chunks_total{result="late"}')
    repeated = _metric(published.get("decoder", {}), 'rheo_decoder_frames_total{kind="repeated"}') - _metric(
        before.get("decoder", {}), 'rheo_decoder_frames_total{kind="repeated"}')

    all_hops: dict[str, list[float]] = {}
    fps_each, ttffs, ttff_work, g2g = [], [], [], []
    hold = None
    for c in created:
        t = observer.of(c["id"])
        hold = t.part_hold_back if t.part_hold_back is not None else hold
        for k, v in _hops(t, args.fps, args.skip).items():
            all_hops.setdefault(k, []).extend(v)
        done = sorted(a for s, a in t.x0.items() if s >= args.skip)
        frames = sum(t.latent[s][2] for s in t.x0 if s >= args.skip and s in t.latent)
        if len(done) >= 3:
            first_frames = t.latent.get(min(s for s in t.x0 if s >= args.skip), (0, 0, 4))[2]
            fps_each.append((frames - first_frames) / (done[-1] - done[0]))
        if t.parts and t.t0 is not None:
            first_part = min(a for a, _, _ in t.parts)
            ttffs.append(first_part - t.t0)
            if 0 in t.latent:  # the first chunk's frame count, as the wire says it (its last frame: count − 1)
                ttff_work.append(first_part - t.t0 - (t.latent[0][2] - 1) / args.fps)
        first_seen: dict[int, float] = {}
        for available, markers, _ in t.parts:
            for m in markers:
                first_seen.setdefault(m, available)
        steady_from = args.skip * 4
        g2g += [a - (t.t0 + m / args.fps) for m, a in first_seen.items() if m >= steady_from and t.t0 is not None]
    ingest = all_hops.get("ingest", [])
    behind = _median(player_latency) if player_latency else hold  # hls.js measured, else its target
    hops = {"gather": _median(all_hops.get("gather", [])), "ingest": _median(ingest),
            "ingest_encode": round(encode_s, 4) if encode_s is not None else None,
            "ingest_wait": round(_median(ingest) - encode_s, 4) if ingest and encode_s is not None else None,
            "dit": _median(all_hops.get("dit", [])), "dit_stages": stage_s,
            "decode": _median(all_hops.get("decode", [])), "package": _median(all_hops.get("package", [])),
            "player": behind, "capture_to_published": _median([g + r for g, r in zip(
                all_hops.get("gather", []), ingest, strict=False)]),
            "stamp_offset": _median(all_hops.get("stamp_offset", []))}
    g2g_p50 = _pct(g2g, 50)
    return {"bench": "serve", "streams": streams, "device": args.device, "model": args.model,
            "weights": _weights(args), "vae": _settings_env(args).get("RHEO_ENCODER__VAE", EncoderSettings().vae),
            "passthrough": args.passthrough, "vae_runs": not (args.passthrough and args.codec_only),
            "size": args.size,
            "fps_target": args.fps, "steps": args.steps, "stages": args.stages, "seconds": args.seconds,
            "ttff_s": _median(ttffs), "ttff_work_s": _median(ttff_work),
            "fps": round(min(fps_each), 2) if fps_each else None,
            "fps_each": [round(f, 2) for f in fps_each], "aggregate_fps": round(sum(fps_each), 2),
            "chunk_p50_s": _pct(all_hops.get("chunk", []), 50), "chunk_p99_s": _pct(all_hops.get("chunk", []), 99),
            "g2g_edge_p50_s": g2g_p50, "g2g_edge_p99_s": _pct(g2g, 99), "g2g_frames": len(g2g),
            "g2g_player_s": round(g2g_p50 + behind, 4) if g2g_p50 is not None and behind is not None else None,
            "player_latency_s": _median(player_latency), "player_latency_p99_s": _pct(player_latency, 99),
            "player_measured": bool(player_latency),
            "deadline_misses": int(misses), "frames_repeated": int(repeated), "gpu_mem_mib": gpu,
            "link_paths": link_paths, "hops": hops,
            "commit": git_commit()}


def _stack(args: argparse.Namespace, work: Path) -> LocalStack:
    env = {"RHEO_MODEL__PASSTHROUGH": "1" if args.passthrough else "0", "RHEO_MODEL__DEVICE": args.device,
           "RHEO_MODEL__PASSTHROUGH_RUNS_VAE": "0" if args.codec_only else "1",
           "RHEO_MODEL__PRESET": args.model, "RHEO_INGEST__STREAM_LINGER_S": "1",
           "RHEO_CONTROLLER__ADVISORY": "true", "RHEO_CONTROLLER__MODE": "static"}
    if args.model_dir is not None:
        env["RHEO_MODEL__MODEL_DIR"] = str(args.model_dir)
    elif args.random_weights:
        env["RHEO_MODEL__RANDOM_WEIGHTS"] = "true"
    env |= _settings_env(args)
    return LocalStack(work, stages=args.stages, ports=Ports.ephemeral(), extra_env=env,
                      torch_threads=args.threads, whip=False)  # RTMP publishers only: no aiortc needed


def _settings_env(args: argparse.Namespace) -> dict[str, str]:
    """The ``--env RHEO_X=V`` service settings."""
    return dict(kv.split("=", 1) for kv in args.env)


def _weights(args: argparse.Namespace) -> str:
    """What the served model runs on: a weights dir, or random weights (tiny, or a real preset opted in)."""
    return str(args.model_dir) if args.model_dir is not None else "random"


def _ok(row: dict, args: argparse.Namespace) -> bool:
    target = args.target_fps or args.fps
    return (row["fps"] is not None and row["fps"] >= 0.95 * target and row["chunk_p99_s"] is not None
            and row["chunk_p99_s"] <= args.max_p99)


def _dry_run(args: argparse.Namespace) -> dict:
    """``--dry-run`` (the GPU suite's CI run): no stack; the content path alone, offline — marker frames through
    the pass-through VAE, x264 and an LL-HLS packager, read back from the parts as the viewer reads them."""
    import numpy as np
    import torch

    from encoder.passthrough import PassthroughVAE
    from ingest.stream import to_pixels
    from ingest.testpattern import pattern_frame, stamp_marker
    from media.h264 import H264Encoder, PartLayout
    from media.llhls import LlHlsStream
    from wan.tiny import make_tiny_vae

    size, fps = args.size, args.fps
    frames = np.stack([stamp_marker(pattern_frame(i, size, size, fps), i) for i in range(13)])
    vae = PassthroughVAE(make_tiny_vae(0))
    enc, dec = vae.new_state(), vae.new_state()
    out = [vae.decode(dec, vae.encode(enc, to_pixels(c))) for c in (frames[:5], frames[5:9], frames[9:13])]
    rgb = ((torch.cat(out, dim=2)[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    layout = PartLayout.for_rate(fps, 1.0, 0.1)
    encoder = H264Encoder(size, size, fps, layout.gop_frames, "ultrafast")
    units = [u for i, f in enumerate(rgb) for u in encoder.encode(f, i)] + encoder.flush()
    hls = LlHlsStream("dry", encoder.config, layout)
    for u in units:
        hls.push(u)
    hls.end()
    markers = []
    for seg in hls.segments:
        with av.open(io.BytesIO(hls.inits[seg.discontinuity] + seg.data)) as container:
            markers += [read_marker(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    expected = [0, 1, 1, 1, 1, 5, 5, 5, 5, 9, 9, 9, 9]  # each 4-frame group shows its first frame
    return {"bench": "serve", "dry_run": True, "markers_ok": markers == expected, "markers": markers,
            "commit": git_commit()}


async def _main(args: argparse.Namespace) -> int:
    if args.model != "tiny" and args.model_dir is None and not args.random_weights:
        _emit({"bench": "serve", "model": args.model, "device": args.device, "skipped": (
            "--model 1.3b/14b needs --model-dir with Wan2.1 weights, or --random-weights (model.random_weights: "
            "real sizes and timings, noise output)"), "commit": git_commit()})
        return 0
    if args.dry_run:
        row = _dry_run(args)
        _emit(row)
        return 0 if row["markers_ok"] else 1
    with tempfile.TemporaryDirectory(prefix="rheo-serve-") as tmp:
        work = Path(tmp) if args.logs is None else args.logs
        work.mkdir(parents=True, exist_ok=True)
        stack = _stack(args, work)
        best, warm, tried = 0, {}, False
        try:
            _progress(f"starting the stack: {args.stages} stages, {args.model} on {args.device}")
            stack.start(timeout=args.start_timeout, progress=True)
            warm = await _warm_up(stack, args) if args.warmup > 0 else {}
            if not args.search:
                _emit(await _measure(stack, args, args.streams) | warm)
                return 0
            n, bad = 1, None
            while bad is None or bad - best > 1:
                tried = True
                row = await _measure(stack, args, n)
                row["search_ok"] = _ok(row, args)
                _emit(row)
                if row["search_ok"]:
                    best = n
                    n = n * 2 if bad is None else (best + bad) // 2
                else:
                    bad = n
                    n = (best + bad) // 2
                if n == best or n > args.max_streams:
                    break
            _emit(_search_row(args, best) | warm)
        except BaseException as e:  # a failed start, a SIGTERM from the suite's time box: what each service said
            _progress(f"serve: {type(e).__name__}: {e}".splitlines()[0])
            if args.search and tried:  # cut off mid-search: what it had found so far, said to be a lower bound
                _emit(_search_row(args, best) | warm | {"cut_off": True})
            for p in stack.procs:
                _progress(f"--- {p.name} (last lines of its log)\n{p.log_tail(1500)}")
            raise
        finally:
            stack.stop(timeout=5.0)  # the services run in sessions of their own: a kill of this process leaves them
    return 0


def _search_row(args: argparse.Namespace, best: int) -> dict:
    return {"bench": "serve_search", "device": args.device, "model": args.model, "size": args.size,
            "fps_target": args.target_fps or args.fps, "max_p99_s": args.max_p99, "streams": best,
            "commit": git_commit()}


def _progress(line: str) -> None:
    """Where a run is, on stderr: the GPU suite keeps it in its log when a step is cut off."""
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="tiny", choices=["tiny", "1.3b", "14b"],
                    help="DiT size: tiny (random weights) or, with --model-dir, the weights' 1.3b/14b")
    ap.add_argument("--model-dir", type=Path, default=None, help="Wan2.1 weights (needed beyond the tiny model)")
    ap.add_argument("--random-weights", action="store_true",
                    help="without --model-dir: serve 1.3b/14b on random weights (model.random_weights)")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--size", type=int, default=128, help="model frame side (a multiple of 64: the marker cells)")
    ap.add_argument("--fps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="publishing time per measurement")
    ap.add_argument("--skip", type=int, default=3, help="chunks of warm-up left out of the steady figures")
    ap.add_argument("--tail", type=float, default=2.0, help="seconds to wait for the last chunks after publishing")
    ap.add_argument("--slo-ms", type=float, default=5000.0, help="the streams' latency bound (chunk deadline)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per service")
    ap.add_argument("--search", action="store_true", help="largest stream count at --target-fps, p99 ≤ --max-p99")
    ap.add_argument("--target-fps", type=float, default=0.0, help="search target per stream (default --fps)")
    ap.add_argument("--max-p99", type=float, default=0.5)
    ap.add_argument("--max-streams", type=int, default=32)
    ap.add_argument("--codec-only", action="store_true", help="the measurement mode without the VAE's work (its "
                    "block-average codec alone: the plumbing's own latency; model.passthrough_runs_vae off)")
    ap.add_argument("--no-passthrough", dest="passthrough", action="store_false",
                    help="run the model's own output (no glass-to-glass: markers do not survive)")
    ap.add_argument("--player", action="store_true", help="watch stream 0 with the gateway's hls.js page in "
                                                           "headless Chromium (playwright): measured hls.latency")
    ap.add_argument("--player-settle", type=float, default=3.0, help="seconds of playback before sampling")
    ap.add_argument("--env", action="append", default=[], metavar="RHEO_X=V", help="extra service setting")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds at most of a throwaway stream first, until "
                    "--warmup-chunks of it are out (CUDA graphs, compile); reported as warmup_s (0: none)")
    ap.add_argument("--warmup-chunks", type=int, default=1, help="finished chunks that end the warm-up stream (more "
                    "than one: its steady batch signatures seen twice, so captured)")
    ap.add_argument("--logs", type=Path, default=None, help="keep the stack's folder (every service's whole log) "
                    "here instead of a temporary one")
    ap.add_argument("--dry-run", action="store_true", help="no stack: the marker path offline (VAE, x264, LL-HLS)")
    args = ap.parse_args(argv)
    if args.codec_only and not args.passthrough:
        ap.error("--codec-only is a choice of the measurement mode: not with --no-passthrough")
    stop_on_sigterm()
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
