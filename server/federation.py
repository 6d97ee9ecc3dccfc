"""Server-side rounds over Flower's Grid: à-la-carte (a pool of prompts) or FedAvg (one prompt).

À-la-carte round: every node gets its own source's latest prompt from the pool (or none),
trains it in isolation, and sends it back; each reply is validated and stored as a new
version of that source. Nothing is averaged. A node that fails, times out or sends an
invalid prompt is logged and skipped; its source keeps its last good version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from common.config import AppConfig
from common.model import APTViT
from common.prompt import Prompt, PromptError
from common.records import ReplyError, check_train_reply, prompt_from_records, prompt_records
from server.pool import PromptPool, StaleVersionError, UnknownSourceError

__all__ = ["RoundReport", "identify_nodes", "run_alacarte", "run_fedavg", "train_round"]

FEDAVG_SOURCE = "fedavg"


@dataclass
class RoundReport:
    """What one round stored and what it rejected (node id -> reason)."""

    round: int
    stored: dict[str, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


def identify_nodes(grid: Grid, node_ids: list[int], timeout: float) -> dict[int, str]:
    """Ask nodes which source they are (a QUERY message); silent nodes are left out."""
    messages = [Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY, group_id="identify")
                for nid in node_ids]
    sources: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        nid = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %s did not identify itself: %s", nid, reply.error.reason)
            continue
        node = reply.content.get("node")
        if not isinstance(node, ConfigRecord) or not str(node.get("source", "")):
            log(WARNING, "node %s sent no source id; skipped", nid)
            continue
        sources[nid] = str(node["source"])
        log(INFO, "node %s is source %s (labels %s)", nid, sources[nid], node.get("labels", "?"))
    return sources


def _latest(pool: PromptPool, source: str, model: APTViT) -> tuple[Prompt | None, int]:
    """The source's latest valid prompt and its version, or (None, 0) to start afresh."""
    try:
        entry = pool.info(source)
        return pool.get(source, model=model), entry.version
    except UnknownSourceError:
        return None, 0
    except PromptError as err:
        log(WARNING, "source %s: stored prompt unusable with this backbone (%s); training afresh", source, err)
        return None, 0


def _train_message(nid: int, source: str, pool: PromptPool, model: APTViT, rnd: int, config: AppConfig) -> Message:
    prompt, version = _latest(pool, source, model)
    records = prompt_records(prompt) if prompt is not None else {}
    cfg = ConfigRecord({"server-round": rnd, "parent-version": version, "local-epochs": config.local_epochs})
    return Message(RecordDict({**records, "config": cfg}), dst_node_id=nid, message_type=MessageType.TRAIN,
                   group_id=f"round-{rnd}")


def accept_reply(reply: Message, source: str, pool: PromptPool, model: APTViT, config: AppConfig) -> int:
    """Validate a train reply and store its prompt; returns the new version.

    Raises ``ReplyError``/``PromptError``/``StaleVersionError`` when the reply must not be stored.
    """
    if reply.has_error():
        raise ReplyError(f"client error {reply.error.code}: {reply.error.reason}")
    check_train_reply(reply.content, config.max_prompt_bytes)
    prompt = prompt_from_records(reply.content, model)
    if prompt.source != source:
        raise ReplyError(f"prompt claims source {prompt.source!r} but node is source {source!r}")
    metrics = dict(reply.content["metrics"])
    return pool.add(source, prompt, metrics, parent_version=int(metrics.get("parent-version", 0)))


def train_round(grid: Grid, pool: PromptPool, model: APTViT, config: AppConfig,
                sources: dict[int, str], rnd: int) -> RoundReport:
    """One à-la-carte round over the identified nodes."""
    report = RoundReport(rnd)
    messages = [_train_message(nid, src, pool, model, rnd, config) for nid, src in sources.items()]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=config.reply_timeout)}
    for nid, source in sources.items():
        if nid not in replies:
            report.rejected[nid] = "no reply before reply-timeout"
            continue
        try:
            report.stored[source] = accept_reply(replies[nid], source, pool, model, config)
        except (ReplyError, PromptError, StaleVersionError, ValueError) as err:
            report.rejected[nid] = f"{type(err).__name__}: {err}"
    for nid, reason in report.rejected.items():
        log(WARNING, "round %d: node %s (source %s) not stored: %s", rnd, nid, sources[nid], reason)
    for source, version in report.stored.items():
        log(INFO, "round %d: stored %s v%d", rnd, source, version)
    return report


def run_alacarte(grid: Grid, config: AppConfig, model: APTViT, pool: PromptPool) -> dict[int, str]:
    """``num-server-rounds`` rounds; nodes that join later are identified and trained next round.

    Returns the participating nodes and their sources.
    """
    sources: dict[int, str] = {}
    for rnd in range(1, config.num_server_rounds + 1):
        new = [nid for nid in grid.get_node_ids() if nid not in sources]
        if new:
            sources.update(identify_nodes(grid, new, config.reply_timeout))
        if not sources:
            log(WARNING, "round %d: no node identified itself; nothing to train", rnd)
            continue
        train_round(grid, pool, model, config, sources, rnd)
    return sources


def run_fedavg(grid: Grid, config: AppConfig, model: APTViT, pool: PromptPool, num_classes: int) -> int:
    """The baseline: one shared prompt averaged with Flower's FedAvg; stored as source ``fedavg``."""
    init = Prompt.init(model, num_classes, n_prompt=config.n_prompt, n_memory=config.n_memory, source=FEDAVG_SOURCE)
    nodes = len(list(grid.get_node_ids()))
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    result = strategy.start(grid=grid, initial_arrays=prompt_records(init)["arrays"],
                            num_rounds=config.num_server_rounds, timeout=config.reply_timeout)
    arrays = {k: v.numpy() for k, v in result.arrays.items()}
    shared = Prompt.from_arrays(arrays, init.metadata(), model)
    return pool.add(FEDAVG_SOURCE, shared, {"rounds": config.num_server_rounds})

