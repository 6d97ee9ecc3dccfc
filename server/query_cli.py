"""``alacarte query``: classify image files with a composition server, or list its sources.

The token is ``--token``, else ``$ALACARTE_TOKEN``; ``--ca-cert`` connects with TLS.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from server.query import WEIGHTINGS, CompositionClient, PredictResult, SourceSummary
from server.table import format_labels, format_table, format_time

__all__ = ["HELP", "add_arguments", "run"]

HELP = "ask a composition server for predictions on image files"
TOKEN_ENV = "ALACARTE_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``alacarte query``."""
    parser.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="PNG or JPEG files to classify")
    parser.add_argument("--server", default="localhost:50051", help="HOST:PORT (default: %(default)s)")
    parser.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--ca-cert", type=Path, default=None, help="PEM CA certificate: connect with TLS")
    parser.add_argument("--sources", default="", help="comma-separated sources to compose (default: all yours)")
    parser.add_argument("--top-k", type=int, default=3, help="labels per image (default: %(default)s)")
    parser.add_argument("--weighting", choices=sorted(WEIGHTINGS), default="default",
                        help="how prompts are averaged; default: density when every selected prompt carries "
                             "its source's density, else uniform")
    parser.add_argument("--list", action="store_true", help="list the sources you may compose and exit")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Run ``alacarte query``: 0 on success, 1 on an RPC error, 2 on bad arguments."""
    if not args.list and not args.images:
        print("alacarte query: give IMAGE files to classify, or --list", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV)
    try:
        with CompositionClient(args.server, token, args.ca_cert, timeout=args.timeout) as client:
            if args.list:
                _print_sources(client.list_sources())
            else:
                sources = [s.strip() for s in args.sources.split(",") if s.strip()]
                result = client.predict(args.images, sources, args.top_k, args.weighting)
                _print_predictions(args.images, result)
    except grpc.RpcError as err:
        print(f"alacarte query: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of our output left: common.cli ends quietly
        raise
    except OSError as err:
        print(f"alacarte query: {err}", file=sys.stderr)
        return 2
    return 0


def _print_predictions(images: Sequence[Path], result: PredictResult) -> None:
    rows = [(str(path) if rank == 1 else "", rank, label.index, label.name or "-", f"{label.probability:.4f}")
            for path, labels in zip(images, result.predictions) for rank, label in enumerate(labels, 1)]
    print(format_table(("IMAGE", "RANK", "CLASS", "NAME", "PROB"), rows))
    print("composed: " + ", ".join(f"{p.source} v{p.version}" for p in result.prompts))


def _print_sources(sources: Sequence[SourceSummary]) -> None:
    if not sources:
        print("no sources you may compose")
        return
    print(format_table(("SOURCE", "VERSION", "LABELS", "EXAMPLES", "CREATED"),
                       [(s.source, s.version, format_labels(s.labels, s.num_classes), s.num_examples,
                         format_time(s.created_at)) for s in sources]))
