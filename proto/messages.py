"""Every message rheo sends, with its schema version: the wire contract.

A message is a strict pydantic model (no coercion, no unknown fields) so that a peer speaking a different schema
fails loudly at the edge instead of deep inside a service. ``Message.encode`` produces a frame (see
``proto.codec``); ``decode`` turns any byte string back into a message or raises ``ProtocolError``.

Changing a message's fields means bumping its ``SCHEMA_VERSION`` and regenerating ``proto/asyncapi.yaml``
(``rheo proto asyncapi --write``); the drift test fails until both are done. A bump that only adds fields with
defaults lists the versions it replaces in ``READS_VERSIONS``, so frames already stored (KV buckets) still decode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, WithJsonSchema, model_validator

from proto.codec import (
    DEFAULT_LIMITS,
    DTYPE_NAMES,
    DeviceOpen,
    DeviceShare,
    Limits,
    decode_frame,
    encode_frame,
    encode_parts,
)
from proto.errors import ProtocolError
from proto.spec import MAX_FPS, MAX_STEPS, MAX_T2V_FRAMES, SIZE_MULTIPLE, RingConfig, chunk_timesteps

if TYPE_CHECKING:
    from proto.clock import ChunkClock


def _check_tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"expected a tensor, got {type(value).__name__}")
    if value.dtype not in DTYPE_NAMES:
        raise ValueError(f"tensor dtype {value.dtype} has no wire encoding")
    return value


Tensor = Annotated[
    torch.Tensor,
    PlainValidator(_check_tensor),
    WithJsonSchema({"type": "object", "x-rheo-tensor": True,
                    "description": "msgpack ext 1: [dtype, shape, offset, nbytes] + raw little-endian bytes"}),
]
"""A tensor field: carried as a zero-copy extension (see ``proto.codec``)."""

StreamId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="stream id (a subject token)")]


class Message(BaseModel):
    """Base of every wire message."""

    model_config = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)

    SCHEMA_VERSION: ClassVar[int] = 1
    """Bump on any change of fields or meaning."""
    READS_VERSIONS: ClassVar[tuple[int, ...]] = ()
    """Older versions this build still decodes: their fields are a subset of this one's, the rest defaulted."""

    def body(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"t": type(self).__name__, "v": self.SCHEMA_VERSION, "d": _fields(self)}
        if headers:
            body["h"] = headers
        return body

    def encode(self, headers: dict[str, str] | None = None) -> bytes:
        """One frame. ``headers`` (e.g. trace context) ride inside the frame, for transports without headers."""
        return encode_frame(self.body(headers))

    def encode_parts(self, headers: dict[str, str] | None = None,
                     device: DeviceShare | None = None) -> list[memoryview | bytes]:
        """Frame parts for a scatter-gather send (the tensor link), no join copy; ``device``: proto.codec."""
        return encode_parts(self.body(headers), device=device)


def _fields(model: BaseModel) -> dict[str, Any]:
    """Shallow field dict with nested models as dicts; tensors pass through untouched (no copies)."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        out[name] = _plain(getattr(model, name))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _fields(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class NoiseParams(BaseModel):
    """Motion-aware noise control (streamdiffusionv2.md §5)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    noise_scale: float = Field(0.8, gt=0, le=1, description="initial noise scale s_init")
    motion_aware: bool = Field(True, description="adapt the noise scale to input motion")


class SLO(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    target_fps: float = Field(16.0, gt=0, description="output frames per second the stream must sustain")
    max_latency_ms: float = Field(1000.0, gt=0, description="glass-to-glass latency bound")


class StreamSpec(Message):
    """What a stream is: set at creation, updated by the control API. The one validated definition of a stream's
    parameters (limits in ``proto.spec``); what derives from them (chunk clock, timesteps) is asked of it."""

    SCHEMA_VERSION: ClassVar[int] = 2
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1,)

    stream_id: StreamId
    width: int = Field(gt=0, multiple_of=SIZE_MULTIPLE, description="model width in pixels")
    height: int = Field(gt=0, multiple_of=SIZE_MULTIPLE, description="model height in pixels")
    fps: float = Field(gt=0, le=MAX_FPS)
    steps: int = Field(ge=1, le=MAX_STEPS, description="denoising steps = stream-batch slots")
    prompt: str
    seed: int = Field(0, ge=0, lt=2**63, description="every random draw of the stream derives from it")
    noise: NoiseParams = Field(default_factory=NoiseParams)
    slo: SLO = Field(default_factory=SLO)
    t2v: bool = Field(False, description="text-to-video: no input video")
    t2v_frames: int = Field(1, ge=1, le=MAX_T2V_FRAMES, description="text-to-video: latent frames per chunk")

    def clock(self, ring: RingConfig | None = None) -> ChunkClock:
        """The stream's chunk clock on ``ring`` (the pipeline's KV window and RoPE refresh; default: SDv2's)."""
        return (ring or RingConfig()).clock(self.t2v_frames if self.t2v else None)

    def timesteps(self, noise_scale: float | None = None) -> list[int]:
        """A chunk's timesteps, slot 0 first, for its (motion-adapted) noise scale; default: the spec's own (T2V:
        the step list itself)."""
        if self.t2v:
            return chunk_timesteps(self.steps, None)
        return chunk_timesteps(self.steps, self.noise.noise_scale if noise_scale is None else noise_scale)


class ChunkHeader(BaseModel):
    """What every hop knows about one chunk of a stream: the one definition, shared by the chunk messages on the bus
    (``LatentChunk``) and the items of the DiT ring (``RingItem``)."""

    model_config = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)
    stream_id: StreamId
    seed: int = Field(ge=0, lt=2**63, description="the stream's seed: every random draw derives from it (with the "
                                                   "segment: ``segment_seed``)")
    fps: float = Field(gt=0, le=MAX_FPS, description="the stream's frame rate (the decoder's CFR clock)")
    seq: int = Field(ge=0, description="chunk index c")
    epoch: int = Field(ge=0, description="block-map epoch the chunk entered with")
    latent_start: int = Field(ge=0, description="absolute latent-frame index of the chunk's first frame")
    rope_start: int = Field(ge=0, description="RoPE start frame after refresh")
    capture_time: float = Field(description="wall-clock capture time of the chunk's first frame (s)")
    deadline: float = Field(description="wall-clock time after which the chunk is useless (s)")
    prompt_version: int = Field(ge=0, description="the prompt the chunk runs under (mid-blend: the target)")
    blend_from: int | None = Field(None, ge=0, description="mid-blend: the prompt version blended from")
    blend_alpha: float = Field(1.0, ge=0, le=1, description="mid-blend: the embedding is lerp(blend_from's, "
                                                              "prompt_version's, blend_alpha)")
    noise_scale: float = Field(ge=0, le=1, description="input noise mix s (1: pure noise, a T2V chunk)")
    timesteps: list[int] = Field(description="the denoising timesteps for this chunk, slot 0 first")
    segment: int = Field(0, ge=0, description="warm-up segment: a `cut` prompt change starts the next one (seq of "
                                              "the stream goes on; its first chunk in a segment is a prepare chunk)")
    replay: bool = Field(False, description="re-sent from ingest's ring to rebuild lost KV: run, never shown")
    trace: str | None = Field(None, max_length=128, description="W3C traceparent of the chunk's last hop: its next "
                                                                 "span's parent (one trace per chunk; "
                                                                 "docs/observability.md)")

    @model_validator(mode="after")
    def _blend(self) -> ChunkHeader:
        if self.blend_from is not None and self.blend_from >= self.prompt_version:
            raise ValueError("a blend goes from an older prompt version to a newer one")
        return self

    def header(self) -> dict[str, Any]:
        """The header fields alone (to build the other kind of chunk message from this one)."""
        return {name: getattr(self, name) for name in ChunkHeader.model_fields}


class LatentChunk(Message, ChunkHeader):
    """One chunk's latents (ingest → first stage; last stage → decoder)."""

    SCHEMA_VERSION: ClassVar[int] = 4
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (3,)

    latent: Tensor = Field(description="[F, C, H, W] latent frames (T2V: zeros; noise_scale 1 ignores them)")


class FrameChunk(Message):
    """Raw frames of one chunk (inside ingest and decoder; never on the bus in production)."""

    stream_id: StreamId
    seq: int = Field(ge=0)
    capture_time: float
    deadline: float
    fps: float = Field(gt=0)
    frames: Tensor = Field(description="[F, H, W, 3] uint8 RGB")


PromptMode = Literal["cut", "blend"]
"""cut: reset caches and warm up again; blend: interpolate embeddings over N chunks, keep KV."""


class PromptUpdate(Message):
    """A new prompt for a stream, effective from the next chunk."""

    stream_id: StreamId
    version: int = Field(ge=0, description="monotonic per stream")
    prompt: str
    mode: PromptMode = "cut"
    blend_chunks: int = Field(0, ge=0, description="chunks to interpolate over in blend mode")
    embedding: Tensor | None = Field(None, description="[L, D] umT5 embedding, when already encoded")


Role = Literal["ingest", "dit-stage", "decoder", "egress", "controller", "gateway", "jobs"]


class WorkCost(BaseModel):
    """What one unit of a member's model work costs, measured there (``services/workmeter.py``)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    unit: Literal["vae_encode", "vae_decode"]
    ms_per_mpx: float = Field(ge=0, description="time per model-size megapixel-frame (EWMA, seeded by the warm-up)")
    busy: float = Field(ge=0, description="fraction of the last heartbeat period the unit was busy")


class Heartbeat(Message):
    """Liveness of one member; the controller declares it dead after a miss budget."""

    SCHEMA_VERSION: ClassVar[int] = 3
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1, 2)

    member_id: str = Field(min_length=1, max_length=128)
    role: Role
    epoch: int = Field(ge=0, description="latest block-map epoch the member has applied")
    sent_at: float
    ready: bool
    streams: list[str] = Field(default_factory=list)
    work: list[WorkCost] = Field(default_factory=list, max_length=8,
                                 description="measured cost of its model work (admission counts every bottleneck)")
    ring_id: str = Field("", max_length=64, description="a DiT stage's ring (pipeline) id (placement)")
    address: str = Field("", max_length=512, description="an egress's base URL for HLS (the gateway proxies there)")


class LatencyFit(BaseModel):
    """A stage's fitted micro-step time for one grid: a + b·n ms for n items (``dit_stage.batcher.LatencyModel``)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    grid: list[int] = Field(max_length=3, description="latent frames, height, width of the items")
    a_ms: float = Field(ge=0, description="fixed ms of a micro-step")
    b_ms: float = Field(ge=0, description="ms per item")
    items: int = Field(0, ge=0, description="items of this grid among the micro-steps fitted (the mix of grids)")


class StageStats(Message):
    """What one DiT stage measured over its last reporting window."""

    SCHEMA_VERSION: ClassVar[int] = 3
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1, 2)

    stage_id: str = Field(min_length=1, max_length=128)
    epoch: int = Field(ge=0)
    block_start: int = Field(ge=0)
    block_end: int = Field(ge=0)
    window_s: float = Field(gt=0)
    micro_steps: int = Field(ge=0)
    block_ms: list[float] = Field(description="mean compute time per owned block")
    extra_ms: float = Field(0.0, description="patch-embed/head/VAE time on first/last stages")
    queue_wait_ms: float = 0.0
    link_send_ms: float = 0.0
    link_recv_ms: float = 0.0
    batch_items: float = Field(0.0, description="mean items per micro-step")
    kv_bytes: dict[str, int] = Field(default_factory=dict, description="KV bytes held per stream")
    free_memory_bytes: int = 0
    items: int = Field(0, ge=0, description="items (stream x step) computed in the window")
    late_items: int = Field(0, ge=0, description="items dropped in the window for their deadline or a full queue "
                                                 "(the autoscaler's miss ratio)")
    latency_fits: list[LatencyFit] = Field(default_factory=list, max_length=8, description="the stage's fitted "
                                           "micro-step times, most measured grid first (the controller prices its "
                                           "ring with them)")


class StageAssignment(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    stage_id: str = Field(min_length=1, max_length=128)
    block_start: int = Field(ge=0)
    block_end: int = Field(ge=0)
    endpoint: str = Field("", description="host:port of the stage's tensor link listener")


BlockMapReason = Literal["initial", "rebalance", "failure", "join"]
"""Why an epoch began. ``failure``: a stage died, so KV of some blocks is lost and streams are rebuilt by replay;
the others keep every stream's KV (moved between stages where blocks moved)."""


class BlockMap(Message):
    """Which stage runs which contiguous block range, under an epoch, and the ring every stream runs on."""

    SCHEMA_VERSION: ClassVar[int] = 4
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (2, 3)

    epoch: int = Field(ge=0)
    num_blocks: int = Field(ge=1)
    stages: list[StageAssignment]
    ring_id: str = Field("0", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the ring (pipeline) this map is of: "
                         "one map per ring, each under its own epochs (docs/scheduling.md, Many rings)")
    created_at: float = 0.0
    reason: BlockMapReason = "initial"
    ring: RingConfig = Field(default_factory=RingConfig, description="KV window, sinks and RoPE refresh of every "
                             "stream (the controller's dit_stage settings)")

    def position(self, stage_id: str) -> int:
        """The stage's place in the ring (0: first), -1 when the map does not hold it."""
        return next((i for i, s in enumerate(self.stages) if s.stage_id == stage_id), -1)

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Each stage's [block_start, block_end), in ring order."""
        return {s.stage_id: (s.block_start, s.block_end) for s in self.stages}

    def validate_cover(self) -> None:
        """Raise unless the stages cover [0, num_blocks) contiguously, in order."""
        pos = 0
        for s in self.stages:
            if s.block_start != pos or s.block_end <= s.block_start:
                raise ProtocolError(f"block map epoch {self.epoch}: stage {s.stage_id} has "
                                    f"[{s.block_start}, {s.block_end}), expected to start at {pos}")
            pos = s.block_end
        if pos != self.num_blocks:
            raise ProtocolError(f"block map epoch {self.epoch} covers {pos} of {self.num_blocks} blocks")


class Error(Message):
    """A failure reported to whoever asked, or on a stream's event subject."""

    code: str = Field(min_length=1, max_length=64)
    message: str
    stream_id: str | None = None


class Ack(Message):
    """A positive answer to a control request."""

    ok: bool = True
    ref: str = Field("", description="what is acknowledged (an id, a seq)")
    detail: str = ""


class VideoUnit(BaseModel):
    """One H.264 access unit (Annex B). ``pts`` counts frames at the stream's constant rate; no B-frames."""

    model_config = ConfigDict(strict=True, extra="forbid")
    pts: int = Field(ge=0)
    keyframe: bool
    data: bytes
    capture_time: float | None = Field(None, description="wall-clock capture time of the source frame, if known")


class EncodedVideo(Message):
    """Encoded output of one stream, decoder → egress: the bus carries H.264, never raw frames."""

    stream_id: StreamId
    seq: int = Field(ge=0, description="per-stream message counter (gaps = lost messages)")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    fps: float = Field(gt=0)
    extradata: bytes = Field(description="H.264 SPS + PPS, Annex B")
    units: list[VideoUnit]
    end_of_stream: bool = Field(False, description="the last message of the stream: packagers close their playlists")


class AudioUnit(BaseModel):
    """One AAC access unit (raw, no ADTS header) with the wall-clock capture time of its first sample, on the clock
    of the video chunks' ``capture_time`` (ingest's pacer anchor), so egress can place it against the styled video."""

    model_config = ConfigDict(strict=True, extra="forbid")
    capture_time: float
    data: bytes = Field(max_length=8192)


class EncodedAudio(Message):
    """The publisher's AAC passed through, ingest → egress, batched (~150 ms per message, not one per frame)."""

    stream_id: StreamId
    seq: int = Field(ge=0, description="per-stream message counter (gaps = lost messages)")
    config: bytes = Field(max_length=64, description="AAC AudioSpecificConfig (the FLV sequence header's payload)")
    sample_rate: int = Field(gt=0, le=192000)
    channels: int = Field(ge=1, le=8)
    units: list[AudioUnit] = Field(max_length=256)


StreamEventKind = Literal["live", "ended"]


class StreamEvent(Message):
    """A stream went live (publisher connected) or ended (publisher gone for good, or deleted)."""

    stream_id: StreamId
    kind: StreamEventKind
    seq: int = Field(0, ge=0, description="ended: the last chunk seq the stream produced")
    at: float


class StreamOutput(Message):
    """The decoder turned chunk ``seq`` of a stream into frames: styled output is flowing. At most a few per second
    per stream (the latest seq); ingest's liveness watch compares it with what it published (docs/recovery.md)."""

    SCHEMA_VERSION: ClassVar[int] = 2
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1,)

    stream_id: StreamId
    seq: int = Field(ge=0, description="the last chunk decoded")
    segment: int = Field(0, ge=0, description="its warm-up segment")
    decoded: int = Field(ge=0, description="chunks of this stream decoded by this decoder so far")
    late: int = Field(0, ge=0, description="of those, decoded after their deadline (still shown): the decoder's "
                                           "deadline misses of this stream")
    at: float


class StreamStatus(Message):
    """What egress sees of one stream's output, once per ``STATUS_INTERVAL_S`` while it serves the stream: the one
    definition of its output FPS, glass-to-glass latency and viewer count (docs/observability.md). The gateway
    answers ``/v1/streams`` from the last one; Prometheus gets the same numbers without a stream label."""

    stream_id: StreamId
    at: float
    output_fps: float | None = Field(None, ge=0, description="frames per second made available to viewers over the "
                                                             "last FPS window (null: not measured yet)")
    latency_p50_s: float | None = Field(None, ge=0, description="median glass-to-glass latency (a part's first "
                                                                "frame's capture → the part available) over the "
                                                                "latency window (null: no part in it)")
    latency_samples: int = Field(0, ge=0, description="parts the median is taken over")
    viewers: int = Field(0, ge=0, description="distinct playback sessions (signed playback tokens) that fetched a "
                                              "playlist or part within the viewer window")
    viewers_capped: bool = Field(False, description="more sessions than egress tracks per stream: viewers is a "
                                                    "lower bound")
    ended: bool = Field(False, description="the stream's playlist has ended (still served for a while)")


StreamState = Literal["created", "live", "recovering", "degraded", "failed", "ended"]
"""``created``: no session yet; then, while a session runs, its health (docs/recovery.md, Liveness): ``live``,
``recovering`` (output stalled, being repaired), ``degraded`` (output flows, most chunks dropped downstream),
``failed`` (repairs brought nothing back: ``state_reason`` says why); ``ended`` when the session ended."""
ACTIVE_STATES: frozenset[str] = frozenset({"live", "recovering", "degraded", "failed"})
"""A session is running (someone serves the stream)."""


class IngestStatus(BaseModel):
    """Ingest's checkpoint of a live stream's session, written into its record every ``ingest.status_interval_s``
    and on state changes (``ingest/status.py``); the API shows it."""

    model_config = ConfigDict(strict=True, extra="forbid")
    member: str = Field("", description="the ingest instance serving the session")
    published: int = Field(0, ge=0, description="chunks published in this session")
    dropped: dict[str, int] = Field(default_factory=dict, description="chunks dropped in this session, by reason "
                                                                      "(ingest/drops.py DROP_REASONS)")
    last_seq: int | None = Field(None, ge=0, description="seq of the last chunk published")
    segment: int = Field(0, ge=0, description="the warm-up segment being encoded")
    at: float = Field(0.0, description="when this checkpoint was written (unix time)")


class Assignment(BaseModel):
    """Where the controller placed a stream (docs/scheduling.md, Placement): the ring that denoises it, the decoder
    and the egress that serve it. Each of them processes only the streams assigned to it."""

    model_config = ConfigDict(strict=True, extra="forbid")
    ring_id: str = Field(max_length=64)
    decoder: str = Field(max_length=128, description="member id of the decoder")
    egress: str = Field(max_length=128, description="member id of the egress")
    egress_url: str = Field("", max_length=512, description="that egress's HLS base URL (its heartbeat's address)")
    version: int = Field(1, ge=1, description="1 at placement, +1 at every move (a member died)")


MAX_RESTREAM_DESTINATIONS = 4  # per stream (the API's limit, and the record's)


class StreamRecord(Message):
    """A stream's row in the stream table (JetStream KV): what it is, its hashed key, where it plays; ingest's
    checkpoint of it and the seq/segment reservation that keeps a stream's chunks monotonic across sessions."""

    SCHEMA_VERSION: ClassVar[int] = 5
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1, 2, 3, 4)

    spec: StreamSpec
    key_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the stream key; the key is never stored")
    state: StreamState = "created"
    state_reason: str = Field("", max_length=1024, description="why the state is what it is (recovering, degraded, "
                                                               "failed)")
    prompt_version: int = Field(0, ge=0)
    created_at: float
    updated_at: float
    egress_url: str = Field("", description="base URL of the egress instance serving this stream's HLS")
    next_seq: int = Field(0, ge=0, description="seq reservation: every chunk ever published has a lower seq; a new "
                                               "session starts here")
    next_segment: int = Field(0, ge=0, description="segment reservation: every chunk ever published has a lower "
                                                   "segment; a new session starts with this one")
    ingest: IngestStatus | None = Field(None, description="ingest's checkpoint of the live (or last) session")
    assignment: Assignment | None = Field(None, description="the controller's placement (None: every decoder and "
                                                            "egress serves it, as without a controller)")
    restream: list[str] = Field(default_factory=list, max_length=MAX_RESTREAM_DESTINATIONS, description=(
        "the stream's own RTMP push destinations (rtmp:// or rtmps://, with their keys: never shown back); empty: "
        "egress.rtmp_push_url, if set"))


class HlsSegmentState(BaseModel):
    """One published HLS segment as a restarted egress lists it again (when its file is still on disk)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    msn: int = Field(ge=0, description="media sequence number")
    discontinuity: int = Field(ge=0, description="discontinuity sequence number of the period it belongs to")
    duration: float = Field(ge=0, le=3600)
    program_date_time: float


class HlsState(Message):
    """What a stream's playlist needs to continue across an egress or decoder restart (``Buckets.EGRESS``, key =
    stream id; written once per closed segment): media sequence and discontinuity sequence never go back, and
    output timestamps continue after ``next_pts``."""

    stream_id: StreamId
    next_msn: int = Field(ge=0, description="media sequence number of the next segment")
    discontinuity: int = Field(ge=0, description="discontinuity sequence number of the current period")
    next_pts: int = Field(ge=0, description="first output pts (frames at ``fps``) after the last one written")
    fps: float = Field(gt=0, le=MAX_FPS)
    segments: list[HlsSegmentState] = Field(max_length=64, description="the playlist window, oldest first")


class ApiToken(Message):
    """A per-stream API token (``Buckets.STREAMS``, key ``t.<token id>``): it may read and PATCH one stream. The
    secret is shown once, at minting; only its sha256 is stored."""

    token_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,32}$")
    stream_id: StreamId
    secret_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the whole token; never the token")
    label: str = Field("", max_length=200)
    created_at: float


class Credit(Message):
    """Flow control for bulk subjects: the consumer has taken ``consumed`` bytes in total from this publisher."""

    consumed: int = Field(ge=0)


# -- the DiT stage ring (tensor link between stages; docs/dit-ring.md) -------------------------------------------


class RingItem(ChunkHeader):
    """One item of the stream-batch ring: chunk ``seq`` of a stream at denoising ``step`` (one batch row)."""

    step: int = Field(ge=0, description="denoising step k (at timesteps[k]); k = steps: the Self-Forcing clean "
                                        "pass of the finished chunk (at the ring's context_noise)")
    slot: int = Field(ge=0, description="KV-cache slot (= step, except chunk 0's sequential prepare: slot 0)")
    steps: int = Field(ge=1, le=MAX_STEPS, description="denoising steps of the stream's segment = stream-batch "
                                                       "slots")
    frame_start: int = Field(ge=0, description="cache frame index of the chunk's first latent frame in this slot")
    frames: int = Field(ge=1, description="latent frames of the chunk")


class StageItems(Message):
    """One micro-step handed to the next DiT stage: per-item headers, hidden states and the noisy latents."""

    SCHEMA_VERSION: ClassVar[int] = 4
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (3,)

    epoch: int = Field(ge=0)
    items: list[RingItem]
    hidden: Tensor = Field(description="[N, f·S, D] hidden states after the sender's blocks")
    noisy: Tensor = Field(description="[N, C, f, H, W] the items' noisy latents (the last stage needs them for x0)")


class RingReturn(Message):
    """Last stage → first stage: items re-noised to their next step, to run again."""

    SCHEMA_VERSION: ClassVar[int] = 4
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (3,)

    epoch: int = Field(ge=0)
    items: list[RingItem] = Field(description="the items at their next step (step, slot already advanced)")
    latents: Tensor = Field(description="[N, C, f, H, W] re-noised latents at each item's step")


class StagePrompt(Message):
    """A prompt embedding handed down the stage chain before the first item that uses its version."""

    stream_id: StreamId
    version: int = Field(ge=0)
    embedding: Tensor = Field(description="[L, D] umT5 embedding")


class EpochSwitch(Message):
    """In-band marker on the stage chain at an online rebalance: every micro-step before it ran under ``previous``,
    every one after it runs under ``epoch`` (docs/rebalance.md). A stage that reads it has run its last micro-step
    of ``previous``, so it ships the blocks it loses and forwards the marker."""

    epoch: int = Field(ge=1)
    previous: int = Field(ge=0)


class ShardLayout(BaseModel):
    """The ring layout and counters of a KV shard (``KVCacheShard.meta()`` minus its block list)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    num_slots: int = Field(ge=1)
    window: int = Field(ge=1)
    sink: int = Field(ge=0)
    tokens_per_frame: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    dtype: str
    adaptive_threshold: float | None
    frames_end: list[int] = Field(description="one past the highest frame written, per slot (ring counters)")


class ShardMove(Message):
    """One stream's state for blocks that change owner at an online rebalance, old owner → new owner, sent after
    the old owner's last micro-step of the old epoch (docs/rebalance.md). Ring state travels with the keys."""

    epoch: int = Field(ge=1, description="the epoch the blocks move into")
    source: str = Field(min_length=1, max_length=128, description="old owner (stage id)")
    target: str = Field(min_length=1, max_length=128, description="new owner (stage id)")
    stream_id: StreamId
    blocks: list[int]
    latent_h: int = Field(ge=1, description="the stream's latent height (a joining stage builds its state from it)")
    latent_w: int = Field(ge=1, description="the stream's latent width")
    segment: int = Field(0, ge=0, description="the stream's warm-up segment at the switch (see LatentChunk)")
    segment_start: int = Field(0, ge=0, description="seq of that segment's prepare chunk (noise draws count from it)")
    layout: ShardLayout
    tensors: dict[str, Tensor] = Field(
        description="per block b: k.b, v.b [slots, window·S, H, D], frame_pos.b [slots, window] (which frame each "
                    "ring slot holds: the write/evict state), sink_k.b, sink_v.b (adaptive sinks); per prompt "
                    "version p: cross_k.p.b, cross_v.p.b [1, L, H, D]")


class ShardMoveEnd(Message):
    """Closes the moves from ``source`` to ``target`` for ``epoch``: the streams whose ShardMove was sent."""

    epoch: int = Field(ge=1)
    source: str = Field(min_length=1, max_length=128)
    target: str = Field(min_length=1, max_length=128)
    blocks: list[int] = Field(description="the blocks moved (a joining stage waits until the ends cover its range)")
    streams: list[str]


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (StreamSpec, LatentChunk, FrameChunk, PromptUpdate, Heartbeat, StageStats, BlockMap, Error, Ack,
                Credit, StreamRecord, EncodedVideo, EncodedAudio, StreamEvent, StageItems, RingReturn, StagePrompt,
                EpochSwitch, ShardMove, ShardMoveEnd, HlsState, StreamOutput, StreamStatus, ApiToken)
}

M = TypeVar("M", bound=Message)


def decode(buf: bytes | bytearray | memoryview, expected: type[M] | None = None,
           limits: Limits = DEFAULT_LIMITS) -> M:
    """Decode a frame into its message; anything wrong raises ``ProtocolError`` (and nothing else)."""
    return decode_with_headers(buf, expected, limits)[0]


def decode_with_headers(buf: bytes | bytearray | memoryview, expected: type[M] | None = None,
                        limits: Limits = DEFAULT_LIMITS, device: DeviceOpen | None = None) -> tuple[M, dict[str, str]]:
    """Decode a frame into its message and the headers carried inside the frame (empty when none)."""
    body = decode_frame(buf, limits, device)
    if not isinstance(body, dict) or not ({"t", "v", "d"} <= set(body) <= {"t", "v", "d", "h"}):
        raise ProtocolError("frame body is not a {t, v, d[, h]} message envelope")
    headers = body.get("h", {})
    if not isinstance(headers, dict) or len(headers) > 32 or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ProtocolError("frame headers must be a map of at most 32 strings to strings")
    name, version, fields = body["t"], body["v"], body["d"]
    if not isinstance(name, str) or name not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {name!r}")
    cls = MESSAGE_TYPES[name]
    if expected is not None and cls is not expected:
        raise ProtocolError(f"expected {expected.__name__}, got {name}")
    if not isinstance(version, int) or isinstance(version, bool) or (
            version != cls.SCHEMA_VERSION and version not in cls.READS_VERSIONS):
        raise ProtocolError(f"{name}: unknown schema version {version!r} (this build reads {cls.SCHEMA_VERSION})")
    if not isinstance(fields, dict):
        raise ProtocolError(f"{name}: fields are not a map")
    try:
        return cls.model_validate(fields), headers  # type: ignore[return-value]
    except ValidationError as e:
        raise ProtocolError(f"{name}: {e.error_count()} invalid field(s): {_first_error(e)}") from e
    except (ValueError, TypeError, RecursionError) as e:
        raise ProtocolError(f"{name}: invalid fields: {e}") from e


def _first_error(e: ValidationError) -> str:
    err = e.errors(include_url=False, include_input=False)[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


__all__ = [
    "MESSAGE_TYPES",
    "SLO",
    "Ack",
    "ApiToken",
    "BlockMap",
    "Credit",
    "EncodedVideo",
    "EpochSwitch",
    "Error",
    "FrameChunk",
    "Heartbeat",
    "HlsSegmentState",
    "HlsState",
    "IngestStatus",
    "LatencyFit",
    "LatentChunk",
    "Message",
    "NoiseParams",
    "PromptMode",
    "PromptUpdate",
    "RingItem",
    "RingReturn",
    "Role",
    "ShardLayout",
    "ShardMove",
    "ShardMoveEnd",
    "StageAssignment",
    "StageItems",
    "StagePrompt",
    "StageStats",
    "StreamEvent",
    "StreamRecord",
    "StreamSpec",
    "Tensor",
    "VideoUnit",
    "decode",
    "decode_with_headers",
]
