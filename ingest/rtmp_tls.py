"""The RTMPS listener's TLS context, reloaded when its certificate or key file changes (a rotated Kubernetes
Secret is swapped in place), so rotating the certificate needs no restart."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server-side context: TLS 1.2+, the default cipher set, no client certificates."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class TlsContexts:
    """Hands out the current server context; loads it again when either file's mtime/size changed. A reload that
    fails (a half-written pair) keeps the previous context and is logged."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self._ctx: ssl.SSLContext | None = None
        self._stamp: tuple[float, int, float, int] | None = None
        self.reloads = 0

    def _files_stamp(self) -> tuple[float, int, float, int]:
        c, k = os.stat(self.cert_file), os.stat(self.key_file)
        return c.st_mtime, c.st_size, k.st_mtime, k.st_size

    def current(self) -> ssl.SSLContext:
        try:
            stamp = self._files_stamp()
        except OSError as exc:
            if self._ctx is None:
                raise
            log.warning("rtmps: cannot stat the certificate files (%s); keeping the loaded certificate", exc)
            return self._ctx
        if self._ctx is None or stamp != self._stamp:
            try:
                ctx = server_context(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                if self._ctx is None:
                    raise
                log.warning("rtmps: certificate reload failed (%s); keeping the previous one", exc)
                return self._ctx
            if self._ctx is not None:
                self.reloads += 1
                log.info("rtmps: certificate %s reloaded", self.cert_file)
            self._ctx, self._stamp = ctx, stamp
        return self._ctx
