"""A minimal Service for lifecycle tests: answers admission requests after a configurable delay."""

from __future__ import annotations

import asyncio
import os
import sys

from proto import Ack, StreamSpec, Subjects
from services.runtime import Service, main


class EchoService(Service):
    role = "controller"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delay = float(os.environ.get("ECHO_DELAY_S", "0"))
        self.in_flight = 0
        self.checks["warmed_up"] = False

    async def start(self) -> None:
        async def answer(spec: StreamSpec, raw) -> None:
            self.in_flight += 1
            try:
                await asyncio.sleep(self.delay)
                await self.bus.respond(raw, Ack(ref=spec.stream_id))
            finally:
                self.in_flight -= 1

        await self.bus.subscribe(Subjects.admission(), answer, expected=StreamSpec)
        self.checks["warmed_up"] = True

    async def drain(self) -> None:
        while self.in_flight:
            await asyncio.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main(EchoService))
