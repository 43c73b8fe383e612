"""rheo egress: encoded video in, HLS / LL-HLS / RTMP out.

``egress.http`` (FastAPI routes with blocking requests), ``egress.rtmp_push`` (restreaming) and ``egress.service``
(the egress process). The LL-HLS packager (``media.llhls``), the CFR pacer + libx264 encoder the decoder runs
(``media.h264``) and the hls.js preview page the gateway serves (``media.player``) are in the ``media`` library.
See docs/media.md.
"""
