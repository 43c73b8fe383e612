"""The tensor link's in-process path: a link whose listener lives in this process (a one-stage ring returns each
item to itself) hands the message object over as it is: no encoding, no socket, no copy, device tensors staying on
the device.

Why not the socket: CUDA IPC cannot map a process's own allocations (``cudaIpcOpenMemHandle`` fails with
``invalid device context``, seen on an H200), and the shared-memory path would copy every return to the host and
back. ``LinkOptions.sender(endpoint, own=True)`` picks this path when the caller knows the target is itself (a
stage whose next stage is itself) and the listener is found among this process's (``LinkListener.in_process``);
otherwise a socket sender without the device path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proto import Message
from services import link_shm

if TYPE_CHECKING:
    from services.link import LinkListener

__all__ = ["LocalSender"]


class LocalSender:
    """What ``NextLink`` and ``SwitchLinks`` use of a ``LinkSender``, delivering into a listener of this process."""

    path = "local"
    on_device = True  # device tensors go as they are: nothing to stage

    def __init__(self, listener: LinkListener, endpoint: str) -> None:
        self.listener = listener
        self.endpoint = endpoint
        self.frames = 0

    def start(self) -> LocalSender:
        link_shm.LINK_PATH.labels(self.path).inc()
        return self

    async def send(self, message: Message, headers: dict[str, str] | None = None) -> int:
        """Queue the message on the listener (in order with anything else it delivers); returns 0 bytes."""
        self.listener.deliver(message, headers or {})
        self.frames += 1
        return 0

    async def flush(self) -> None:
        return None

    async def acknowledged(self) -> None:
        return None  # delivered is read: the listener's queue is the receiving stage's

    def close(self) -> int:
        return 0  # nothing is held in flight
