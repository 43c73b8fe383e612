"""Offline jobs: a video (or a prompt) in, an MP4 out, through the one offline engine (docs/jobs.md)."""
