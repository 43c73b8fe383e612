"""Whether a stream may start on this ingest: what it can serve, then what the controller answers (design §6)."""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors

from ingest.models import latent_chunk_bytes
from proto import Error, ProtocolError, StreamSpec, Subjects
from services.bus import Bus
from services.config import Settings
from services.controller.admission_queue import QUEUE_POLL_S

__all__ = ["ask_admission", "unservable"]

log = logging.getLogger("rheo.ingest")


def unservable(settings: Settings, spec: StreamSpec) -> str:
    """Why this ingest cannot serve ``spec`` ("" when it can): a model size over its limits, or T2V chunks too large
    for one message."""
    ing = settings.ingest
    if spec.width > ing.max_model_width or spec.height > ing.max_model_height:
        return f"model size {spec.width}x{spec.height} exceeds {ing.max_model_width}x{ing.max_model_height}"
    if spec.t2v:
        size = latent_chunk_bytes(settings, spec.width, spec.height, spec.t2v_frames)
        if size > settings.nats.max_send_bytes:
            return (f"a chunk of {spec.t2v_frames} latent frames at {spec.width}x{spec.height} is {size} bytes, "
                    f"over nats.max_send_bytes {settings.nats.max_send_bytes}: use fewer t2v_frames")
    return ""


async def ask_admission(bus: Bus | None, spec: StreamSpec, timeout: float, without_controller: str = "refuse",
                        queued_wait_s: float = 0.0) -> str:
    """The controller's refusal reason, or "" when the stream may start. No controller answering: refused, unless
    ``ingest.admission_without_controller`` is ``admit``. Queued (``controller.admission_queue``): asks again every
    ``QUEUE_POLL_S`` (the controller keeps its place while it asks) for at most ``queued_wait_s``, then answers the
    last reason (0: a queued answer is a refusal)."""
    end = time.monotonic() + queued_wait_s
    while True:
        reply = await _ask(bus, spec, timeout, without_controller)
        if not isinstance(reply, Error):
            return reply
        if reply.code != "queued" or time.monotonic() + QUEUE_POLL_S > end:
            return reply.message
        log.info("stream %s: %s", spec.stream_id, reply.message)
        await asyncio.sleep(QUEUE_POLL_S)


async def _ask(bus: Bus | None, spec: StreamSpec, timeout: float, without_controller: str) -> str | Error:
    assert bus is not None
    try:
        reply = await bus.request(Subjects.admission(), spec, timeout=timeout)
    except nats.errors.NoRespondersError:
        if without_controller == "admit":
            log.warning("stream %s: no controller answers admission; admitted (ingest.admission_without_controller)",
                        spec.stream_id)
            return ""
        return "no controller answers admission (the controller is down or restarting); retry"
    except (nats.errors.TimeoutError, TimeoutError):
        return "the controller did not answer admission in time; retry"
    except nats.errors.Error as e:  # connection closed or draining (shutdown)
        return f"cannot reach the controller ({type(e).__name__}); retry"
    except ProtocolError as e:
        return f"malformed admission answer ({e}); retry"
    return reply if isinstance(reply, Error) else ""
