"""A WHIP publisher for tests: aiortc sends a synthetic moving picture (and optionally a tone) to a WHIP URL."""

from __future__ import annotations

import fractions

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack


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


async def offer(audio: bool = False) -> RTCPeerConnection:
    """A publishing peer connection with its offer set (ICE gathered: WHIP without trickle)."""
    pc = RTCPeerConnection()
    pc.addTransceiver(MovingPicture(), direction="sendonly")
    if audio:
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def publish(client: httpx.AsyncClient, url: str, key: str, pc: RTCPeerConnection) -> httpx.Response:
    """POST the offer; on 201 the answer is applied (media starts flowing)."""
    r = await client.post(url, content=pc.localDescription.sdp.encode(),
                          headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {key}"})
    if r.status_code == 201:
        await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
    return r
