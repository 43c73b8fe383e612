"""The ``rheo`` command: one entry point for every service and tool."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from services.config import describe, iter_fields, load_settings


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


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _cmd_nats(args: argparse.Namespace) -> int:
    from services.natsd import NatsServer

    with NatsServer(port=args.port) as server:
        print(f"nats-server running at {server.url} (JetStream on, max_payload 8MB); Ctrl-C stops it", flush=True)
        _wait_for_signal()
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from services.natsd import NatsServer

    settings = load_settings()
    if settings.model.model_dir is None:
        print("*" * 78 + "\n*  NO MODEL WEIGHTS CONFIGURED (model.model_dir): the tiny RANDOM model on CPU.\n"
              "*  Output is noise-like restyling, for trying the plumbing only.\n" + "*" * 78, file=sys.stderr)
    with NatsServer(port=args.nats_port) as server:
        print(f"rheo up: private nats-server at {server.url}", flush=True)
        print("rheo up: the media and model services join this stack as their issues land; "
              "see `rheo --help` for what runs today. Ctrl-C stops everything.", flush=True)
        _wait_for_signal()
    return 0


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

    p = sub.add_parser("nats", help="run a private nats-server (JetStream, max_payload 8MB) in the foreground")
    p.add_argument("--port", type=int, default=4222, help="client port (-1: random)")
    p.set_defaults(func=_cmd_nats)

    p = sub.add_parser("up", help="start the local stack: a private nats-server and every service")
    p.add_argument("--nats-port", type=int, default=4222, help="client port of the private nats-server")
    p.set_defaults(func=_cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
