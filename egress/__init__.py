"""rheo egress: encoded video in, HLS / LL-HLS / RTMP out.

``egress.http`` (FastAPI routes with blocking requests), ``egress.rtmp_push`` (restreaming), ``egress.player``
(hls.js preview page), and ``egress.service`` (the egress process). The LL-HLS packager (``media.llhls``) and the
CFR pacer + libx264 encoder the decoder runs (``media.h264``) are in the ``media`` library. See docs/media.md.
"""
