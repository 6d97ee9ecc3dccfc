"""Flower ServerApp: collects one prompt per source into a durable pool, then reports.

``mode = "alacarte"`` (default) keeps every source's prompt in the pool and composes them;
``mode = "fedavg"`` is the standard baseline (one shared prompt, Flower's FedAvg). At the
end the server evaluates each participating source's prompt and their composition on its
own test split (``test-examples`` > 0) and, with ``federated-eval``, on every node's
validation split, and prints the tables. The test split's backbone pass runs on idle cores
while the clients train (``prefetch_test_split``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from torch.utils.data import DataLoader

from common.config import AppConfig, build_model
from common.data import Shard, backbone_transform, limit_per_partition, load_split
from common.kv_cache import KVCache, Prefetch
from common.model import APTViT
from common.prompt import Prompt
from common.records import prompts_records
from common.train import evaluate
from server.fedavg import FEDAVG_SOURCE, run_fedavg
from server.federation import AlaCarteFederation, admitted_evaluation, send_and_collect
from server.pool import PromptPool
from server.table import accuracy_table, format_table

app = ServerApp()

_TEST_CACHE_BYTES = 4 << 30  # the test split's prefetched keys/values: ~2.4 MB per 112 px image in float32


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds of the configured mode, then evaluate what the pool holds."""
    config = AppConfig.from_run_config(context.run_config)
    model = build_model(config)
    pool = PromptPool.open_and_repair(config.pool_path())  # the writer repairs interrupted writes on start
    log(INFO, "mode %s, backbone %s:%s at %d px, pool %s", config.mode, model.backbone_name,
        model.fingerprint[:12], config.img_size, pool.root)
    test = server_test_split(config, model)
    test_loader = DataLoader(test, batch_size=config.batch_size) if test is not None else None
    with prefetch_test_split(model, test_loader, config) as prefetch:
        if config.mode == "fedavg":
            num_classes = len(test.classes) if test is not None else len(load_split(
                config.dataset, config.data_path(), "train").classes)
            run_fedavg(grid, pool, model, config, num_classes)
            nodes, sources = {}, [FEDAVG_SOURCE]
        else:
            nodes = AlaCarteFederation(pool, model, config).start(grid)
            sources = sorted(set(nodes.values()))
        stored = set(pool.sources())
        prompts = {s: pool.get(s, model=model) for s in sources if s in stored}
        if not prompts:
            log(WARNING, "no prompt was stored; nothing to evaluate")
            return
        if test_loader is not None:
            cache = _prefetched(prefetch)
            print(accuracy_table(f"Server test split ({len(test)} images)", prompts,
                                 evaluate(model, list(prompts.values()), test_loader, cache=cache)))
    if config.federated_eval and nodes:
        federated_evaluate(grid, config, prompts, nodes)


def server_test_split(config: AppConfig, model: APTViT) -> Shard | None:
    """The server's own test images (a deterministic subset), or None when not configured."""
    if config.test_examples == 0:
        return None
    raw = load_split(config.dataset, config.data_path(), "test")
    indices = limit_per_partition(np.arange(len(raw)), config.test_examples, config.partition_seed)
    return Shard(raw, indices, backbone_transform(model.backbone))


@contextmanager
def prefetch_test_split(model: APTViT, loader: DataLoader | None, config: AppConfig) -> Iterator[Prefetch | None]:
    """While the block runs (the rounds), compute the test split's backbone keys/values on idle
    cores (``common.kv_cache.Prefetch``); the evaluation then runs the backbone only on the
    images the prefetch did not reach. Yields ``None`` without a test split or with
    ``kv-cache = false``. Keys/values are kept in float32, so the accuracies are those of a
    direct evaluation; the cache (``_TEST_CACHE_BYTES`` at most, the rest is computed at
    evaluation) is deleted on leaving the block."""
    if loader is None or not config.kv_cache:
        yield None
        return
    cache = KVCache(model, max_bytes=_TEST_CACHE_BYTES, dtype=torch.float32)
    try:
        with Prefetch(cache, loader) as prefetch:
            yield prefetch
    finally:
        cache.close()


def _prefetched(prefetch: Prefetch | None) -> KVCache | None:
    """The prefetched test cache; None (evaluate from the images) if there is none or the prefetch failed."""
    if prefetch is None:
        return None
    try:
        return prefetch.result()
    except RuntimeError as err:
        log(WARNING, "%s; the test split is evaluated from its images", err)
        return None


def federated_evaluate(grid: Grid, config: AppConfig, prompts: dict[str, Prompt], nodes: dict[int, str]) -> None:
    """Send the prompts to the run's nodes; print each one's composed accuracy on its validation split.

    ``nodes`` are the nodes that took part (node id -> source); nodes that left are not waited for.
    """
    content = prompts_records(list(prompts.values()))
    live = set(grid.get_node_ids())
    messages = {nid: Message(RecordDict(content), dst_node_id=nid, message_type=MessageType.EVALUATE,
                             group_id="eval") for nid in nodes if nid in live}
    rows = []
    for nid, reply in send_and_collect(grid, messages, config.reply_timeout).items():
        result = admitted_evaluation(f"node {nid} (source {nodes[nid]})", reply)
        if result is not None:
            rows.append((nodes[nid], result.num_examples, result.accuracy))
    table = format_table(("source", "val images", "composed acc"),
                         [(name, n, f"{acc:.3f}") for name, n, acc in sorted(rows)], right={1, 2})
    print(f"\nFederated evaluation of the composed model (each source's validation split)\n{table}")
