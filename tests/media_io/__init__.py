"""Media edge tests (RTMP ingest, HLS/LL-HLS/RTMP egress)."""
