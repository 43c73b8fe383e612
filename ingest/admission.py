"""Whether a stream may start on this ingest: what it can serve, then what the controller answers (design §6)."""

from __future__ import annotations

import logging

import nats.errors

from ingest.models import latent_chunk_bytes
from proto import Error, ProtocolError, StreamSpec, Subjects
from services.bus import Bus
from services.config import Settings

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


async def ask_admission(bus: Bus | None, spec: StreamSpec, timeout: float, without_controller: str = "refuse") -> str:
    """The controller's refusal reason, or "" when the stream may start. No controller answering: refused, unless
    ``ingest.admission_without_controller`` is ``admit``."""
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
    return reply.message if isinstance(reply, Error) else ""
