"""The ``rheo`` command: one entry point for every service and tool."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from proto.spec import SIZE_MULTIPLE
from services import top, up
from services.config import describe, iter_fields, load_settings
from services.config_errors import ConfigError


def _cmd_config(args: argparse.Namespace) -> int:
    if args.keys:
        for key, default, description in iter_fields():
            print(f"{key:40s} {json.dumps(default, default=str):24s} {description}")
        return 0
    print(describe(load_settings()), end="")
    return 0


def _cmd_asyncapi(args: argparse.Namespace) -> int:
    from proto.asyncapi import DOCUMENT_PATH, build_document, load_committed, render

    if args.write:
        DOCUMENT_PATH.write_text(render())
        print(f"wrote {DOCUMENT_PATH}")
        return 0
    if args.check:
        if load_committed() != build_document():
            print(f"{DOCUMENT_PATH} is out of date: run `rheo proto asyncapi --write`", file=sys.stderr)
            return 1
        print(f"{DOCUMENT_PATH} matches the code")
        return 0
    print(render(), end="")
    return 0


def _cmd_permissions(args: argparse.Namespace) -> int:
    from proto.permissions import PERMISSIONS_PATH, render_json

    if args.write:
        PERMISSIONS_PATH.write_text(render_json())
        print(f"wrote {PERMISSIONS_PATH}")
        return 0
    if args.check:
        if PERMISSIONS_PATH.read_text() != render_json():
            print(f"{PERMISSIONS_PATH} is out of date: run `rheo proto permissions --write`", file=sys.stderr)
            return 1
        print(f"{PERMISSIONS_PATH} matches the code")
        return 0
    print(render_json(), end="")
    return 0


def _cmd_nats_config(args: argparse.Namespace) -> int:
    """The authorization block for an operator's own nats-server: one user per role with its permissions; the
    passwords are placeholders for bcrypt hashes (``nats server passwd``)."""
    from proto.permissions import ROLES, authorization_block, user_name

    creds = {r: {"user": user_name(r), "password": f"<bcrypt hash of {user_name(r)}'s password>"} for r in ROLES}
    print(authorization_block(creds), end="")
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _cmd_nats(args: argparse.Namespace) -> int:
    import tempfile

    from services.natsd import NatsServer, make_identities

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rheo-nats-"))
    identities = {} if args.anonymous else make_identities(workdir / "identities")
    with NatsServer(workdir / "nats", port=args.port, identities=identities, anonymous=args.anonymous) as server:
        print(f"nats-server running at {server.url} (JetStream on, max_payload 8MB); Ctrl-C stops it", flush=True)
        if args.anonymous:
            print("WARNING: --anonymous: no authorization, any client may publish anything", flush=True)
        for role, ident in identities.items():
            env = " ".join(f"{k}={v}" for k, v in ident.env().items())
            print(f"  rheo {role}: RHEO_NATS__URL={server.url} {env}", flush=True)
        _wait_for_signal()
    return 0


def _cmd_testpattern(args: argparse.Namespace) -> int:
    from ingest.testpattern import main as testpattern

    return testpattern(args.argv)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    if w <= 0 or h <= 0 or w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of {SIZE_MULTIPLE}, "
                                         f"got {text!r}")
    return w, h


_TINY_WARNING = (
    "*" * 78 + "\n*  NO MODEL WEIGHTS: running the tiny RANDOM model (preset 'tiny').\n"
    "*  The output is noise-like restyling, for trying the plumbing only.\n"
    "*  Pass --model-dir DIR (see README, 'Model weights') for real output.\n" + "*" * 78
)


def _same_file(a: Path, b: Path) -> bool:
    """One file under two spellings (relative, ``..``, a symlink or a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _cmd_run(args: argparse.Namespace) -> int:
    """``rheo run``: file → file through the single-process StreamPipeline. Errors: one line, exit code 2."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="rheo run: %(message)s")
    if args.t2v and args.input is not None:
        print("rheo run: error: --t2v generates from the prompt alone; drop --input", file=sys.stderr)
        return 2
    if not args.t2v and args.input is None:
        print("rheo run: error: --input is required (or --t2v --seconds N)", file=sys.stderr)
        return 2
    if args.seconds is not None and args.seconds <= 0:
        print("rheo run: error: --seconds must be > 0", file=sys.stderr)
        return 2
    settings = load_settings()  # a config mistake is one line before anything heavy is imported
    if args.input is not None and _same_file(args.input, args.output):
        print(f"rheo run: error: --output {args.output} is the input file: it would be overwritten; write elsewhere",
              file=sys.stderr)
        return 2
    from pipeline.offline import InputError, VideoInput

    try:
        video = None if args.t2v else VideoInput(args.input)  # bad input fails before any model is loaded
        if not args.output.parent.is_dir():
            raise InputError(f"output folder {args.output.parent} does not exist")
    except InputError as err:
        print(f"rheo run: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    try:
        from dit_stage.loading import CheckpointError
        from encoder.prompt import PromptEncoderFilesError, T5WeightsError
        from encoder.vae_loading import VAEWeightsError
        from pipeline.loading import ModelDirError
        from pipeline.offline import build_pipeline, run_file, run_t2v
        from pipeline.pipeline import PipelineConfig, PipelineError
    except ImportError as err:
        print(f"rheo run: error: missing dependency: {err}", file=sys.stderr)
        return 2
    expected = (InputError, ModelDirError, PipelineError, CheckpointError, PromptEncoderFilesError, T5WeightsError,
                VAEWeightsError, FileNotFoundError, PermissionError, IsADirectoryError)  # fmt: skip
    model_dir = args.model_dir if args.preset is None else None
    if model_dir is None and args.preset is None:
        model_dir = settings.model.model_dir
    tiny = model_dir is None
    size = args.size or ((128, 128) if tiny else (settings.stream.width, settings.stream.height))
    config = PipelineConfig(
        width=size[0],
        height=size[1],
        steps=args.steps or settings.stream.steps,
        noise_scale=settings.stream.noise_scale,
        motion_aware_noise=settings.stream.motion_aware_noise,
        ring=settings.dit_stage.ring(),  # the ring the stage services run: `rheo run` equals them
    )
    seed = settings.stream.seed if args.seed is None else args.seed
    progress = not args.quiet
    try:
        if tiny:
            print(_TINY_WARNING, file=sys.stderr)
        pipeline = build_pipeline(settings, config, model_dir=model_dir, checkpoint=args.checkpoint,
                                  device=args.device, vae=args.vae)
        if args.t2v:
            stats = run_t2v(pipeline, args.output, args.prompt, seconds=args.seconds or 2.0, fps=settings.stream.fps,
                            seed=seed, progress=progress)  # fmt: skip
        else:
            assert video is not None
            stats = run_file(pipeline, video, args.output, args.prompt, seed=seed, progress=progress)
    except expected as err:
        print(f"rheo run: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rheo run: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as err:  # one line, no traceback (the contract of `rheo run`)
        print(f"rheo run: error: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return 1
    print(
        f"rheo run: wrote {args.output}: {stats.frames_out} frames at {stats.output_fps:g} fps "
        f"({config.width}x{config.height}, {pipeline.description})\n"
        f"rheo run: achieved {stats.fps:.2f} FPS, time to first frame {stats.ttff_s:.3f} s, "
        f"total {stats.seconds:.2f} s",
        file=sys.stderr,
    )
    return 0


SERVICES: dict[str, tuple[str, str]] = {
    "ingest": ("ingest.service", "IngestService"),
    "dit-stage": ("dit_stage.service", "DitStageService"),
    "decoder": ("decoder.service", "DecoderService"),
    "egress": ("egress.service", "EgressService"),
    "controller": ("services.controller.service", "ControllerService"),
    "gateway": ("services.gateway.service", "GatewayService"),
    "jobs": ("jobs.service", "JobsService"),
}
"""``rheo <name>`` runs the service class; each is also ``python -m <module>``."""


def _cmd_service(args: argparse.Namespace) -> int:
    import importlib

    from services.runtime import main as run_service

    module, cls = SERVICES[args.service]
    try:
        service_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        print(f"rheo {args.service}: not available in this build ({e})", file=sys.stderr)
        return 2
    return run_service(service_cls)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rheo",
        description="rheo: live video restyling with StreamDiffusionV2 (causal Wan2.1) as a NATS-connected service.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="print the effective configuration (env RHEO_*, YAML from RHEO_CONFIG)")
    p.add_argument("--keys", action="store_true", help="list every key with its default and description")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("proto", help="wire-contract tools")
    psub = p.add_subparsers(dest="proto_command", metavar="TOOL", required=True)
    a = psub.add_parser("asyncapi", help="print, write or check proto/asyncapi.yaml")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="regenerate proto/asyncapi.yaml from the code")
    g.add_argument("--check", action="store_true", help="exit 1 when proto/asyncapi.yaml differs from the code")
    a.set_defaults(func=_cmd_asyncapi)
    a = psub.add_parser("permissions", help="print, write or check charts/rheo/files/nats-permissions.json")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="regenerate the file from proto/permissions.py")
    g.add_argument("--check", action="store_true", help="exit 1 when the file differs from the code")
    a.set_defaults(func=_cmd_permissions)
    a = psub.add_parser("nats-config", help="print the authorization block for an external nats-server")
    a.set_defaults(func=_cmd_nats_config)

    p = sub.add_parser("nats", help="run a private nats-server (JetStream, max_payload 8MB, one nkey per role) in "
                                    "the foreground")
    p.add_argument("--port", type=int, default=4222, help="client port (-1: random)")
    p.add_argument("--workdir", help="where the store and the roles' seed files go (default: a new temp folder)")
    p.add_argument("--anonymous", action="store_true", help="no authorization at all (development only)")
    p.set_defaults(func=_cmd_nats)

    for name in SERVICES:
        p = sub.add_parser(name, help=f"run the {name} service (configured by RHEO_* / RHEO_CONFIG)")
        p.set_defaults(func=_cmd_service, service=name)

    up.add_parser(sub)
    top.add_parser(sub)

    p = sub.add_parser("testpattern", help="publish a moving test pattern over RTMP (rheo testpattern URL ...)")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="URL [--size WxH] [--fps N] [--seconds S]")
    p.set_defaults(func=_cmd_testpattern)

    p = sub.add_parser("run", help="restyle a video file (or generate one from a prompt) into an H.264 MP4")
    p.add_argument("--input", type=Path, help="any video PyAV can read")
    p.add_argument("--output", type=Path, required=True, help="the MP4 to write (replaced only when complete)")
    p.add_argument("--prompt", required=True, help="what the video should become")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, help="Wan2.1 model directory (README: 'Model weights')")
    src.add_argument("--preset", choices=["tiny"], help="tiny random model, no weights (the default without any)")
    p.add_argument("--checkpoint", type=Path, help="causal DiT checkpoint (default: <model dir>/causal/model.pt)")
    p.add_argument("--steps", type=int, choices=[1, 2, 3, 4], help="denoising steps (default: stream.steps)")
    p.add_argument("--size", type=_parse_size, help="model size WIDTHxHEIGHT (default: 512x512; tiny: 128x128)")
    p.add_argument("--seed", type=int, help="stream seed (default: stream.seed)")
    p.add_argument("--t2v", action="store_true", help="no input video: generate from the prompt")
    p.add_argument("--seconds", type=float, help="T2V duration (default 2)")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N")
    p.add_argument("--vae", choices=["wan", "taehv"], help="VAE for encode and decode (default: encoder.vae)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # RHEO_* or RHEO_CONFIG is wrong: one line, whatever the subcommand
        print(f"rheo {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
