"""Tests of the composition service: ``server.service``, ``server.auth``, ``server.batcher``, ``server.query``.

Real gRPC servers on 127.0.0.1 (free ports) over a tiny random ``vit_tiny_patch16_224`` at 32 px.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import IMG, NUM_CLASSES, random_prompt
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

from common import alacarte_pb2 as pb
from common import alacarte_pb2_grpc as pb_grpc
from common.cli import main as cli_main
from common.compose import Weighting, compose_probs, composition_weights
from common.data import backbone_transform
from common.density import SourceDensity
from common.model import APTViT, load_backbone
from server import service as service_module
from server.admission import MAX_N_PROMPT
from server.auth import AuthenticationError, TokenStore, add_user, remove_user
from server.batcher import DeadlineExceededError, DynamicBatcher, QueueFullError
from server.pool import PromptPool
from server.query import CompositionClient
from server.service import SERVICE_NAME, CompositionServer, ServiceConfig

SOURCES = ("a", "b", "c", "d")
USERS = {"alice": ["a", "b"], "bob": ["c"], "ops": "*"}
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def model() -> APTViT:
    return APTViT(load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=IMG, device="cpu"))


def fill_pool(root: Path, model: APTViT, other_label_space: bool = True) -> PromptPool:
    """Sources ``SOURCES`` (``d`` trained on classes 0-4), and ``seven`` over 7 classes only."""
    pool = PromptPool(root)
    for i, source in enumerate(SOURCES):
        labels = range(5) if source == "d" else None
        pool.add(source, random_prompt(model, seed=i, labels=labels))
    if other_label_space:
        pool.add("seven", random_prompt(model, seed=9, num_classes=7))
    return pool


def encode(seed: int, size: tuple[int, int] = (IMG, IMG), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


IMAGES = [encode(0), encode(1, (48, 40)), encode(2, (20, 28), "JPEG")]


def local_probs(model: APTViT, pool: PromptPool, images: list[bytes], sources: list[str],
                weighting: str | None = None) -> torch.Tensor:
    """What the service must answer: ``APTViT.compose`` on the same decoded, transformed images."""
    transform = backbone_transform(model.backbone)
    x = torch.stack([transform(Image.open(io.BytesIO(b))) for b in images])
    prompts = [pool.get(s, model=model) for s in sources]
    with torch.no_grad():
        return model.compose(x, prompts, weighting)


def dense(predictions, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Top-k lists with k = num_classes back to a ``[n, C]`` probability tensor."""
    out = torch.zeros(len(predictions), num_classes)
    for i, labels in enumerate(predictions):
        assert [x.probability for x in labels] == sorted((x.probability for x in labels), reverse=True)
        for label in labels:
            out[i, label.index] = label.probability
    return out


@pytest.fixture(scope="module")
def pool(model, tmp_path_factory) -> PromptPool:
    return fill_pool(tmp_path_factory.mktemp("pool"), model)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("auth") / "tokens.json"
    return path, {user: add_user(path, user, sources) for user, sources in USERS.items()}


@pytest.fixture
def start(model) -> Iterator[Callable[..., CompositionServer]]:
    """Start servers on a free loopback port; all are stopped at teardown."""
    servers = []

    def _start(pool: PromptPool, **config) -> CompositionServer:
        config = {"port": 0, "max_wait": 0.005} | config
        server = CompositionServer(model, pool, ServiceConfig(**config), backbone_transform(model.backbone))
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture(scope="module")
def secured(model, pool, tokens) -> Iterator[CompositionServer]:
    """One server with tokens and small limits, shared by the read-only tests."""
    server = CompositionServer(model, pool, ServiceConfig(port=0, tokens=tokens[0], max_images=4,
                                                          max_image_pixels=64 * 64, class_names=tuple("ABCDEFGHIJ")),
                               backbone_transform(model.backbone))
    yield server
    server.stop(grace=0)


def client_for(server: CompositionServer, token: str | None = None) -> CompositionClient:
    return CompositionClient(server.address, token=token, timeout=30)


def status_of(call: Callable[..., object], *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """The status code and message of the ``grpc.RpcError`` that ``call(*args, **kwargs)`` raises."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


# --------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("weighting", ["uniform", "confidence"])
def test_predict_equals_local_compose(secured, pool, model, tokens, weighting) -> None:
    with client_for(secured, tokens[1]["ops"]) as client:
        result = client.predict(IMAGES, sources=["c", "a", "d"], top_k=NUM_CLASSES, weighting=weighting)
    want = local_probs(model, pool, IMAGES, ["a", "c", "d"], None if weighting == "uniform" else "confidence")
    torch.testing.assert_close(dense(result.predictions), want, atol=1e-5, rtol=0)
    assert [(p.source, p.version, p.sha256) for p in result.prompts] == \
        [(s, 1, pool.info(s).sha256) for s in ("a", "c", "d")]
    assert result.predictions[0][0].name == "ABCDEFGHIJ"[result.predictions[0][0].index]


def test_default_top_k_and_default_sources(secured, pool, model, tokens, tmp_path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(IMAGES[0])
    with client_for(secured, tokens[1]["alice"]) as client:
        result = client.predict([image], top_k=0)  # a path; no sources = all of alice's
    assert [p.source for p in result.prompts] == ["a", "b"]
    assert len(result.predictions[0]) == 3
    want = local_probs(model, pool, IMAGES[:1], ["a", "b"]).topk(3)
    assert [x.index for x in result.predictions[0]] == want.indices[0].tolist()


def test_list_sources(secured, pool, tokens) -> None:
    with client_for(secured, tokens[1]["ops"]) as client:
        listed = client.list_sources()
    assert [s.source for s in listed] == sorted(SOURCES)  # "seven" is of another label space than the names
    d = next(s for s in listed if s.source == "d")
    entry = pool.info("d")
    assert (d.version, d.labels, d.label_names, d.num_classes, d.sha256) == \
        (1, (0, 1, 2, 3, 4), tuple("ABCDE"), NUM_CLASSES, entry.sha256)
    assert d.created_at == pytest.approx(entry.created_at, abs=1e-6)


# --------------------------------------------------------------------------- access control


@pytest.mark.parametrize("user", sorted(USERS))
def test_access_matrix(secured, tokens, user) -> None:
    rights = USERS[user]
    with client_for(secured, tokens[1][user]) as client:
        for source in ("a", "b", "c", "d"):
            if rights == "*" or source in rights:
                assert [p.source for p in client.predict(IMAGES[:1], [source]).prompts] == [source]
            else:
                code, message = status_of(client.predict, IMAGES[:1], [source])
                assert code == grpc.StatusCode.PERMISSION_DENIED and source in message and user in message
        listed = [s.source for s in client.list_sources()]
        assert listed == (sorted(SOURCES) if rights == "*" else rights)
        # a source that does not exist: unknown for who may see everything, denied for the others
        code, _ = status_of(client.predict, IMAGES[:1], ["nope"])
        assert code == (grpc.StatusCode.INVALID_ARGUMENT if rights == "*" else grpc.StatusCode.PERMISSION_DENIED)


def test_unauthenticated(secured, tokens) -> None:
    issued = tokens[1]
    stub = pb_grpc.CompositionServiceStub(grpc.insecure_channel(secured.address))
    request = pb.PredictRequest(images=IMAGES[:1])
    for metadata in [(), (("authorization", "Basic abc"),), (("authorization", "Bearer alc_0123456789abcdef_x"),),
                     (("authorization", "Bearer " + issued["alice"] + "x"),)]:
        for call, arg in ((stub.Predict, request), (stub.ListSources, pb.ListSourcesRequest())):
            code, message = status_of(call, arg, metadata=metadata, timeout=30)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in message


def test_tokens_are_hashed_and_reloaded_live(secured, tokens, tmp_path) -> None:
    path, issued = tokens
    text = path.read_text()
    assert all(token not in text and token.split("_", 2)[2] not in text for token in issued.values())
    assert path.stat().st_mode & 0o777 == 0o600
    new = add_user(path, "carol", ["d"])  # no restart needed
    with client_for(secured, new) as client:
        assert [s.source for s in client.list_sources()] == ["d"]
        remove_user(path, "carol")
        code, _ = status_of(client.list_sources)
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_token_store_fails_closed_on_a_broken_file(tmp_path) -> None:
    path = tmp_path / "tokens.json"
    token = add_user(path, "eve", "*")
    store = TokenStore(path)
    assert store.authenticate([("authorization", f"Bearer {token}")]).sources is None
    path.write_text("{not json")
    with pytest.raises(AuthenticationError):
        store.authenticate([("authorization", f"Bearer {token}")])
    with pytest.raises(ValueError, match="sources"):
        add_user(path.with_name("other.json"), "eve", [])


def test_no_tokens_only_on_loopback() -> None:
    with pytest.raises(ValueError, match="--tokens"):
        ServiceConfig(host="0.0.0.0")
    assert ServiceConfig(host="::1").tokens is None


# --------------------------------------------------------------------------- bad input


BAD_REQUESTS = {
    "undecodable": (dict(images=[b"not an image"]), "image 0"),
    "truncated": (dict(images=[IMAGES[0], IMAGES[0][:60]]), "image 1"),
    "gif": (dict(images=[encode(3, fmt="GIF")]), "PNG or JPEG"),
    "oversized": (dict(images=[encode(4, (65, 64))]), "pixels"),
    "too many images": (dict(images=IMAGES[:1] * 5), "1 to 4 images"),
    "no images": (dict(images=[]), "1 to 4 images"),
    "top_k too large": (dict(images=IMAGES[:1], top_k=NUM_CLASSES + 1), "top_k"),
    "top_k negative": (dict(images=IMAGES[:1], top_k=-1), "top_k"),
    "unknown weighting": (dict(images=IMAGES[:1], weighting=7), "weighting"),
    "unknown source": (dict(images=IMAGES[:1], sources=["a", "zz"]), "unknown source 'zz'"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument(secured, tokens, case) -> None:
    fields, expected = BAD_REQUESTS[case]
    stub = pb_grpc.CompositionServiceStub(grpc.insecure_channel(secured.address))
    metadata = (("authorization", f"Bearer {tokens[1]['ops']}"),)
    request = pb.PredictRequest(**({"sources": ["a"]} | fields))
    code, message = status_of(stub.Predict, request, metadata=metadata, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in message


def test_other_label_space_is_refused(secured, start, pool, tokens) -> None:
    metadata = (("authorization", f"Bearer {tokens[1]['ops']}"),)
    request = pb.PredictRequest(images=IMAGES[:1], sources=["a", "seven"])
    stub = pb_grpc.CompositionServiceStub(grpc.insecure_channel(secured.address))
    code, message = status_of(stub.Predict, request, metadata=metadata, timeout=30)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "label space" in message  # class names fix it: 10
    stub = pb_grpc.CompositionServiceStub(grpc.insecure_channel(start(pool).address))  # no class names
    code, message = status_of(stub.Predict, request, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "label space" in message


def test_message_size_limit(start, pool) -> None:
    server = start(pool, max_message_bytes=1 << 16)
    with client_for(server) as client:
        code, _ = status_of(client.predict, [b"\0" * (1 << 17)])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bad_requests_do_not_affect_concurrent_good_ones(start, pool, model) -> None:
    server = start(pool, max_wait=0.05)
    want = local_probs(model, pool, IMAGES, ["a", "b"])
    outcomes: dict[int, object] = {}

    def call(i: int) -> None:
        images = IMAGES if i % 2 == 0 else [IMAGES[0], b"garbage"]
        with client_for(server) as client:
            try:
                outcomes[i] = dense(client.predict(images, ["a", "b"], top_k=NUM_CLASSES).predictions)
            except grpc.RpcError as err:
                outcomes[i] = err.code()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outcome in outcomes.items():
        if i % 2:
            assert outcome == grpc.StatusCode.INVALID_ARGUMENT
        else:
            torch.testing.assert_close(outcome, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- pool changes


def test_forget_and_new_version_without_restart(start, model, tmp_path) -> None:
    pool = fill_pool(tmp_path / "pool", model, other_label_space=False)
    server = start(pool)
    with client_for(server) as client:
        before = client.predict(IMAGES, ["a", "b"], top_k=NUM_CLASSES)
        assert [(p.source, p.version) for p in before.prompts] == [("a", 1), ("b", 1)]

        pool.add("a", random_prompt(model, seed=42))
        after = client.predict(IMAGES, ["a", "b"], top_k=NUM_CLASSES)
        assert [(p.source, p.version) for p in after.prompts] == [("a", 2), ("b", 1)]
        torch.testing.assert_close(dense(after.predictions), local_probs(model, pool, IMAGES, ["a", "b"]),
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(dense(after.predictions), dense(before.predictions), atol=1e-3)

        pool.remove("b")
        assert "b" not in [p.source for p in client.predict(IMAGES[:1]).prompts]
        assert "b" not in [s.source for s in client.list_sources()]
        code, message = status_of(client.predict, IMAGES[:1], ["a", "b"])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "'b'" in message


def test_unservable_prompt_is_reported(start, model, tmp_path) -> None:
    pool = PromptPool(tmp_path / "pool")
    pool.add("a", random_prompt(model, seed=0))
    foreign = random_prompt(model, seed=1)
    foreign.config = replace(foreign.config, fingerprint="0" * 64)  # trained on another backbone
    pool.add("alien", foreign)
    server = start(pool)
    with client_for(server) as client:
        assert [s.source for s in client.list_sources()] == ["a"]
        code, message = status_of(client.predict, IMAGES[:1], ["alien"])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "backbone" in message


# --------------------------------------------------------------------------- batching, queue, deadlines


def test_concurrent_mixed_selections_share_one_backbone_pass(start, pool, model) -> None:
    server = start(pool, max_wait=0.5, max_batch=64)
    selections = [["a"], ["a", "b"], ["b", "c", "d"], ["a", "b"], ["d"], ["a", "b", "c", "d"]]
    weightings = ["uniform", "confidence"] * 3
    barrier = threading.Barrier(len(selections))
    got: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        with client_for(server) as client:
            barrier.wait()
            got[i] = dense(client.predict(IMAGES, selections[i], NUM_CLASSES, weightings[i]).predictions)

    batches = server.batcher.batches
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(selections))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.batcher.batches - batches < len(selections)  # requests were merged
    with client_for(start(pool)) as client:
        for i, sources in enumerate(selections):  # one by one gives the same answers
            alone = dense(client.predict(IMAGES, sources, NUM_CLASSES, weightings[i]).predictions)
            torch.testing.assert_close(got[i], alone, atol=1e-5, rtol=0)
            weighting = None if weightings[i] == "uniform" else "confidence"
            torch.testing.assert_close(got[i], local_probs(model, pool, IMAGES, sources, weighting),
                                       atol=1e-5, rtol=0)


def test_queue_full_and_deadline_over_grpc(start, pool) -> None:
    server = start(pool, max_queue=1)
    entered, release, processed = threading.Event(), threading.Event(), []
    compose = server.batcher._process

    def blocked(jobs):  # hold the worker so that requests queue up
        entered.set()
        release.wait(30)
        processed.append(len(jobs))
        return compose(jobs)

    server.batcher._process = blocked
    with client_for(server) as client:
        first = threading.Thread(target=client.predict, args=(IMAGES[:1], ["a"]))
        first.start()
        assert entered.wait(10)
        code, _ = status_of(client.predict, IMAGES[:1], ["a"], timeout=0.3)  # queued, then expires
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        queued = threading.Thread(target=client.predict, args=(IMAGES[:1], ["a"]))
        queued.start()  # takes the expired request's slot
        _wait_until(lambda: server.batcher.queued == 1)
        code, message = status_of(client.predict, IMAGES[:1], ["a"])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in message
        release.set()
        first.join()
        queued.join()
    assert processed == [1, 1]  # the expired request never reached the model


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_batcher_merges_within_max_batch_and_isolates_failures() -> None:
    seen: list[list[int]] = []
    gate = threading.Event()

    def process(items: list[int]) -> list[object]:
        gate.wait(10)
        seen.append(items)
        if items == [99]:
            raise RuntimeError("whole batch failed")
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    with DynamicBatcher(process, max_batch=4, max_queue=10, max_wait=0.0) as batcher:
        futures = [batcher.submit(0, size=1)]  # taken alone while the worker is held at the gate
        _wait_until(lambda: batcher.queued == 0)
        futures += [batcher.submit(i, size=2) for i in (1, 2, 3)] + [batcher.submit(-4, size=1)]
        futures.append(batcher.submit(5, size=9))  # larger than max_batch: runs alone
        cancelled = batcher.submit(6)
        assert cancelled.cancel()
        expired = batcher.submit(7, deadline=time.monotonic() - 1)
        gate.set()
        assert [f.result(10) for f in futures[:4]] == [0, 10, 20, 30]
        with pytest.raises(ValueError, match="bad -4"):
            futures[4].result(10)
        assert futures[5].result(10) == 50
        with pytest.raises(DeadlineExceededError):
            expired.result(10)
        assert batcher.submit(99).exception(10).args == ("whole batch failed",)
        assert batcher.submit(8).result(10) == 80  # the worker survived
    assert seen == [[0], [1, 2], [3, -4], [5], [99], [8]]
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(1)


def test_batcher_waits_for_a_reserved_slots_job_and_for_nothing_else() -> None:
    """A reserved slot's job joins the batch the worker is forming (up to ``reserved_wait``); a
    slot released without a job, or no slot at all, makes the worker go on at once."""
    seen: list[list[int]] = []
    with DynamicBatcher(lambda items: (seen.append(items), items)[1], max_batch=4, max_queue=10, max_wait=0.0,
                        reserved_wait=30.0) as batcher:
        slot = batcher.reserve()
        first = batcher.submit(1)
        time.sleep(0.2)  # the worker holds job 1 and waits for the slot's job
        assert seen == []
        second = batcher.submit(2, reservation=slot)
        assert [first.result(10), second.result(10)] == [1, 2]
        slot = batcher.reserve()
        third = batcher.submit(3)
        time.sleep(0.2)
        slot.release()
        assert third.result(10) == 3  # well before reserved_wait
        assert batcher.submit(4).result(10) == 4
    assert seen == [[1, 2], [3], [4]]
    with pytest.raises(ValueError, match="reserved_wait"):
        DynamicBatcher(lambda items: items, max_batch=1, max_queue=1, reserved_wait=-1.0)


def test_batcher_queue_bound() -> None:
    gate = threading.Event()
    with DynamicBatcher(lambda items: (gate.wait(10), items)[1], max_batch=1, max_queue=2) as batcher:
        running = batcher.submit(0)
        _wait_until(lambda: batcher.queued == 0)
        queued = [batcher.submit(1), batcher.submit(2)]
        with pytest.raises(QueueFullError, match="busy"):
            batcher.submit(3)
        assert queued[0].cancel()  # a cancelled job frees its slot
        queued.append(batcher.submit(4))
        gate.set()
        assert [running.result(10), queued[1].result(10), queued[2].result(10)] == [0, 2, 4]


# --------------------------------------------------------------------------- health, reflection, TLS, CLI


def test_health_and_reflection(start, pool) -> None:
    server = start(pool)
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert.pem, key.pem)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:  # fall back on the openssl command line
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def test_tls_round_trip(start, pool, model, tokens, tmp_path) -> None:
    cert, key = self_signed_cert(tmp_path)
    server = start(pool, tls_cert=cert, tls_key=key, tokens=tokens[0])
    with CompositionClient(server.address, tokens[1]["alice"], root_certificates=cert, timeout=30) as client:
        result = client.predict(IMAGES, ["a", "b"], top_k=NUM_CLASSES)
        assert [s.source for s in client.list_sources()] == ["a", "b"]
    torch.testing.assert_close(dense(result.predictions), local_probs(model, pool, IMAGES, ["a", "b"]),
                               atol=1e-5, rtol=0)
    with CompositionClient(server.address, tokens[1]["alice"], timeout=5) as plaintext:
        code, _ = status_of(plaintext.list_sources)
    assert code == grpc.StatusCode.UNAVAILABLE
    with CompositionClient(server.address, None, root_certificates=cert.read_bytes(), timeout=30) as anonymous:
        code, _ = status_of(anonymous.list_sources)
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_cli_add_token_and_query(start, pool, tmp_path, capsys, monkeypatch) -> None:
    tokens_file = tmp_path / "tokens.json"
    assert cli_main(["serve", "--tokens", str(tokens_file), "--add-token", "dana", "--sources", "a, b"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("alc_") and token not in tokens_file.read_text()
    server = start(pool, tokens=tokens_file, class_names=tuple(f"class{i}" for i in range(NUM_CLASSES)))
    images = [tmp_path / "one.png", tmp_path / "two.jpg"]
    images[0].write_bytes(IMAGES[0])
    images[1].write_bytes(IMAGES[2])
    monkeypatch.setenv("ALACARTE_TOKEN", token)
    assert cli_main(["query", "--server", server.address, "--sources", "a", "--top-k", "2", *map(str, images)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["IMAGE", "RANK", "CLASS", "NAME", "PROB"]
    assert len(out) == 1 + 2 * 2 + 1 and "class" in out[1] and out[-1] == "composed: a v1"
    assert cli_main(["query", "--server", server.address, "--list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["SOURCE", "a", "b"]
    assert cli_main(["query", "--server", server.address, "--sources", "c", str(images[0])]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert cli_main(["serve", "--tokens", str(tokens_file), "--revoke-token", "dana"]) == 0
    assert cli_main(["query", "--server", server.address, "--list"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


@pytest.mark.slow
def test_alacarte_serve_command(model, tmp_path) -> None:
    """The real ``alacarte serve`` process: starts, answers, picks up a new source, stops on SIGTERM."""
    pool = fill_pool(tmp_path / "pool", model, other_label_space=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "serve", "--pool", str(pool.root), "--backbone", "vit_tiny_patch16_224",
         "--random-init", "--img-size", str(IMG), "--device", "cpu", "--port", "0", "--classes", "fashion_mnist"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read() if proc.poll() is not None else line
        address = line.split("listening on ")[1].split()[0]
        with CompositionClient(address, timeout=30) as client:
            result = client.predict(IMAGES, ["a", "c"], top_k=NUM_CLASSES)
            assert result.predictions[0][0].name in ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
            pool.add("e", random_prompt(model, seed=7))
            assert "e" in [s.source for s in client.list_sources()]
        torch.testing.assert_close(dense(result.predictions), local_probs(model, pool, IMAGES, ["a", "c"]),
                                   atol=1e-5, rtol=0)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


# --------------------------------------------------------------------------- hardening (issue 14)


def test_predict_without_a_deadline(secured, pool, model, tokens) -> None:
    """A raw stub call with no timeout: grpc reports a huge time_remaining, which must mean 'none'."""
    stub = pb_grpc.CompositionServiceStub(grpc.insecure_channel(secured.address))
    reply = stub.Predict(pb.PredictRequest(images=IMAGES, sources=["a", "b"], top_k=NUM_CLASSES),
                         metadata=(("authorization", f"Bearer {tokens[1]['ops']}"),))
    got = dense([p.labels for p in reply.predictions])
    torch.testing.assert_close(got, local_probs(model, pool, IMAGES, ["a", "b"]), atol=1e-5, rtol=0)


def test_a_queue_slot_is_reserved_before_any_image_is_decoded(start, pool, monkeypatch) -> None:
    server = start(pool, max_queue=1)
    entered, release = threading.Event(), threading.Event()
    compose = server.batcher._process
    server.batcher._process = lambda jobs: (entered.set(), release.wait(30), compose(jobs))[2]
    decoded = []
    import server.service as service

    decode = service._decode_one
    monkeypatch.setattr(service, "_decode_one", lambda *a: decoded.append(a[0]) or decode(*a))
    with client_for(server) as client:
        running = threading.Thread(target=client.predict, args=(IMAGES[:1], ["a"]))
        running.start()
        assert entered.wait(10)
        queued = threading.Thread(target=client.predict, args=(IMAGES[:1], ["a"]))
        queued.start()
        _wait_until(lambda: server.batcher.queued == 1)
        decoded.clear()
        code, message = status_of(client.predict, [b"garbage", *IMAGES[:1]], ["a"])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in message  # not INVALID_ARGUMENT
        assert decoded == []
        release.set()
        running.join()
        queued.join()


def test_total_pixels_are_bounded_before_decoding(start, pool, monkeypatch) -> None:
    import server.service as service

    server = start(pool, max_image_pixels=64 * 64, max_request_pixels=2 * 48 * 40)
    monkeypatch.setattr(service, "_decode_one", lambda *a: pytest.fail("an image was decoded"))
    with client_for(server) as client:
        code, message = status_of(client.predict, [encode(5, (48, 40))] * 3, ["a"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "5760 pixels in all" in message


def test_a_call_without_a_valid_token_is_refused_unread(secured, tokens) -> None:
    """Bytes that are no PredictRequest at all: refused UNAUTHENTICATED, so never parsed."""
    channel = grpc.insecure_channel(secured.address)
    raw = channel.unary_unary(f"/{SERVICE_NAME}/Predict", request_serializer=None, response_deserializer=None)
    garbage = b"\xff" * 64
    for metadata in [(), (("authorization", "Bearer alc_0123456789abcdef_x"),)]:
        code, message = status_of(raw, garbage, metadata=metadata, timeout=30)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in message
    code, _ = status_of(raw, garbage, metadata=(("authorization", f"Bearer {tokens[1]['ops']}"),), timeout=30)
    assert code != grpc.StatusCode.UNAUTHENTICATED  # with a token the request is parsed (and is garbage)


def test_errors_carry_no_server_paths(start, model, tmp_path) -> None:
    pool = PromptPool(tmp_path / "pool")
    pool.add("a", random_prompt(model, seed=0))
    pool.add("broken", random_prompt(model, seed=1))
    pool.info("broken").path.write_bytes(random_prompt(model, seed=2).to_bytes())  # damaged behind its back
    server = start(pool)
    with client_for(server) as client:
        code, message = status_of(client.predict, IMAGES[:1], ["broken"])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "damaged" in message
        assert str(tmp_path) not in message and "/" not in message

        def fail(jobs):
            raise OSError(f"cannot read {tmp_path / 'secret'}")

        server.batcher._process = fail
        code, message = status_of(client.predict, IMAGES[:1], ["a"])
    assert code == grpc.StatusCode.INTERNAL and str(tmp_path) not in message and "OSError" in message


@pytest.mark.parametrize("created_at", ["1e12", "'Inf'", "-1e300"])
def test_list_sources_survives_an_odd_stored_created_at(start, model, tmp_path, created_at) -> None:
    pool = PromptPool(tmp_path / "pool")
    pool.add("a", random_prompt(model, seed=0))
    pool.add("b", random_prompt(model, seed=1))
    with sqlite3.connect(pool.index_path) as conn:  # written by an older build, or by hand
        conn.execute(f"UPDATE prompts SET created_at = {created_at} WHERE source = 'a'")
    with client_for(start(pool)) as client:
        assert [s.source for s in client.list_sources()] == ["a", "b"]


def test_serves_a_read_only_pool_without_changing_it(start, model, tmp_path) -> None:
    writer = fill_pool(tmp_path / "pool", model, other_label_space=False)
    orphan = writer.root / "prompts" / "a" / "v7.safetensors"
    orphan.write_bytes(b"left by an interrupted write")
    before = pool_bytes(writer.root)
    server = start(PromptPool(writer.root, read_only=True))
    with client_for(server) as client:
        assert [p.source for p in client.predict(IMAGES[:1], ["a", "b"]).prompts] == ["a", "b"]
    assert pool_bytes(writer.root) == before and orphan.exists()


def pool_bytes(root: Path) -> dict[Path, bytes]:
    """Every file of a pool folder (but SQLite's -wal/-shm side files) with its bytes."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def test_prompts_over_the_shape_limits_are_unservable(start, model, tmp_path) -> None:
    pool = PromptPool(tmp_path / "pool")
    pool.add("a", random_prompt(model, seed=0))
    pool.add("huge", random_prompt(model, seed=1, n_prompt=MAX_N_PROMPT + 1))
    with client_for(start(pool)) as client:
        assert [s.source for s in client.list_sources()] == ["a"]
        assert [p.source for p in client.predict(IMAGES[:1]).prompts] == ["a"]  # the default selection works
        code, message = status_of(client.predict, IMAGES[:1], ["huge"])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "at most 16" in message


# --------------------------------------------------------------------------- density weighting


@pytest.fixture(scope="module")
def density_pool(model, tmp_path_factory) -> PromptPool:
    """Sources ``x`` (classes 0-4) and ``y`` (classes 5-9), each with a density fitted on its own images."""
    pool = PromptPool(tmp_path_factory.mktemp("density"))
    gen = torch.Generator().manual_seed(3)
    for i, (source, classes) in enumerate((("x", range(5)), ("y", range(5, 10)))):
        images = torch.randn(40, 3, IMG, IMG, generator=gen) + 2.0 * i
        labels = torch.tensor([classes[j % 5] for j in range(40)])
        with torch.no_grad():
            pooled = model.pooled(model.backbone_forward(images)[0])
        prompt = random_prompt(model, seed=20 + i, labels=classes)
        prompt.density = SourceDensity.fit(pooled, labels, rank=4)
        pool.add(source, prompt)
    pool.add("plain", random_prompt(model, seed=30))
    return pool


def direct_density_probs(model: APTViT, pool: PromptPool, images: list[bytes], sources: list[str]) -> torch.Tensor:
    """``compose_probs(logits, composition_weights(DENSITY, ...))`` computed directly."""
    transform = backbone_transform(model.backbone)
    x = torch.stack([transform(Image.open(io.BytesIO(b))) for b in images])
    prompts = [pool.get(s, model=model) for s in sources]
    with torch.no_grad():
        logits, pooled = model.forward_with_pooled(x, prompts)
        return compose_probs(logits, composition_weights(Weighting.DENSITY, logits, prompts, pooled))


def test_density_weighting_equals_direct_composition(start, density_pool, model) -> None:
    want = direct_density_probs(model, density_pool, IMAGES, ["x", "y"])
    uniform = local_probs(model, density_pool, IMAGES, ["x", "y"], "uniform")
    assert not torch.allclose(want, uniform, atol=1e-3)  # the weighting matters here
    with client_for(start(density_pool)) as client:
        for weighting in ("density", "default"):  # unset = density: every selected prompt carries one
            got = dense(client.predict(IMAGES, ["x", "y"], NUM_CLASSES, weighting).predictions)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        got = dense(client.predict(IMAGES, ["x", "y"], NUM_CLASSES, "uniform").predictions)
        torch.testing.assert_close(got, uniform, atol=1e-5, rtol=0)
        default = dense(client.predict(IMAGES, ["x", "plain"], NUM_CLASSES).predictions)  # "plain" has none
        torch.testing.assert_close(default, local_probs(model, density_pool, IMAGES, ["plain", "x"], "uniform"),
                                   atol=1e-5, rtol=0)
        code, message = status_of(client.predict, IMAGES, ["x", "plain"], NUM_CLASSES, "density")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "plain" in message


def test_a_repeated_selection_is_factorised_once(start, density_pool, model, monkeypatch) -> None:
    """The service keeps a selection's factorised densities while the pool is unchanged: the
    same answer as a fresh composition, one factorisation for three requests."""
    built = []
    real = service_module.PooledDensities
    monkeypatch.setattr(service_module, "PooledDensities", lambda densities: built.append(1) or real(densities))
    want = direct_density_probs(model, density_pool, IMAGES, ["x", "y"])
    with client_for(start(density_pool)) as client:
        for _ in range(3):
            got = dense(client.predict(IMAGES, ["x", "y"], NUM_CLASSES, "density").predictions)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(built) == 1


def test_cli_query_with_density_weighting(start, density_pool, tmp_path, capsys) -> None:
    server = start(density_pool)
    image = tmp_path / "one.png"
    image.write_bytes(IMAGES[0])
    assert cli_main(["query", "--server", server.address, "--sources", "x,y", "--weighting", "density",
                     "--top-k", "1", str(image)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "composed: x v1, y v1"
