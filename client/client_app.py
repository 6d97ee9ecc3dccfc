"""Flower ClientApp: one data source trains its own prompt on its private shard.

Handlers (Flower Message API):

* ``query``: tells the server which source this node is (and its label set);
* ``train``: trains the prompt it was sent (or a fresh one) with the recipe of
  ``common.train`` (probe-initialised head, prompt tuning kept only where the local validation
  split says it helps), fits this source's density on its training features (unless
  ``share-density = false``), and replies with exactly the prompt's arrays (density
  included), its metadata and scalar metrics;
* ``evaluate``: evaluates the prompt(s) it was sent (FedAvg: the shared prompt's tensors),
  alone and composed, on its local validation split; replies with the composition's accuracy
  and loss (the loss is what the FedAvg server selects its round on).

The frozen backbone comes from the per-process cache (``common.model.load_backbone``), so
all simulated clients of a worker process share one copy (on CUDA when available).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log
from torch.utils.data import DataLoader

from common.config import AppConfig, ConfigError, build_model
from common.data import Shard, backbone_transform, load_client_shard, load_local_dataset
from common.kv_cache import KVCache
from common.model import APTViT
from common.prompt import Prompt, source_seed
from common.records import prompt_from_records, prompt_records, prompts_from_records
from common.train import evaluate, source_density, train_prompt

app = ClientApp()

_KV_CACHES: dict[tuple[str, str], KVCache] = {}


@dataclass
class NodeData:
    """This node's source id and its private train/validation shards."""

    source: str
    train: Shard
    val: Shard

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def load_node_data(context: Context, config: AppConfig, model: APTViT) -> NodeData:
    """Simulation: partition ``partition-id`` of ``num-partitions``; deployment: the node's
    own ``data-dir`` (node config), named by its ``source`` (node config)."""
    node = context.node_config
    transform = backbone_transform(model.backbone)
    if "partition-id" in node:
        pid, num = int(node["partition-id"]), int(node["num-partitions"])
        train, val = load_client_shard(
            config.dataset, config.data_path(), pid, num, config.partitioner, alpha=config.dirichlet_alpha,
            seed=config.partition_seed, max_examples=config.examples_per_source or None,
            val_fraction=config.val_fraction, transform=transform)
        return NodeData(str(node.get("source", f"source-{pid}")), train, val)
    if not str(node.get("data-dir", "")) or not str(node.get("source", "")):
        raise ConfigError("a deployed SuperNode needs --node-config \"source='NAME' data-dir='/path/to/data'\"")
    train, val = load_local_dataset(str(node["data-dir"]), config.dataset, transform,
                                    max_examples=config.examples_per_source or None,
                                    val_fraction=config.val_fraction, seed=config.partition_seed)
    return NodeData(str(node["source"]), train, val)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Reply with this node's source id and label set (no data)."""
    config = AppConfig.from_run_config(context.run_config)
    data = load_node_data(context, config, build_model(config))
    record = ConfigRecord({"source": data.source, "labels": json.dumps(data.train.label_set())})
    return Message(RecordDict({"node": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this source's prompt on the local shard and reply with the prompt only."""
    config = AppConfig.from_run_config(context.run_config)
    model = build_model(config)
    data = load_node_data(context, config, model)
    prompt = _starting_prompt(msg.content, model, data, config)
    loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.partition_seed))
    val_loader = _selection_loader(data, config)
    cache = _kv_cache(data.source, model) if config.kv_cache else None
    log(INFO, "source %s: training its prompt on %d images (%d for validation)", data.source, len(data.train),
        len(data.val))
    metrics = train_prompt(model, prompt, loader, config.train_config(), cache=cache, val_loader=val_loader)
    log(INFO, "source %s: %d steps on %d examples, kept epoch %d of %d (validation loss %.3f), "
        "last-epoch loss %.3f, accuracy %.3f", data.source, metrics["steps"], metrics["num_examples"],
        metrics["selected_epoch"], metrics["epochs"], metrics["val_loss"], metrics["loss"], metrics["accuracy"])
    prompt.density = None
    if config.mode == "alacarte" and config.share_density:
        prompt.density = source_density(model, DataLoader(data.train, batch_size=config.batch_size), cache)
    train_config = msg.content.get("config", ConfigRecord())
    reply = RecordDict({**prompt_records(prompt), "metrics": MetricRecord({
        "num-examples": int(metrics["num_examples"]),
        "train-loss": float(metrics["loss"]),
        "train-accuracy": float(metrics["accuracy"]),
        "parent-version": int(train_config.get("parent-version", 0)),
        "seconds": float(metrics["seconds"]),
    })})
    reply["parent"] = ConfigRecord({"sha256": str(train_config.get("parent-sha256", ""))})  # the server's stale check
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate_prompts(msg: Message, context: Context) -> Message:
    """Accuracy and loss of the sent prompts, alone and composed, on the local validation split
    (whose backbone keys/values the recipe's selection already cached: no backbone pass for them);
    ``num-examples`` 0 and nothing else when this source has no validation images."""
    config = AppConfig.from_run_config(context.run_config)
    model = build_model(config)
    data = load_node_data(context, config, model)
    if not len(data.val):
        log(INFO, "source %s: no validation images to evaluate on; replying num-examples 0", data.source)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)
    shared = config.mode == "fedavg"
    prompts = [_shared_prompt(msg.content, model, data, config)] if shared else prompts_from_records(msg.content, model)
    cache = _kv_cache(data.source, model) if config.kv_cache else None
    result = evaluate(model, prompts, DataLoader(data.val, batch_size=config.batch_size), cache=cache)
    return Message(RecordDict({"metrics": MetricRecord({
        "num-examples": int(result["num_examples"]),
        "accuracy": float(result["accuracy"]),
        "loss": float(result["nll"]),
        "prompt-accuracy": [float(a) for a in result["prompt_accuracy"]],
    })}), reply_to=msg)


def _selection_loader(data: NodeData, config: AppConfig) -> DataLoader | None:
    """The validation split the recipe selects on, when there is one. A FedAvg client selects
    too: it returns the shared prompt it received unless local tuning beats it on its own
    validation split (without that, each round's fresh optimiser undoes the fitted head)."""
    if not len(data.val):
        log(WARNING, "source %s: no validation images (val-fraction %g of %d images); the last epoch is kept",
            data.source, config.val_fraction, len(data.train))
        return None
    return DataLoader(data.val, batch_size=config.batch_size)


def _starting_prompt(content: RecordDict, model: APTViT, data: NodeData, config: AppConfig) -> Prompt:
    """The prompt the server sent (alacarte: this source's latest; fedavg: the shared one), or a
    fresh one when none was sent or the sent one does not cover this shard's labels."""
    labels = data.train.label_set()
    if "prompt" in content:
        prompt = prompt_from_records(content, model)
        if set(labels) <= set(prompt.config.labels):
            return prompt
        log(WARNING, "source %s: its stored prompt covers %s but the data has %s; starting afresh",
            data.source, list(prompt.config.labels), labels)
    elif "arrays" in content:
        return _shared_prompt(content, model, data, config)
    shared = config.mode == "fedavg"
    return Prompt.init(model, data.num_classes, n_prompt=config.n_prompt, n_memory=config.n_memory,
                       seed=0 if shared else source_seed(data.source),
                       labels=None if shared else labels, source=data.source)


def _shared_prompt(content: RecordDict, model: APTViT, data: NodeData, config: AppConfig) -> Prompt:
    """The shared prompt of a FedAvg message (its ``arrays`` record: tensors only, over every class)."""
    template = Prompt.init(model, data.num_classes, n_prompt=config.n_prompt, n_memory=config.n_memory, seed=0,
                           source=data.source)
    arrays = {k: v.numpy() for k, v in content["arrays"].items()}
    return Prompt.from_arrays(arrays, template.config, model)


def use_kv_cache(source: str, model: APTViT, cache: KVCache) -> None:
    """Make ``cache`` this process's backbone key/value cache of ``source`` for ``model``.

    For simulations that precompute one cache over every client's images and lend it to all
    the simulated clients of a process; a real client builds its own on its first epoch.
    """
    _KV_CACHES[(source, model.fingerprint)] = cache


def _kv_cache(source: str, model: APTViT) -> KVCache:
    """This process's backbone key/value cache for ``source`` (kept across rounds)."""
    key = (source, model.fingerprint)
    if key not in _KV_CACHES:
        _KV_CACHES[key] = KVCache(model, max_bytes=2 << 30)
    return _KV_CACHES[key]
