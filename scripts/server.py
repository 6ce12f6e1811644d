#!/usr/bin/env python3
"""Start, wait for and stop a TorchServe serving this project's archives.

    python scripts/server.py start [--models efficientnet_lite0] [--run-dir build/serve]
    python scripts/server.py stop  [--run-dir build/serve]

What ``start`` does, and the ports: ``serving/server.py`` (below), whose functions the
integration tests, the load tests and the viewer use too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving import server as _server_module
from serving.server import (
    DEFAULT_CONFIG,
    DEFAULT_RUN_DIR,
    DEFAULT_STORE,
    ROOT,
    ServerError,
    print_usage,
    requested_port_base,
    running_server,
    start,
    stop,
    wait_ready,
)


def server_doc() -> str:
    """``serving/server.py``'s docstring without its first line."""
    return _server_module.__doc__.split("\n\n", 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\n" + server_doc(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0"], help="archive names in the model store")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--model-store", type=Path, default=DEFAULT_STORE)
    parser.add_argument(
        "--port-base",
        type=int,
        help="use ports N, N+1, N+2 (HTTP) and N+4, N+5 (gRPC); default: $PORT_BASE, else config.properties' ports",
    )
    parser.add_argument("--example-image", type=Path, default=ROOT / "build" / "samples" / "chelsea.jpg")
    args = parser.parse_args(argv)
    if args.action == "stop":
        print("TorchServe stopped" if stop(args.run_dir) else f"no TorchServe running from {args.run_dir}")
        return 0
    port_base = args.port_base if args.port_base is not None else requested_port_base()
    running = running_server(args.run_dir)
    if running:
        print(
            f"TorchServe is already up at {running.inference_url} "
            f"(started from {running.run_dir}; `make stop` stops it)"
        )
        if port_base is not None and running.inference_url != f"http://127.0.0.1:{port_base}":
            print(f"note: it keeps its ports; to move it to PORT_BASE={port_base}, `make stop` first")
        try:
            wait_ready(running, args.models, timeout=300)
        except ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print_usage(running, args.models, args.example_image)
        return 0
    try:
        server = start(
            args.models, run_dir=args.run_dir, config=args.config, model_store=args.model_store, port_base=port_base
        )
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"TorchServe is up at {server.inference_url} (logs and key_file.json in {server.run_dir})")
    print_usage(server, args.models, args.example_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
