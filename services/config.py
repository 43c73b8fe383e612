"""The one configuration model of rheo.

Every knob of every service lives here, with a default and a one-line description. Values come from (highest
precedence first) constructor arguments, environment variables ``RHEO_<SECTION>__<KEY>`` (e.g.
``RHEO_NATS__URL``), an optional YAML file named by ``RHEO_CONFIG``, then the defaults. The Helm chart renders
exactly these keys; ``rheo config`` prints the effective values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from proto.spec import (
    ADAPTIVE_THRESHOLD,
    KV_WINDOW,
    MAX_FPS,
    MAX_MODEL_HEIGHT,
    MAX_MODEL_WIDTH,
    MAX_STEPS,
    SINK,
    SIZE_MULTIPLE,
    T_REFRESH,
    RingConfig,
)
from services.config_errors import ConfigError, explain

MiB = 1024 * 1024


class Section(BaseModel):
    """A config section: unknown keys are errors, so a typo in YAML or env never passes silently."""

    model_config = ConfigDict(extra="forbid")


class NatsSettings(Section):
    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated for a cluster")
    user: str | None = Field(None, description="user name for user/password auth")
    password: SecretStr | None = Field(None, description="password for user/password auth")
    token: SecretStr | None = Field(None, description="token auth")
    nkey_seed_file: Path | None = Field(None, description="path to an NKey seed file")
    creds_file: Path | None = Field(None, description="path to a JWT .creds file")
    tls_ca_file: Path | None = Field(None, description="CA bundle that signs the server certificate")
    tls_cert_file: Path | None = Field(None, description="client certificate for mutual TLS")
    tls_key_file: Path | None = Field(None, description="client key for mutual TLS")
    name: str | None = Field(None, description="client connection name shown by the server (default: service)")
    inbox_prefix: str = Field("_INBOX", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
                              description="subject prefix of this service's reply inboxes; with bus permissions "
                                          "its role's (_INBOX.<role>), the only inboxes it may subscribe to")
    connect_timeout_s: float = Field(2.0, gt=0, description="timeout of one connection attempt")
    reconnect_wait_s: float = Field(0.25, gt=0, description="first reconnect delay; doubles up to the maximum")
    reconnect_wait_max_s: float = Field(5.0, gt=0, description="upper bound of the reconnect backoff")
    max_reconnect_attempts: int = Field(-1, description="reconnect attempts before giving up (-1: forever)")
    initial_connect_attempts: int = Field(10, ge=1, description="attempts for the first connect before failing")
    max_send_bytes: int = Field(
        6 * MiB, gt=0, description="largest payload this service will publish; checked against server max_payload"
    )
    credit_window_bytes: int = Field(
        32 * MiB, gt=0, description="bytes a bulk publisher may have unacknowledged (credit window)"
    )
    kv_replicas: int = Field(1, ge=1, description="JetStream replicas for the KV buckets rheo creates")


class ProtoSettings(Section):
    max_message_bytes: int = Field(
        8 * MiB, gt=0, description="largest encoded message the decoder accepts (matches NATS max_payload)"
    )
    max_tensor_bytes: int = Field(64 * MiB, gt=0, description="largest single tensor a message may declare")
    max_tensor_dims: int = Field(8, ge=1, description="largest tensor rank a message may declare")


class TelemetrySettings(Section):
    service_name: str = Field("rheo", description="OpenTelemetry service.name resource attribute")
    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP traces URL (e.g. http://collector:4318/v1/traces); "
                                      "unset disables export")
    trace_sample_ratio: float = Field(1.0, ge=0, le=1, description="share of chunks traced (decided once per chunk "
                                      "at ingest; every later hop follows)")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="port of /healthz, /readyz and /metrics (0: ephemeral)"
    )
    log_level: str = Field("INFO", description="Python log level")
    log_json: bool = Field(False, description="emit logs as JSON lines (for cluster log collectors)")


class LifecycleSettings(Section):
    http_host: str = Field("0.0.0.0", description="listen address of /healthz, /readyz and /metrics")
    heartbeat_interval_s: float = Field(0.5, gt=0, description="period of the heartbeat every member publishes")
    member_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description="this process's member id (null: <role>-<hostname>-<pid>); "
        "a stable one lets a restarted decoder or egress keep the streams placed on it")
    drain_timeout_s: float = Field(10.0, gt=0, description="longest a SIGTERM drain may take before exiting")
    work_stuck_s: float = Field(
        300.0, gt=0, description="/healthz fails while one unit of work (micro-step, VAE encode/decode) runs longer "
        "(a stage's first forwards on CUDA include torch.compile and graph capture)"
    )
    loop_lag_s: float = Field(10.0, gt=0, description="/healthz fails while the event loop wakes this much late")


class ModelSettings(Section):
    model_dir: Path | None = Field(
        None, description="Wan2.1 base folder (+ causal checkpoint); unset runs the tiny random model"
    )
    checkpoint: Path | None = Field(None, description="causal DiT checkpoint (SDv2/CausVid/Self-Forcing) file")
    preset: Literal["tiny", "1.3b", "14b"] = Field("tiny", description="DiT size when no weights configure it")
    random_weights: bool = Field(
        False, description="serve a 1.3b/14b preset without model_dir on RANDOM weights (benchmarks: real timings, "
        "noise output); refused unless set, logged loudly"
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype (auto: bf16 on CUDA, fp32 on CPU)"
    )
    passthrough: bool = Field(
        False, description="measurement mode (bench/serve.py): a block-average VAE codec and a DiT whose output is "
                           "its input, so frames reach HLS unchanged; the DiT blocks still run"
    )
    passthrough_runs_vae: bool = Field(
        True, description="in the measurement mode, the real VAE still runs (its output dropped for the codec's), "
                          "so the timings pay for it; off: the codec alone (the plumbing's own latency)"
    )


class EncoderSettings(Section):
    """The Stream-VAE of ingest (encode) and of the decoder service (decode): which one, batched how."""

    vae: Literal["wan", "taehv"] = Field(
        "wan", description="VAE both ways: the Wan2.1 VAE, or TAEHV (taew2_1) for encode and decode (fast mode)"
    )
    taehv_path: Path | None = Field(None, description="TAEHV (taew2_1) weights; default <model dir>/taew2_1.pth")
    batch_window_ms: float = Field(
        0.0, ge=0, le=100, description="how long a VAE batch waits for more streams' chunks (0: only those ready now)"
    )
    compile: bool = Field(False, description="torch.compile the VAE per shape, channels-last (CUDA only; opt-in)")


class StreamDefaults(Section):
    width: int = Field(512, gt=0, multiple_of=SIZE_MULTIPLE, description="model input width in pixels")
    height: int = Field(512, gt=0, multiple_of=SIZE_MULTIPLE, description="model input height in pixels")
    fps: float = Field(16.0, gt=0, le=MAX_FPS, description="target output frame rate")
    steps: int = Field(2, ge=1, le=MAX_STEPS, description="denoising steps (stream-batch slots)")
    prompt: str = Field("a cinematic painting", description="prompt used until a stream sets its own")
    noise_scale: float = Field(0.8, gt=0, le=1, description="initial noise scale s_init")
    motion_aware_noise: bool = Field(True, description="adapt the noise scale to input motion")
    seed: int = Field(0, description="default stream seed; every random draw derives from it")
    slo_latency_ms: float = Field(1000.0, gt=0, description="target glass-to-glass latency")


class IngestSettings(Section):
    rtmp_host: str = Field("0.0.0.0", description="RTMP listen address")
    rtmp_port: int = Field(1935, ge=0, le=65535, description="RTMP listen port (0: ephemeral)")
    rtmp_app: str = Field("live", description="the only RTMP application name accepted")
    rtmps_port: int | None = Field(
        None, ge=0, le=65535, description="RTMPS (RTMP over TLS) listen port on rtmp_host (0: ephemeral); null: no "
        "RTMPS listener. Needs tls_cert_file and tls_key_file"
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain of the RTMPS listener")
    tls_key_file: Path | None = Field(None, description="PEM private key of the RTMPS listener")
    max_connections: int = Field(
        256, ge=1, description="concurrent publishing RTMP connections (past the stream key check) before refusing"
    )
    max_preauth_connections: int = Field(
        64, ge=1, description="concurrent connections not yet past the stream key check (handshake, connect, "
        "publish); when full, the oldest of the address holding the most is closed for a newcomer"
    )
    max_connections_per_ip: int = Field(
        32, ge=1, description="concurrent RTMP connections from one address (an IPv6 /64), publishing or not"
    )
    max_preauth_per_ip: int = Field(
        8, ge=1, description="concurrent connections from one address (an IPv6 /64) not yet past the key check"
    )
    preauth_buffer_bytes: int = Field(
        64 * 1024, ge=4096, description="before the key check: largest message, chunk size and buffered bytes of a "
        "connection (only connect/createStream/publish commands are accepted then)"
    )
    handshake_timeout_s: float = Field(
        5.0, gt=0, description="time allowed from accept to the stream key check (TLS, RTMP handshake, publish)"
    )
    idle_timeout_s: float = Field(10.0, gt=0, description="drop a publisher that sends nothing this long")
    frame_timeout_s: float = Field(
        10.0, gt=0, description="close a publishing session that delivers no complete video frame this long "
        "(a slow drip of bytes included)"
    )
    audio_only_grace_s: float = Field(
        3.0, gt=0, description="refuse a publisher that sends audio but no video message this long after publish "
        "(rheo restyles video: an audio-only stream would produce nothing)"
    )
    key_failures_per_ip: int = Field(
        5, ge=1, description="failed stream keys from one address within key_failure_window_s before it is blocked"
    )
    key_failure_window_s: float = Field(60.0, gt=0, description="window in which failed stream keys are counted")
    key_backoff_s: float = Field(
        60.0, gt=0, description="how long an address that guessed too many stream keys is refused every publish"
    )
    max_chunk_size: int = Field(65536, ge=128, description="largest RTMP chunk size a client may set")
    max_message_bytes: int = Field(8 * MiB, gt=0, description="largest RTMP message length accepted")
    max_pending_bytes: int = Field(32 * MiB, gt=0, description="largest partially assembled bytes per connection")
    max_width: int = Field(1920, gt=0, description="widest input video accepted")
    max_height: int = Field(1080, gt=0, description="tallest input video accepted")
    chunk_queue_depth: int = Field(4, ge=1, description="chunks queued per stream before the oldest is dropped")
    replay_chunks: int | None = Field(
        None, ge=0, description="latest latent chunks kept per stream (besides the prepare and sink chunks) and "
        "replayed after a stage failure; null: enough to refill the KV window (dit_stage.kv_window - sink)"
    )
    admission_timeout_s: float = Field(
        2.0, gt=0, description="wait for the controller's admission answer at RTMP publish"
    )
    admission_without_controller: Literal["refuse", "admit"] = Field(
        "refuse", description="when no controller answers admission: refuse the stream (fail closed) or admit it "
        "(a deployment without a controller)"
    )
    replay_ack_timeout_s: float = Field(
        15.0, gt=0, description="after a failure epoch, wait this long for every stage of the new map to announce "
        "it before replaying (then replay anyway, logged)"
    )
    stream_linger_s: float = Field(
        10.0, ge=0, description="how long a disconnected stream waits for its publisher to reconnect before it ends"
    )
    whip_port: int | None = Field(
        None, ge=0, le=65535, description="WHIP (WebRTC publish, RFC 9725) HTTP listen port on "
        "lifecycle.http_host, which the gateway's /v1/streams/{id}/whip forwards to (0: ephemeral); null: no WHIP "
        "(docs/whip.md)"
    )
    whip_client_header: str | None = Field(
        None, description="take a WHIP publisher's address (per-address caps, key-guess backoff) from this header: "
        "X-Forwarded-For where only the gateway reaches ingest.whip_port; unset: the connection's peer"
    )
    whip_ice_servers: list[str] = Field(
        default_factory=list, description="STUN/TURN URLs of WHIP sessions (e.g. stun:stun.example.org:3478); empty: "
        "host candidates only (loopback/LAN publishers)"
    )
    status_interval_s: float = Field(
        2.0, gt=0, description="how often ingest writes each live stream's checkpoint (and seq reservation) into its "
        "stream record"
    )
    window_ack_bytes: int = Field(2_500_000, gt=0, description="acknowledgement window announced to publishers")
    max_model_width: int = Field(
        MAX_MODEL_WIDTH, gt=0, multiple_of=SIZE_MULTIPLE,
        description="widest model size a stream may ask for (sizes the largest latent)"
    )
    max_model_height: int = Field(
        MAX_MODEL_HEIGHT, gt=0, multiple_of=SIZE_MULTIPLE,
        description="tallest model size a stream may ask for (sizes the largest latent)"
    )
    debug_tap_dir: Path | None = Field(
        None, description="also write each chunk's model-size input frames here as <stream>/chunk_<seq>.npy (tests)"
    )
    liveness_floor_s: float = Field(
        6.0, gt=0, description="a chunk published this long (at least; else its SLO + 4 chunk periods) without any "
        "styled output after it: the stream is repaired with a new warm-up segment (docs/recovery.md, Liveness)"
    )
    liveness_max_repairs: int = Field(3, ge=0, description="repairs without output before a stream is reported failed")
    liveness_retry_s: float = Field(30.0, gt=0, description="how often a failed stream is still repaired")

    @model_validator(mode="after")
    def _rtmps_has_a_certificate(self) -> IngestSettings:
        if self.rtmps_port is not None and (self.tls_cert_file is None or self.tls_key_file is None):
            raise ValueError("ingest.rtmps_port needs ingest.tls_cert_file and ingest.tls_key_file")
        return self


class EgressSettings(Section):
    hls_dir: Path = Field(Path("/tmp/rheo-hls"), description="where HLS playlists and segments are written")
    segment_seconds: float = Field(1.0, gt=0, description="HLS segment duration")
    part_seconds: float = Field(0.1, gt=0, description="LL-HLS part duration (whole frames, at least one)")
    playlist_segments: int = Field(6, ge=2, description="segments kept in the rolling playlist")
    x264_preset: str = Field("veryfast", description="libx264 preset for the output")
    bitrate_kbps: int = Field(2500, gt=0, description="target output video bitrate")
    rtmp_push_url: str | None = Field(
        None, description="restream every stream to this RTMP URL template; {stream_id} is replaced by the stream id"
    )
    rtmp_push_backoff_s: float = Field(0.5, gt=0, description="first RTMP push reconnect delay; doubles per failure")
    rtmp_push_backoff_max_s: float = Field(10.0, gt=0, description="upper bound of the RTMP push reconnect delay")
    rtmp_push_silent_audio: bool = Field(True, description="add an AAC silence track to the RTMP push")
    rtmp_push_ca_file: Path | None = Field(
        None, description="PEM CA bundle that verifies an rtmps:// push target (null: the system's trusted CAs); "
        "the server certificate is always verified"
    )
    encoder_threads: int = Field(1, ge=1, description="libx264 threads per output stream")
    cfr_start_delay_s: float = Field(0.1, ge=0, description="jitter buffer before the CFR pacer starts output")
    http_host: str = Field("0.0.0.0", description="listen address of the egress HLS/LL-HLS HTTP server")
    http_port: int = Field(8090, ge=0, le=65535, description="port of the egress HLS/LL-HLS HTTP server (0: ephemeral)")
    public_url: str | None = Field(
        None, description="base URL the gateway reaches this egress at (recorded in the stream table); "
        "unset: http://<http_host, or 127.0.0.1 for a wildcard host>:<port>"
    )
    ended_grace_s: float = Field(
        2.0, ge=0, description="after a stream's 'ended' event, end its playlist once no video came for this long "
        "(the decoder's end_of_stream ends it at once)"
    )
    ended_retention_s: float = Field(
        300.0, ge=0, description="how long an ended stream's playlist and segments stay served before removal"
    )
    viewer_window_s: float = Field(
        10.0, gt=0, description="a playback session counts as a viewer of its stream for this long after its last "
        "playlist or media request"
    )


class DecoderSettings(Section):
    decoder: Literal["wan", "taehv"] = Field("wan", description="VAE decoder: the Wan decoder or the TAEHV one")
    taehv_path: Path | None = Field(None, description="TAEHV (taew2_1) weights, when decoder is taehv")
    debug_tap_dir: Path | None = Field(
        None, description="also write decoded frames (before H.264) here as .npy per chunk, for equality tests"
    )
    max_queued_chunks: int = Field(8, ge=1, description="latent chunks queued per stream before the oldest is dropped")
    ended_grace_s: float = Field(
        2.0, ge=0, description="after a stream's 'ended' event, wait this long for its last chunk before flushing"
    )
    idle_timeout_s: float = Field(
        30.0, gt=0, description="a stream that sends no chunk for this long is ended (flushed, state freed)"
    )
    publish_timeout_s: float = Field(
        2.0, gt=0, description="longest wait for egress credit before a video message is dropped and counted"
    )


class DitStageSettings(Section):
    stage_id: str = Field("dit-0", description="this stage's id in the block map (StatefulSet: the pod name)")
    ring_id: str = Field("0", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the ring (pipeline) this stage "
                         "belongs to: the controller places streams on rings (docs/scheduling.md, Placement); auto: "
                         "from the stage id's ordinal, dit-<k> is in ring k div controller.stages (the chart's)")
    link_host: str = Field("0.0.0.0", description="tensor-link listen address")
    link_port: int = Field(7100, ge=0, le=65535, description="tensor-link listen port (0: ephemeral)")
    advertise_host: str = Field("127.0.0.1", description="host other stages reach this stage's link at (pod IP)")
    max_batch_items: int = Field(16, ge=1, description="largest number of items in one micro-step")
    batcher: Literal["slo", "greedy"] = Field(
        "slo", description="first stage's micro-step batcher: slo (earliest deadline first, batch size from a "
        "latency model fitted online, items that cannot make their deadline dropped before compute) or greedy "
        "(oldest first, up to max_batch_items)"
    )
    max_queued_chunks: int = Field(4, ge=1, description="new chunks queued per stream before the oldest is dropped")
    kv_window: int = Field(
        KV_WINDOW, ge=2, description="latent frames one chunk attends to (KV ring size, sinks included)"
    )
    sink: int = Field(SINK, ge=0, description="sink frames of the KV ring (never rolled out)")
    adaptive_threshold: float | None = Field(
        ADAPTIVE_THRESHOLD, description="adaptive sink replacement below this similarity (null disables)"
    )
    t_refresh: int | None = Field(
        T_REFRESH, ge=1, description="RoPE start frame at which chunk positions are reset (null disables the refresh)"
    )
    stats_interval_s: float = Field(2.0, gt=0, description="period of the StageStats this stage publishes")
    tiny_seed: int = Field(0, ge=0, description="weight seed of the random DiT (tiny, or model.random_weights) when "
                           "model.model_dir is unset")
    link_max_frame_bytes: int = Field(64 * MiB, gt=0, description="largest tensor-link frame sent or accepted")
    link_key: SecretStr | None = Field(
        None, description="shared secret every tensor-link connection proves both ways (HMAC); required unless "
        "link_host is a loopback address"
    )
    link_shared_memory: Literal["auto", "off"] = Field(
        "auto", description="auto: a tensor link to a stage on the same host (same /dev/shm and uid) carries frames "
        "in POSIX shared memory, only a descriptor on the socket; off: always TCP"
    )
    link_cuda_ipc: Literal["auto", "off"] = Field(
        "auto", description="auto: a tensor link to a stage on the same host and the same CUDA device (GPU UUIDs "
        "compared in the link handshake; needs link_shared_memory auto) hands hidden states over as CUDA IPC "
        "handles, with no host copy; off: such a link uses shared memory"
    )
    timed_block_ms: float | None = Field(
        None, ge=0, description="timed stand-in mode for controller and scale tests: each micro-step takes this "
        "many ms per owned block (plus timed_item_ms per item), sleeping after the real model (null: normal mode)"
    )
    timed_item_ms: float = Field(0.0, ge=0, description="timed mode: extra ms per block per item of a micro-step")
    slowdown: float = Field(
        1.0, gt=0, description="timed mode: multiplies the modelled time (a knob to slow one stage)"
    )
    cache_mode: Literal["sdv2", "self_forcing"] = Field(
        "sdv2", description="KV cache mode of the ring: sdv2, or self_forcing (a clean pass per finished chunk)"
    )
    context_noise: float = Field(0.0, ge=0, le=1000, description="self_forcing: the clean pass's timestep")
    forward: Literal["auto", "eager", "graph", "compile"] = Field(
        "auto", description="DiT forward: eager, graph (CUDA-graph replay), compile (graph + torch.compile) or auto "
        "(compile on CUDA, else eager)"
    )
    warm_up_chunks: int = Field(
        6, ge=0, le=64, description="chunks of the throwaway stream a stage holding every block runs before it "
        "serves, when its forward compiles or captures (the first stream then waits for neither; 0: none)"
    )
    capture_budget: float = Field(
        0.1, ge=0, le=1, description="graph, compile: the share of the last 20 s a stage may spend capturing CUDA "
        "graphs (each about a second at 1.3B, every stream waiting); past it a new batch signature runs eagerly"
    )

    @model_validator(mode="after")
    def _valid_ring(self) -> DitStageSettings:
        self.ring()  # an inconsistent ring (sink ≥ window, refresh inside the window) fails at load, not mid-stream
        return self

    def ring(self) -> RingConfig:
        """The ring these settings configure: what the controller puts in the block map and ingest clocks by."""
        return RingConfig(kv_window=self.kv_window, sink=self.sink, adaptive_threshold=self.adaptive_threshold,
                          t_refresh=self.t_refresh, cache_mode=self.cache_mode, context_noise=self.context_noise)


class AutoscaleSettings(Section):
    """The controller's autoscaler (services/controller/autoscale.py); the modes avoid YAML's boolean words."""

    mode: Literal["disabled", "advisory", "apply"] = Field(
        "disabled", description="disabled; advisory: decide and log scale changes without applying them; apply: "
        "apply them through the Kubernetes API (in-cluster only)"
    )
    interval_s: float = Field(15.0, gt=0, description="how often the leader decides")
    target_utilisation: float = Field(
        0.75, gt=0, le=1, description="capacity floor: replicas so the measured demand sits at this utilisation"
    )
    scale_down_below: float = Field(
        0.5, gt=0, lt=1, description="remove a replica only after utilisation stayed below this for down_cooldown_s"
    )
    miss_ratio_up: float = Field(
        0.01, ge=0, le=1, description="fast loop: one more replica when more than this share of chunks missed their "
        "deadline in the last window"
    )
    up_cooldown_s: float = Field(60.0, ge=0, description="no scale-up sooner than this after the last one")
    down_cooldown_s: float = Field(300.0, ge=0, description="low utilisation must hold this long before a scale-down")
    min_rings: int = Field(1, ge=1, description="fewest rings (DiT pipelines)")
    max_rings: int = Field(4, ge=1, description="most rings (DiT pipelines)")
    min_decoders: int = Field(1, ge=1, description="fewest decoders")
    max_decoders: int = Field(8, ge=1, description="most decoders")
    min_ingests: int = Field(1, ge=1, description="fewest ingests")
    max_ingests: int = Field(8, ge=1, description="most ingests")
    ring_workload: str = Field(
        "StatefulSet/dit", pattern=r"^(StatefulSet|Deployment)/[a-z0-9.-]+$",
        description="the workload whose replicas are rings x controller.stages pods"
    )
    decoder_workload: str = Field(
        "Deployment/rheo-decoder", pattern=r"^(StatefulSet|Deployment)/[a-z0-9.-]+$",
        description="the decoders' workload"
    )
    ingest_workload: str = Field(
        "Deployment/rheo-ingest", pattern=r"^(StatefulSet|Deployment)/[a-z0-9.-]+$",
        description="the ingests' workload"
    )

    def bounds(self, pool: str) -> tuple[int, int]:
        return getattr(self, f"min_{pool}"), getattr(self, f"max_{pool}")

    def workload(self, pool: str) -> str:
        return getattr(self, {"rings": "ring_workload", "decoders": "decoder_workload",
                              "ingests": "ingest_workload"}[pool])


class ControllerSettings(Section):
    stages: int = Field(2, ge=1, description="DiT stages per pipeline (the block map splits the blocks among them)")
    rings: int = Field(1, ge=1, description="rings (DiT pipelines) the controller keeps a block map for from the "
                       "start (ring r: stages dit-<r*stages> ...); a stage heartbeating another ring adds it")
    num_blocks: int | None = Field(
        None, ge=1, description="DiT blocks the block map splits (null: the model preset's; set for tiny test models)"
    )
    heartbeat_miss_s: float = Field(
        1.5, gt=0, description="a stage silent this long is suspected (logged, counted), not yet failed"
    )
    heartbeat_dead_s: float = Field(
        4.5, gt=0, description="a stage silent this long (at least heartbeat_miss_s) is declared dead and a "
        "failure epoch replaces it; one that withdrew its endpoint or restarted is failed at once"
    )
    startup_grace_s: float = Field(
        20.0, gt=0, description="a stage in the map never heard from since this controller began leading is "
        "declared dead after this long"
    )
    rejoin_settle_s: float = Field(
        1.0, ge=0, description="a stage outside the map must heartbeat this long before a join epoch includes it"
    )
    mode: Literal["static", "adaptive"] = Field(
        "adaptive", description="static: even block maps only; adaptive: rebalance from measured stage times"
    )
    advisory: bool = Field(
        False, description="compute and log rebalance and admission decisions without applying them "
        "(failure and join epochs always apply)"
    )
    rebalance_gain_threshold: float = Field(
        0.1, ge=0, lt=1, description="rebalance only when the slowest stage would get at least this much faster"
    )
    rebalance_sustain_s: float = Field(
        3.0, ge=0, description="the predicted gain must hold this long before a rebalance"
    )
    rebalance_cooldown_s: float = Field(
        10.0, ge=0, description="no rebalance sooner than this after any block-map change"
    )
    memory_headroom: float = Field(
        0.1, ge=0, lt=1, description="fraction of a stage's reported memory the partitioner leaves free"
    )
    admission_prior_streams: int = Field(
        4, ge=0, description="streams admitted while no stage has reported timing yet (the capacity prior)"
    )
    admission_headroom: float = Field(
        0.9, gt=0, le=1, description="fraction of the measured pipeline capacity admission may fill"
    )
    admission_queue: bool = Field(
        False, description="a stream refused for capacity waits (queued, first come first served) up to "
                           "admission_queue_max_wait_s for room instead of being refused at once"
    )
    admission_queue_max_wait_s: float = Field(
        60.0, gt=0, le=3600, description="longest a queued stream waits before it is refused (with the reason)"
    )
    admission_queue_max_streams: int = Field(
        32, ge=1, le=1024, description="streams the admission queue holds; beyond it a stream is refused"
    )
    lease_ttl_s: float = Field(
        5.0, gt=0, description="a leader that has not renewed its lock for this long is replaced by a standby"
    )
    lease_name: str = Field(
        "rheo-controller", description="name of the Kubernetes Lease (in-cluster) for leader election"
    )
    autoscale: AutoscaleSettings = Field(default_factory=AutoscaleSettings)


class PlaybackSettings(Section):
    signing_keys: list[SecretStr] = Field(
        default_factory=list, description="HMAC keys of signed playback URLs (gateway and egress; ≥ 32 characters): "
        "the first signs, all verify (rotate by prepending)"
    )
    token_ttl_s: float = Field(
        21600.0, gt=0, le=30 * 86400, description="lifetime of the playback URLs the API returns (a viewer's URL "
        "stops working after it; POST /v1/streams/{id}/playback mints a fresh one)"
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="web origins allowed to fetch playback (CORS) with a valid token "
        "(empty: same-origin only; '*': any)"
    )


class GatewaySettings(Section):
    host: str = Field("0.0.0.0", description="HTTP listen address")
    port: int = Field(8080, ge=0, le=65535, description="HTTP listen port")
    api_tokens: list[SecretStr] = Field(
        default_factory=list, description="operator bearer tokens accepted by the API (everything)")
    api_tokens_file: Path | None = Field(
        None, description="also accept the operator tokens in this file (a JSON list or one per line), re-read "
        "when it changes (a mounted Secret rotates them without a restart)"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="web origins allowed to call /v1 from a browser (CORS; empty: none)"
    )
    whip_url: str = Field(
        "", description="base URL of the ingest's WHIP listener (ingest.whip_port) that /v1/streams/{id}/whip "
        "forwards to, e.g. http://rheo-ingest-whip:8088; empty: browser publishing is off"
    )
    max_body_bytes: int = Field(
        65536, gt=0, description="largest request body accepted (413 before it is read)"
    )
    write_rate_per_s: float = Field(
        1.0, gt=0, description="stream creations and PATCHes per second allowed to one API token (token bucket)"
    )
    write_burst: int = Field(10, ge=1, description="… and the burst it may spend at once (beyond: 429)")
    max_playback_requests_per_client: int = Field(
        8, ge=1, description="playback requests (blocking reloads included) one client address may have in "
        "flight through the proxy (beyond: 429)"
    )
    client_address_header: str | None = Field(
        None, description="take the client address for per-client limits from this header (e.g. X-Forwarded-For; "
        "only behind a proxy that sets it); unset: the connection's peer address"
    )
    proxy_max_connections: int = Field(
        256, ge=1, description="connections the HLS proxy may hold to egress (shared by all viewers)"
    )
    allow_anonymous: bool = Field(False, description="serve /v1 without a token (local development only)")
    public_url: str = Field("http://localhost:8080", description="base URL viewers reach the gateway at")
    public_rtmp_url: str = Field("rtmp://localhost:1935", description="base RTMP URL streamers publish to")
    prompt_ack_timeout_s: float = Field(1.0, gt=0, description="wait for ingest to confirm a live prompt change")
    proxy_timeout_s: float = Field(10.0, gt=0, description="upstream timeout when proxying HLS from egress")


class JobsSettings(Section):
    """Offline jobs (``POST /v1/jobs``, the ``jobs`` workers; docs/jobs.md)."""

    max_upload_bytes: int = Field(
        256 * MiB, gt=0, description="largest video POST /v1/jobs accepts (413 before it is read)")
    max_seconds: float = Field(60.0, gt=0, description="longest T2V job, in seconds of output")
    progress_interval_s: float = Field(0.5, gt=0, description="how often a worker records a running job's progress")
    stale_after_s: float = Field(
        60.0, gt=0, description="a running job whose worker has not reported for this long fails (worker lost)")


class Settings(BaseSettings):
    """Everything a rheo process can be told."""

    model_config = SettingsConfigDict(
        env_prefix="RHEO_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    service: str = Field("rheo", description="the service this process runs (set by the CLI)")
    nats: NatsSettings = Field(default_factory=NatsSettings)
    proto: ProtoSettings = Field(default_factory=ProtoSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    stream: StreamDefaults = Field(default_factory=StreamDefaults)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    egress: EgressSettings = Field(default_factory=EgressSettings)
    decoder: DecoderSettings = Field(default_factory=DecoderSettings)
    dit_stage: DitStageSettings = Field(default_factory=DitStageSettings)
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    playback: PlaybackSettings = Field(default_factory=PlaybackSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("RHEO_CONFIG")
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"RHEO_CONFIG names {path!r}, which is not a file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """The effective settings: overrides > env > ``RHEO_CONFIG`` YAML > defaults; a mistake in any of them is a
    ``ConfigError`` whose message is one line naming the key."""
    try:
        return Settings(**overrides)
    except (ValueError, OSError, yaml.YAMLError) as e:  # ValidationError and SettingsError are ValueErrors
        structured = [key for key, default, _ in iter_fields() if isinstance(default, list | dict)]
        raise ConfigError(explain(e, structured)) from e


def describe(settings: Settings) -> str:
    """YAML of the effective settings with secrets masked (what ``rheo config`` prints)."""
    data = settings.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)


def iter_fields(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every leaf knob, for docs and the chart's contract test."""
    out: list[tuple[str, Any, str]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(iter_fields(ann, f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            out.append((f"{prefix}{name}", default, field.description or ""))
    return out
