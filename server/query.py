"""Client of the composition service: ``CompositionClient`` (``alacarte query`` is ``server.query_cli``).

Example::

    with CompositionClient("localhost:50051", token=os.environ["ALACARTE_TOKEN"],
                           root_certificates="ca.pem") as client:
        result = client.predict(["shoe.png"], sources=["hospital-a", "hospital-b"], top_k=3)
        for label in result.predictions[0]:
            print(label.index, label.name, label.probability)

Errors come as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from common import alacarte_pb2 as pb
from common import alacarte_pb2_grpc as pb_grpc

__all__ = ["CompositionClient", "Label", "PredictResult", "PromptUsed", "SourceSummary"]

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
