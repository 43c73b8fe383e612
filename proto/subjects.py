"""The one place NATS subjects and JetStream bucket names are written.

Every subject is declared once in ``CHANNELS`` with its message type and who publishes it; services build
subjects only through ``Subjects`` (no other module writes a subject string). Stream ids and member ids are
subject tokens, so they are checked: a dot or wildcard in an id would silently widen a subscription.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proto.messages import (
    Ack,
    BlockMap,
    Credit,
    EncodedAudio,
    EncodedVideo,
    Error,
    Heartbeat,
    LatentChunk,
    Message,
    PromptUpdate,
    StageStats,
    StreamEvent,
    StreamOutput,
    StreamSpec,
    StreamStatus,
)
from proto.rings import DEFAULT_RING

PREFIX = "rheo"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class InvalidToken(ValueError):
    """An id that cannot be a NATS subject token."""


def token(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise InvalidToken(f"{what} {value!r} is not a valid subject token ([A-Za-z0-9_-]{{1,64}})")
    return value


@dataclass(frozen=True)
class Channel:
    """One subject pattern: its parameters, payload and meaning (rendered into asyncapi.yaml)."""

    name: str
    pattern: str  # with {param} placeholders
    message: type[Message]
    publishers: tuple[str, ...]
    subscribers: tuple[str, ...]
    description: str
    bulk: bool = False
    """Published through a credit window; the consumer replies with ``Credit`` messages."""
    replies: tuple[type[Message], ...] = ()
    """Messages a subscriber sends back on the request's reply inbox."""
    role_param: str | None = None
    """The parameter that names the publisher's role: the bus permissions let a role publish only its own, so a
    receiver can trust the role in the subject (and refuse a message claiming another)."""

    @property
    def params(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.pattern)

    def subject(self, **params: str) -> str:
        if set(params) != set(self.params):
            raise TypeError(f"channel {self.name} takes {self.params}, got {sorted(params)}")
        return self.pattern.format(**{k: token(v, k) for k, v in params.items()})

    def wildcard(self, **fixed: str) -> str:
        """The subscription subject matching every instance of this channel (``fixed``: those parameters set)."""
        pattern = self.pattern
        for k, v in fixed.items():
            if k not in self.params:
                raise TypeError(f"channel {self.name} has no parameter {k}")
            pattern = pattern.replace("{" + k + "}", token(v, k))
        return re.sub(r"{\w+}", "*", pattern)

    def publishable_by(self, role: str) -> str:
        """The subjects ``role`` may publish on this channel: the wildcard, with ``role_param`` fixed to it."""
        fixed = self.pattern.replace("{" + self.role_param + "}", token(role, "role")) if self.role_param else \
            self.pattern
        return re.sub(r"{\w+}", "*", fixed)

    def param(self, subject: str, name: str) -> str | None:
        """The value of parameter ``name`` in a subject of this channel (None: not one of its subjects)."""
        regex = "^" + re.escape(self.pattern).replace(r"\{", "{").replace(r"\}", "}") + "$"
        regex = re.sub(r"{(\w+)}", r"(?P<\1>[^.]+)", regex)
        m = re.match(regex, subject)
        return m.group(name) if m else None


CHANNELS: dict[str, Channel] = {
    c.name: c
    for c in (
        Channel("stream_spec", PREFIX + ".stream.{stream_id}.spec", StreamSpec,
                ("gateway", "controller"), ("ingest", "dit-stage", "decoder", "egress"),
                "A stream's specification, on creation and on every parameter change. A change is a request: "
                "the ingest serving the live stream answers Ack(ref=seq it takes effect at) or Error.",
                replies=(Ack, Error)),
        Channel("stream_latent", PREFIX + ".stream.{stream_id}.latent.{ring_id}", LatentChunk,
                ("ingest",), ("dit-stage",),
                "Encoded latent chunks of a stream, ingest to the first DiT stage of the ring the stream is placed "
                "on (each first stage subscribes to its own ring's only).", bulk=True, replies=(Credit,)),
        Channel("stream_x0", PREFIX + ".stream.{stream_id}.x0", LatentChunk,
                ("dit-stage",), ("decoder",),
                "Finished (denoised) latent chunks, last DiT stage to the decoder.", bulk=True, replies=(Credit,)),
        Channel("stream_prompt", PREFIX + ".stream.{stream_id}.prompt", PromptUpdate,
                ("gateway", "ingest"), ("ingest", "dit-stage"),
                "Prompt changes (request/reply: ingest answers Ack(ref=<chunk seq it takes effect at>)); "
                "ingest republishes them with the umT5 embedding attached.", replies=(Ack, Error)),
        Channel("stream_video", PREFIX + ".stream.{stream_id}.video", EncodedVideo,
                ("decoder",), ("egress",),
                "H.264 access units of a stream's output, decoder to egress.", bulk=True, replies=(Credit,)),
        Channel("stream_audio", PREFIX + ".stream.{stream_id}.audio", EncodedAudio,
                ("ingest",), ("egress",),
                "The publisher's AAC, passed through (batched, with capture times on the video chunks' clock); "
                "egress muxes it in step with the styled video and restreams it."),
        Channel("stream_event", PREFIX + ".stream.{stream_id}.event", StreamEvent,
                ("ingest", "gateway"), ("dit-stage", "decoder", "egress", "controller", "gateway"),
                "A stream went live or ended."),
        Channel("stream_output", PREFIX + ".stream.{stream_id}.output", StreamOutput,
                ("decoder",), ("ingest", "gateway"),
                "Styled output is flowing: the last chunk the decoder decoded and its late ones (a few per second "
                "at most); the liveness watch of the stream's ingest repairs a stream whose output stopped; the "
                "gateway's stats show the last decoded seq and the late count."),
        Channel("stream_status", PREFIX + ".stream.{stream_id}.status", StreamStatus,
                ("egress",), ("gateway",),
                "What egress sees of a stream's output, about once a second while it serves it: output FPS, "
                "median glass-to-glass latency, viewers (the API's and `rheo top`'s per-stream numbers)."),
        Channel("stream_error", PREFIX + ".stream.{stream_id}.error", Error,
                ("ingest", "dit-stage", "decoder", "egress", "controller", "gateway"),
                ("gateway", "controller", "ingest"),
                "Per-stream failures and refusals (and the API's deletion), for the API, the controller and the "
                "stream's ingest."),
        Channel("ctl_blockmap", PREFIX + ".ctl.blockmap", BlockMap,
                ("controller",), ("dit-stage", "ingest", "controller"),
                "The current DiT block map and its epoch (also kept in the blockmap KV bucket)."),
        Channel("ctl_heartbeat", PREFIX + ".ctl.heartbeat.{role}.{member_id}", Heartbeat,
                ("ingest", "dit-stage", "decoder", "egress", "gateway", "controller", "jobs"), ("controller",),
                "Liveness of every member, on a fixed period. The subject names the member's role, which only "
                "that role may publish: the controller refuses a heartbeat whose body claims another.",
                role_param="role"),
        Channel("ctl_stats", PREFIX + ".ctl.stats.{stage_id}", StageStats,
                ("dit-stage",), ("controller",),
                "Per-stage timing and memory, input to rebalancing and admission."),
        Channel("ctl_admission", PREFIX + ".ctl.admission", StreamSpec,
                ("ingest", "gateway"), ("controller",),
                "Request/reply: may this stream start? Answered with Ack or Error.", replies=(Ack, Error)),
    )
}


class Subjects:
    """Subject builders: the only way code names a subject."""

    @staticmethod
    def stream_spec(stream_id: str) -> str:
        return CHANNELS["stream_spec"].subject(stream_id=stream_id)

    @staticmethod
    def stream_latent(stream_id: str, ring_id: str = DEFAULT_RING) -> str:
        return CHANNELS["stream_latent"].subject(stream_id=stream_id, ring_id=ring_id)

    @staticmethod
    def ring_latents(ring_id: str) -> str:
        """Every stream's latent chunks into ring ``ring_id`` (its first stage's subscription)."""
        return CHANNELS["stream_latent"].wildcard(ring_id=ring_id)

    @staticmethod
    def stream_x0(stream_id: str) -> str:
        return CHANNELS["stream_x0"].subject(stream_id=stream_id)

    @staticmethod
    def stream_prompt(stream_id: str) -> str:
        return CHANNELS["stream_prompt"].subject(stream_id=stream_id)

    @staticmethod
    def stream_video(stream_id: str) -> str:
        return CHANNELS["stream_video"].subject(stream_id=stream_id)

    @staticmethod
    def stream_audio(stream_id: str) -> str:
        return CHANNELS["stream_audio"].subject(stream_id=stream_id)

    @staticmethod
    def stream_output(stream_id: str) -> str:
        return CHANNELS["stream_output"].subject(stream_id=stream_id)

    @staticmethod
    def stream_status(stream_id: str) -> str:
        return CHANNELS["stream_status"].subject(stream_id=stream_id)

    @staticmethod
    def stream_event(stream_id: str) -> str:
        return CHANNELS["stream_event"].subject(stream_id=stream_id)

    @staticmethod
    def stream_error(stream_id: str) -> str:
        return CHANNELS["stream_error"].subject(stream_id=stream_id)

    @staticmethod
    def blockmap() -> str:
        return CHANNELS["ctl_blockmap"].subject()

    @staticmethod
    def heartbeat(role: str, member_id: str) -> str:
        return CHANNELS["ctl_heartbeat"].subject(role=role, member_id=member_id)

    @staticmethod
    def stats(stage_id: str) -> str:
        return CHANNELS["ctl_stats"].subject(stage_id=stage_id)

    @staticmethod
    def admission() -> str:
        return CHANNELS["ctl_admission"].subject()


class Buckets:
    """JetStream KV bucket names (shared state)."""

    STREAMS = "rheo-streams"
    BLOCKMAP = "rheo-blockmap"
    ENDPOINTS = "rheo-endpoints"
    CONTROLLER = "rheo-controller"
    PROMPTS = "rheo-prompts"
    EGRESS = "rheo-egress"  # stream id → HlsState: playlist continuity across egress/decoder restarts
    JOBS = "rheo-jobs"  # job id → JobRecord (proto/jobs.py)
    JOB_FILES = "rheo-job-files"  # an object store, not KV: each job's uploaded input and MP4 result

    ALL = (STREAMS, BLOCKMAP, ENDPOINTS, CONTROLLER, PROMPTS, EGRESS, JOBS, JOB_FILES)


@dataclass(frozen=True)
class BucketAccess:
    """Which roles read and which write one KV bucket, as the code does (the source of the bus permissions)."""

    bucket: str
    writers: tuple[tuple[str, str], ...]
    """(role, key pattern it may write: ``>`` any key)."""
    readers: tuple[str, ...] = ()
    description: str = ""
    object_store: bool = False
    """A JetStream object store, not a KV bucket (writers write any object: the key pattern is ``>``)."""

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([r for r, _ in self.writers] + list(self.readers)))


BUCKET_ACCESS: dict[str, BucketAccess] = {
    a.bucket: a
    for a in (
        BucketAccess(Buckets.STREAMS, (("gateway", ">"), ("ingest", ">"), ("egress", ">"), ("controller", "s.*")),
                     ("decoder",),
                     description="gateway creates/patches/deletes; ingest claims and checkpoints; egress records "
                                 "playlist state; the controller records placements; the decoder watches them"),
        BucketAccess(Buckets.BLOCKMAP, (("controller", ">"), ("dit-stage", "prepared.*")), ("ingest",),
                     description="the controller writes the map; a stage only its prepared epoch"),
        BucketAccess(Buckets.ENDPOINTS, (("dit-stage", ">"),), ("controller",),
                     description="stages advertise their tensor-link endpoints"),
        BucketAccess(Buckets.CONTROLLER, (("controller", ">"),), ("gateway",),
                     description="leader lock, state and admission answers; the gateway reads admissions"),
        BucketAccess(Buckets.PROMPTS, (("ingest", ">"),), ("dit-stage",),
                     description="prompt embeddings, looked up by the stages"),
        BucketAccess(Buckets.EGRESS, (("egress", ">"),), description="HLS continuity state"),
        BucketAccess(Buckets.JOBS, (("gateway", ">"), ("jobs", ">")),
                     description="offline jobs: the gateway queues and cancels, workers claim and report"),
        BucketAccess(Buckets.JOB_FILES, (("gateway", ">"), ("jobs", ">")), object_store=True,
                     description="job inputs (the gateway stores uploads) and results (workers store MP4s)"),
    )
}


def kv_subject(bucket: str, key: str) -> str:
    """The NATS subject JetStream stores a KV bucket's ``key`` under (``key`` may be a wildcard): what bus
    permissions grant and what a key listing filters on."""
    return f"$KV.{bucket}.{key}"


BLOCKMAP_KEYS = "blockmap.*"
"""Every ring's block map in ``Buckets.BLOCKMAP`` (what ingest watches)."""


def blockmap_key(ring_id: str) -> str:
    """Key in ``Buckets.BLOCKMAP`` of ring ``ring_id``'s block map (one map per ring, written by the controller)."""
    return f"blockmap.{token(ring_id, 'ring id')}"


def stage_prepared_key(stage_id: str) -> str:
    """Key in ``Buckets.BLOCKMAP`` where a DiT stage records the newest epoch it is prepared to run (weights of its
    new range loaded): the first stage starts an online rebalance only once every stage has (docs/rebalance.md)."""
    return f"prepared.{token(stage_id, 'stage id')}"
