"""Every byte from a node is untrusted: malformed replies through the real round loop, source
binding, prompt shape limits, parent-hash staleness and FedAvg reply checks (issue 14).

Nodes are Flower message handlers behind the fake Grid of ``test_deployment``; training is
stubbed (the reply the ClientApp would send), then corrupted per case.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from test_deployment import FakeGrid

from common.config import AppConfig
from common.density import SourceDensity
from common.model import APTViT
from common.prompt import Prompt
from common.records import ReplyError, prompt_from_records, prompt_records
from server.admission import (
    COMPOSE_BUDGET_BYTES,
    MAX_N_MEMORY,
    MAX_N_PROMPT,
    PromptLimitError,
    check_evaluation,
    check_prompt,
    compose_scores_bytes,
)
from server.bindings import NodeSourcesError, load_node_sources
from server.fedavg import CheckedFedAvg, run_fedavg
from server.federation import AlaCarteFederation
from server.pool import PromptPool, StaleParentError
from server.server_app import federated_evaluate

SOURCES = {10: "src-a", 11: "src-b", 12: "src-c"}
NUM_CLASSES = 10
pytestmark = pytest.mark.usefixtures("task_identity")
RUN_CONFIG = {"backbone": "vit_tiny_patch16_224", "pretrained": False, "img-size": 32, "test-examples": 0,
              "federated-eval": False, "reply-timeout": 30.0}


@pytest.fixture(scope="module")
def run_config() -> dict:
    return RUN_CONFIG


def good_reply(msg: Message, model: APTViT, source: str) -> Message:
    """What ``client_app.train`` sends: the sent prompt (or a fresh one), metrics, the parent echo."""
    if "prompt" in msg.content:
        prompt = prompt_from_records(msg.content, model)
    else:
        prompt = Prompt.init(model, NUM_CLASSES, labels=[0, 1, 2], source=source)
    metrics = MetricRecord({"num-examples": 30, "train-loss": 1.0, "train-accuracy": 0.5, "seconds": 0.1,
                            "parent-version": int(msg.content["config"]["parent-version"])})
    parent = ConfigRecord({"sha256": str(msg.content["config"].get("parent-sha256", ""))})
    return Message(RecordDict({**prompt_records(prompt), "metrics": metrics, "parent": parent}), reply_to=msg)


Corrupt = Callable[[Message, APTViT, str], Message]


def node(model: APTViT, source: str, corrupt: Corrupt | None = None) -> Callable[[Message], Message]:
    """A node that identifies as ``source`` and replies to training with ``corrupt`` (or a good reply)."""

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            return Message(RecordDict({"node": ConfigRecord({"source": source, "labels": "[0, 1, 2]"})}),
                           reply_to=msg)
        return (corrupt or good_reply)(msg, model, source)

    return handle


# ------------------------------------------------------------------ reply corruptions


def _with(reply: Message, **records) -> Message:
    """``reply`` with some records replaced (``None`` removes one)."""
    content = {k: v for k, v in reply.content.items() if records.get(k, v) is not None}
    content |= {k: v for k, v in records.items() if v is not None}
    return Message(RecordDict(content), reply_to=_request_of(reply))


def _request_of(reply: Message) -> Message:
    request = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return request


def _arrays(reply: Message, **arrays: Array) -> ArrayRecord:
    return ArrayRecord({**dict(reply.content["arrays"].items()), **arrays})


def _meta(reply: Message, **fields) -> ConfigRecord:
    return ConfigRecord({**dict(reply.content["prompt"].items()), **fields})


def _metrics(reply: Message, **values) -> MetricRecord:
    return MetricRecord({**dict(reply.content["metrics"].items()), **values})


def _npy_claiming(shape: tuple[int, ...], payload: bytes) -> bytes:
    """npy bytes whose header claims ``shape`` but that carry only ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def _tokens(reply: Message) -> np.ndarray:
    return reply.content["arrays"]["tokens"].numpy()


def _tokens_with(value: float) -> Corrupt:
    def corrupt(msg: Message, model: APTViT, source: str) -> Message:
        reply = good_reply(msg, model, source)
        tokens = _tokens(reply).copy()
        tokens[0, 0] = value
        return _with(reply, arrays=_arrays(reply, tokens=Array(tokens)))
    return corrupt


def _edit(edit: Callable[[Message], dict]) -> Corrupt:
    """A corruption of the good reply: ``edit(reply)`` gives the records to replace."""
    return lambda msg, model, source: _with(good_reply(msg, model, source), **edit(good_reply(msg, model, source)))


def _big_prompt(num_classes: int = NUM_CLASSES, n_prompt: int = 1, n_memory: int = 4) -> Corrupt:
    """A well-formed prompt of another size than the server admits."""
    def corrupt(msg: Message, model: APTViT, source: str) -> Message:
        prompt = Prompt.init(model, num_classes, labels=[0, 1], n_prompt=n_prompt, n_memory=n_memory, source=source)
        return _with(good_reply(msg, model, source), **prompt_records(prompt))
    return corrupt


def _density(change: Callable[[dict], None]) -> Corrupt:
    """The good reply's prompt carrying a density of its own classes, whose arrays ``change`` corrupts."""
    def corrupt(msg: Message, model: APTViT, source: str) -> Message:
        reply = good_reply(msg, model, source)
        prompt = prompt_from_records(reply.content, model)
        labels = torch.tensor(prompt.config.labels).repeat(5)
        features = torch.randn(len(labels), model.embed_dim, generator=torch.Generator().manual_seed(0))
        prompt.density = SourceDensity.fit(features + labels[:, None], labels, rank=3)
        arrays = prompt.arrays()
        change(arrays)
        return _with(reply, arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    return corrupt


def _error_reply(msg: Message, model: APTViT, source: str) -> Message:
    return Message(Error(code=0, reason="client crashed"), reply_to=msg)


def _deep_labels(reply: Message) -> dict:
    return {"prompt": _meta(reply, labels="[" * 200_000)}


MALFORMED: dict[str, tuple[Corrupt, str]] = {
    "array stype not numpy": (_edit(lambda r: {"arrays": _arrays(r, tokens=Array(
        dtype="float32", shape=_tokens(r).shape, stype="torch", data=_tokens(r).tobytes()))}), "not numpy-serialised"),
    "npy header claims 2**40 values": (_edit(lambda r: {"arrays": _arrays(r, tokens=Array(
        dtype="float32", shape=_tokens(r).shape, stype="numpy.ndarray",
        data=_npy_claiming((2**40,), _tokens(r).tobytes())))}), "disagrees"),
    "declared shape oversized": (_edit(lambda r: {"arrays": _arrays(r, tokens=Array(
        dtype="float32", shape=(1 << 20, 1 << 10), stype="numpy.ndarray", data=b"\0" * 144))}), "oversized"),
    "wrong dtype float64": (_edit(lambda r: {"arrays": _arrays(r, tokens=Array(_tokens(r).astype(np.float64)))}),
                            "dtype 'float64'"),
    "wrong dtype int64 tensor": (_edit(lambda r: {"arrays": _arrays(r, tokens=Array(_tokens(r).astype(np.int64)))}),
                                 "float32"),
    "NaN tensor": (_tokens_with(math.nan), "NaN"),
    "Inf tensor": (_tokens_with(math.inf), "NaN or Inf"),
    "unknown array key": (_edit(lambda r: {"arrays": _arrays(r, extra=Array(np.zeros(3, np.float32)))}), "extra"),
    "unknown record": (_edit(lambda r: {"features": ConfigRecord({"x": "1"})}), "features"),
    "missing parent echo": (_edit(lambda r: {"parent": None}), "parent"),
    "malformed parent echo": (_edit(lambda r: {"parent": ConfigRecord({"sha256": "zz"})}), "hex SHA-256"),
    "unknown metric": (_edit(lambda r: {"metrics": _metrics(r, **{"gradient-norm": 1.0})}), "gradient-norm"),
    "list metric": (_edit(lambda r: {"metrics": _metrics(r, **{"train-loss": [0.1, 0.2]})}), "scalars"),
    "parent-version inf": (_edit(lambda r: {"metrics": _metrics(r, **{"parent-version": math.inf})}), "finite"),
    "num-examples 2**64": (_edit(lambda r: {"metrics": _metrics(r, **{"num-examples": 2**64})}), "outside"),
    "labels nested 200000 deep": (_edit(_deep_labels), "nested"),
    "metadata num_examples 2**64": (_edit(lambda r: {"prompt": _meta(r, num_examples=str(2**64))}), "num_examples"),
    "created_at nan": (_edit(lambda r: {"prompt": _meta(r, created_at="nan")}), "created_at"),
    "created_at inf": (_edit(lambda r: {"prompt": _meta(r, created_at="inf")}), "created_at"),
    "created_at 1e12": (_edit(lambda r: {"prompt": _meta(r, created_at="1e12")}), "created_at"),
    "metadata int type": (_edit(lambda r: {"prompt": _meta(r, n_prompt=1)}), "must be a string"),
    "metadata bytes type": (_edit(lambda r: {"prompt": _meta(r, source=b"src-b")}), "must be a string"),
    "n_prompt over the limit": (_big_prompt(n_prompt=MAX_N_PROMPT + 1), "limit of 16"),
    "n_memory over the limit": (_big_prompt(n_memory=MAX_N_MEMORY + 1), "limit of 64"),
    "other label space": (_big_prompt(num_classes=7), "label space"),
    "claims another source": (_edit(lambda r: {"prompt": _meta(r, source="src-a")}), "claims source"),
    "client error": (_error_reply, "client crashed"),
    "density NaN mean": (_density(lambda a: a["density.mean"].fill(np.nan)), "NaN"),
    "density negative variance": (_density(lambda a: a.update({"density.variances": -a["density.variances"]})),
                                  "positive"),
    "density rank over the limit": (_density(lambda a: a.update({"density.basis": np.zeros(
        (len(a["density.classes"]), 40, a["density.mean"].shape[1]), np.float32)})), "rank"),
    "density of foreign classes": (_density(lambda a: a.update({"density.classes": a["density.classes"] + 5})),
                                   "outside the prompt's label set"),
    "density array missing": (_density(lambda a: a.pop("density.residual")), "density"),
}


def source_files(pool: PromptPool, source: str) -> dict[str, bytes]:
    folder = pool.root / "prompts" / source
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_reply_is_rejected_alone(case, app_config, app_model, tmp_path, flwr_log):
    corrupt, reason = MALFORMED[case]
    pool = PromptPool(tmp_path / "pool")
    pool.add("src-b", Prompt.init(app_model, NUM_CLASSES, labels=[3, 4], source="src-b"))
    before = (source_files(pool, "src-b"), pool.history("src-b"))
    grid = FakeGrid({10: node(app_model, "src-a"), 11: node(app_model, "src-b", corrupt), 12: node(app_model, "src-c")})
    two_rounds = AppConfig.from_run_config(RUN_CONFIG | {"num-server-rounds": 2})

    assert AlaCarteFederation(pool, app_model, two_rounds).start(grid) == SOURCES  # the run finished both rounds
    assert {s: pool.info(s).version for s in ("src-a", "src-c")} == {"src-a": 2, "src-c": 2}
    assert (source_files(pool, "src-b"), pool.history("src-b")) == before  # byte-identical
    rejected = [line for line in flwr_log.records if "node 11 (source src-b) not stored" in line]
    assert len(rejected) == 2 and reason in rejected[0], rejected


# ------------------------------------------------------------------ source binding


def test_nodes_are_trained_only_as_their_bound_source(app_config, app_model, tmp_path, flwr_log):
    bindings = tmp_path / "node-sources.json"
    bindings.write_text(json.dumps({"10": "src-a", "11": "src-b"}))
    grid = FakeGrid({10: node(app_model, "src-a"), 11: node(app_model, "src-a"), 12: node(app_model, "src-c")})
    bound = AppConfig.from_run_config(RUN_CONFIG | {"node-sources": str(bindings)})
    pool = PromptPool(tmp_path / "pool")

    assert AlaCarteFederation(pool, app_model, bound).start(grid) == {10: "src-a"}
    assert pool.sources() == ["src-a"] and pool.info("src-a").version == 1
    log = flwr_log.text()
    assert "node 11 claims source 'src-a' but is bound to 'src-b'" in log
    assert "node 12 (claiming source 'src-c') is bound to no source" in log
    assert "round 1/1: training 1 source(s) (src-a);" in log


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "unreadable"), ('["src-a"]', "JSON object"), ('{"x": "src-a"}', "numeric node id"),
    ('{"1": ".hidden"}', "invalid source id")])
def test_bad_node_sources_file_fails_before_any_round(text, message, tmp_path):
    path = tmp_path / "node-sources.json"
    path.write_text(text)
    with pytest.raises(NodeSourcesError, match=message):
        load_node_sources(path)
    with pytest.raises(NodeSourcesError, match="unreadable"):
        load_node_sources(tmp_path / "missing.json")


# ------------------------------------------------------------------ shape limits


def test_worst_case_prompt_composes_a_32_image_batch_within_the_budget(app_model):
    # DINOv2 ViT-S/14 at 224 px: 257 tokens, 6 heads; the bound holds for every admitted prompt
    worst = compose_scores_bytes(batch=32, heads=6, tokens=257, n_prompt=MAX_N_PROMPT, n_memory=MAX_N_MEMORY)
    assert worst <= COMPOSE_BUDGET_BYTES
    # the issue's prompt (n_prompt ~ 5450, 8 MiB) needed ~23 GB for the prompt-to-prompt scores alone
    assert compose_scores_bytes(32, 6, 257, 5450, 0) > 300 * COMPOSE_BUDGET_BYTES
    worst = Prompt.init(app_model, NUM_CLASSES, n_prompt=MAX_N_PROMPT, n_memory=MAX_N_MEMORY)
    prompt = check_prompt(worst, NUM_CLASSES)
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = app_model.compose(images, [prompt, prompt])
    assert probs.shape == (32, NUM_CLASSES) and torch.isfinite(probs).all()
    with pytest.raises(PromptLimitError):
        check_prompt(Prompt.init(app_model, 7), NUM_CLASSES)


# ------------------------------------------------------------------ staleness by parent hash


def test_reply_trained_from_a_forgotten_prompt_never_returns(app_config, app_model, tmp_path):
    pool = PromptPool(tmp_path / "pool")
    pool.add("src-a", Prompt.init(app_model, NUM_CLASSES, seed=1, source="src-a"))
    sent = Message(RecordDict({**prompt_records(pool.get("src-a", model=app_model)), "config": ConfigRecord(
        {"parent-version": 1, "parent-sha256": pool.info("src-a").sha256})}), dst_node_id=10,
        message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = "m1"
    late = good_reply(sent, app_model, "src-a")  # trained from v1 ...
    pool.remove("src-a")  # ... which is forgotten; the source is re-added, again at v1
    pool.add("src-a", Prompt.init(app_model, NUM_CLASSES, seed=2, source="src-a"))
    with pytest.raises(StaleParentError, match="forgotten"):
        AlaCarteFederation(pool, app_model, app_config).accept_reply(late, "src-a")
    assert [e.version for e in pool.history("src-a")] == [1]


# ------------------------------------------------------------------ FedAvg


def fedavg_train_reply(msg: Message, model: APTViT, corrupt: bool = False) -> Message:
    """A FedAvg client's train reply: the shared prompt it was sent plus 1 (NaN in one token if ``corrupt``)."""
    arrays = {k: v.numpy() + 1.0 for k, v in msg.content["arrays"].items()}
    if corrupt:
        arrays["tokens"][0, 0] = math.nan
    shape = {"n_prompt": arrays["tokens"].shape[0], "n_memory": arrays["memory"].shape[1]}
    metadata = ConfigRecord(Prompt.init(model, NUM_CLASSES, source="fedavg", **shape).config.to_metadata())
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "train-accuracy": 0.5, "seconds": 0.1,
                            "parent-version": 0})
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "prompt": metadata, "metrics": metrics,
                               "parent": ConfigRecord({"sha256": ""})}), reply_to=msg)


def test_fedavg_rejects_a_nan_reply_per_node(app_model, tmp_path, flwr_log):
    """Without validation splits nothing is evaluated and the last round's average is stored."""
    fedavg = AppConfig.from_run_config(RUN_CONFIG | {"mode": "fedavg", "num-server-rounds": 2, "val-fraction": 0.0})
    grid = FakeGrid({nid: lambda msg, bad=nid == 11: fedavg_train_reply(msg, app_model, bad) for nid in (10, 11, 12)})
    pool = PromptPool(tmp_path / "pool")
    assert run_fedavg(grid, pool, app_model, fedavg, NUM_CLASSES) == 1
    shared = pool.get("fedavg", model=app_model)
    initial = Prompt.init(app_model, NUM_CLASSES, source="fedavg", n_prompt=fedavg.n_prompt, n_memory=fedavg.n_memory)
    np.testing.assert_allclose(shared.arrays()["tokens"], initial.arrays()["tokens"] + 2.0, atol=1e-5)
    assert shared.config.num_examples == 20  # the two admitted nodes' images, not the rejected one's
    rejected = [line for line in flwr_log.records if "reply of node 11 rejected" in line]
    assert len(rejected) == 2 and "NaN" in rejected[0]
    assert {m.metadata.message_type for m in grid.sent} == {MessageType.TRAIN}
    assert pool.info("fedavg").metrics == {"rounds": 2, "kept-round": 2}
    assert not any("cannot be kept" in line for line in flwr_log.records)  # nothing evaluated: nothing to warn of


def fedavg_node(model: APTViT, initial: Prompt,
                evaluate_reply: Callable[[Message, int], Message]) -> Callable[[Message], Message]:
    """A FedAvg node: its train replies add 1 to the shared prompt (:func:`fedavg_train_reply`);
    its evaluate reply is ``evaluate_reply(msg, shift)``, ``shift`` the sent prompt's distance
    from ``initial`` (round r's shared prompt is ``initial`` + r)."""
    def handle(msg: Message) -> Message:
        if msg.metadata.message_type != MessageType.EVALUATE:
            return fedavg_train_reply(msg, model)
        shift = float(msg.content["arrays"]["tokens"].numpy()[0, 0] - initial.arrays()["tokens"][0, 0])
        return evaluate_reply(msg, round(shift))
    return handle


def validation_reply(msg: Message, metrics: dict) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def test_fedavg_keeps_the_round_with_the_lowest_validation_loss(app_model, tmp_path, flwr_log):
    """Every round adds 1 to the shared prompt; the nodes' validation loss is |shift - 2|, so
    round 2 of 4 is stored. Node 12's evaluate replies are malformed: logged and left out."""
    fedavg = AppConfig.from_run_config(RUN_CONFIG | {"mode": "fedavg", "num-server-rounds": 4})
    initial = Prompt.init(app_model, NUM_CLASSES, source="fedavg", n_prompt=fedavg.n_prompt, n_memory=fedavg.n_memory)

    def node(loss_of: Callable[[int], object]) -> Callable[[Message], Message]:
        return fedavg_node(app_model, initial, lambda msg, shift: validation_reply(
            msg, {"num-examples": 5, "accuracy": 0.5, "loss": loss_of(shift)}))

    grid = FakeGrid({10: node(lambda shift: abs(shift - 2.0)), 11: node(lambda shift: abs(shift - 2.0) + 0.5),
                     12: node(lambda shift: -1.0)})
    pool = PromptPool(tmp_path / "pool")
    run_fedavg(grid, pool, app_model, fedavg, NUM_CLASSES)
    kept = pool.get("fedavg", model=app_model)
    np.testing.assert_allclose(kept.arrays()["tokens"], initial.arrays()["tokens"] + 2.0, atol=1e-5)
    assert kept.config.num_examples == 30  # round 2's three training replies
    assert pool.info("fedavg").metrics == {"rounds": 4, "kept-round": 2}
    assert sum("node 12 sent an unusable evaluate reply" in line for line in flwr_log.records) == 4
    assert any("FedAvg round 2: validation loss 0.2500" in line for line in flwr_log.records)


def test_fedavg_keeps_the_earlier_of_rounds_that_tie_to_rounding(app_model, tmp_path, flwr_log):
    """Validation losses 1.0, 1.0 - 1e-7 (an average of unchanged prompts differs only by
    rounding: a tie), 0.8, 0.8 - 1e-7: round 3 is kept. Node 11 has no validation images (left
    out, no warning); node 12's evaluate fails, and the log shows its error's last line."""
    fedavg = AppConfig.from_run_config(RUN_CONFIG | {"mode": "fedavg", "num-server-rounds": 4})
    initial = Prompt.init(app_model, NUM_CLASSES, source="fedavg", n_prompt=fedavg.n_prompt, n_memory=fedavg.n_memory)
    losses = {1: 1.0, 2: 1.0 - 1e-7, 3: 0.8, 4: 0.8 - 1e-7}
    traceback = 'Traceback (most recent call last):\n  File "client_app.py", line 9\nValueError: disk on fire\n'
    grid = FakeGrid({
        10: fedavg_node(app_model, initial, lambda msg, shift: validation_reply(
            msg, {"num-examples": 5, "accuracy": 0.5, "loss": losses[shift]})),
        11: fedavg_node(app_model, initial, lambda msg, shift: validation_reply(msg, {"num-examples": 0})),
        12: fedavg_node(app_model, initial, lambda msg, shift: Message(Error(code=0, reason=traceback), reply_to=msg)),
    })
    pool = PromptPool(tmp_path / "pool")
    run_fedavg(grid, pool, app_model, fedavg, NUM_CLASSES)
    assert pool.info("fedavg").metrics == {"rounds": 4, "kept-round": 3}
    assert any("FedAvg round 3: validation loss 0.8000, accuracy 0.500 (5 images, 1 nodes)" in line
               for line in flwr_log.records)
    assert sum("node 11 has no validation images" in line for line in flwr_log.records) == 4
    failed = [line for line in flwr_log.records if "node 12 failed to evaluate" in line]
    assert len(failed) == 4 and all(line.endswith("error 0: ValueError: disk on fire") for line in failed)


@pytest.mark.parametrize(("patience", "rounds", "kept"), [(0, 5, 4), (2, 3, 1), (3, 5, 4)])
def test_fedavg_patience_stops_after_rounds_without_a_lower_validation_loss(patience, rounds, kept, app_model,
                                                                           tmp_path, flwr_log):
    """Validation losses 0.5, 0.6, 0.7, 0.1, 0.2 over rounds 1..5: patience 2 stops after round
    3 (two rounds above round 1's) and keeps round 1; patience 3 reaches round 4's lower loss and
    runs out of rounds; 0 runs them all. Only the rounds run are trained and recorded."""
    fedavg = AppConfig.from_run_config(RUN_CONFIG | {"mode": "fedavg", "num-server-rounds": 5,
                                                     "fedavg-patience": patience})
    initial = Prompt.init(app_model, NUM_CLASSES, source="fedavg", n_prompt=fedavg.n_prompt, n_memory=fedavg.n_memory)
    losses = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.1, 5: 0.2}
    grid = FakeGrid({nid: fedavg_node(app_model, initial, lambda msg, shift: validation_reply(
        msg, {"num-examples": 5, "accuracy": 0.5, "loss": losses[shift]})) for nid in (10, 11)})
    pool = PromptPool(tmp_path / "pool")
    run_fedavg(grid, pool, app_model, fedavg, NUM_CLASSES)
    assert pool.info("fedavg").metrics == {"rounds": rounds, "kept-round": kept}
    assert sum(m.metadata.message_type == MessageType.TRAIN for m in grid.sent) == 2 * rounds
    np.testing.assert_allclose(pool.get("fedavg", model=app_model).arrays()["tokens"],
                               initial.arrays()["tokens"] + kept, atol=1e-5)
    assert any(f"stopping after round {rounds}" in line for line in flwr_log.records) == (rounds < 5)


def test_fedavg_patience_without_validation_splits_runs_every_round(app_model, tmp_path, flwr_log):
    fedavg = AppConfig.from_run_config(RUN_CONFIG | {"mode": "fedavg", "num-server-rounds": 3, "val-fraction": 0.0,
                                                     "fedavg-patience": 1})
    grid = FakeGrid({10: lambda msg: fedavg_train_reply(msg, app_model)})
    pool = PromptPool(tmp_path / "pool")
    run_fedavg(grid, pool, app_model, fedavg, NUM_CLASSES)
    assert pool.info("fedavg").metrics == {"rounds": 3, "kept-round": 3}
    assert any("fedavg-patience needs validation splits" in line for line in flwr_log.records)


@pytest.mark.parametrize(("metrics", "match"), [
    ({"num-examples": 4, "accuracy": 0.5}, "lack 'loss'"),
    ({"accuracy": 0.5, "loss": 1.0}, "num-examples"),
    ({"num-examples": -1, "accuracy": 0.5, "loss": 1.0}, "num-examples"),
    ({"num-examples": 4.0, "accuracy": 0.5, "loss": 1.0}, "num-examples"),
    ({"num-examples": 4, "accuracy": 1.5, "loss": 1.0}, "accuracy"),
    ({"num-examples": 4, "accuracy": 0.5, "loss": float("inf")}, "loss"),
    ({"num-examples": 4, "accuracy": 0.5, "loss": [1.0]}, "loss"),
])
def test_check_evaluation_refuses_malformed_metrics(metrics, match):
    with pytest.raises(ReplyError, match=match):
        check_evaluation(RecordDict({"metrics": MetricRecord(metrics)}))
    good = check_evaluation(RecordDict({"metrics": MetricRecord({"num-examples": 4, "accuracy": 0.5, "loss": 0.7})}))
    assert (good.num_examples, good.accuracy, good.loss) == (4, 0.5, 0.7)
    assert check_evaluation(RecordDict({"metrics": MetricRecord({"num-examples": 0})})) is None  # no validation images


def test_checked_fedavg_refuses_a_reply_of_another_shape(app_config, app_model):
    template = Prompt.init(app_model, NUM_CLASSES, source="fedavg")
    strategy = CheckedFedAvg(template, app_model, app_config)
    other = Prompt.init(app_model, NUM_CLASSES, n_prompt=2, source="fedavg")
    content = RecordDict({**prompt_records(other), "metrics": MetricRecord({"num-examples": 1}),
                          "parent": ConfigRecord({"sha256": ""})})
    with pytest.raises(ValueError, match="tokens"):
        strategy.check_reply(content)
    content = RecordDict({**prompt_records(template), "metrics": MetricRecord({"num-examples": 0}),
                          "parent": ConfigRecord({"sha256": ""})})
    with pytest.raises(ValueError, match="num-examples >= 1"):
        strategy.check_reply(content)


# ------------------------------------------------------------------ federated evaluation replies


@pytest.mark.parametrize("metrics", [
    None,  # no metrics record
    ConfigRecord({"num-examples": 4, "accuracy": 0.5}),  # wrong record type
    MetricRecord({"num-examples": 4, "accuracy": float("nan")}),
    MetricRecord({"num-examples": 4, "accuracy": [0.5]}),
    MetricRecord({"num-examples": 2**60, "accuracy": 0.5}),
    MetricRecord({"accuracy": 0.5}),
])
def test_malformed_evaluation_reply_is_left_out(metrics, app_config, app_model, flwr_log, capsys):
    def evaluating(bad: bool) -> Callable[[Message], Message]:
        def handle(msg: Message) -> Message:
            good = MetricRecord({"num-examples": 4, "accuracy": 0.75, "loss": 0.6})
            content = {} if bad and metrics is None else {"metrics": metrics if bad else good}
            return Message(RecordDict(content), reply_to=msg)
        return handle

    grid = FakeGrid({10: evaluating(False), 11: evaluating(True)})
    prompts = {"src-a": Prompt.init(app_model, NUM_CLASSES, labels=[0, 1], source="src-a")}
    federated_evaluate(grid, app_config, prompts, {10: "src-a", 11: "src-b"})
    table = capsys.readouterr().out
    assert "src-a" in table and "0.750" in table and "src-b" not in table
    assert any("node 11 (source src-b) sent an unusable evaluate reply" in line for line in flwr_log.records)
