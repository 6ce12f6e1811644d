#!/usr/bin/env python3
"""Ask a running server why it classified each image as it did.

    python scripts/client.py IMAGE... [--model efficientnet_lite0] [--url http://127.0.0.1:8080]
        [--topk K] [--explanations dve,targeted_dve|none] [--format png|overlay|array]
        [--map-size N|original] [--stages] [--class-conditional] [--target CLASS]
        [--json] [--out DIR]

The flags mirror the API's options (README, "The API"); an option not given is left to
the server's default. For each image it prints the top predictions and the salient box
and writes, into ``--out`` (default ``build/client``): each map as ``<image>_<name>.png``
(``.npy`` for ``--format array``; stage maps as ``<image>_stage<i>_<layer>.*``) and, for
PNG maps, ``<image>_overlay.png`` (the photo coloured by each map, side by side, with the
salient box). With ``--json`` it prints each raw answer as one line of JSON instead (the
server's error JSON for a failed image; ``{"code": null, ...}`` when there was no answer),
in the order of the images, and writes files only if ``--out`` is given.

Every image is answered on its own: a file that cannot be read or an image the server
refuses is reported on stderr, the others are still sent, and the exit status is 1 if
any failed. The token is read from TorchServe's ``key_file.json``; the default URL's port
is ``$PORT_BASE`` (8080 if unset), as for ``make serve``.

A 503 (the model's queue is full) is retried with exponential backoff and jitter, at
most ``--tries`` attempts and ``--retry-budget`` seconds of waiting in all, honouring a
``Retry-After`` header (``serving/backoff.py``); any other error is final.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serving.backoff import Backoff
from serving.client import DEFAULT_KEY_FILE, MAP_NAMES, RequestFailed, explain, options_from, save_outputs, summary
from serving.server import ROOT, port_base, read_token


def _explanations(text: str) -> list[str]:
    names = [] if text.strip().lower() in ("", "none") else [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in MAP_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown map {unknown[0]!r}: use a comma-separated list of {', '.join(MAP_NAMES)}, or none"
        )
    return names


def _map_size(text: str) -> int | str:
    if text == "original":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of pixels nor 'original'") from None


def _target(text: str) -> int | str:
    """A class index (digits) or a label."""
    return int(text) if text.isdigit() else text


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument(
        "--url", default=None, help="the inference address (default http://127.0.0.1:$PORT_BASE, 8080 if unset)"
    )
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    api = parser.add_argument_group("the API's options (default: the server's)")
    api.add_argument("--topk", type=int, help="how many classes to return")
    api.add_argument(
        "--explanations", type=_explanations, help="maps to return: dve,targeted_dve (both), dve, targeted_dve, or none"
    )
    api.add_argument(
        "--format",
        choices=["png", "overlay", "array"],
        help="png: gray map; overlay: the photo coloured by the map; array: floats",
    )
    api.add_argument("--map-size", type=_map_size, help='long side of the maps in pixels, or "original"')
    api.add_argument("--stages", action="store_true", help="also return the DVE map of every stage of the model")
    api.add_argument(
        "--class-conditional",
        action="store_true",
        help="explain the top class rather than the paper's class-agnostic DVE",
    )
    api.add_argument("--target", type=_target, help="explain this class: an index or a label")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print each raw answer as one line of JSON")
    output.add_argument(
        "--out", type=Path, help="folder for the maps (default build/client; with --json: none unless given)"
    )
    retries = parser.add_argument_group("retries of 503")
    retries.add_argument(
        "--tries", type=int, default=Backoff.tries, help="attempts per image when the server answers 503 (1: no retry)"
    )
    retries.add_argument(
        "--retry-budget", type=float, default=Backoff.budget, help="most seconds to wait between those attempts, in all"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _arguments()
    args = parser.parse_args(argv)
    if args.tries < 1 or args.retry_budget < 0:
        parser.error("--tries must be at least 1 and --retry-budget not negative")
    url = args.url or f"http://127.0.0.1:{port_base()}"
    out = args.out if args.out or args.json else ROOT / "build" / "client"
    retry = Backoff(tries=args.tries, budget=args.retry_budget)
    try:
        token = read_token(args.key_file)
    except (OSError, ValueError, KeyError):
        print(
            f"error: no inference key in {args.key_file}; start the server with `make serve` or pass --key-file",
            file=sys.stderr,
        )
        return 1
    options = options_from(args)
    failed = 0
    for path in args.images:
        try:
            try:
                image = path.read_bytes()
            except OSError as error:
                raise RequestFailed(f"cannot read the file: {error.strerror or error}") from None
            response = explain(url, args.model, token, image, options, retry)
        except RequestFailed as failure:
            failed += 1
            print(f"{path}: error: {failure}", file=sys.stderr)
            if args.json:
                print(failure.as_json(), flush=True)
            continue
        if args.json:
            print(json.dumps(response, separators=(",", ":")), flush=True)
        else:
            print("\n".join(summary(path, response)))
        if out is not None:
            for written in save_outputs(path, response, out):
                if not args.json:
                    print(f"  wrote {written}")
    if failed:
        print(f"{failed} of {len(args.images)} images failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
