"""The controller places admitted streams on measured decoders and egresses, records the assignment in the stream
table before answering, refuses a stream no decoder has room for, and moves a dead decoder's streams to a live one
(real NATS, an in-process controller, fake members' heartbeats)."""

from __future__ import annotations

import contextlib

from proto import SLO, Ack, Error, StreamSpec, Subjects, WorkCost
from services.bus import Bus
from services.config import NatsSettings
from services.gateway.playback import egress_url
from services.streams import StreamTable, new_stream_id

from .conftest import Controllers, Members, controller_settings

# a 64x64 16 fps stream decodes 0.0655 megapixel-frames/s; at 4000 ms each a decoder sustains 0.225 at 90 %
# headroom: three such streams fit one decoder, four do not
DECODE_MS = 4000.0


async def test_placement_refusal_and_a_dead_decoders_streams_move(nats_settings: NatsSettings, bus: Bus,
                                                                   controllers: Controllers, members: Members,
                                                                   eventually) -> None:
    table = await StreamTable.open(bus)
    specs = [StreamSpec(stream_id=new_stream_id(), width=64, height=64, fps=16.0, steps=2, prompt="p",
                        slo=SLO(target_fps=16.0, max_latency_ms=60000)) for _ in range(7)]
    for spec in specs:
        await table.create(spec)
    try:
        members.beat("dit-0", ring_id="0")
        for d in ("dec-a", "dec-b"):
            members.beat(d, "decoder", work=[WorkCost(unit="vae_decode", ms_per_mpx=DECODE_MS, busy=0.0)])
        for e in ("egr-a", "egr-b"):
            members.beat(e, "egress", address=f"http://{e}:8080")
        svc = await controllers.start(controller_settings(nats_settings, stages=1, heartbeat_miss_s=0.4,
                                                          heartbeat_dead_s=0.8, admission_prior_streams=10))
        await eventually(lambda: svc.leader and len(svc.placement_pool().decoders) == 2
                         and len(svc.placement_pool().egresses) == 2)
        for spec in specs[:6]:
            reply = await bus.request(Subjects.admission(), spec, timeout=10)
            assert isinstance(reply, Ack) and "placed on ring 0" in reply.detail, reply
        refused = await bus.request(Subjects.admission(), specs[6], timeout=10)
        assert isinstance(refused, Error) and refused.code == "no_capacity"
        assert "no decoder has room" in refused.message, refused.message
        # recorded in the stream table before the answer; best fit fills one decoder first
        records = {s.stream_id: await table.get(s.stream_id) for s in specs[:6]}
        placed = {sid: r.assignment for sid, r in records.items()}
        assert all(a is not None and a.ring_id == "0" for a in placed.values())
        on = {d: sorted(sid for sid, a in placed.items() if a is not None and a.decoder == d)
              for d in ("dec-a", "dec-b")}
        assert [len(v) for v in on.values()] == [3, 3], on
        for sid, a in placed.items():  # egresses unmeasured: spread; the gateway plays from the assigned one
            assert a is not None and egress_url(records[sid]) == f"http://{a.egress}:8080"
        assert sorted(a.egress for a in placed.values() if a is not None).count("egr-a") == 3
        # dec-a dies: its streams move to dec-b (over its capacity: degraded beats lost), the rest stays
        members.pause("dec-a")

        await eventually(lambda: all(a.decoder == "dec-b" for a in svc.assigner.assignments.values()), timeout=15)
        # the controller decides in memory, then writes each move into the table: wait for the last write
        async def written() -> bool:
            now = [(await table.get(sid)).assignment for sid in placed]
            return all(a is not None and a.decoder == "dec-b" for a in now)

        await eventually(written, timeout=15, interval=0.1)
        for sid, before in placed.items():
            after = (await table.get(sid)).assignment
            assert after is not None and before is not None and after.egress == before.egress
            assert after.version == before.version + (1 if sid in on["dec-a"] else 0)
        moves = [d for d in svc.decisions if d["kind"] == "move"]
        assert sorted(d["stream_id"] for d in moves) == on["dec-a"]
        assert all(d["overcommitted"] == ["decoder"] for d in moves)
    finally:
        for spec in specs:
            with contextlib.suppress(Exception):
                await table.delete(spec.stream_id)
