"""RTMPS: PyAV (ffmpeg's rtmps over GnuTLS) publishes to ingest's TLS listener into the same pipeline; egress's
RTMP client restreams to an ``rtmps://`` URL and verifies the server certificate; the certificate reloads when its
files change."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from egress.rtmp_push import RtmpPush, split_rtmp_url
from ingest.rtmp_tls import TlsContexts
from media_io.mediakit import LiveSource, RawRtmp, ingest_server, publish_pyav

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl CLI to make a test certificate")


def make_cert(directory: Path, name: str = "tls") -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (what `rheo up` users would bring)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


def test_split_rtmps_url() -> None:
    assert split_rtmp_url("rtmps://a.example/live/k") == ("a.example", 443, "live", "k")
    with pytest.raises(ValueError):
        RtmpPush("http://a.example/live/k", None)  # type: ignore[arg-type]


def test_certificate_reloads_when_its_files_change(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    contexts = TlsContexts(cert, key)
    first = contexts.current()
    assert contexts.current() is first  # unchanged files: the same context
    new_cert, new_key = make_cert(tmp_path, "rotated")
    os.replace(new_cert, cert)
    os.replace(new_key, key)
    os.utime(cert, (1, 1))  # a different stamp even within the filesystem's mtime granularity
    assert contexts.current() is not first and contexts.reloads == 1
    key.write_text("not a key")  # a half-written rotation keeps the previous context
    assert contexts.current() is not None and contexts.reloads == 1


async def test_rtmps_publish_and_restream(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    keys = {"key-tls": "tls", "push-key": "pushed", "push-untrusted": "untrusted"}
    async with ingest_server(keys, rtmps_port=0, tls_cert_file=cert, tls_key_file=key) as (server, col):
        tls_port = server.tls_port
        # 1. A real publisher (ffmpeg's rtmps) into the TLS listener: the same pipeline as plain RTMP.
        good = await publish_pyav(f"rtmps://127.0.0.1:{tls_port}/live/key-tls", 24, 16, "320x240")
        assert good.report.get("ok"), good
        await col.finished("tls")
        assert col.frame_indices("tls") == list(range(21))

        # 2. Egress's restream client to rtmps://, verifying the certificate against the configured CA.
        holder: dict = {}
        source = LiveSource(lambda unit: holder["push"].push(unit))
        push = holder["push"] = RtmpPush(f"rtmps://localhost:{tls_port}/live/push-key", source.encoder.config,
                                         backoff_s=0.1, backoff_max_s=0.2, ca_file=cert)
        push_task = asyncio.create_task(push.run())
        await source.run(2.0)
        await push.finish()
        await asyncio.wait_for(push_task, 10)
        await col.finished("pushed")
        assert push.stats.connects == 1 and push.stats.failures == 0, push.stats
        assert col.streams["pushed"].stats.frames_decoded >= 16

        # 3. Without the CA the same server is not trusted: verification is on by default.
        untrusted = RtmpPush(f"rtmps://localhost:{tls_port}/live/push-untrusted", source.encoder.config,
                             backoff_s=0.1, backoff_max_s=0.1)
        untrusted_task = asyncio.create_task(untrusted.run())
        for _ in range(100):
            if untrusted.stats.failures:
                break
            await asyncio.sleep(0.05)
        untrusted_task.cancel()
        assert untrusted.stats.connects == 0 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stats.last_error

        # 4. Plain RTMP on the TLS port is a failed TLS handshake, counted.
        plain = await RawRtmp.open(tls_port, handshake=False)
        plain.writer.write(b"\x03" + bytes(1536))
        await plain.read_until_closed(timeout=3)
    assert "untrusted" not in col.streams
    assert server.stats.refused["tls"] >= 2  # the untrusted client's aborted handshake(s), and the plain RTMP one
