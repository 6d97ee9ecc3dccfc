"""The FedAvg baseline: one shared prompt averaged with Flower's own ``FedAvg`` strategy.

``run_fedavg`` trains it over Flower's Grid and stores it in the pool as source ``fedavg``.
``CheckedFedAvg`` checks every reply as the à-la-carte federation does before it enters the
average (``server.federation``, ``server.admission``). With validation splits, every round's
shared prompt is evaluated on the nodes' validation splits (federated evaluation) and the
round with the lowest validation loss is stored; with ``fedavg-patience`` the run stops once
that loss has not fallen for that many rounds. A restarted run resumes the stored shared prompt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, replace
from logging import INFO, WARNING

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from common.config import AppConfig
from common.model import APTViT
from common.prompt import Prompt
from common.records import ReplyError, prompt_records
from server.admission import Evaluation
from server.federation import admit_prompt, admitted_evaluation, exception_reason, latest_parent
from server.pool import PromptPool

__all__ = ["FEDAVG_SOURCE", "LOSS_TIE_RTOL", "CheckedFedAvg", "PatienceExhausted", "run_fedavg"]

FEDAVG_SOURCE = "fedavg"
# Rounds whose validation losses agree to this relative tolerance tie, and the earlier one is
# kept: when every client returns the prompt it was sent, the average differs from it only by
# float rounding, and so does its loss (far below what a validation split can resolve).
LOSS_TIE_RTOL = 1e-4


def run_fedavg(grid: Grid, pool: PromptPool, model: APTViT, config: AppConfig, num_classes: int) -> int:
    """The baseline: one shared prompt averaged with Flower's FedAvg; stored as source ``fedavg``.

    Resumes from the pool's latest shared prompt when it fits (same backbone and classes).
    With validation splits (``val-fraction > 0``) every round's shared prompt is evaluated on
    every node's validation split and the round with the lowest validation loss is stored
    (``CheckedFedAvg``): the paragon's selection on the union of the validation splits,
    federated; without them the last round's is.
    """
    fresh = Prompt.init(model, num_classes, n_prompt=config.n_prompt, n_memory=config.n_memory,
                        source=FEDAVG_SOURCE)
    start = latest_parent(pool, FEDAVG_SOURCE, model)
    stored = start.prompt
    usable = stored is not None and stored.arrays().keys() == fresh.arrays().keys() and all(
        stored.arrays()[k].shape == v.shape for k, v in fresh.arrays().items())
    if stored is not None and not usable:
        log(WARNING, "shared prompt v%d does not fit %d classes / this prompt size; starting afresh",
            start.version, num_classes)
    init = stored if usable else fresh
    if usable:
        log(INFO, "FedAvg resumes from the shared prompt v%d", start.version)
    if config.fedavg_patience and not config.val_fraction > 0:
        log(WARNING, "fedavg-patience needs validation splits (val-fraction > 0); all %d rounds run",
            config.num_server_rounds)
    nodes = len(list(grid.get_node_ids()))
    strategy = CheckedFedAvg(init, model, config, fraction_evaluate=1.0 if config.val_fraction > 0 else 0.0,
                             min_train_nodes=nodes, min_evaluate_nodes=nodes, min_available_nodes=nodes)
    with suppress(PatienceExhausted):
        strategy.start(grid=grid, initial_arrays=strategy.current.arrays, num_rounds=config.num_server_rounds,
                       timeout=config.reply_timeout)
    kept = strategy.best or strategy.current
    if strategy.best is not None:
        log(INFO, "FedAvg keeps round %d's shared prompt (validation loss %.4f, the lowest of %d rounds)",
            kept.round, kept.val_loss, strategy.rounds)
    arrays = {k: v.numpy() for k, v in kept.arrays.items()}
    shared = Prompt.from_arrays(arrays, replace(init.config, num_examples=kept.num_examples), model)
    meta = {"rounds": strategy.rounds, "kept-round": kept.round}
    return pool.add(FEDAVG_SOURCE, shared, meta, parent_sha256=start.sha256)


class PatienceExhausted(Exception):
    """Ends Flower's round loop early: ``fedavg-patience`` rounds in a row brought no lower
    validation loss (raised by :meth:`CheckedFedAvg.aggregate_evaluate`, caught by ``run_fedavg``)."""


@dataclass(frozen=True)
class _RoundPrompt:
    """The shared prompt averaged in ``round`` (0: the starting one), the training images behind
    it and its validation loss over the nodes that evaluated it (NaN: not evaluated)."""

    round: int
    arrays: ArrayRecord
    num_examples: int
    val_loss: float = math.nan


class CheckedFedAvg(FedAvg):
    """Flower's FedAvg that checks every reply as à-la-carte mode does before averaging it.

    A reply must hold the shared prompt's exact tensors (names, shapes, float32, finite),
    admissible metadata and metrics, and a positive ``num-examples``; any other reply is
    logged with its node and left out of the average (a NaN never spoils it). A round
    without a valid reply keeps the shared prompt unchanged. ``current`` is the latest shared
    prompt, with the training images behind it (the sum over its round's averaged replies).

    Federated evaluation (when ``fraction_evaluate > 0``) scores each round's shared prompt on
    the nodes' validation splits; ``best`` is the round whose example-weighted mean validation
    loss is the lowest, the earliest of rounds that tie to ``LOSS_TIE_RTOL`` (``None`` until an
    evaluation reply is admitted). Evaluate replies are untrusted too
    (``server.admission.check_evaluation``): a malformed one is logged and left out. With
    ``fedavg-patience`` N > 0, N evaluated rounds in a row without a new ``best`` (a round no
    node could evaluate counts as one) raise :class:`PatienceExhausted`. ``rounds`` counts the
    rounds trained.
    """

    def __init__(self, template: Prompt, model: APTViT, config: AppConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        self.template, self.model, self.config = template, model, config
        self.current = _RoundPrompt(0, prompt_records(template)["arrays"], template.config.num_examples)
        self.best: _RoundPrompt | None = None
        self.rounds = 0
        self._stale = 0  # evaluated rounds since the last new best

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the replies that pass ``check_reply``; log the others."""
        self.rounds = server_round
        replies = list(replies)
        valid = [reply for reply in replies if self._admitted(server_round, reply)]
        if replies and not valid:
            log(WARNING, "FedAvg round %d: no valid reply; the shared prompt is unchanged", server_round)
        averaged = [reply for reply in valid if not reply.has_error()]
        arrays, metrics = super().aggregate_train(server_round, valid)
        if arrays is not None and averaged:
            images = sum(int(reply.content["metrics"]["num-examples"]) for reply in averaged)
            self.current = _RoundPrompt(server_round, arrays, images)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The shared prompt's validation loss and accuracy over the admitted evaluate replies
        (example-weighted); remembers that prompt if its loss is the lowest so far. ``None``
        without federated evaluation (no validation splits) or without a usable reply."""
        if not self.fraction_evaluate:
            return None
        scores = [evaluation for reply in replies if (evaluation := admitted_evaluation(
            f"FedAvg round {server_round}: node {reply.metadata.src_node_id}", reply)) is not None]
        metrics = self._score(server_round, scores) if scores else None
        if metrics is None:
            log(WARNING, "FedAvg round %d: no usable evaluate reply; this round cannot be kept", server_round)
            self._stale += 1
        patience = self.config.fedavg_patience
        if patience and self._stale >= patience:
            log(INFO, "FedAvg: %d round(s) in a row without a lower validation loss (fedavg-patience); "
                "stopping after round %d", self._stale, server_round)
            raise PatienceExhausted
        return metrics

    def _score(self, server_round: int, scores: list[Evaluation]) -> MetricRecord:
        """Log and return this round's example-weighted validation loss and accuracy; the round
        becomes ``best`` if its loss is lower than the best's beyond ``LOSS_TIE_RTOL``."""
        images = sum(e.num_examples for e in scores)
        loss = sum(e.loss * e.num_examples for e in scores) / images
        accuracy = sum(e.accuracy * e.num_examples for e in scores) / images
        log(INFO, "FedAvg round %d: validation loss %.4f, accuracy %.3f (%d images, %d nodes)", server_round, loss,
            accuracy, images, len(scores))
        if self.best is None or (loss < self.best.val_loss
                                 and not math.isclose(loss, self.best.val_loss, rel_tol=LOSS_TIE_RTOL)):
            self.best, self._stale = replace(self.current, val_loss=loss), 0
        else:
            self._stale += 1
        return MetricRecord({"val-loss": loss, "val-accuracy": accuracy})

    def _admitted(self, server_round: int, reply: Message) -> bool:
        if reply.has_error():
            return True  # FedAvg itself logs and drops error replies
        try:
            self.check_reply(reply.content)
        except Exception as err:  # untrusted reply: whatever it makes fail rejects it alone
            log(WARNING, "FedAvg round %d: reply of node %s rejected: %s", server_round,
                reply.metadata.src_node_id, exception_reason(err))
            return False
        return True

    def check_reply(self, content: RecordDict) -> None:
        """Raise unless ``content`` is an admissible update of the shared prompt."""
        prompt, metrics = admit_prompt(content, self.model, self.config)
        Prompt.from_arrays(prompt.arrays(), self.template.config, self.model)  # the shared prompt's shapes
        if not 1 <= metrics.get("num-examples", 0):
            raise ReplyError("a FedAvg reply needs num-examples >= 1 (its weight in the average)")
