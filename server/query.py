"""Client of the composition service: ``CompositionClient`` and ``alacarte query``.

Example::

    with CompositionClient("localhost:50051", token=os.environ["ALACARTE_TOKEN"],
                           root_certificates="ca.pem") as client:
        result = client.predict(["shoe.png"], sources=["hospital-a", "hospital-b"], top_k=3)
        for label in result.predictions[0]:
            print(label.index, label.name, label.probability)

Errors come as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from common import alacarte_pb2 as pb
from common import alacarte_pb2_grpc as pb_grpc

__all__ = ["CompositionClient", "HELP", "Label", "PredictResult", "PromptUsed", "SourceSummary",
           "add_arguments", "run"]

HELP = "ask a composition server for predictions on image files"
TOKEN_ENV = "ALACARTE_TOKEN"
WEIGHTINGS = {"default": pb.WEIGHTING_DEFAULT, "uniform": pb.WEIGHTING_UNIFORM,
              "confidence": pb.WEIGHTING_CONFIDENCE, "density": pb.WEIGHTING_DENSITY}
MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class Label:
    """One predicted class of an image."""

    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class PromptUsed:
    """A prompt the server composed: its source, version and file hash."""

    source: str
    version: int
    sha256: str


@dataclass(frozen=True)
class PredictResult:
    """Top-k labels per image (request order, most probable first) and the prompts used."""

    predictions: list[list[Label]]
    prompts: list[PromptUsed]


@dataclass(frozen=True)
class SourceSummary:
    """A source the caller may compose, at its latest version."""

    source: str
    version: int
    labels: tuple[int, ...]
    label_names: tuple[str, ...]  # empty when the server has no class names
    num_classes: int
    num_examples: int
    created_at: float  # POSIX seconds
    sha256: str


class CompositionClient:
    """A connection to a composition server.

    Args:
        target: ``host:port``.
        token: bearer token, sent as ``authorization: Bearer <token>`` metadata.
        root_certificates: PEM CA bundle (bytes or a file path) to use TLS; ``None`` = plaintext.
        timeout: default deadline of each call, in seconds.
    """

    def __init__(self, target: str, token: str | None = None, root_certificates: bytes | str | Path | None = None,
                 *, timeout: float = 60.0) -> None:
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if root_certificates is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            pem = root_certificates if isinstance(root_certificates, bytes) else Path(root_certificates).read_bytes()
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(pem), options=options)
        self._stub = pb_grpc.CompositionServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def predict(self, images: Sequence[bytes | str | Path], sources: Iterable[str] | None = None, top_k: int = 3,
                weighting: str = "default", timeout: float | None = None) -> PredictResult:
        """Classify encoded images (PNG/JPEG bytes, or paths of such files).

        ``sources=None`` composes every source the caller may use; ``weighting`` is
        ``"default"`` (density when every selected prompt carries its source's density, else
        uniform), ``"uniform"``, ``"confidence"`` or ``"density"``. Raises ``grpc.RpcError``
        with the server's status.
        """
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {weighting!r}")
        sources = [sources] if isinstance(sources, str) else list(sources or ())
        request = pb.PredictRequest(images=[_read(image) for image in images], sources=sources,
                                    top_k=top_k, weighting=WEIGHTINGS[weighting])
        reply = self._stub.Predict(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return PredictResult(
            predictions=[[Label(x.index, x.name, x.probability) for x in p.labels] for p in reply.predictions],
            prompts=[PromptUsed(p.source, p.version, p.sha256) for p in reply.prompts])

    def list_sources(self, timeout: float | None = None) -> list[SourceSummary]:
        """The sources the caller may compose, sorted by id."""
        reply = self._stub.ListSources(pb.ListSourcesRequest(), timeout=timeout or self.timeout,
                                       metadata=self._metadata)
        names = list(reply.class_names)
        return [SourceSummary(s.source, s.version, tuple(s.labels),
                              tuple(names[c] for c in s.labels if c < len(names)) if names else (),
                              s.num_classes, s.num_examples, s.created_at.ToNanoseconds() / 1e9, s.sha256)
                for s in reply.sources]

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> CompositionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


# --------------------------------------------------------------------------- CLI


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
    except OSError as err:
        print(f"alacarte query: {err}", file=sys.stderr)
        return 2
    return 0


def _print_predictions(images: Sequence[Path], result: PredictResult) -> None:
    rows = [(str(path) if rank == 1 else "", rank, label.index, label.name or "-", f"{label.probability:.4f}")
            for path, labels in zip(images, result.predictions) for rank, label in enumerate(labels, 1)]
    _print_table(("IMAGE", "RANK", "CLASS", "NAME", "PROB"), rows)
    print("composed: " + ", ".join(f"{p.source} v{p.version}" for p in result.prompts))


def _print_sources(sources: Sequence[SourceSummary]) -> None:
    from server.pool_cli import format_labels, format_time

    if not sources:
        print("no sources you may compose")
        return
    _print_table(("SOURCE", "VERSION", "LABELS", "EXAMPLES", "CREATED"),
                 [(s.source, s.version, format_labels(s.labels, s.num_classes), s.num_examples,
                   format_time(s.created_at)) for s in sources])


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
