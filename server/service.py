"""The composition service: gRPC ``alacarte.v1.CompositionService`` over a prompt pool.

A ``CompositionServer`` holds the frozen backbone once, watches the prompt pool through a
``server.catalog.Catalog`` and answers ``Predict`` (classify images with the à-la-carte
composition of chosen sources) and ``ListSources``. It also serves ``grpc.health.v1.Health``
and server reflection. Its command line, ``alacarte serve``, is ``server.service_cli``.

Request path (every byte of a request is untrusted; the cheap checks come first):

1. a server interceptor checks the bearer token (``server.auth``) from the call's metadata
   before the request message is even parsed: a missing or wrong token costs nothing;
2. the handler thread resolves the selected sources against the current pool snapshot and
   the caller's rights (``server.catalog.select_prompts``), checks counts and options, then
   *reserves a queue slot* (``RESOURCE_EXHAUSTED`` when busy) before it decodes anything;
   it reads every image's header, refuses more than ``max_request_pixels`` in all (or
   ``max_image_pixels`` in one image), and only then decodes and transforms them -- so a
   bad request fails alone, before batching;
3. the job takes its reserved slot in the bounded queue (``server.batcher``); one worker
   thread merges queued jobs, whatever their source selections, into a single backbone
   pass (``APTViT.backbone_forward``: keys/values and the pooled features density
   weighting needs); jobs sharing a selection run their prompts together
   (``APTViT.forward_kv``) and each job weights and composes its own rows
   (``common.compose``);
4. the handler returns the top-k labels and the exact prompts used.

Weighting: ``WEIGHTING_DEFAULT`` (unset) is density weighting when every selected prompt
carries its source's density, else uniform; ``UNIFORM``, ``CONFIDENCE`` and ``DENSITY``
force one (``DENSITY`` needs every selected prompt's density: ``FAILED_PRECONDITION``).

A refused request is a ``server.errors.RequestError`` (gRPC status and message); error
messages never carry server paths.
"""

from __future__ import annotations

import concurrent.futures
import io
import ipaddress
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image
from torch import Tensor

from common import alacarte_pb2 as pb
from common import alacarte_pb2_grpc as pb_grpc
from common.compose import Weighting, compose_probs, composition_weights, default_weighting
from common.density import PooledDensities
from common.model import APTViT
from common.prompt import Prompt
from server.auth import AuthenticationError, Principal, TokenStore
from server.batcher import BatcherClosedError, DeadlineExceededError, DynamicBatcher, QueueFullError, Reservation
from server.catalog import Catalog, ServedPrompt, Snapshot, select_prompts
from server.errors import RequestError
from server.pool import PoolEntry, PoolError, PromptPool

__all__ = [
    "SERVICE_NAME",
    "CompositionServer",
    "CompositionServicer",
    "ServiceConfig",
    "TokenInterceptor",
    "decode_images",
    "is_loopback",
]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CompositionService"].full_name
ANONYMOUS = Principal("anonymous", None)
WEIGHTINGS = {pb.WEIGHTING_DEFAULT: None, pb.WEIGHTING_UNIFORM: Weighting.UNIFORM,
              pb.WEIGHTING_CONFIDENCE: Weighting.CONFIDENCE, pb.WEIGHTING_DENSITY: Weighting.DENSITY}
ACCEPTED_FORMATS = ("PNG", "JPEG")
DEFAULT_TOP_K = 3
MiB = 1 << 20
MAX_DEADLINE_S = 86400.0  # a longer (or no) client deadline means "none": grpc reports ~2**63 ns then


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and security settings of a composition server (see ``alacarte serve --help``)."""

    host: str = "127.0.0.1"
    port: int = 50051
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tokens: Path | None = None
    class_names: tuple[str, ...] = ()
    max_batch: int = 32  # images per backbone pass
    max_queue: int = 32  # requests waiting for the model
    max_wait: float = 0.002  # seconds the worker waits to fill a batch
    max_images: int = 64  # images per request
    max_image_pixels: int = 4096 * 4096  # width x height of one decoded image
    max_request_pixels: int = 64 * MiB  # all images of one request (64 of 1024 x 1024, 4 of 4096 x 4096)
    max_message_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("pass both --tls-cert and --tls-key (PEM files), or neither")
        if min(self.max_batch, self.max_queue, self.max_images, self.max_image_pixels, self.max_request_pixels,
               self.max_message_bytes) < 1:
            raise ValueError("max-batch, max-queue, max-images and the size limits must be >= 1")
        if self.tokens is None and not is_loopback(self.host):
            raise ValueError(f"refusing to serve {self.host} without authentication: pass --tokens FILE "
                             "(create it with --add-token) or bind a loopback address such as 127.0.0.1")

    @property
    def rpc_threads(self) -> int:
        """Handler threads: enough for a full queue plus the requests being decoded or run."""
        return self.max_queue + 8


# --------------------------------------------------------------------------- images


def decode_images(
    blobs: Sequence[bytes],
    transform: Callable[[Image.Image], Tensor],
    max_pixels: int,
    max_total_pixels: int | None = None,
) -> Tensor:
    """Decode PNG/JPEG ``blobs`` and apply the backbone ``transform``: ``[n, 3, H, W]``.

    Every image's header is read first (no pixel decoded): one over ``max_pixels``, or all
    together over ``max_total_pixels``, refuses the request before any decoding.
    Raises ``RequestError(INVALID_ARGUMENT)`` naming the first bad image.
    """
    sizes = [_header_pixels(i, blob, max_pixels) for i, blob in enumerate(blobs)]
    if max_total_pixels is not None and sum(sizes) > max_total_pixels:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the request's images hold {sum(sizes)} pixels in all, over the limit of "
                           f"{max_total_pixels}; downscale them or split the request")
    return torch.stack([_decode_one(i, blob, transform) for i, blob in enumerate(blobs)])


def _bad_image(index: int, why: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"image {index}: {why}")


def _header_pixels(index: int, blob: bytes, max_pixels: int) -> int:
    """Width x height from the image header only (PIL opens lazily); checked against ``max_pixels``."""
    try:
        with Image.open(io.BytesIO(blob), formats=ACCEPTED_FORMATS) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _bad_image(index, f"not a decodable {' or '.join(ACCEPTED_FORMATS)} image ({err})") from err
    if width * height > max_pixels:
        raise _bad_image(index, f"{width}x{height} pixels exceeds the limit of {max_pixels} pixels; downscale it")
    return width * height


def _decode_one(index: int, blob: bytes, transform: Callable[[Image.Image], Tensor]) -> Tensor:
    try:
        with Image.open(io.BytesIO(blob), formats=ACCEPTED_FORMATS) as image:
            image.load()
            return transform(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _bad_image(index, f"not a decodable {' or '.join(ACCEPTED_FORMATS)} image ({err})") from err


# --------------------------------------------------------------------------- batched compute


@dataclass(frozen=True)
class _Job:
    images: Tensor  # [n, 3, H, W]
    prompts: tuple[Prompt, ...]
    weighting: Weighting


class _Composer:
    """The batcher's ``process``: one backbone pass for all jobs, prompts per selection.

    The factorised densities of the ``max_selections`` most recent selections are kept: the
    catalog hands out the same prompt objects until the pool changes, so a repeated selection
    skips the factorisation (each entry holds its prompts, so their ids stay unique)."""

    def __init__(self, model: APTViT, max_selections: int = 32) -> None:
        self.model, self.max_selections = model, max_selections
        self._scorers: OrderedDict[tuple[int, ...], tuple[tuple[Prompt, ...], PooledDensities]] = OrderedDict()

    def _scorer(self, prompts: tuple[Prompt, ...]) -> PooledDensities:
        """The selection's :class:`PooledDensities`, from the cache or built (and cached)."""
        key = tuple(map(id, prompts))
        if key in self._scorers:
            self._scorers.move_to_end(key)
            return self._scorers[key][1]
        scorer = PooledDensities([p.density for p in prompts])
        self._scorers[key] = (prompts, scorer)
        while len(self._scorers) > self.max_selections:
            self._scorers.popitem(last=False)
        return scorer

    @torch.inference_mode()
    def __call__(self, jobs: list[_Job]) -> list[Tensor | BaseException]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(tuple(map(id, job.prompts)), []).append(i)
        order = [i for members in groups.values() for i in members]
        images = torch.cat([jobs[i].images for i in order]).to(self.model.device)
        features, kv = self.model.backbone_forward(images)  # the one backbone pass of the batch
        pooled = self.model.pooled(features)  # [B, D], for density weighting
        results: list[Tensor | BaseException] = [RuntimeError("job not run")] * len(jobs)
        start = 0
        for members in groups.values():
            stop = start + sum(len(jobs[i].images) for i in members)
            self._run_group(kv[:, :, start:stop], pooled[start:stop], [jobs[i] for i in members], members, results)
            start = stop
        return results

    def _run_group(self, kv: Tensor, pooled: Tensor, jobs: list[_Job], members: list[int], results: list) -> None:
        """Jobs sharing one prompt selection: run the prompts once, weight and compose per job."""
        try:
            logits = self.model.forward_kv(kv, pooled, jobs[0].prompts)  # [k, n, C]
        except Exception as err:  # fail these jobs only, not the batch
            logger.exception("prompt forward failed for %d job(s)", len(jobs))
            for i in members:
                results[i] = err
            return
        start = 0
        for i, job in zip(members, jobs):
            stop = start + len(job.images)
            try:
                scorer = self._scorer(job.prompts) if job.weighting is Weighting.DENSITY else None
                weights = composition_weights(job.weighting, logits[:, start:stop], job.prompts, pooled[start:stop],
                                              scorer)
                results[i] = compose_probs(logits[:, start:stop], weights).float().cpu()
            except Exception as err:  # this job only
                logger.exception("composition failed for one job")
                results[i] = err
            start = stop


# --------------------------------------------------------------------------- gRPC service


class CompositionServicer(pb_grpc.CompositionServiceServicer):
    """``Predict`` and ``ListSources`` over a catalog, a batcher and a token store."""

    def __init__(self, catalog: Catalog, batcher: DynamicBatcher, tokens: TokenStore | None,
                 config: ServiceConfig, transform: Callable[[Image.Image], Tensor]) -> None:
        self.catalog, self.batcher, self.tokens = catalog, batcher, tokens
        self.config, self.transform = config, transform

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        """Classify ``request.images`` with the composition of the selected sources."""
        try:
            principal = self._authenticate(context)
            served = select_prompts(self._snapshot(), principal, request.sources)
            num_classes = served[0].prompt.config.num_classes
            top_k = self._check_request(request, num_classes)
            prompts = tuple(s.prompt for s in served)
            weighting = _weighting(request.weighting, served)
            with self._reserve() as slot:  # admission before any image is decoded
                images = decode_images(request.images, self.transform, self.config.max_image_pixels,
                                       self.config.max_request_pixels)
                probs = self._run(_Job(images, prompts, weighting), context, slot)
        except RequestError as err:
            context.abort(err.code, err.message)
        return _predict_response(probs, top_k, served, self.config.class_names)

    def ListSources(self, request: pb.ListSourcesRequest, context: grpc.ServicerContext) -> pb.ListSourcesResponse:
        """The servable sources the caller may compose, sorted by id."""
        try:
            principal = self._authenticate(context)
            snapshot = self._snapshot()
        except RequestError as err:
            context.abort(err.code, err.message)
        return pb.ListSourcesResponse(
            sources=[_source_info(snapshot.prompts[s].entry) for s in sorted(snapshot.prompts)
                     if principal.may_use(s)],
            class_names=self.config.class_names, backbone=self.catalog.model.backbone_name)

    def _authenticate(self, context: grpc.ServicerContext) -> Principal:
        if self.tokens is None:
            return ANONYMOUS
        try:
            return self.tokens.authenticate(context.invocation_metadata())
        except AuthenticationError as err:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, str(err)) from err

    def _snapshot(self) -> Snapshot:
        try:
            return self.catalog.current()
        except (PoolError, sqlite3.Error, OSError) as err:
            logger.exception("cannot read the prompt pool")
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"the prompt pool is unreadable right now ({type(err).__name__}); retry later") from err

    def _reserve(self) -> Reservation:
        try:
            return self.batcher.reserve()
        except QueueFullError as err:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from err
        except BatcherClosedError as err:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(err)) from err

    def _check_request(self, request: pb.PredictRequest, num_classes: int) -> int:
        """Validate counts and options; return the effective ``top_k``."""
        n = len(request.images)
        if not 1 <= n <= self.config.max_images:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"a request carries 1 to {self.config.max_images} images, got {n}; split it")
        if request.weighting not in WEIGHTINGS:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"unknown weighting {request.weighting}; use DEFAULT, UNIFORM, CONFIDENCE or DENSITY")
        if not 0 <= request.top_k <= num_classes:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"top_k must be within 1..{num_classes} (0 = {DEFAULT_TOP_K}), got {request.top_k}")
        return request.top_k or min(DEFAULT_TOP_K, num_classes)

    def _run(self, job: _Job, context: grpc.ServicerContext, slot: Reservation) -> Tensor:
        """Queue ``job`` in its reserved ``slot``; wait for its probabilities ``[n, C]`` within the deadline.

        A client without a deadline (grpc then reports ~2**63 ns remaining) waits without one.
        """
        remaining = context.time_remaining()
        if remaining is not None and remaining > MAX_DEADLINE_S:
            remaining = None
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            future = self.batcher.submit(job, size=len(job.images), deadline=deadline, reservation=slot)
        except QueueFullError as err:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from err
        except BatcherClosedError as err:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(err)) from err
        context.add_callback(future.cancel)  # client gone: drop the job if still queued
        try:
            return future.result(timeout=remaining)
        except (concurrent.futures.TimeoutError, DeadlineExceededError) as err:
            future.cancel()
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "the deadline passed before the images were classified; allow more time") from err
        except concurrent.futures.CancelledError as err:
            raise RequestError(grpc.StatusCode.CANCELLED, "the request was cancelled") from err
        except Exception as err:
            logger.exception("composition failed")
            raise RequestError(grpc.StatusCode.INTERNAL, f"composition failed ({type(err).__name__}; the details "
                               "are in the server's log)") from err


def _weighting(value: int, served: Sequence[ServedPrompt]) -> Weighting:
    """The weighting a request asks for (unset: ``default_weighting``); raises ``RequestError``."""
    prompts = [s.prompt for s in served]
    weighting = WEIGHTINGS[value] or default_weighting(prompts)
    if weighting is Weighting.DENSITY:
        missing = [s.entry.source for s in served if s.prompt.density is None]
        if missing:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"density weighting needs every selected source's density; {missing[:10]} shipped "
                               "none. Use WEIGHTING_UNIFORM or WEIGHTING_CONFIDENCE, or select other sources")
    return weighting


def _predict_response(probs: Tensor, top_k: int, served: Sequence[ServedPrompt],
                      class_names: Sequence[str]) -> pb.PredictResponse:
    values, indices = probs.topk(top_k, dim=1)
    return pb.PredictResponse(
        predictions=[
            pb.ImagePrediction(labels=[
                pb.LabelScore(index=c, name=class_names[c] if c < len(class_names) else "", probability=p)
                for c, p in zip(row_idx, row_val)])
            for row_idx, row_val in zip(indices.tolist(), values.tolist())],
        prompts=[pb.PromptRef(source=s.entry.source, version=s.entry.version, sha256=s.entry.sha256)
                 for s in served])


def _source_info(entry: PoolEntry) -> pb.SourceInfo:
    """The listing of one source; an implausible stored ``created_at`` is left unset, not fatal."""
    return pb.SourceInfo(source=entry.source, version=entry.version, labels=entry.labels,
                         num_classes=entry.num_classes, num_examples=entry.num_examples,
                         created_at=_timestamp(entry.created_at), sha256=entry.sha256)


def _timestamp(seconds: float) -> Timestamp | None:
    """``seconds`` as a protobuf Timestamp, or None when it is no valid one (NaN, inf, beyond 9999)."""
    stamp = Timestamp()
    try:
        stamp.FromNanoseconds(int(seconds * 1e9))
        stamp.ToDatetime()  # validates the range 0001..9999
    except (ValueError, OverflowError, TypeError):
        return None
    return stamp


# --------------------------------------------------------------------------- authentication


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls to the composition service without a valid token before their request is parsed.

    Health and reflection stay open. The handler authenticates again to learn the caller's
    rights (one SHA-256 per call).
    """

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001, ANN201 (grpc's API)
        """Continue with the real handler, or with one that aborts ``UNAUTHENTICATED`` unread."""
        if not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(handler_call_details)
        try:
            self.tokens.authenticate(handler_call_details.invocation_metadata)
        except AuthenticationError as err:
            message = str(err)
            return grpc.unary_unary_rpc_method_handler(  # no deserializer: the request bytes stay unread
                lambda _request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, message))
        return continuation(handler_call_details)


# --------------------------------------------------------------------------- server


class CompositionServer:
    """A running composition server: gRPC server, health, reflection, batcher and catalog.

    ``port`` is the bound port (useful with ``config.port = 0``). ``stop`` drains in-flight
    requests, then stops the worker.
    """

    def __init__(self, model: APTViT, pool: PromptPool, config: ServiceConfig,
                 transform: Callable[[Image.Image], Tensor]) -> None:
        self.config = config
        tokens = TokenStore(config.tokens) if config.tokens is not None else None
        self.catalog = Catalog(pool, model, num_classes=len(config.class_names) or None)
        self.batcher = DynamicBatcher(_Composer(model), max_batch=config.max_batch,
                                      max_queue=config.max_queue, max_wait=config.max_wait, name="alacarte-batcher")
        self.health = health.HealthServicer()
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes)]
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(config.rpc_threads, thread_name_prefix="alacarte-rpc"),
            interceptors=[TokenInterceptor(tokens)] if tokens is not None else [],
            options=options, maximum_concurrent_rpcs=config.rpc_threads)
        pb_grpc.add_CompositionServiceServicer_to_server(
            CompositionServicer(self.catalog, self.batcher, tokens, config, transform), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        try:
            self.port = self._bind()
            self._server.start()
        except BaseException:
            self.batcher.close()
            raise
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        return f"[{self.config.host}]:{self.port}" if ":" in self.config.host else f"{self.config.host}:{self.port}"

    def _bind(self) -> int:
        address = f"[{self.config.host}]:{self.config.port}" if ":" in self.config.host \
            else f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert is None:
            return self._server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials(
            [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())])
        return self._server.add_secure_port(address, credentials)

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, finish in-flight requests (up to ``grace`` s), stop the worker."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.batcher.close()
        logger.info("served %d request(s), %d image(s) in %d batch(es)",
                    self.batcher.jobs, self.batcher.items, self.batcher.batches)

    def __enter__(self) -> CompositionServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
