"""Child-process RTMP publisher for the tests: PyAV's flv muxer, barcoded frames, JSON report on stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import av
import av.logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mediakit import barcode_frame


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--frames", type=int, default=45)
    ap.add_argument("--fps", type=int, default=16)
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--codec", default="libx264")
    ap.add_argument("--realtime", action="store_true", help="send at the frame rate instead of as fast as possible")
    ap.add_argument("--abort-after", type=int, default=0, help="exit abruptly (no FLV trailer) after N frames")
    ap.add_argument("--start", type=int, default=0, help="barcode index of the first frame")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    av.logging.set_level(av.logging.ERROR)
    report: dict = {"ok": False, "sent": 0}
    with av.logging.Capture() as logs:
        try:
            out = av.open(args.url, "w", format="flv", timeout=10)
            opts = {"preset": "ultrafast", "tune": "zerolatency", "g": str(args.fps)}
            if args.codec == "libx265":  # zerolatency: a packet per frame (no lookahead holding all 16 back to
                # the flush, after which a refusal can arrive too late for this publisher to see it)
                opts = {"preset": "ultrafast", "tune": "zerolatency", "x265-params": "log-level=error"}
            st = out.add_stream(args.codec, rate=args.fps, options=opts)
            st.width, st.height, st.pix_fmt = width, height, "yuv420p"
            t0 = time.monotonic()
            for i in range(args.frames):
                frame = av.VideoFrame.from_ndarray(barcode_frame(args.start + i, width, height), format="rgb24")
                frame.pts = i
                for packet in st.encode(frame):
                    out.mux(packet)
                report["sent"] = i + 1
                if args.abort_after and i + 1 >= args.abort_after:
                    print(json.dumps(report), flush=True)
                    os._exit(0)
                if args.realtime:
                    time.sleep(max(0.0, t0 + (i + 1) / args.fps - time.monotonic()))
            for packet in st.encode():
                out.mux(packet)
            out.close()
            report["ok"] = True
        except Exception as exc:
            report["error"] = f"{exc.__class__.__name__}: {exc}"
    report["log"] = [str(m[2]).strip() for m in logs if m[2]]
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
