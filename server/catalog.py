"""What the composition service can compose: the pool's latest admissible prompts, kept loaded.

``Catalog.current()`` returns the ``Snapshot`` of the pool's current generation. The pool
is re-read when ``PromptPool.generation()`` changes (checked on every request, one small
SQLite query); only prompts whose file hash changed are loaded again, so new versions and
forgotten sources take effect without a restart.

Only prompts this server admits are served (``server.admission``: n_prompt/n_memory within
the limits and, when the server has class names, a head over exactly that label space);
others are listed as unservable with the reason. ``select_prompts`` resolves a request's
sources against a snapshot and the caller's rights.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from common.model import APTViT
from common.prompt import Prompt, PromptError
from server.admission import check_prompt
from server.auth import Principal
from server.errors import RequestError
from server.pool import MAX_SOURCE_LEN, PoolCorruptError, PoolEntry, PromptPool, UnknownSourceError

__all__ = ["Catalog", "ServedPrompt", "Snapshot", "select_prompts"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedPrompt:
    """A prompt ready to run, with the pool entry it was loaded from."""

    entry: PoolEntry
    prompt: Prompt


@dataclass(frozen=True)
class Snapshot:
    """The servable state of the pool at one ``generation``."""

    generation: int
    prompts: Mapping[str, ServedPrompt] = field(default_factory=dict)
    unservable: Mapping[str, str] = field(default_factory=dict)  # source -> why it cannot be composed


class Catalog:
    """The pool's latest admissible prompts, loaded on the model's device and refreshed on change.

    ``num_classes`` (the label space of the server's class names) makes prompts of another
    label space unservable; prompts over the shape limits always are.
    """

    def __init__(self, pool: PromptPool, model: APTViT, num_classes: int | None = None) -> None:
        self.pool, self.model, self.num_classes = pool, model, num_classes
        self._lock = threading.Lock()
        self._snapshot = Snapshot(generation=-1)
        self.current()

    def current(self) -> Snapshot:
        """The snapshot of the pool's current generation (reloading what changed)."""
        generation = self.pool.generation()
        if generation <= self._snapshot.generation:
            return self._snapshot
        with self._lock:
            if generation > self._snapshot.generation:
                self._snapshot = self._load(generation, self._snapshot)
            return self._snapshot

    def _load(self, generation: int, previous: Snapshot) -> Snapshot:
        prompts: dict[str, ServedPrompt] = {}
        unservable: dict[str, str] = {}
        for entry in self.pool.entries():
            old = previous.prompts.get(entry.source)
            if old is not None and old.entry.sha256 == entry.sha256:
                prompts[entry.source] = old
                continue
            try:
                prompt = self.pool.get(entry.source, entry.version, model=self.model).requires_grad_(False)
                check_prompt(prompt, self.num_classes)
            except UnknownSourceError:  # forgotten meanwhile
                continue
            except (PromptError, PoolCorruptError) as err:
                unservable[entry.source] = self._public_reason(err)
                logger.warning("source %r cannot be served: %s", entry.source, err)
                continue
            prompts[entry.source] = ServedPrompt(entry, prompt)
        logger.info("prompt pool generation %d: %d source(s) servable", generation, len(prompts))
        return Snapshot(generation, prompts, unservable)

    def _public_reason(self, err: Exception) -> str:
        """Why a source cannot be served, for callers: no server path in it."""
        if isinstance(err, PoolCorruptError):
            return "its stored prompt file is damaged or missing on the server; the operator must forget and re-add it"
        return str(err).replace(str(self.pool.root), "<pool>")


def select_prompts(snapshot: Snapshot, principal: Principal, requested: Sequence[str]) -> list[ServedPrompt]:
    """The prompts a request composes, sorted by source; raises ``RequestError``.

    An empty ``requested`` means every servable source the caller may use. A source outside
    the caller's rights is PERMISSION_DENIED whether or not it exists (nothing leaks).
    """
    if not requested:
        chosen = [s for s in snapshot.prompts if principal.may_use(s)]
        if not chosen:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"no prompt that user {principal.user!r} may use is in the pool yet")
    else:
        chosen = list(dict.fromkeys(requested))
        for source in chosen:
            _check_source(snapshot, principal, source)
    served = [snapshot.prompts[s] for s in sorted(chosen)]
    sizes = {p.prompt.config.num_classes for p in served}
    if len(sizes) > 1:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the selected sources (by default: all you may use) disagree on the label space "
                           f"size {sorted(sizes)}; select sources trained on the same label space")
    return served


def _check_source(snapshot: Snapshot, principal: Principal, source: str) -> None:
    if not principal.may_use(source):
        raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                           f"user {principal.user!r} may not compose source {source[:MAX_SOURCE_LEN]!r}; "
                           "ask the operator to extend your token's sources, or see ListSources")
    if source in snapshot.unservable:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"source {source!r} cannot be served: {snapshot.unservable[source]}")
    if source not in snapshot.prompts:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"unknown source {source[:MAX_SOURCE_LEN]!r} (never added, or forgotten); ListSources shows "
                           "the sources you may compose")
