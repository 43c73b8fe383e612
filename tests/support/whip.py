"""A WHIP publisher for tests: aiortc sends a synthetic moving picture (and optionally audio) to a WHIP URL; for A/V
sync, pictures and a tone captured on one clock (``Clock``, ``Pictures``, ``Tone``)."""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Callable

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

AUDIO_RATE, AUDIO_FRAME = 48000, 960  # Opus's rate and 20 ms frames, as a browser captures them


class MovingPicture(VideoStreamTrack):
    """A gradient that slides by 4 pixels a frame, at aiortc's 30 fps clock."""

    def __init__(self, width: int = 96, height: int = 64) -> None:
        super().__init__()
        self.width, self.height, self.n = width, height, 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        x = (np.arange(self.width)[None, :] * 3 + self.n * 4) % 256
        y = np.arange(self.height)[:, None] * 2 % 256
        img = np.stack([np.broadcast_to(x, (self.height, self.width)), np.broadcast_to(y, (self.height, self.width)),
                        np.full((self.height, self.width), 128)], axis=-1).astype(np.uint8)
        self.n += 1
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = pts, time_base or fractions.Fraction(1, 90000)
        return frame


class Clock:
    """The capture clock of a publisher's tracks: media time ``t`` is captured at wall time ``t0 + t`` (``t0``: the
    first capture of either track), so a picture and a sample of the same media time are captured together."""

    def __init__(self) -> None:
        self.t0: float | None = None

    async def until(self, t: float) -> None:
        if self.t0 is None:
            self.t0 = time.time()
        await asyncio.sleep(max(0.0, self.t0 + t - time.time()))


class Pictures(VideoStreamTrack):
    """``draw(n)`` (RGB) as frame ``n``, captured at media time ``n / fps`` on ``clock``."""

    def __init__(self, draw: Callable[[int], np.ndarray], fps: float, clock: Clock) -> None:
        super().__init__()
        self.draw, self.fps, self.clock, self.n = draw, fps, clock, 0

    async def recv(self) -> av.VideoFrame:
        t = self.n / self.fps
        await self.clock.until(t)
        frame = av.VideoFrame.from_ndarray(self.draw(self.n), format="rgb24")
        frame.pts, frame.time_base = round(t * 90000), fractions.Fraction(1, 90000)
        self.n += 1
        return frame


class Tone(MediaStreamTrack):
    """A 1 kHz tone from media time ``onset_s`` on ``clock`` (silence before), in 20 ms frames each handed on once
    its last sample is captured (as a microphone's)."""

    kind = "audio"

    def __init__(self, onset_s: float, clock: Clock, hz: float = 1000.0) -> None:
        super().__init__()
        self.onset_s, self.clock, self.hz, self.k = onset_s, clock, hz, 0

    async def recv(self) -> av.AudioFrame:
        first = self.k * AUDIO_FRAME
        await self.clock.until((first + AUDIO_FRAME) / AUDIO_RATE)
        t = (first + np.arange(AUDIO_FRAME)) / AUDIO_RATE
        x = (0.5 * 32767 * np.sin(2 * np.pi * self.hz * t) * (t >= self.onset_s)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([x, x], axis=1).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, first, fractions.Fraction(1, AUDIO_RATE)
        self.k += 1
        return frame


async def offer(audio: bool | MediaStreamTrack = False, video: MediaStreamTrack | None = None) -> RTCPeerConnection:
    """A publishing peer connection with its offer set (ICE gathered: WHIP without trickle). ``video``: a
    ``MovingPicture`` unless given; ``audio``: True for aiortc's silence, or a track."""
    pc = RTCPeerConnection()
    pc.addTransceiver(video or MovingPicture(), direction="sendonly")
    if audio:
        pc.addTransceiver(AudioStreamTrack() if audio is True else audio, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def publish(client: httpx.AsyncClient, url: str, key: str, pc: RTCPeerConnection) -> httpx.Response:
    """POST the offer; on 201 the answer is applied (media starts flowing)."""
    r = await client.post(url, content=pc.localDescription.sdp.encode(),
                          headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {key}"})
    if r.status_code == 201:
        await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
    return r
