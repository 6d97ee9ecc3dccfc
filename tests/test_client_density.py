"""The ClientApp ships its source's density with the prompt, unless ``share-density = false``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from synthetic import make_idx_dataset
from torch.utils.data import DataLoader

from client.client_app import evaluate_prompts, train
from common.compose import Weighting, default_weighting
from common.config import AppConfig, build_model
from common.data import backbone_transform, load_client_shard
from common.kv_cache import KVCache
from common.prompt import Prompt
from common.records import prompt_from_records, prompt_records
from common.train import evaluate
from server.admission import check_evaluation


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> dict:
    data = make_idx_dataset(tmp_path_factory.mktemp("idx"), n_train=120, n_test=40)
    return {"backbone": "vit_tiny_patch16_224", "pretrained": False, "img-size": 32, "data-dir": str(data),
            "examples-per-source": 40, "local-epochs": 1, "min-steps": 2, "batch-size": 16,
            "partitioner": "classes"}


def node_context(run_config: dict, **overrides) -> Context:
    """The context of partition 0 of 3 (the ClientApp's view of this node)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                   run_config=run_config | overrides)


def train_reply(run_config: dict, sent: RecordDict | None = None, **overrides) -> Message:
    """The ClientApp's reply to a train message (default: the first round of a fresh source)."""
    context = node_context(run_config, **overrides)  # first: a Message needs the task identity
    content = sent if sent is not None else RecordDict({"config": ConfigRecord({"parent-version": 0})})
    return train(Message(content, dst_node_id=1, message_type=MessageType.TRAIN), context)


def node_shards(config: AppConfig, model) -> tuple:
    """(train, validation) shards of partition 0, as the ClientApp loads them."""
    return load_client_shard(config.dataset, config.data_path(), 0, 3, "classes", seed=0, max_examples=40,
                             val_fraction=config.val_fraction, transform=backbone_transform(model.backbone))


def test_reply_carries_the_density_of_the_training_images(run_config):
    config = AppConfig.from_run_config(run_config)
    model = build_model(config, device="cpu")
    prompt = prompt_from_records(train_reply(run_config).content, model)
    assert prompt.density is not None and default_weighting([prompt]) is Weighting.DENSITY
    shard, _ = node_shards(config, model)
    images = torch.stack([shard[i][0] for i in range(len(shard))])
    with torch.no_grad():
        pooled = model.pooled(model.backbone_forward(images)[0])
    assert prompt.density.num_images == len(shard) == prompt.config.num_examples
    assert prompt.density.classes.tolist() == list(prompt.config.labels) == shard.label_set()
    first = torch.as_tensor(shard.labels) == int(prompt.density.classes[0])
    torch.testing.assert_close(prompt.density.mean[0].double(), pooled[first].double().mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [{"share-density": False}, {"mode": "fedavg"}])
def test_no_density_leaves_the_client_when_private_or_fedavg(run_config, overrides):
    content = train_reply(run_config, **overrides).content
    assert not any(name.startswith("density.") for name in content["arrays"].keys())
    model = build_model(AppConfig.from_run_config(run_config), device="cpu")
    assert prompt_from_records(content, model).density is None


def test_fedavg_client_returns_the_shared_prompt_unless_tuning_wins_on_its_validation(run_config):
    """A later FedAvg round (fitted head) whose tuning hurts (learning rate 10): the reply is the
    prompt it received, bit for bit; without a validation split the client returns its last epoch."""
    config = AppConfig.from_run_config(run_config)
    model = build_model(config, device="cpu")
    shared = Prompt.init(model, 10, n_prompt=config.n_prompt, n_memory=config.n_memory, seed=3)
    with torch.no_grad():
        shared.head.weight.normal_(0.0, 0.01)
    sent = shared.arrays()
    message = RecordDict({"arrays": prompt_records(shared)["arrays"], "config": ConfigRecord({})})
    hurts = {"mode": "fedavg", "learning-rate": 10.0}
    kept = prompt_from_records(train_reply(run_config, message, **hurts).content, model).arrays()
    assert kept.keys() == sent.keys() and all(np.array_equal(kept[k], sent[k]) for k in sent)
    last = prompt_from_records(train_reply(run_config, message, **hurts, **{"val-fraction": 0.0}).content,
                               model).arrays()
    assert not np.array_equal(last["tokens"], sent["tokens"])


def test_fedavg_evaluate_scores_the_shared_prompt_on_the_validation_split(run_config):
    """FedAvg's evaluate message carries the shared prompt's tensors only; the reply's loss and
    accuracy are that prompt's on this node's validation split (what the server selects on),
    scored through the node's fp16 key/value cache."""
    config = AppConfig.from_run_config(run_config | {"mode": "fedavg"})
    model = build_model(config, device="cpu")
    shared = Prompt.init(model, 10, n_prompt=config.n_prompt, n_memory=config.n_memory, seed=3)
    with torch.no_grad():
        shared.head.weight.normal_(0.0, 0.5)
    sent = RecordDict({"arrays": prompt_records(shared)["arrays"], "config": ConfigRecord({"server-round": 1})})
    context = node_context(run_config, mode="fedavg")
    reply = evaluate_prompts(Message(sent, dst_node_id=1, message_type=MessageType.EVALUATE), context)
    metrics = reply.content["metrics"]
    _, val = node_shards(config, model)
    expected = evaluate(model, [shared], DataLoader(val, batch_size=16), cache=KVCache(model))
    assert metrics["num-examples"] == len(val) > 0
    assert metrics["loss"] == pytest.approx(expected["nll"], rel=1e-5) and metrics["loss"] > 0
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])


def test_evaluate_without_validation_images_replies_zero_examples(run_config):
    """A source with no validation split has nothing to score: it says so (``num-examples`` 0,
    which the server leaves out) instead of failing the evaluate message."""
    model = build_model(AppConfig.from_run_config(run_config), device="cpu")
    sent = RecordDict(prompt_records(Prompt.init(model, 10, seed=3)))
    context = node_context(run_config, **{"val-fraction": 0.0})
    reply = evaluate_prompts(Message(sent, dst_node_id=1, message_type=MessageType.EVALUATE), context)
    assert not reply.has_error() and dict(reply.content["metrics"]) == {"num-examples": 0}
    assert check_evaluation(reply.content) is None


def test_a_stored_prompt_over_other_labels_is_replaced_by_a_fresh_one(run_config):
    """À-la-carte: a sent prompt that does not cover the shard's labels is not trained on; the
    source starts from a fresh prompt (its tokens far from the sent prompt's)."""
    model = build_model(AppConfig.from_run_config(run_config), device="cpu")
    stale = Prompt.init(model, 10, labels=[7, 8], source="source-0")
    with torch.no_grad():
        stale.tokens.fill_(100.0)
    sent = RecordDict({**prompt_records(stale), "config": ConfigRecord({"parent-version": 1})})
    prompt = prompt_from_records(train_reply(run_config, sent).content, model)
    assert prompt.config.labels != stale.config.labels
    assert float(prompt.tokens.detach().abs().max()) < 10.0
