#!/usr/bin/env python3
"""The local studio: a web page to generate and listen, over an HTTP API other programs can call.

`python3 scripts/studio.py --root .` serves http://127.0.0.1:8000/ (the page) and /api/... (JSON,
documented at /docs). Generation is stage 5's (`pipeline.studio` over `pipeline.pieces`); pieces land
where stage 5 writes them, so the command line and the studio share one history. It answers only
requests addressed to its own address (the loopback names and `--host`, with `--port`; more with
`--allow-host`) and refuses state-changing requests from other origins.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.cli import DefaultsHelpFormatter, positive_float, positive_int, setup_logging  # noqa: E402

LOG = logging.getLogger("pipeline.studio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve the local studio: a page and a JSON API over stage 5.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="project root holding model_results/ (models) and music_transformer/ (pieces)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; anything but loopback exposes the studio to the network")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--max-upload-mb", type=positive_int, default=20,
                        help="largest audio prompt accepted, in MiB (larger uploads get 413)")
    parser.add_argument("--max-seconds", type=positive_float, default=600.0,
                        help="longest piece a request may ask for, in seconds (longer requests get 422)")
    parser.add_argument("--max-pieces", type=positive_int, default=32,
                        help="most pieces one request may ask for (more get 422; a job's estimated memory is "
                             "also held to half of the machine's)")
    parser.add_argument("--allow-host", action="append", metavar="NAME[:PORT]",
                        help="also answer requests addressed to this host name (e.g. the machine's name on the "
                             "network with --host 0.0.0.0); the loopback names and --host are always answered")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity")
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "studio")
    import uvicorn

    from pipeline.studio import Studio, create_app, served_hosts

    if not is_loopback(args.host):
        LOG.warning("WARNING: listening on %s, not loopback: anyone who can reach this address can generate, "
                    "upload and read the pieces; the studio has no authentication", args.host)
    studio = Studio(args.root.resolve(), max_upload_bytes=args.max_upload_mb * 1024 * 1024,
                    max_seconds=args.max_seconds, max_pieces=args.max_pieces,
                    allowed_hosts=[*served_hosts(args.host, args.port), *(args.allow_host or [])])
    try:
        uvicorn.run(create_app(studio), host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        studio.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
