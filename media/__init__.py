"""rheo media: the media library that ingest, the decoder and egress run (no service of its own).

Modules are imported directly (``from media.h264 import H264Encoder``); see media/README.md and docs/media.md.
"""
