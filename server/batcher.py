"""Dynamic batching: merge concurrently submitted jobs into one batch for a single worker.

RPC handler threads ``submit`` jobs (each of a known *size*, e.g. a number of images) to a
bounded queue and wait on the returned ``Future``. One worker thread takes the oldest job,
adds queued jobs while the batch stays within ``max_batch`` (waiting at most ``max_wait``
for more to arrive), skips jobs that were cancelled or whose deadline passed, and hands the
batch to ``process``, which returns one result (or exception) per job. A job larger than
``max_batch`` forms a batch of its own, so a job is never split.

A caller that must do costly work before its job exists (decode a request's images) first
``reserve()``s a queue slot: admission is decided before the work is paid, and reserved
slots count against ``max_queue`` like queued jobs. A reserved slot is a job known to be
coming, so while one is held and the batch has room the worker waits for it, up to
``reserved_wait``: under load, requests whose images are still being decoded join the
batch instead of the next one, and a lone request (nothing reserved) waits only ``max_wait``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatcherClosedError", "DeadlineExceededError", "DynamicBatcher", "QueueFullError", "Reservation"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` jobs already; the caller should retry later."""


class DeadlineExceededError(TimeoutError):
    """The job's deadline passed before the worker reached it; it was not processed."""


class BatcherClosedError(RuntimeError):
    """The batcher was closed (the server is shutting down)."""


class Reservation:
    """A queue slot held before its job exists; pass it to ``submit``, or ``release`` it.

    As a context manager it releases the slot on exit unless ``submit`` used it.
    """

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher = batcher
        self.held = True

    def release(self) -> None:
        """Give the slot back (no-op once submitted or released)."""
        self._batcher._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Job(Generic[T]):
    item: T
    size: int
    deadline: float | None  # time.monotonic() seconds
    future: Future


class DynamicBatcher(Generic[T, R]):
    """A bounded job queue drained in batches by one worker thread.

    Args:
        process: maps a batch of items to one result per item, in order; a result that is
            an exception is raised to that item's submitter only. If ``process`` raises,
            every job of the batch gets the exception.
        max_batch: largest total size of a batch (a single larger job still runs, alone).
        max_queue: most jobs waiting; ``submit`` raises ``QueueFullError`` beyond.
        max_wait: seconds the worker waits for more jobs once it has one.
        reserved_wait: seconds it waits, while a slot is reserved and the batch has room, for
            that slot's job (module doc); at least ``max_wait``.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch: int,
        max_queue: int,
        max_wait: float = 0.002,
        reserved_wait: float = 0.05,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait < 0 or reserved_wait < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait >= 0, reserved_wait >= 0; got "
                             f"{max_batch}, {max_queue}, {max_wait}, {reserved_wait}")
        self._process = process
        self.max_batch, self.max_queue, self.max_wait = max_batch, max_queue, max_wait
        self.reserved_wait = max(reserved_wait, max_wait)
        self._queue: deque[_Job[T]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._reserved = 0  # slots held by ``reserve`` and not yet submitted
        self.batches = self.jobs = self.items = 0  # processed so far (statistics)
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def reserve(self) -> Reservation:
        """Hold a queue slot for a job still being prepared. Raises ``QueueFullError`` or ``BatcherClosedError``."""
        with self._cond:
            self._admit()
            self._reserved += 1
        return Reservation(self)

    def submit(self, item: T, size: int = 1, deadline: float | None = None,
               reservation: Reservation | None = None) -> Future:
        """Queue ``item`` (of ``size`` units, deadline in ``time.monotonic()`` seconds).

        With a held ``reservation`` the job takes its slot (no new admission check).
        Returns a ``Future`` of its result; cancelling it before the worker starts the job
        drops the job. Raises ``QueueFullError`` or ``BatcherClosedError``.
        """
        future: Future = Future()
        with self._cond:
            if reservation is not None and reservation.held:
                if self._closed:
                    raise BatcherClosedError("the server is shutting down; retry on another replica")
                reservation.held = False
                self._reserved -= 1
            else:
                self._admit()
            self._queue.append(_Job(item, size, deadline, future))
            self._cond.notify()
        return future

    def _admit(self) -> None:
        """Raise unless a job may take a slot now (call with the lock held)."""
        if self._closed:
            raise BatcherClosedError("the server is shutting down; retry on another replica")
        if len(self._queue) + self._reserved >= self.max_queue:
            self._drop_dead()
        if len(self._queue) + self._reserved >= self.max_queue:
            raise QueueFullError(f"server busy: {len(self._queue) + self._reserved} requests already queued; "
                                 "retry with backoff")

    def _release(self, reservation: Reservation) -> None:
        with self._cond:
            if reservation.held:
                reservation.held = False
                self._reserved -= 1
                self._cond.notify()  # a worker waiting for this slot's job stops waiting

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker (cancelled ones excluded)."""
        with self._cond:
            return sum(not job.future.cancelled() for job in self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting jobs, finish the queued ones, and join the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout)

    def __enter__(self) -> DynamicBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._execute(batch)

    def _drop_dead(self) -> None:
        """Free the slots of queued jobs that were cancelled or whose deadline passed."""
        now = time.monotonic()
        live: deque[_Job[T]] = deque()
        for job in self._queue:
            if job.deadline is not None and job.deadline <= now:
                _expire(job)
            elif not job.future.cancelled():
                live.append(job)
        self._queue = live

    def _next_batch(self) -> list[_Job[T]] | None:
        """Block for the next batch of live jobs; ``None`` once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch, size = [], 0
            start = time.monotonic()
            wait_until, reserved_until = start + self.max_wait, start + self.reserved_wait
            while True:
                if self._queue:
                    if batch and size + self._queue[0].size > self.max_batch:
                        break
                    job = self._queue.popleft()
                    if _start(job):
                        batch.append(job)
                        size += job.size
                    if size >= self.max_batch:
                        break
                    continue
                remaining = (reserved_until if self._reserved else wait_until) - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _execute(self, batch: list[_Job[T]]) -> None:
        try:
            results = self._process([job.item for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"process returned {len(results)} results for {len(batch)} jobs")
        except Exception as err:  # the worker must survive any failure of one batch
            logger.exception("batch of %d jobs failed", len(batch))
            results = [err] * len(batch)
        for job, result in zip(batch, results):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        self.batches += 1
        self.jobs += len(batch)
        self.items += sum(job.size for job in batch)


def _start(job: _Job) -> bool:
    """Mark ``job`` running; False (and the job is dropped) if it was cancelled or expired."""
    if job.deadline is not None and time.monotonic() >= job.deadline:
        _expire(job)
        return False
    return job.future.set_running_or_notify_cancel()


def _expire(job: _Job) -> None:
    if job.future.set_running_or_notify_cancel():
        job.future.set_exception(DeadlineExceededError("the deadline passed while the request was queued"))
