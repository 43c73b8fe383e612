"""A stage's outgoing tensor links: the one to the next stage in the ring, and those an online switch opens.

``NextLink`` follows the next stage's advertised endpoint (``rheo-endpoints``), reconnects when it changes, and
sends without letting a dead peer hold up the micro-step loop. ``SwitchLinks`` are the direct links to the new
owners of the blocks this stage hands over (moves do not follow the ring) and, when a stage joins right after this
one, to the new next stage (docs/rebalance.md, Protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dit_stage.telemetry import StageTelemetry
from proto import Message, RingReturn, ShardMove, ShardMoveEnd, StageItems
from services.bus import KV
from services.config import DitStageSettings
from services.link import LinkOptions, Sender, parse_endpoint
from services.link_cuda import CudaIpc
from services.link_staging import LinkStaging
from services.runtime import Background, watch_key
from wan.device import resolve_device

__all__ = ["LINK_POLL_S", "NextLink", "SwitchLinks"]

log = logging.getLogger("rheo.dit_stage")

LINK_POLL_S = 0.5
"""How often a link send blocked on a dead peer checks whether the next stage changed."""


def link_options(cfg: DitStageSettings, model_device: str = "cpu") -> LinkOptions:
    """The options of every link of this stage; a stage that listens beyond loopback must have a link key (anyone
    who reaches an unkeyed link port could feed hidden states into the ring). A stage on a CUDA device offers CUDA
    IPC to a peer on the same GPU unless ``link_cuda_ipc`` is off (``model_device``: ``model.device``)."""
    key = cfg.link_key.get_secret_value().encode() if cfg.link_key else None
    if key is None and not _loopback(cfg.link_host):
        raise ValueError(f"dit_stage.link_key is required: the tensor link listens on {cfg.link_host}, beyond "
                          "loopback (set RHEO_DIT_STAGE__LINK_KEY; the chart and `rheo up` generate one)")
    device = CudaIpc.for_device(resolve_device(model_device)) if cfg.link_cuda_ipc == "auto" else None
    return LinkOptions(max_frame_bytes=cfg.link_max_frame_bytes, key=key,
                       shared_memory=cfg.link_shared_memory == "auto", device=device)


async def stage_for_link(message: Message, on_device: bool = False) -> Message:
    """Ring traffic still on a CUDA device goes to the host through pinned, reused buffers on the copy stream
    (services/link_staging.py), waited for off the event loop; anything else (CPU tensors) is sent as it is. On a
    CUDA IPC connection (``on_device``: the next stage is on this GPU) nothing is staged: the tensors go as handles."""
    if on_device:
        return message
    if isinstance(message, StageItems):
        staging = LinkStaging.for_device(message.hidden.device)
        if staging is not None:
            message.hidden, message.noisy = await staging.to_host([message.hidden, message.noisy])
    elif isinstance(message, RingReturn):
        staging = LinkStaging.for_device(message.latents.device)
        if staging is not None:
            (message.latents,) = await staging.to_host([message.latents])
    return message


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NextLink:
    """The link to the next stage (the last stage's goes to the first: ring returns).

    A message is handed only to a sender connected to the next stage of the map it runs under: ``follow`` with a
    new target takes the link down at once, so nothing of a new epoch is queued to a sender about to be replaced
    (the replayed prepare item of a failure epoch once went to the dead stage's sender and was discarded with it,
    and its stream was never prepared again). A send caught on a sender that is replaced is sent again on the new
    one, unless its epoch is older than the link's (stale: counted ``link_changed``). Frames a replaced sender
    discards unacknowledged are counted ``link_replaced``.
    """

    def __init__(self, stage_id: str, endpoints: KV, options: LinkOptions, telemetry: StageTelemetry,
                 on_state: Callable[[bool], None]) -> None:
        self.stage_id = stage_id
        self.endpoints = endpoints
        self.options = options
        self.telemetry = telemetry
        self.on_state = on_state  # False while (re)connecting, True once a sender is up
        self.next_stage: str | None = None
        self.epoch = 0
        """Messages of an older epoch are stale for the current next stage: not sent again after a re-link."""
        self.sender: Sender | None = None
        self.sender_stage: str | None = None  # the stage ``sender`` is connected to
        self.ready = asyncio.Event()
        self.closing = False
        self._tasks = Background()
        self._follow: asyncio.Task[None] | None = None

    def follow(self, stage_id: str, epoch: int = 0) -> None:
        """Link to ``stage_id`` from ``epoch`` on (only the epoch changes when it already is the next stage)."""
        self.epoch = max(self.epoch, epoch)
        if stage_id != self.next_stage or self._follow is None:
            if stage_id == self.sender_stage and self.sender is not None:
                self.ready.set()  # back to the stage the sender still links to (a re-link that never connected)
                self.on_state(True)
            else:
                self.ready.clear()  # from now on a send waits for the new sender
                self.on_state(False)
            self._restart_follow(stage_id)

    def _restart_follow(self, stage_id: str) -> None:
        self.next_stage = stage_id
        if self._follow is not None:
            self._follow.cancel()

        async def kv() -> KV:
            return self.endpoints

        self._follow = self._tasks.spawn(
            watch_key(kv, stage_id, self._on_endpoint, what=f"stage {self.stage_id}: endpoint"), "link-connect")

    def hand_over(self, stage_id: str, sender: Sender) -> None:
        """An online switch re-links at its switch point: ``sender`` (opened at prepare time) replaces the current
        one, which is closed once the old next stage has read what it carries."""
        old, self.sender, self.sender_stage = self.sender, sender, stage_id
        self._restart_follow(stage_id)
        self.ready.set()
        if old is not None:
            self._tasks.spawn(self._close_when_acknowledged(old), "link-close")

    def _replaced(self, sender: Sender) -> bool:
        return self.sender is not sender or self.sender_stage != self.next_stage

    async def send(self, message: Message) -> bool:
        """Send to the next stage; False (dropped, counted) when the link closes, the send fails, or the next stage
        changed and the message is of an older epoch. A send blocked on a dead peer must not hold up the
        micro-step loop: it gives up when the next stage changes, and goes again to the new one."""
        while True:
            await self.ready.wait()
            if self.closing:
                self.telemetry.drop("link_closed")
                return False
            sender = self.sender
            assert sender is not None
            message = await stage_for_link(message, sender.on_device)
            send = asyncio.ensure_future(sender.send(message))
            while True:
                done, _ = await asyncio.wait({send}, timeout=LINK_POLL_S)
                if done:
                    try:
                        send.result()
                    except Exception as e:
                        if self._replaced(sender):
                            break  # closed under it: the new link takes it
                        self.telemetry.drop("link_error")
                        log.warning("stage %s: link send failed: %s", self.stage_id, e)
                        return False
                    return True
                if self._replaced(sender) or self.closing:
                    send.cancel()
                    break
            if self.closing or getattr(message, "epoch", self.epoch) < self.epoch:
                self.telemetry.drop("link_closed" if self.closing else "link_changed")
                return False
            log.info("stage %s: %s sent again on the link to %s", self.stage_id, type(message).__name__,
                     self.next_stage)

    async def send_marker(self, message: Message) -> None:
        """The switch marker goes on the current link whatever happens (the old next stage must read it)."""
        await self.ready.wait()
        assert self.sender is not None
        await self.sender.send(message)

    async def flush(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until the next stage has read what was sent."""
        if self.sender is not None and self.ready.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sender.acknowledged(), timeout_s)

    async def close(self) -> None:
        self.closing = True
        self.ready.set()  # a send waiting for a sender gives up (counted)
        await self._tasks.cancel()
        if self.sender is not None:
            self._count(await asyncio.to_thread(self.sender.close), "link_closed")

    def _count(self, discarded: int, reason: str) -> None:
        if discarded:
            self.telemetry.drop(reason, discarded)

    async def _close_when_acknowledged(self, sender: Sender) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sender.acknowledged(), 30.0)
        self._count(await asyncio.to_thread(sender.close), "link_replaced")

    async def _on_endpoint(self, value: bytes, _revision: int) -> None:
        endpoint = value.decode(errors="replace")
        if self.sender is None or self.sender.endpoint != endpoint or self.sender_stage != self.next_stage:
            await self._connect(endpoint)

    async def _connect(self, endpoint: str) -> None:
        try:
            host, port = parse_endpoint(endpoint)
        except ValueError as e:
            log.warning("stage %s: next stage advertises a bad endpoint: %s", self.stage_id, e)
            return
        target = self.next_stage
        delay = 0.05
        while True:  # reachable before ready: readiness means the ring can carry an item
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
                writer.close()
                break
            except (OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        old = self.sender
        self.ready.clear()
        self.on_state(False)
        self.sender = self.options.sender(endpoint, own=target == self.stage_id).start()
        self.sender_stage = target
        if old is not None:  # sends caught on it go again on the new sender; what it still holds is counted
            self._count(await asyncio.to_thread(old.close), "link_replaced")
        self.on_state(True)
        self.ready.set()
        log.info("stage %s: tensor link to %s (%s)", self.stage_id, target, endpoint)


@dataclass
class SwitchLinks:
    """The links one online switch opens at prepare time, closed when it ends."""

    epoch: int
    options: LinkOptions
    senders: dict[str, Sender] = field(default_factory=dict)  # new owners of blocks this stage hands over
    next_stage: str | None = None  # the next stage under the new map, when it changes (a stage joins after us)
    next_sender: Sender | None = None
    aborted: bool = False

    async def open(self, endpoints: KV, targets: Iterable[str], relink_to: str | None, stage_id: str) -> None:
        """Open a link to every target (and to ``relink_to``, which is ``stage_id``, this stage, when the ring
        shrinks to it); stops early once the switch is aborted."""
        for target in targets:
            endpoint = await self._endpoint_of(endpoints, target)
            if self.aborted:
                return
            self.senders[target] = self.options.sender(endpoint).start()
        if relink_to is not None:
            endpoint = await self._endpoint_of(endpoints, relink_to)
            if not self.aborted:
                self.next_stage = relink_to
                self.next_sender = self.options.sender(endpoint, own=relink_to == stage_id).start()

    async def send_moves(self, stage_id: str, moves: list[ShardMove | ShardMoveEnd],
                         telemetry: StageTelemetry) -> None:
        for move in moves:
            sender = self.senders.get(move.target)
            if sender is None:
                log.error("stage %s: no link to %s for its moved blocks", stage_id, move.target)
                continue
            try:
                n = await sender.send(move)
            except Exception as e:  # e.g. a tensor over the link's frame cap: the new owner counts the stream lost
                log.error("stage %s: move to %s not sent: %s", stage_id, move.target, e)
                continue
            if isinstance(move, ShardMove):
                telemetry.moved("out", n)

    def take_next(self) -> tuple[str, Sender] | None:
        """The new next stage and its link, handed to ``NextLink`` at the switch point (once)."""
        if self.next_stage is None or self.next_sender is None:
            return None
        taken, self.next_sender = (self.next_stage, self.next_sender), None
        return taken

    async def close(self, telemetry: StageTelemetry) -> None:
        """After a completed switch, once the new owners have read the moves; at once after an aborted one. What
        the links never got acknowledged is counted (``switch_link_closed``)."""
        discarded = 0
        if self.aborted and self.next_sender is not None:
            discarded += await asyncio.to_thread(self.next_sender.close)
        for sender in self.senders.values():
            if not self.aborted:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sender.acknowledged(), 30.0)
            discarded += await asyncio.to_thread(sender.close)
        if discarded:
            telemetry.drop("switch_link_closed", discarded)

    async def _endpoint_of(self, endpoints: KV, stage_id: str) -> str:
        while not self.aborted:
            entry = await endpoints.get(stage_id)
            if entry is not None and entry.value:
                return entry.value.decode(errors="replace")
            await asyncio.sleep(0.1)
        return ""
