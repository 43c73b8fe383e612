"""100k random and mutated byte strings: the decoder only ever raises ProtocolError."""

from __future__ import annotations

import random
import struct

import torch

from proto import (
    Ack,
    BlockMap,
    Heartbeat,
    LatentChunk,
    Limits,
    PromptUpdate,
    ProtocolError,
    StageAssignment,
    StageStats,
    StreamSpec,
    decode,
)

N = 100_000
LIMITS = Limits(max_message_bytes=1 << 20, max_tensor_bytes=1 << 18)


def _seeds() -> list[bytes]:
    return [
        LatentChunk(stream_id="s", seed=0, fps=16.0, seq=1, epoch=0, latent_start=2, rope_start=2, capture_time=1.0,
                    deadline=2.0,
                    prompt_version=0, noise_scale=0.8, timesteps=[700, 500],
                    latent=torch.randn(1, 4, 4, 4).bfloat16()).encode(),
        PromptUpdate(stream_id="s", version=2, prompt="neon", mode="blend", blend_chunks=4,
                     embedding=torch.randn(3, 8)).encode(),
        StreamSpec(stream_id="s", width=512, height=512, fps=16.0, steps=2, prompt="a").encode(),
        BlockMap(epoch=3, num_blocks=30, stages=[StageAssignment(stage_id="a", block_start=0, block_end=30)]).encode(),
        Heartbeat(member_id="m", role="dit-stage", epoch=1, sent_at=1.0, ready=True, streams=["a"]).encode(),
        StageStats(stage_id="x", epoch=1, block_start=0, block_end=2, window_s=1.0, micro_steps=3,
                   block_ms=[1.0, 2.0], kv_bytes={"s": 10}).encode(),
        Ack(ref="1").encode(),
    ]


def _mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and b:  # flip bits
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # set an interesting byte
            b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xC7, 0xD4, 0xDD, 0xDF])
        elif op == 2:  # truncate
            del b[rng.randrange(len(b) + 1):]
        elif op == 3:  # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and len(b) >= 8:  # lie about the body length
            struct.pack_into("<I", b, 4, rng.choice([0, 1, len(b), 2**31, 2**32 - 1, rng.randrange(2**32)]))
        elif op == 5:  # splice two frames
            other = rng.choice(seeds)
            b = b[: rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1):]
        elif b:  # overwrite a 4/8-byte int somewhere with an extreme value
            i = rng.randrange(len(b))
            b[i:i + 8] = struct.pack("<q", rng.choice([-1, 2**62, -(2**62), 0]))
    return bytes(b)


def test_decoder_only_raises_protocol_error() -> None:
    rng = random.Random(1234)
    seeds = _seeds()
    for s in seeds:
        decode(s, limits=LIMITS)  # the seeds themselves are valid
    outcomes = {"ok": 0, "ProtocolError": 0}
    for i in range(N):
        kind = i % 4
        if kind == 0:
            data = rng.randbytes(rng.randrange(64))
        elif kind == 1:
            data = b"RH\x01\x00" + struct.pack("<I", rng.randrange(256)) + rng.randbytes(rng.randrange(256))
        else:
            data = _mutate(rng, rng.choice(seeds), seeds)
        try:
            decode(data, limits=LIMITS)
        except ProtocolError:
            outcomes["ProtocolError"] += 1
        else:
            outcomes["ok"] += 1
    assert outcomes["ProtocolError"] > N // 2, outcomes
