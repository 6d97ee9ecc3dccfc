"""Server-side rounds over Flower's Grid: the à-la-carte federation (a pool of prompts).

À-la-carte round (``AlaCarteFederation``): every node gets its own source's latest prompt
from the pool (or none), trains it in isolation, and sends it back; each reply is validated
and stored as a new version of that source. Nothing is averaged. The helpers that check and
log replies serve the FedAvg baseline too (``server.fedavg``).

Failures (deployment: SuperNodes on other machines come and go):

* A node that fails, does not answer within ``reply-timeout``, or sends an invalid prompt is
  logged and skipped; the round goes on with the others and its source keeps its last good
  version (the log says which). Every byte of a reply is untrusted (``server.admission``):
  whatever decoding, validating or storing one reply raises rejects that reply only.
* With ``node-sources`` (a JSON file ``{"<node id>": "<source>"}`` that
  ``deploy/keys.sh --register`` writes), a node may only be the source it is bound to; an
  unbound node, or one claiming another source, is not trained. Without it (simulation,
  where the partition id names the source) a node's claim is trusted.
* Replies are matched to nodes by the id of the message they answer, so an error the
  SuperLink returns on a node's behalf (e.g. the node went offline) is reported for that
  node, and a reply to anything but this round's message is ignored.
* Every round starts from the nodes the SuperLink lists as connected: nodes that left are
  dropped, nodes that joined (or restarted under a new id) are identified and trained.
* Each prompt sent carries its pool SHA-256 (``parent-sha256``, "" for none), which the
  reply echoes; a reply is stored only if that prompt is still the source's latest (the
  pool's ``parent_sha256`` guard), so a late, duplicated or concurrent reply never
  overwrites a newer version, and one trained from a forgotten prompt never returns
  (versions restart after a forget, hashes do not).
* A restarted ServerApp continues every source from the pool's latest version, so no
  source is trained from scratch twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.config import AppConfig
from common.data import load_split
from common.model import APTViT
from common.prompt import Prompt, PromptError
from common.records import ReplyError, check_train_reply, parent_sha256, prompt_records
from server.admission import (
    Evaluation,
    check_evaluation,
    check_metadata,
    check_metrics,
    check_prompt,
    decode_arrays,
    known_label_space,
)
from server.bindings import load_node_sources
from server.pool import InvalidSourceError, PoolCorruptError, PromptPool, UnknownSourceError, validate_source

__all__ = ["AlaCarteFederation", "Parent", "RoundReport", "TrainRound", "admit_prompt", "admitted_evaluation",
           "error_reason", "exception_reason", "identify_nodes", "latest_parent", "run_label_space", "send_and_collect"]

MAX_REASON_CHARS = 300


@dataclass
class RoundReport:
    """What one round stored and what it rejected (node id -> reason)."""

    round: int
    stored: dict[str, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


def send_and_collect(grid: Grid, messages: Mapping[int, Message], timeout: float) -> dict[int, Message]:
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


def identify_nodes(grid: Grid, node_ids: list[int], timeout: float,
                   bindings: Mapping[int, str] | None = None) -> dict[int, str]:
    """Ask nodes which source they are (a QUERY message); silent or invalid nodes are left out.

    With ``bindings`` (node id -> source, from ``node-sources``), a node must claim exactly
    the source it is bound to; unbound nodes are left out too.
    """
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
            source, labels = _node_identity(replies[nid])
            _check_binding(nid, source, bindings)
        except Exception as err:  # untrusted reply: nothing in it may stop the run
            log(WARNING, "node %s not identified: %s", nid, exception_reason(err))
            continue
        sources[nid] = source
        log(INFO, "node %s is source %s (labels %s)", nid, source, labels)
    return sources


def _check_binding(nid: int, source: str, bindings: Mapping[int, str] | None) -> None:
    """Raise ``ReplyError`` unless ``bindings`` is None or binds node ``nid`` to ``source``."""
    if bindings is None:
        return
    if nid not in bindings:
        raise ReplyError(f"node {nid} (claiming source {source!r}) is bound to no source in node-sources; "
                         "register its key with deploy/keys.sh --register")
    if bindings[nid] != source:
        raise ReplyError(f"node {nid} claims source {source!r} but is bound to {bindings[nid]!r}; it is not "
                         "trained (check the SuperNode's --source, or the node-sources file)")


def exception_reason(err: BaseException) -> str:
    """``Type: message``, cut to ``MAX_REASON_CHARS`` (an untrusted reply may make errors huge)."""
    return _cut(f"{type(err).__name__}: {err}")


def error_reason(reply: Message) -> str:
    """``error <code>: <last line of the reason>`` of an error reply, cut to ``MAX_REASON_CHARS``:
    Flower puts the client's own message last, after the traceback of the handler that raised."""
    lines = [line.strip() for line in str(reply.error.reason).splitlines() if line.strip()]
    return _cut(f"error {reply.error.code}: {lines[-1] if lines else '(no reason given)'}")


def admitted_evaluation(who: str, reply: Message) -> Evaluation | None:
    """The :class:`~server.admission.Evaluation` of an evaluate reply, or ``None`` (logged as
    ``who`` ..., e.g. "node 7 (source a)") when it is an error, malformed
    (``check_evaluation``) or from a node without validation images; nothing it holds escapes."""
    if reply.has_error():
        log(WARNING, "%s failed to evaluate: %s", who, error_reason(reply))
        return None
    try:
        evaluation = check_evaluation(reply.content)
    except Exception as err:  # untrusted reply: whatever it makes fail rejects it alone
        log(WARNING, "%s sent an unusable evaluate reply (%s); left out", who, exception_reason(err))
        return None
    if evaluation is None:
        log(INFO, "%s has no validation images; left out", who)
    return evaluation


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def _node_identity(reply: Message) -> tuple[str, str]:
    """(source id, label list) of an identify reply; raises ``ReplyError`` when unusable."""
    if reply.has_error():
        raise ReplyError(error_reason(reply))
    node = reply.content.get("node")
    if not isinstance(node, ConfigRecord) or not str(node.get("source", "")):
        raise ReplyError("the reply names no source id")
    try:
        source = validate_source(str(node["source"]))
    except InvalidSourceError as err:
        raise ReplyError(f"{err}; fix the SuperNode's --node-config source") from err
    return source, str(node.get("labels", "?"))[:200]


@dataclass(frozen=True)
class Parent:
    """What a source trains from: its latest usable prompt (or None), that version and file SHA-256."""

    prompt: Prompt | None
    version: int = 0
    sha256: str = ""


@dataclass(frozen=True)
class TrainRound:
    """One configured round: which node trains which source, from which parent, with which message."""

    server_round: int
    sources: Mapping[int, str]  # node id -> source
    parents: Mapping[str, Parent]  # source -> what it trains from
    messages: Mapping[int, Message]  # node id -> its train message


def latest_parent(pool: PromptPool, source: str, model: APTViT) -> Parent:
    """The source's latest usable prompt, its version and SHA-256.

    ``Parent(None)`` for a source not in the pool. A stored prompt this backbone cannot use
    (another backbone, or a file damaged outside the pool) gives ``Parent(None, latest
    version, its sha256)``: the source trains afresh and its reply becomes the next
    version, instead of being refused as stale forever.
    """
    try:
        entry = pool.info(source)
    except UnknownSourceError:
        return Parent(None)
    try:
        return Parent(pool.get(source, entry.version, model=model), entry.version, entry.sha256)
    except (PromptError, PoolCorruptError) as err:
        log(WARNING, "source %s: stored v%d is unusable (%s); training afresh", source,
            entry.version, err)
        return Parent(None, entry.version, entry.sha256)


def _train_message(nid: int, parent: Parent, server_round: int, config: AppConfig) -> Message:
    records = prompt_records(parent.prompt) if parent.prompt is not None else {}
    cfg = ConfigRecord({"server-round": server_round, "parent-version": parent.version,
                        "parent-sha256": parent.sha256, "local-epochs": config.local_epochs})
    return Message(RecordDict({**records, "config": cfg}), dst_node_id=nid, message_type=MessageType.TRAIN,
                   group_id=f"round-{server_round}")


def admit_prompt(content: RecordDict, model: APTViT, config: AppConfig,
                 num_classes: int | None = None) -> tuple[Prompt, dict[str, int | float]]:
    """The prompt and metrics of a train reply's content, every byte checked (``server.admission``).

    Raises ``ReplyError`` or a ``PromptError`` (``PromptLimitError`` for a prompt over the
    shape limits or of another label space than ``num_classes``).
    """
    check_train_reply(content, config.max_prompt_bytes)
    arrays = decode_arrays(content["arrays"], config.max_prompt_bytes)
    metadata = check_metadata(content["prompt"])
    metrics = check_metrics(content["metrics"])
    return check_prompt(Prompt.from_arrays(arrays, metadata, model), num_classes), metrics


class AlaCarteFederation:
    """The à-la-carte rounds over Flower's Grid: each source trains its own prompt, the pool keeps it.

    It reads like a Flower strategy without being one (nothing is averaged): ``start`` runs
    the rounds; each round ``configure_train`` makes one train message per node, the replies
    are collected, and ``aggregate_train`` validates them and stores each as its source's
    next version, returning a ``RoundReport``.

    ``num_classes`` is the run's label space (``run_label_space``, read once here); replied
    prompts of another size are rejected.
    """

    def __init__(self, pool: PromptPool, model: APTViT, config: AppConfig) -> None:
        self.pool, self.model, self.config = pool, model, config
        self.num_classes = run_label_space(config)

    def start(self, grid: Grid) -> dict[int, str]:
        """``num-server-rounds`` rounds over the connected nodes; nodes that join later are
        identified and trained from the next round on.

        Returns every node that took part in some round, with its source. Raises
        ``NodeSourcesError`` (before any round) when ``node-sources`` is set but unreadable.
        """
        bindings = load_node_sources(self.config.node_sources) if self.config.node_sources else None
        if bindings is None:
            log(INFO, "node-sources is not set: each node's claimed source is trusted (simulation, or a "
                "deployment whose nodes are all trusted)")
        sources: dict[int, str] = {}
        participants: dict[int, str] = {}
        for server_round in range(1, self.config.num_server_rounds + 1):
            sources = _connected_sources(grid, sources, server_round, self.config.reply_timeout, bindings)
            if not sources:
                log(WARNING, "round %d: no node identified itself; nothing to train", server_round)
                continue
            participants.update(sources)
            self.train_round(grid, sources, server_round)
        return participants

    def train_round(self, grid: Grid, sources: Mapping[int, str], server_round: int) -> RoundReport:
        """One round over the identified nodes (node id -> source); failed nodes are logged and skipped."""
        train = self.configure_train(server_round, sources)
        log(INFO, "round %d/%d: training %d source(s) (%s); replies are awaited up to reply-timeout (%g s)",
            server_round, self.config.num_server_rounds, len(sources), ", ".join(sorted(set(sources.values()))),
            self.config.reply_timeout)
        replies = send_and_collect(grid, train.messages, self.config.reply_timeout)
        return self.aggregate_train(train, replies)

    def configure_train(self, server_round: int, sources: Mapping[int, str]) -> TrainRound:
        """One train message per node, carrying its source's latest usable prompt (or none)."""
        parents = {source: latest_parent(self.pool, source, self.model) for source in set(sources.values())}
        messages = {nid: _train_message(nid, parents[source], server_round, self.config)
                    for nid, source in sources.items()}
        return TrainRound(server_round, dict(sources), parents, messages)

    def aggregate_train(self, train: TrainRound, replies: Mapping[int, Message]) -> RoundReport:
        """Store every valid reply of ``train`` (node id -> reply); the report says what was rejected, why."""
        report = RoundReport(train.server_round)
        for nid, source in train.sources.items():
            if nid not in replies:
                report.rejected[nid] = f"no reply within reply-timeout ({self.config.reply_timeout:g} s)"
                continue
            try:
                report.stored[source] = self.accept_reply(replies[nid], source,
                                                          parent_sha256_sent=train.parents[source].sha256)
            except Exception as err:  # untrusted reply: whatever it makes fail rejects it alone
                report.rejected[nid] = exception_reason(err)
        _log_report(report, train)
        return report

    def accept_reply(self, reply: Message, source: str, *, parent_sha256_sent: str | None = None) -> int:
        """Validate a train reply of node ``source`` and store its prompt; returns the new version.

        ``parent_sha256_sent`` is the SHA-256 of the prompt the server sent with the train
        message ("" for none); the reply must echo it. The prompt is stored only if the echoed
        prompt is still the source's latest (``PromptPool.add``'s ``parent_sha256`` guard).

        Raises ``ReplyError``, a ``PromptError`` or a ``PoolError`` (e.g. ``StaleParentError``)
        when the reply must not be stored; the round loop also survives anything else.
        """
        if reply.has_error():
            raise ReplyError(f"client {error_reason(reply)}")
        prompt, metrics = admit_prompt(reply.content, self.model, self.config, self.num_classes)
        if prompt.config.source != source:
            raise ReplyError(f"prompt claims source {prompt.config.source[:140]!r} but node is source {source!r}")
        echoed = parent_sha256(reply.content)
        if parent_sha256_sent is not None and echoed != parent_sha256_sent:
            raise ReplyError(f"reply was trained from prompt {echoed[:12] or '(none)'} but the server sent "
                             f"{parent_sha256_sent[:12] or '(none)'}")
        return self.pool.add(source, prompt, metrics, parent_sha256=echoed)


def _log_report(report: RoundReport, train: TrainRound) -> None:
    """One warning per rejected node (saying which version its source keeps), one line per stored prompt."""
    for nid, reason in report.rejected.items():
        source = train.sources[nid]
        parent = train.parents[source]
        kept = f"v{parent.version}" if parent.version else "no prompt yet"
        if source in report.stored:
            kept = f"v{report.stored[source]} from another node"
        log(WARNING, "round %d: node %s (source %s) not stored: %s; source %s keeps %s",
            report.round, nid, source, reason, source, kept)
    for source, version in report.stored.items():
        log(INFO, "round %d: stored %s v%d", report.round, source, version)


def _connected_sources(grid: Grid, sources: dict[int, str], server_round: int, timeout: float,
                       bindings: Mapping[int, str] | None) -> dict[int, str]:
    """The identified nodes still connected, plus the newly connected ones (identified now)."""
    online = set(grid.get_node_ids())
    for nid in sorted(set(sources) - online):
        log(WARNING, "round %d: node %s (source %s) is no longer connected; skipped", server_round, nid,
            sources[nid])
    current = {nid: src for nid, src in sources.items() if nid in online}
    new = sorted(online - set(current))
    if new:
        current.update(identify_nodes(grid, new, timeout, bindings))
    _warn_shared_sources(current, server_round)
    return current


def _warn_shared_sources(sources: dict[int, str], server_round: int) -> None:
    """Several nodes claiming one source train from the same version: only one reply can be stored."""
    nodes_of: dict[str, list[int]] = defaultdict(list)
    for nid, source in sources.items():
        nodes_of[source].append(nid)
    for source, nids in sorted(nodes_of.items()):
        if len(nids) > 1:
            log(WARNING, "round %d: nodes %s all claim source %s; only the first valid reply is stored "
                "(give each SuperNode its own --node-config source)", server_round, sorted(nids), source)


def run_label_space(config: AppConfig) -> int | None:
    """The number of classes of the run's dataset (built-in names, else the server's copy of it).

    ``None`` (logged) when the server has no copy of an unknown dataset: replies are then
    not checked against a label space.
    """
    known = known_label_space(config.dataset)
    if known is not None:
        return known
    for split in ("test", "train"):
        try:
            return len(load_split(config.dataset, config.data_path(), split).classes)
        except (OSError, ValueError):
            continue
    log(WARNING, "dataset %s is not available on the server: the label space of replies is not checked",
        config.dataset)
    return None
