"""A moving test pattern published over RTMP in real time (``rheo testpattern URL``; ``make up`` uses it).

Runs in its own process: PyAV holds the GIL during RTMP network I/O, so it must not share a service's event loop.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import av
import numpy as np


def pattern_frame(i: int, width: int, height: int, fps: float) -> np.ndarray:
    """Colour bars drifting sideways with a bouncing square: motion a viewer notices at once."""
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    shift = int(i * width / (4 * fps))
    bars = ((x + shift) * 7 // width) % 7
    palette = np.array([[235, 235, 235], [235, 235, 16], [16, 235, 235], [16, 235, 16],
                        [235, 16, 235], [235, 16, 16], [16, 16, 235]], dtype=np.uint8)
    frame = palette[np.broadcast_to(bars, (height, width))].copy()
    t = i / fps
    size = max(8, min(width, height) // 5)
    cx = int((width - size) * (0.5 + 0.5 * math.sin(1.3 * t)))
    cy = int((height - size) * (0.5 + 0.5 * math.sin(2.1 * t)))
    frame[cy:cy + size, cx:cx + size] = 0
    frame[(y % 64 == 0).repeat(width, axis=1)] //= 2
    return frame


AUDIO_RATE = 44100
BEEP_S = 0.25  # each second of the pattern starts with a beep this long


class Beeps:
    """AAC beeps of ``hz`` at the start of every second of pattern time (an A/V sync marker, like a test card's)."""

    def __init__(self, out: av.container.OutputContainer, hz: float, start_s: float) -> None:
        self.hz = hz
        self.stream = out.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        self.stream.codec_context.bit_rate = 64000
        self.samples = round(start_s * AUDIO_RATE / 1024) * 1024

    def until(self, t: float) -> list[av.Packet]:
        """The audio packets of pattern time up to ``t`` (s)."""
        packets: list[av.Packet] = []
        while self.samples / AUDIO_RATE < t:
            ts = (self.samples + np.arange(1024)) / AUDIO_RATE
            wave = (0.5 * np.sin(2 * np.pi * self.hz * ts) * (ts % 1.0 < BEEP_S)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = AUDIO_RATE, self.samples
            self.samples += 1024
            packets += self.stream.encode(frame)
        return packets


MARKER_BITS = 16
"""Frame-number marker (``--marker``): the top two rows of ``width // 8``-pixel cells, 8 bits per row, MSB first,
white = 1, black = 0; cells are multiples of the VAE's 8-pixel blocks, so the pass-through mode keeps them."""


def stamp_marker(frame: np.ndarray, i: int) -> np.ndarray:
    """``frame`` with frame number ``i`` (mod 2^16) stamped as the marker (in place)."""
    cell = frame.shape[1] // 8
    for b in range(MARKER_BITS):
        r, c = divmod(b, 8)
        frame[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 235 if (i >> (MARKER_BITS - 1 - b)) & 1 else 16
    return frame


def read_marker(frame: np.ndarray) -> int | None:
    """The frame number ``stamp_marker`` put in an RGB frame, or None where a cell is neither black nor white."""
    cell = frame.shape[1] // 8
    value = 0
    for b in range(MARKER_BITS):
        r, c = divmod(b, 8)
        m = cell // 4  # the cell's centre: H.264 blurs its edges
        luma = float(frame[r * cell + m:(r + 1) * cell - m, c * cell + m:(c + 1) * cell - m].mean())
        if 80 < luma < 170:
            return None
        value = (value << 1) | (luma >= 170)
    return value


def publish(url: str, width: int = 640, height: int = 360, fps: int = 16, seconds: float = 0.0,
            first: int = 0, tone_hz: float = 0.0, marker: bool = False) -> int:
    """Publish frames ``first``… until ``seconds`` of them have gone (0: forever) or the server closes the
    connection (raises); returns the next frame's index. ``tone_hz``: with an AAC track of beeps (none: video only).
    ``marker``: stamp each frame's number and print ``{"t0": wall-clock time of frame 0}`` on stdout, so a reader
    knows when any frame was captured."""
    out = av.open(url, "w", format="flv", timeout=10)
    i = first
    try:
        stream = out.add_stream("libx264", rate=fps,
                                options={"preset": "ultrafast", "tune": "zerolatency", "g": str(fps)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        beeps = Beeps(out, tone_hz, first / fps) if tone_hz else None
        t0 = time.monotonic() - first / fps
        if marker:
            print(json.dumps({"t0": time.time() - first / fps}), flush=True)
        while not seconds or i < seconds * fps:
            image = pattern_frame(i, width, height, fps)
            frame = av.VideoFrame.from_ndarray(stamp_marker(image, i) if marker else image, format="rgb24")
            frame.pts = i
            for packet in [*stream.encode(frame), *(beeps.until((i + 1) / fps) if beeps else [])]:
                out.mux(packet)
            i += 1
            time.sleep(max(0.0, t0 + i / fps - time.monotonic()))
        for packet in stream.encode():
            out.mux(packet)
    finally:
        out.close()
    return i


def publish_reconnecting(url: str, width: int, height: int, fps: int, seconds: float, tone_hz: float = 0.0,
                         marker: bool = False) -> None:
    """``publish``, connecting again after a lost or refused connection, as OBS does (the ingest restarted, or
    refused the publish for now): 1 s, then up to 5 s apart. The pattern goes on where it was."""
    i, delay = 0, 1.0
    while not seconds or i < seconds * fps:
        try:
            i = publish(url, width, height, fps, seconds, first=i, tone_hz=tone_hz, marker=marker)
            return
        except (av.error.FFmpegError, OSError) as e:
            print(f"rheo testpattern: {e}; reconnecting in {delay:.0f} s", file=sys.stderr, flush=True)
            time.sleep(delay)
            i += int(delay * fps)  # the frames that time would have had
            delay = min(5.0, delay + 1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rheo testpattern", description=__doc__)
    ap.add_argument("url", help="rtmp://host:port/live/<stream key>")
    ap.add_argument("--size", default="640x360", help="WxH")
    ap.add_argument("--fps", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: run until killed)")
    ap.add_argument("--reconnect", action="store_true", help="connect again when the connection is lost or "
                                                              "refused, as OBS does")
    ap.add_argument("--tone", type=float, default=0.0, metavar="HZ",
                    help="add an AAC track: a 0.25 s beep of HZ at the start of every second (0: no audio)")
    ap.add_argument("--marker", action="store_true", help="stamp each frame's number (bench/serve.py reads it back "
                                                           "for glass-to-glass latency); prints frame 0's time")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    try:
        if args.reconnect:
            publish_reconnecting(args.url, w, h, args.fps, args.seconds, args.tone, args.marker)
        else:
            publish(args.url, w, h, args.fps, args.seconds, tone_hz=args.tone, marker=args.marker)
    except (av.error.FFmpegError, OSError) as e:
        print(f"rheo testpattern: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
