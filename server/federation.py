"""Server-side rounds over Flower's Grid: à-la-carte (a pool of prompts) or FedAvg (one prompt).

À-la-carte round: every node gets its own source's latest prompt from the pool (or none),
trains it in isolation, and sends it back; each reply is validated and stored as a new
version of that source. Nothing is averaged.

Failures (deployment: SuperNodes on other machines come and go):

* A node that fails, does not answer within ``reply-timeout``, or sends an invalid prompt is
  logged and skipped; the round goes on with the others and its source keeps its last good
  version (the log says which).
* Replies are matched to nodes by the id of the message they answer, so an error the
  SuperLink returns on a node's behalf (e.g. the node went offline) is reported for that
  node, and a reply to anything but this round's message is ignored.
* Every round starts from the nodes the SuperLink lists as connected: nodes that left are
  dropped, nodes that joined (or restarted under a new id) are identified and trained.
* Each prompt sent carries its pool version; a reply is stored only if that version is
  still the source's latest (the pool's ``parent_version`` guard), so a late, duplicated
  or concurrent reply never overwrites a newer version.
* A restarted ServerApp continues every source from the pool's latest version, so no
  source is trained from scratch twice (FedAvg likewise resumes its shared prompt).
"""

from __future__ import annotations

from collections import defaultdict
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
from server.pool import (
    InvalidSourceError,
    PoolCorruptError,
    PromptPool,
    StaleVersionError,
    UnknownSourceError,
    validate_source,
)

__all__ = ["RoundReport", "accept_reply", "identify_nodes", "run_alacarte", "run_fedavg", "send_and_collect",
           "train_round"]

FEDAVG_SOURCE = "fedavg"


@dataclass
class RoundReport:
    """What one round stored and what it rejected (node id -> reason)."""

    round: int
    stored: dict[str, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


def send_and_collect(grid: Grid, messages: dict[int, Message], timeout: float) -> dict[int, Message]:
    """Send one message per node and return the replies that arrived in time, by node id.

    Replies are matched by the id of the message they answer (not by their sender: an
    error the SuperLink generates for an unreachable node comes from the SuperLink). A
    second reply for the same node, or one to an unknown message, is logged and dropped.
    """
    sent = list(messages.items())
    replies = grid.send_and_receive([msg for _, msg in sent], timeout=timeout)
    node_of = {msg.metadata.message_id: nid for nid, msg in sent}  # ids are set when pushed
    collected: dict[int, Message] = {}
    for reply in replies:
        nid = node_of.get(reply.metadata.reply_to_message_id)
        if nid is None:
            log(WARNING, "dropped a reply from node %s to a message this round did not send",
                reply.metadata.src_node_id)
        elif nid in collected:
            log(WARNING, "dropped a duplicate reply for node %s", nid)
        else:
            collected[nid] = reply
    return collected


def identify_nodes(grid: Grid, node_ids: list[int], timeout: float) -> dict[int, str]:
    """Ask nodes which source they are (a QUERY message); silent or invalid nodes are left out."""
    messages = {nid: Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY, group_id="identify")
                for nid in node_ids}
    replies = send_and_collect(grid, messages, timeout)
    sources: dict[int, str] = {}
    for nid in node_ids:
        if nid not in replies:
            log(WARNING, "node %s did not identify itself within reply-timeout (%g s); asking again next round",
                nid, timeout)
            continue
        try:
            sources[nid], labels = _node_identity(replies[nid])
        except ReplyError as err:
            log(WARNING, "node %s not identified: %s", nid, err)
            continue
        log(INFO, "node %s is source %s (labels %s)", nid, sources[nid], labels)
    return sources


def _node_identity(reply: Message) -> tuple[str, str]:
    """(source id, label list) of an identify reply; raises ``ReplyError`` when unusable."""
    if reply.has_error():
        raise ReplyError(f"error {reply.error.code}: {reply.error.reason}")
    node = reply.content.get("node")
    if not isinstance(node, ConfigRecord) or not str(node.get("source", "")):
        raise ReplyError("the reply names no source id")
    try:
        source = validate_source(str(node["source"]))
    except InvalidSourceError as err:
        raise ReplyError(f"{err}; fix the SuperNode's --node-config source") from err
    return source, str(node.get("labels", "?"))


def _latest(pool: PromptPool, source: str, model: APTViT) -> tuple[Prompt | None, int]:
    """The source's latest usable prompt and its version.

    ``(None, 0)`` for a source not in the pool. A stored prompt this backbone cannot use
    (another backbone, or a file damaged outside the pool) gives ``(None, latest version)``:
    the source trains afresh and its reply becomes the next version, instead of being
    refused as stale forever.
    """
    try:
        entry = pool.info(source)
    except UnknownSourceError:
        return None, 0
    try:
        return pool.get(source, entry.version, model=model), entry.version
    except (PromptError, PoolCorruptError) as err:
        log(WARNING, "source %s: stored v%d is unusable (%s); training afresh", source,
            entry.version, err)
        return None, entry.version


def _train_message(nid: int, prompt: Prompt | None, version: int, rnd: int, config: AppConfig) -> Message:
    records = prompt_records(prompt) if prompt is not None else {}
    cfg = ConfigRecord({"server-round": rnd, "parent-version": version, "local-epochs": config.local_epochs})
    return Message(RecordDict({**records, "config": cfg}), dst_node_id=nid, message_type=MessageType.TRAIN,
                   group_id=f"round-{rnd}")


def accept_reply(reply: Message, source: str, pool: PromptPool, model: APTViT, config: AppConfig,
                 parent_version: int | None = None) -> int:
    """Validate a train reply and store its prompt; returns the new version.

    ``parent_version`` is the pool version the server sent with the train message; the
    reply must echo it, and it is stored only if that is still the source's latest. Without
    it, the version the reply echoes is used.

    Raises ``ReplyError``/``PromptError``/``StaleVersionError`` when the reply must not be stored.
    """
    if reply.has_error():
        raise ReplyError(f"client error {reply.error.code}: {reply.error.reason}")
    check_train_reply(reply.content, config.max_prompt_bytes)
    prompt = prompt_from_records(reply.content, model)
    if prompt.source != source:
        raise ReplyError(f"prompt claims source {prompt.source!r} but node is source {source!r}")
    metrics = dict(reply.content["metrics"])
    echoed = int(metrics.get("parent-version", 0))
    if parent_version is not None and echoed != parent_version:
        raise ReplyError(f"reply was trained from version {echoed} but the server sent version {parent_version}")
    return pool.add(source, prompt, metrics, parent_version=echoed)


def train_round(grid: Grid, pool: PromptPool, model: APTViT, config: AppConfig,
                sources: dict[int, str], rnd: int) -> RoundReport:
    """One à-la-carte round over the identified nodes; failed nodes are logged and skipped."""
    report = RoundReport(rnd)
    starts = {src: _latest(pool, src, model) for src in set(sources.values())}
    messages = {nid: _train_message(nid, *starts[src], rnd, config) for nid, src in sources.items()}
    replies = send_and_collect(grid, messages, config.reply_timeout)
    for nid, source in sources.items():
        if nid not in replies:
            report.rejected[nid] = f"no reply within reply-timeout ({config.reply_timeout:g} s)"
            continue
        try:
            report.stored[source] = accept_reply(replies[nid], source, pool, model, config,
                                                 parent_version=starts[source][1])
        except (ReplyError, PromptError, StaleVersionError, ValueError) as err:
            report.rejected[nid] = f"{type(err).__name__}: {err}"
    for nid, reason in report.rejected.items():
        source = sources[nid]
        kept = f"v{starts[source][1]}" if starts[source][1] else "no prompt yet"
        if source in report.stored:
            kept = f"v{report.stored[source]} from another node"
        log(WARNING, "round %d: node %s (source %s) not stored: %s; source %s keeps %s",
            rnd, nid, source, reason, source, kept)
    for source, version in report.stored.items():
        log(INFO, "round %d: stored %s v%d", rnd, source, version)
    return report


def _connected_sources(grid: Grid, sources: dict[int, str], rnd: int, timeout: float) -> dict[int, str]:
    """The identified nodes still connected, plus the newly connected ones (identified now)."""
    online = set(grid.get_node_ids())
    for nid in sorted(set(sources) - online):
        log(WARNING, "round %d: node %s (source %s) is no longer connected; skipped", rnd, nid, sources[nid])
    current = {nid: src for nid, src in sources.items() if nid in online}
    new = sorted(online - set(current))
    if new:
        current.update(identify_nodes(grid, new, timeout))
    _warn_shared_sources(current, rnd)
    return current


def _warn_shared_sources(sources: dict[int, str], rnd: int) -> None:
    """Several nodes claiming one source train from the same version: only one reply can be stored."""
    nodes_of: dict[str, list[int]] = defaultdict(list)
    for nid, source in sources.items():
        nodes_of[source].append(nid)
    for source, nids in sorted(nodes_of.items()):
        if len(nids) > 1:
            log(WARNING, "round %d: nodes %s all claim source %s; only the first valid reply is stored "
                "(give each SuperNode its own --node-config source)", rnd, sorted(nids), source)


def run_alacarte(grid: Grid, config: AppConfig, model: APTViT, pool: PromptPool) -> dict[int, str]:
    """``num-server-rounds`` rounds over the connected nodes; nodes that join later are
    identified and trained from the next round on.

    Returns every node that took part in some round, with its source.
    """
    sources: dict[int, str] = {}
    participants: dict[int, str] = {}
    for rnd in range(1, config.num_server_rounds + 1):
        sources = _connected_sources(grid, sources, rnd, config.reply_timeout)
        if not sources:
            log(WARNING, "round %d: no node identified itself; nothing to train", rnd)
            continue
        participants.update(sources)
        train_round(grid, pool, model, config, sources, rnd)
    return participants


def run_fedavg(grid: Grid, config: AppConfig, model: APTViT, pool: PromptPool, num_classes: int) -> int:
    """The baseline: one shared prompt averaged with Flower's FedAvg; stored as source ``fedavg``.

    Resumes from the pool's latest shared prompt when it fits (same backbone and classes).
    """
    fresh = Prompt.init(model, num_classes, n_prompt=config.n_prompt, n_memory=config.n_memory,
                        source=FEDAVG_SOURCE)
    stored, version = _latest(pool, FEDAVG_SOURCE, model)
    usable = stored is not None and stored.arrays().keys() == fresh.arrays().keys() and all(
        stored.arrays()[k].shape == v.shape for k, v in fresh.arrays().items())
    if stored is not None and not usable:
        log(WARNING, "shared prompt v%d does not fit %d classes / this prompt size; starting afresh",
            version, num_classes)
    init = stored if usable else fresh
    if usable:
        log(INFO, "FedAvg resumes from the shared prompt v%d", version)
    nodes = len(list(grid.get_node_ids()))
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    result = strategy.start(grid=grid, initial_arrays=prompt_records(init)["arrays"],
                            num_rounds=config.num_server_rounds, timeout=config.reply_timeout)
    arrays = {k: v.numpy() for k, v in result.arrays.items()}
    shared = Prompt.from_arrays(arrays, init.metadata(), model)
    return pool.add(FEDAVG_SOURCE, shared, {"rounds": config.num_server_rounds}, parent_version=version)
