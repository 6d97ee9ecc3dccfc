"""ClientApp replies and ServerApp reply validation, on real Flower messages (no simulation)."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from synthetic import make_idx_dataset
from torch.utils.data import DataLoader

from client.client_app import evaluate_prompts, identify, train, use_kv_cache
from common.config import AppConfig, ConfigError, build_model
from common.kv_cache import KVCache, Prefetch
from common.prompt import TENSOR_NAMES, BackboneMismatchError, PromptShapeError, PromptValueError
from common.records import TRAIN_METRICS, ReplyError, check_train_reply, prompt_from_records, prompts_records
from common.train import evaluate
from server.federation import AlaCarteFederation
from server.pool import PromptPool, StaleVersionError
from server.server_app import _prefetched, prefetch_test_split, server_test_split

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> dict:
    data = make_idx_dataset(tmp_path_factory.mktemp("idx"), n_train=120, n_test=40)
    return {"backbone": "vit_tiny_patch16_224", "pretrained": False, "img-size": 32, "data-dir": str(data),
            "examples-per-source": 40, "local-epochs": 1, "min-steps": 2, "batch-size": 16, "test-examples": 40,
            "pool-dir": str(tmp_path_factory.mktemp("pool")), "partitioner": "classes"}


def context(run_config: dict, partition: int = 0, partitions: int = 3) -> Context:
    node_config = {"partition-id": partition, "num-partitions": partitions}
    return Context(run_id=1, node_id=partition + 1, node_config=node_config,
                   state=RecordDict(), run_config=run_config)


def message(content: RecordDict, kind: str = MessageType.TRAIN) -> Message:
    return Message(content, dst_node_id=1, message_type=kind)


@pytest.fixture(scope="module")
def train_reply(run_config) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return train(message(RecordDict({"config": ConfigRecord({"parent-version": 0})})), context(run_config))


def test_defaults_match_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert AppConfig.from_run_config(config) == AppConfig()


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown run-config key"):
        AppConfig.from_run_config({"num-rounds": 3})
    with pytest.raises(ConfigError, match="must be an integer"):
        AppConfig.from_run_config({"local-epochs": "many"})
    with pytest.raises(ConfigError, match="mode must be one of"):
        AppConfig.from_run_config({"mode": "average"})


def test_config_validates_on_construction_and_documents_every_key():
    with pytest.raises(ConfigError, match="mode must be one of"):
        AppConfig(mode="average")  # not only through from_run_config (the service builds one directly)
    with pytest.raises(ConfigError, match="val-fraction"):
        AppConfig(val_fraction=1.0)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(AppConfig.help()) == set(pyproject)
    assert all(len(text) > len("(default 0)") + 10 for text in AppConfig.help().values())


def test_identify_reports_source_and_labels(run_config):
    reply = identify(message(RecordDict(), MessageType.QUERY), context(run_config, partition=2))
    assert reply.content["node"]["source"] == "source-2"
    assert reply.content["node"]["labels"] == "[7, 8, 9]"


def test_train_reply_carries_only_the_prompt(train_reply, app_model, app_config):
    content = train_reply.content
    assert set(content.keys()) == {"arrays", "prompt", "metrics", "parent"}
    assert content["parent"]["sha256"] == ""  # echoes the parent-sha256 the server sent (none)
    tensors = {k for k in content["arrays"].keys() if not k.startswith("density.")}  # + the source density
    assert tensors == set(TENSOR_NAMES)
    prompt = prompt_from_records(content, app_model)
    assert prompt.config.source == "source-0" and list(prompt.config.labels) == [0, 1, 2, 3]
    # the upload is exactly the prompt's tensors: no images, features, per-example values or gradients
    expected = sum(a.nbytes for a in prompt.arrays().values())
    assert sum(len(a.numpy().tobytes()) for a in content["arrays"].values()) == expected
    metrics = content["metrics"]
    assert set(metrics.keys()) <= TRAIN_METRICS
    assert all(not isinstance(v, list) for v in metrics.values())
    assert metrics["num-examples"] == prompt.config.num_examples > 0
    check_train_reply(content, app_config.max_prompt_bytes)


def test_train_starts_from_the_sent_prompt(run_config, train_reply, app_model):
    sent = prompt_from_records(train_reply.content, app_model)
    content = RecordDict({**{k: train_reply.content[k] for k in ("arrays", "prompt")},
                          "config": ConfigRecord({"parent-version": 1})})
    # no validation split: the last tuning epoch is kept (with one, an untuned epoch 0 could win)
    reply = train(message(content), context(run_config | {"val-fraction": 0.0}))
    trained = prompt_from_records(reply.content, app_model)
    assert reply.content["metrics"]["parent-version"] == 1
    assert trained.config.labels == sent.config.labels
    assert not np.array_equal(trained.arrays()["tokens"], sent.arrays()["tokens"])
    # it continued from the sent head: a fresh prompt's zero head would have been probe-initialised
    assert np.abs(trained.arrays()["head.weight"] - sent.arrays()["head.weight"]).max() < 0.5


def test_train_uses_a_lent_kv_cache(run_config, app_model):
    lent = KVCache(app_model)
    use_kv_cache("source-1", app_model, lent)
    train(message(RecordDict({"config": ConfigRecord({"parent-version": 0})})), context(run_config, partition=1))
    # one epoch: every image of source-1's shard went through the lent cache, source-0's did not
    assert lent.misses > 0 and len(lent) == lent.misses


def test_evaluate_reply(run_config, train_reply, app_model):
    prompt = prompt_from_records(train_reply.content, app_model)
    reply = evaluate_prompts(message(RecordDict(prompts_records([prompt, prompt])), MessageType.EVALUATE),
                             context(run_config))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0
    assert len(metrics["prompt-accuracy"]) == 2 and 0.0 <= metrics["accuracy"] <= 1.0


def test_evaluate_reuses_the_cache_the_selection_filled(run_config, train_reply, app_model):
    """Training cached the validation images (the selection's losses), so evaluating on them
    needs no backbone pass, and gives what an uncached evaluation gives."""
    prompt = prompt_from_records(train_reply.content, app_model)
    request = message(RecordDict(prompts_records([prompt])), MessageType.EVALUATE)
    lent = KVCache(app_model)
    use_kv_cache("source-2", app_model, lent)
    train(message(RecordDict({"config": ConfigRecord({"parent-version": 0})})), context(run_config, partition=2))
    hits, misses = lent.hits, lent.misses
    cached = evaluate_prompts(request, context(run_config, partition=2)).content["metrics"]
    assert lent.misses == misses and lent.hits - hits == cached["num-examples"] > 0
    uncached = evaluate_prompts(request, context(run_config | {"kv-cache": False}, partition=2)).content["metrics"]
    assert (lent.hits, lent.misses) == (hits + cached["num-examples"], misses)
    assert cached["accuracy"] == uncached["accuracy"] and cached["prompt-accuracy"] == uncached["prompt-accuracy"]


def _reply_with(train_reply: Message, **arrays: np.ndarray) -> Message:
    content = train_reply.content
    record = ArrayRecord({k: Array(arrays.get(k, v.numpy())) for k, v in content["arrays"].items()})
    return Message(RecordDict({"arrays": record, "prompt": content["prompt"], "metrics": content["metrics"],
                               "parent": content["parent"]}), reply_to=message(RecordDict()))


def _bad_replies(train_reply: Message, other_model) -> dict[str, tuple[Message, type]]:
    tokens = train_reply.content["arrays"]["tokens"].numpy()
    nan = tokens.copy()
    nan[0, 0] = np.nan
    foreign = prompt_from_records(train_reply.content, None)
    foreign.config = replace(foreign.config, fingerprint=other_model.fingerprint)
    features = ArrayRecord({"x": Array(np.zeros((40, 192), np.float32))})
    extra = RecordDict({**dict(train_reply.content), "features": features})
    per_example = RecordDict({**dict(train_reply.content),
                              "metrics": MetricRecord({"num-examples": 3, "train-loss": [0.1, 0.2, 0.3]})})
    reply = message(RecordDict())
    return {
        "shape": (_reply_with(train_reply, tokens=np.zeros((2, tokens.shape[1]), np.float32)), PromptShapeError),
        "nan": (_reply_with(train_reply, tokens=nan), PromptValueError),
        "fingerprint": (Message(RecordDict({**dict(train_reply.content),
                                            "prompt": ConfigRecord(foreign.config.to_metadata())}),
                                reply_to=reply), BackboneMismatchError),
        "extra record": (Message(extra, reply_to=reply), ReplyError),
        "per-example metrics": (Message(per_example, reply_to=reply), ReplyError),
    }


def test_server_rejects_malformed_replies_and_keeps_the_pool(train_reply, app_model, app_config, tmp_path):
    other = build_model(AppConfig.from_run_config({"backbone": "vit_tiny_patch16_224", "pretrained": False,
                                                   "img-size": 48}), device="cpu")
    pool = PromptPool(tmp_path / "pool")
    federation = AlaCarteFederation(pool, app_model, app_config)
    for name, (reply, error) in _bad_replies(train_reply, other).items():
        with pytest.raises(error):
            federation.accept_reply(reply, "source-0")
        assert pool.sources() == [], name
    tiny = AppConfig.from_run_config({"max-prompt-bytes": 1000})
    with pytest.raises(ReplyError, match="over the 1000-byte limit"):
        AlaCarteFederation(pool, app_model, tiny).accept_reply(train_reply, "source-0")
    with pytest.raises(ReplyError, match="claims source"):
        federation.accept_reply(train_reply, "source-1")
    assert pool.sources() == [] and not list((tmp_path / "pool").rglob("*.safetensors"))


def test_server_stores_valid_reply_and_refuses_stale_duplicate(train_reply, app_model, app_config, tmp_path):
    pool = PromptPool(tmp_path / "pool")
    federation = AlaCarteFederation(pool, app_model, app_config)
    assert federation.accept_reply(train_reply, "source-0") == 1
    with pytest.raises(StaleVersionError):
        federation.accept_reply(train_reply, "source-0")  # same parent-version 0: duplicate
    assert [e.version for e in pool.history("source-0")] == [1]
    stored = pool.get("source-0", model=app_model)
    sent = prompt_from_records(train_reply.content, app_model)
    assert all(np.array_equal(stored.arrays()[k], sent.arrays()[k]) for k in TENSOR_NAMES)


def test_check_train_reply_rejects_missing_records():
    with pytest.raises(ReplyError, match="exactly"):
        check_train_reply(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), 1 << 20)


def test_server_prefetches_its_test_split_and_evaluates_the_same(train_reply, app_model, app_config):
    test = server_test_split(app_config, app_model)
    loader = DataLoader(test, batch_size=16)
    prompts = [prompt_from_records(train_reply.content, app_model)]
    direct = evaluate(app_model, prompts, loader)
    with prefetch_test_split(app_model, loader, app_config) as prefetch:
        assert prefetch.wait(timeout=300)
        cache = _prefetched(prefetch)
        assert len(cache) == len(test)
        cached = evaluate(app_model, prompts, loader, cache=cache)
    assert cache.misses == len(test) and cache.hits == len(test)  # evaluate ran no backbone pass
    assert cached["composed"] == direct["composed"] and cached["prompt_accuracy"] == direct["prompt_accuracy"]
    assert cached["nll"] == pytest.approx(direct["nll"], rel=1e-5)
    with prefetch_test_split(app_model, loader, replace(app_config, kv_cache=False)) as prefetch:
        assert prefetch is None
    with prefetch_test_split(app_model, None, app_config) as prefetch:  # no test split
        assert prefetch is None


def test_a_failed_prefetch_is_logged_and_the_test_split_evaluated_from_images(app_model, flwr_log):
    def failing():
        raise OSError("no space left on device")
        yield

    prefetch = Prefetch(KVCache(app_model, dtype=torch.float32), failing())
    assert prefetch.wait(timeout=60)
    assert _prefetched(prefetch) is None
    assert "prefetching backbone keys/values failed: no space left on device" in flwr_log.text()
