"""Child-process RTMP receiver (PyAV listen mode) for the push test; JSON report on stdout."""

from __future__ import annotations

import json
import sys

import av

url = sys.argv[1]
report: dict = {"frames": 0, "pts": [], "audio_streams": 0}
try:
    with av.open(url, options={"listen": "1"}, timeout=(20, 5)) as container:
        report["audio_streams"] = len(container.streams.audio)
        report["width"] = container.streams.video[0].codec_context.width
        try:
            for frame in container.decode(video=0):
                report["frames"] += 1
                report["pts"].append(frame.pts)
        except (OSError, av.error.FFmpegError):
            pass  # the publisher's disconnect ends the stream with EIO
except Exception as exc:
    report["error"] = f"{exc.__class__.__name__}: {exc}"
print(json.dumps(report))
