"""rheo ingest: RTMP publishers in, paced model-size frame chunks out.

``ingest.server.RtmpServer`` (with ``Decision``/``KeyTableAuthoriser`` and per-stream ``IngestStream`` queues),
``ingest.pacing`` (pacer, chunker, bounded queue), ``ingest.replay`` and ``ingest.service`` (the ingest process).
The RTMP chunk stream, AMF0, FLV and frame shaping come from the ``media`` library. See docs/media.md.
"""
