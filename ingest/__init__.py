"""rheo ingest: RTMP publishers in, paced model-size frame chunks out.

Media side (this issue): ``ingest.server.RtmpServer`` (with ``Decision``/``KeyTableAuthoriser`` and per-stream
``IngestStream`` queues), ``ingest.chunkstream`` (sans-IO RTMP chunk parser), ``ingest.amf0``, ``ingest.flv``
(FLV/AVC tags → PyAV frames) and ``ingest.pacing`` (pacer, shaper, chunker, bounded queue). See docs/media.md.
"""
