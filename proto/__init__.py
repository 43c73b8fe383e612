"""rheo's wire contract: every message, subject and schema version, in one place."""

from proto.codec import Limits
from proto.errors import ProtocolError
from proto.messages import (
    MESSAGE_TYPES,
    SLO,
    Ack,
    BlockMap,
    Credit,
    Error,
    FrameChunk,
    Heartbeat,
    LatentChunk,
    Message,
    NoiseParams,
    PromptUpdate,
    StageAssignment,
    StageStats,
    StreamRecord,
    StreamSpec,
    decode,
    decode_with_headers,
)
from proto.subjects import CHANNELS, Buckets, InvalidToken, Subjects

__all__ = [
    "CHANNELS",
    "MESSAGE_TYPES",
    "SLO",
    "Ack",
    "BlockMap",
    "Buckets",
    "Credit",
    "Error",
    "FrameChunk",
    "Heartbeat",
    "InvalidToken",
    "LatentChunk",
    "Limits",
    "Message",
    "NoiseParams",
    "PromptUpdate",
    "ProtocolError",
    "StageAssignment",
    "StageStats",
    "StreamRecord",
    "StreamSpec",
    "Subjects",
    "decode",
    "decode_with_headers",
]
