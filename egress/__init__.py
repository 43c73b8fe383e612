"""rheo egress: encoded video in, HLS / LL-HLS / RTMP out.

``egress.encoder`` (CFR pacer + libx264 encoder, run by the decoder process), ``egress.llhls`` (CMAF packager and
playlists), ``egress.http`` (FastAPI routes with blocking requests), ``egress.rtmp_push`` (restreaming),
``egress.player`` (hls.js preview page), and ``egress.service`` (the egress process). See docs/media.md.
"""
