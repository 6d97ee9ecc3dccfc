"""The prompt pool: every source's prompts, kept side by side (never averaged), versioned.

À-la-carte composition needs each source's own prompt, so the server *keeps* what every
source uploads and composes any subset at query time. ``PromptPool`` is that store.

Layout under the pool directory ``root``::

    root/pool.sqlite                          index (SQLite, WAL mode, synchronous=FULL)
    root/prompts/<source>/v<version>.safetensors

The index holds one row per (source, version) with the metadata needed for listing
(labels, number of examples, creation time, backbone fingerprint, round, metrics, the
file's SHA-256), so listing never reads tensors.

Consistency (a process may die at any instant, e.g. SIGKILL):

* ``add`` takes the index's write lock (``BEGIN IMMEDIATE``), writes the file atomically
  (temporary file, fsync, rename, fsync of the folder), then inserts the row and commits.
  A crash before the commit leaves only an *orphan* file that no row names; it is ignored
  and deleted by ``repair()``, an explicit writer action (``alacarte pool repair``, and the
  ServerApp on start through ``PromptPool.open_and_repair``). A row never names a missing
  file.
* ``remove`` deletes the rows (commit), then the files. A crash in between leaves orphans,
  cleaned as above.
* Readers never block: each call opens its own connection and sees a committed snapshot.
  File contents are checked against the SHA-256 in the index, so a reader racing a
  ``remove`` gets ``UnknownSourceError``, never a half-forgotten prompt.

Versions of a source count 1, 2, ... without gaps. After ``remove`` (forget) a source id
may be added again and starts at version 1, so caches should key prompts by
``PoolEntry.sha256`` (or watch ``generation()``), not by (source, version) alone.

Read-only use (``PromptPool(root, read_only=True)``: ``alacarte serve``, ``alacarte pool
ls/show``) never writes, creates or deletes anything: the index is opened with SQLite's
``mode=ro`` (``immutable=1`` when the folder is not writable and no writer is active), and
writing methods raise ``ReadOnlyPoolError``.

What the pool stores is bounded: a prompt's ``created_at`` must be a finite time between
1970 and a day from now and its ``num_examples`` at most 2**53 (``InvalidPromptMetadataError``
otherwise), so listing never meets an unprintable value.

Every public method is safe to call from many threads and processes at once: a
``PromptPool`` keeps no open connection (each call opens its own, with a busy timeout), so
one instance may be shared by a gRPC thread pool and used after ``fork``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from common.files import atomic_write
from common.prompt import Prompt

if TYPE_CHECKING:
    from common.model import APTViT

__all__ = [
    "InvalidMetricsError",
    "InvalidPromptMetadataError",
    "InvalidSourceError",
    "PoolCorruptError",
    "PoolEntry",
    "PoolError",
    "PoolNotFoundError",
    "PromptPool",
    "ReadOnlyPoolError",
    "RepairReport",
    "SourceMismatchError",
    "StaleParentError",
    "StaleVersionError",
    "UnknownSourceError",
    "validate_source",
]

logger = logging.getLogger(__name__)

POOL_ENV = "ALACARTE_POOL"
INDEX_NAME = "pool.sqlite"
PROMPTS_DIR = "prompts"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
MAX_SOURCE_LEN = 128
_SOURCE_RE = re.compile(r"[A-Za-z0-9_.-]+")
_KNOWN_SHOWN = 20
MAX_CLOCK_SKEW_S = 86400.0  # created_at may be at most this far in the future
MAX_NUM_EXAMPLES = 2**53

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    f"INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', {SCHEMA_VERSION}), ('generation', 0)",
    """CREATE TABLE IF NOT EXISTS prompts (
        source       TEXT    NOT NULL,
        version      INTEGER NOT NULL,
        path         TEXT    NOT NULL,  -- relative to the pool root
        sha256       TEXT    NOT NULL,
        labels       TEXT    NOT NULL,  -- JSON list of class ids
        num_classes  INTEGER NOT NULL,
        num_examples INTEGER NOT NULL,
        created_at   REAL    NOT NULL,  -- when the prompt was made (its own metadata)
        added_at     REAL    NOT NULL,  -- when the pool stored it
        backbone     TEXT    NOT NULL,
        fingerprint  TEXT    NOT NULL,
        round        INTEGER,
        metrics      TEXT    NOT NULL,  -- JSON object
        PRIMARY KEY (source, version)
    ) WITHOUT ROWID""",
)

_COLUMNS = ("source, version, path, sha256, labels, num_classes, num_examples, created_at, added_at, "
            "backbone, fingerprint, round, metrics")


class PoolError(Exception):
    """Base class of prompt pool errors."""


class PoolNotFoundError(PoolError, FileNotFoundError):
    """No pool exists at the given directory (and creating one was not asked for)."""


class InvalidSourceError(PoolError, ValueError):
    """A source id is empty or unsafe as a file name."""


class SourceMismatchError(PoolError, ValueError):
    """The prompt says it belongs to another source than the one it is added under."""


class InvalidMetricsError(PoolError, ValueError):
    """Metrics are not a mapping of names to finite numbers or strings."""


class InvalidPromptMetadataError(PoolError, ValueError):
    """A prompt's creation time or example count is outside what the pool stores."""


class ReadOnlyPoolError(PoolError):
    """A writing method was called on a pool opened with ``read_only=True``."""


class UnknownSourceError(PoolError, KeyError):
    """The pool has no such source (or no such version of it)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class StaleVersionError(PoolError):
    """An ``add`` was based on a version that is no longer the source's latest."""

    def __init__(self, source: str, parent_version: int, latest_version: int) -> None:
        self.source, self.parent_version, self.latest_version = source, parent_version, latest_version
        now = (f"its latest version is {latest_version}" if latest_version
               else "it has no version (forgotten or never added)")
        super().__init__(
            f"stale prompt for source {source!r}: it was trained from version {parent_version} but {now}; "
            "the reply is late or duplicated and was not stored. Send the source its latest prompt and train again")


class StaleParentError(StaleVersionError):
    """An ``add`` was trained from a prompt (by SHA-256) that is no longer the source's latest."""

    def __init__(self, source: str, parent_sha256: str, latest: PoolEntry | None) -> None:
        PoolError.__init__(
            self, f"stale prompt for source {source!r}: it was trained from the prompt "
            f"{parent_sha256[:12] or '(none)'} but the latest is "
            f"{f'v{latest.version} ({latest.sha256[:12]})' if latest else 'none (forgotten or never added)'}; "
            "the reply is late, duplicated or based on a forgotten prompt and was not stored. "
            "Send the source its latest prompt and train again")
        self.source, self.parent_sha256 = source, parent_sha256
        self.parent_version, self.latest_version = -1, latest.version if latest else 0


class PoolCorruptError(PoolError):
    """An indexed prompt file is missing or its bytes differ from the index."""


@dataclass(frozen=True)
class PoolEntry:
    """One stored version of a source's prompt, as listed by the index (no tensors read)."""

    source: str
    version: int
    path: Path
    sha256: str
    labels: tuple[int, ...]
    num_classes: int
    num_examples: int
    created_at: float
    added_at: float
    backbone: str
    fingerprint: str
    round: int | None
    metrics: dict[str, float | int | str]


@dataclass(frozen=True)
class RepairReport:
    """What ``PromptPool.repair`` cleaned up."""

    orphans: tuple[Path, ...]  # files no index row names (interrupted writes), deleted
    dangling: tuple[tuple[str, int], ...]  # (source, version) rows whose file was missing, dropped

    def __bool__(self) -> bool:
        return bool(self.orphans or self.dangling)


def default_pool_dir() -> Path:
    """``$ALACARTE_POOL``, else ``$ALACARTE_HOME/pool``: where the app and the service look by default."""
    from common.assets import alacarte_home

    env = os.environ.get(POOL_ENV)
    return Path(env).expanduser() if env else alacarte_home() / "pool"


def validate_source(source: str) -> str:
    """Return ``source`` if it is a valid source id, else raise ``InvalidSourceError``.

    Valid ids are 1-128 characters among letters, digits, ``-``, ``_`` and ``.``, not
    starting with ``.`` (so they are safe, visible file names).
    """
    if not isinstance(source, str) or not _SOURCE_RE.fullmatch(source) or source.startswith(".") \
            or len(source) > MAX_SOURCE_LEN:
        raise InvalidSourceError(
            f"invalid source id {source!r}: use 1-{MAX_SOURCE_LEN} ASCII letters, digits, '-', '_' or '.', "
            "not starting with '.' (e.g. 'client-3')")
    return source


class PromptPool:
    """A directory of versioned per-source prompts with a SQLite index; see the module doc."""

    def __init__(self, root: str | Path, *, create: bool = True, read_only: bool = False) -> None:
        """Open (or with ``create``, make) the pool at ``root``; opening never repairs or deletes.

        ``read_only`` opens an existing pool for reading only (nothing on disk changes).
        Raises ``PoolNotFoundError`` when ``root`` holds no pool and ``create`` is False
        or ``read_only`` is True.
        """
        self.root = Path(root).expanduser().resolve()
        self.index_path = self.root / INDEX_NAME
        self.read_only = read_only
        self._write_lock = threading.Lock()
        self._ro_uri = f"file:{self.index_path}?mode=ro"
        if not self.index_path.exists():
            if not create or read_only:
                raise PoolNotFoundError(
                    f"no prompt pool at {self.root} ({INDEX_NAME} is missing); check --pool / ALACARTE_POOL")
            (self.root / PROMPTS_DIR).mkdir(parents=True, exist_ok=True)
        if read_only:
            self._check_readable()
        else:
            self._init_index()

    @classmethod
    def open_and_repair(cls, root: str | Path) -> PromptPool:
        """Open (creating if need be) the pool at ``root`` for writing and ``repair()`` it (the ServerApp)."""
        pool = cls(root)
        pool.repair()
        return pool

    def __repr__(self) -> str:
        return f"PromptPool({str(self.root)!r}{', read_only=True' if self.read_only else ''})"

    # ------------------------------------------------------------------ writing

    def add(
        self,
        source: str,
        prompt: Prompt,
        metrics: Mapping[str, float | int | str] | None = None,
        *,
        round: int | None = None,
        parent_version: int | None = None,
        parent_sha256: str | None = None,
    ) -> int:
        """Store ``prompt`` as the next version of ``source`` and return that version (1, 2, ...).

        The stored artefact carries ``source`` as its source id: ``prompt.config.source`` must be
        empty or equal to it (else ``SourceMismatchError``); ``prompt`` itself is not modified.
        ``metrics`` (names to numbers or strings) and the federated ``round`` are kept in the
        index.

        Stale-reply guard: ``parent_version`` is the version the client started training from
        (0 for a source without a stored prompt). When given, the add succeeds only if that is
        still the source's latest version; otherwise ``StaleVersionError`` is raised and nothing
        is stored, so a late or duplicated reply never shadows a newer version, and a reply for
        a source forgotten meanwhile does not bring it back. ``None`` skips the check.

        ``parent_sha256`` is the stronger guard the federation uses: the SHA-256 of the
        stored prompt the client trained from ("" for none). Versions restart at 1 after
        ``remove``, hashes do not, so a reply trained from a forgotten prompt is refused
        (``StaleParentError``) even once the source is back at that version number.

        Raises ``InvalidSourceError``, ``SourceMismatchError``, ``InvalidMetricsError``,
        ``InvalidPromptMetadataError``, ``StaleVersionError``, ``ReadOnlyPoolError``, or a
        ``common.prompt.PromptError`` if the prompt is invalid (e.g. NaN); nothing is stored then.
        """
        self._check_writable()
        validate_source(source)
        if prompt.config.source not in ("", source):
            raise SourceMismatchError(
                f"prompt belongs to source {prompt.config.source!r}, not {source!r}; add it under its own source id")
        data = prompt.to_bytes(replace(prompt.config, source=source))
        stored = Prompt.from_bytes(data)  # what readers will get: validate before storing
        _check_storable(stored)
        meta = stored.config
        metrics_json = _metrics_json(metrics)
        with self._write() as conn:
            latest = _latest_version(conn, source)
            if parent_version is not None and parent_version != latest:
                raise StaleVersionError(source, parent_version, latest)
            if parent_sha256 is not None:
                _check_parent(conn, self, source, parent_sha256)
            version = latest + 1
            rel = f"{PROMPTS_DIR}/{source}/v{version}.safetensors"
            _durable_write(self.root / rel, data)
            conn.execute(
                f"INSERT INTO prompts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (source, version, rel, hashlib.sha256(data).hexdigest(), json.dumps(list(meta.labels)),
                 meta.num_classes, meta.num_examples, meta.created_at, time.time(), meta.backbone,
                 meta.fingerprint, round, metrics_json))
            _bump_generation(conn)
        return version

    def remove(self, source: str) -> int:
        """Forget ``source``: delete all its versions' files and index rows; return how many.

        The removal is committed to the index first (other processes stop seeing the source),
        then the files are deleted. Raises ``UnknownSourceError`` if the source is not stored.
        """
        self._check_writable()
        with self._write() as conn:
            count = conn.execute("DELETE FROM prompts WHERE source = ?", (source,)).rowcount
            if not count:
                raise UnknownSourceError(self._unknown_message(conn, source, None))
            _bump_generation(conn)
        self._delete_orphans(only=source)
        return count

    def repair(self) -> RepairReport:
        """Delete orphan files (left by interrupted writes) and drop rows whose file is gone.

        A writer's action (``alacarte pool repair``; the ServerApp on start), never run by
        opening a pool; safe to call at any time, also while others write. Logs what it did.
        """
        self._check_writable()
        with self._write() as conn:
            dangling = tuple((s, v) for s, v, rel in conn.execute("SELECT source, version, path FROM prompts")
                             if not (self.root / rel).is_file())
            if dangling:
                conn.executemany("DELETE FROM prompts WHERE source = ? AND version = ?", dangling)
                _bump_generation(conn)
        report = RepairReport(orphans=self._delete_orphans(), dangling=dangling)
        if report:
            logger.warning("prompt pool %s repaired: deleted %d orphan file(s), dropped %d dangling row(s) %s",
                           self.root, len(report.orphans), len(report.dangling), list(report.dangling))
        return report

    # ------------------------------------------------------------------ reading

    def get(self, source: str, version: int | None = None, model: APTViT | None = None) -> Prompt:
        """Load a version of ``source`` (the latest by default), validated like ``Prompt.load``.

        With ``model`` the prompt must fit its backbone and is placed on its device. Raises
        ``UnknownSourceError`` for an unknown source or version, ``PoolCorruptError`` if the
        file was damaged outside the pool.
        """
        return self._load(self.info(source, version), model)

    def read_bytes(self, source: str, version: int | None = None) -> bytes:
        """The stored artefact of a version of ``source`` (the latest by default), byte for byte,
        checked against the index's SHA-256 (errors as in ``get``): what ``alacarte pool export``
        writes, and ``Prompt.from_bytes`` (or another pool's ``add``) reads back."""
        return self._read(self.info(source, version))

    def latest(self, model: APTViT | None = None) -> dict[str, Prompt]:
        """The latest prompt of every source, by source id, validated as in ``get``.

        Sources forgotten while this runs are left out; any other error of ``get`` is raised.
        """
        prompts = {}
        for entry in self.entries():
            with contextlib.suppress(UnknownSourceError):
                prompts[entry.source] = self._load(entry, model)
        return prompts

    def sources(self) -> list[str]:
        """The stored source ids, sorted."""
        with self._connect() as conn:
            return [s for (s,) in conn.execute("SELECT DISTINCT source FROM prompts ORDER BY source")]

    def entries(self) -> list[PoolEntry]:
        """The latest version's entry of every source, sorted by source id."""
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM prompts AS p "
                "WHERE version = (SELECT MAX(version) FROM prompts WHERE source = p.source) ORDER BY source")
            return [self._entry(row) for row in rows]

    def info(self, source: str, version: int | None = None) -> PoolEntry:
        """The index entry of a version of ``source`` (the latest by default)."""
        with self._connect() as conn:
            if version is None:
                row = conn.execute(f"SELECT {_COLUMNS} FROM prompts WHERE source = ? ORDER BY version DESC LIMIT 1",
                                   (source,)).fetchone()
            else:
                row = conn.execute(f"SELECT {_COLUMNS} FROM prompts WHERE source = ? AND version = ?",
                                   (source, version)).fetchone()
            if row is None:
                raise UnknownSourceError(self._unknown_message(conn, source, version))
        return self._entry(row)

    def history(self, source: str) -> list[PoolEntry]:
        """Every stored version of ``source``, oldest first."""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM prompts WHERE source = ? ORDER BY version",
                                (source,)).fetchall()
            if not rows:
                raise UnknownSourceError(self._unknown_message(conn, source, None))
        return [self._entry(row) for row in rows]

    def generation(self) -> int:
        """A counter bumped by every change (add, remove, repair), in any process.

        Cheap to poll: a long-running service re-reads ``entries()`` when it changes.
        """
        with self._connect() as conn:
            return conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection (autocommit; explicit transactions; read-only URI when read-only), closed on exit."""
        if self.read_only:
            conn = sqlite3.connect(self._ro_uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        else:
            conn = sqlite3.connect(self.index_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            if not self.read_only:
                conn.execute("PRAGMA synchronous = FULL")
            yield conn
        finally:
            conn.close()

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyPoolError(f"the prompt pool at {self.root} was opened read-only; open it without "
                                    "read_only to change it")

    def _check_readable(self) -> None:
        """Check the schema without writing; fall back on ``immutable=1`` if ``mode=ro`` cannot open it.

        A WAL database needs its ``-shm`` file to be read; in a folder this process may not
        write, with no writer active (no ``-shm``), SQLite can only read it as immutable.
        """
        try:
            try:
                schema = self._schema()
            except sqlite3.OperationalError:
                if os.access(self.root, os.W_OK):
                    raise
                self._ro_uri = f"file:{self.index_path}?mode=ro&immutable=1"
                logger.warning("prompt pool %s is read-only for this process: reading it as immutable "
                               "(changes made meanwhile by a writer are not seen)", self.root)
                schema = self._schema()
        except sqlite3.DatabaseError as err:
            raise PoolError(f"the index of the prompt pool at {self.root} is unreadable ({err}); check the "
                            "folder's permissions, or restore it") from err
        if schema != SCHEMA_VERSION:
            raise PoolError(f"prompt pool {self.root} has index schema {schema}; this build reads "
                            f"schema {SCHEMA_VERSION}. Use a matching alacarte version")

    def _schema(self) -> int | None:
        with self._connect() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else row[0]

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the index's write lock (across threads and processes)."""
        with self._write_lock, self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _init_index(self) -> None:
        with self._connect() as conn:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                logger.warning("prompt pool %s: SQLite WAL mode unavailable (journal_mode=%s); "
                               "readers may wait for writers. Keep the pool on a local file system", self.root, mode)
        with self._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            schema = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if schema != SCHEMA_VERSION:
            raise PoolError(f"prompt pool {self.root} has index schema {schema}; this build reads "
                            f"schema {SCHEMA_VERSION}. Use a matching alacarte version")

    def _entry(self, row: tuple) -> PoolEntry:
        (source, version, rel, sha, labels, num_classes, num_examples, created_at, added_at,
         backbone, fingerprint, round_, metrics) = row
        return PoolEntry(
            source=source, version=version, path=self.root / rel, sha256=sha, labels=tuple(json.loads(labels)),
            num_classes=num_classes, num_examples=num_examples, created_at=created_at, added_at=added_at,
            backbone=backbone, fingerprint=fingerprint, round=round_, metrics=json.loads(metrics))

    def _load(self, entry: PoolEntry, model: APTViT | None) -> Prompt:
        return Prompt.from_bytes(self._read(entry), model)

    def _read(self, entry: PoolEntry) -> bytes:
        """The file bytes of ``entry``, checked against its SHA-256.

        On a mismatch the index decides: the row is gone (forgotten meanwhile:
        ``UnknownSourceError``), was replaced (forgotten and re-added: read the new one), or
        is unchanged (the file was damaged: ``PoolCorruptError``).
        """
        try:
            data = entry.path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None and hashlib.sha256(data).hexdigest() == entry.sha256:
            return data
        current = self.info(entry.source, entry.version)
        if current.sha256 != entry.sha256:
            return self._read(current)
        problem = "is missing" if data is None else "does not match the index (SHA-256 differs)"
        raise PoolCorruptError(
            f"prompt file {entry.path} of source {entry.source!r} version {entry.version} {problem}; it was changed "
            f"outside the pool. Forget the source (`alacarte pool rm {entry.source}`) and have it upload again")

    def _delete_orphans(self, only: str | None = None) -> tuple[Path, ...]:
        """Delete files under ``prompts/`` (or one source's folder) that no row names; drop empty folders.

        Runs under the write lock, so a file being written by an ``add`` (whose row is not
        committed yet) is never taken for an orphan.
        """
        base = self.root / PROMPTS_DIR
        folders = [base / only] if only is not None else [p for p in base.iterdir() if p.is_dir()]
        removed = []
        with self._write() as conn:
            indexed = {rel for (rel,) in conn.execute("SELECT path FROM prompts")}
            for folder in folders:
                if not folder.is_dir():
                    continue
                for path in list(folder.iterdir()):
                    if path.relative_to(self.root).as_posix() not in indexed:
                        path.unlink(missing_ok=True)
                        removed.append(path)
                if not any(folder.iterdir()):
                    folder.rmdir()
        return tuple(removed)

    def _unknown_message(self, conn: sqlite3.Connection, source: str, version: int | None) -> str:
        versions = [v for (v,) in conn.execute("SELECT version FROM prompts WHERE source = ? ORDER BY version",
                                               (source,))]
        if versions:
            return (f"source {source!r} has no version {version} in the pool at {self.root}; "
                    f"it has versions {versions[0]}..{versions[-1]}")
        known = [s for (s,) in conn.execute("SELECT DISTINCT source FROM prompts ORDER BY source")]
        shown = ", ".join(known[:_KNOWN_SHOWN]) + (f", ... ({len(known)} in all)" if len(known) > _KNOWN_SHOWN else "")
        return (f"unknown source {source!r} in the pool at {self.root}; known sources: {shown or 'none'} "
                "(see `alacarte pool ls`)")


def _check_storable(prompt: Prompt) -> None:
    """Refuse metadata the index could not store or list (SQLite integers, printable times)."""
    created_at = prompt.config.created_at
    if not (isinstance(created_at, float | int) and 0.0 <= created_at <= time.time() + MAX_CLOCK_SKEW_S):
        raise InvalidPromptMetadataError(
            f"prompt created_at = {created_at!r} is not a time between 1970 and a day from now; check the "
            "sender's clock")
    if not 0 <= prompt.config.num_examples <= MAX_NUM_EXAMPLES:
        raise InvalidPromptMetadataError(
            f"prompt num_examples = {prompt.config.num_examples} is outside 0..{MAX_NUM_EXAMPLES}")


def _check_parent(conn: sqlite3.Connection, pool: PromptPool, source: str, parent_sha256: str) -> None:
    """Raise ``StaleParentError`` unless ``parent_sha256`` is the source's latest prompt ("" = none)."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM prompts WHERE source = ? ORDER BY version DESC LIMIT 1",
                       (source,)).fetchone()
    latest = None if row is None else pool._entry(row)
    if (latest.sha256 if latest else "") != parent_sha256:
        raise StaleParentError(source, parent_sha256, latest)


def _latest_version(conn: sqlite3.Connection, source: str) -> int:
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM prompts WHERE source = ?", (source,)).fetchone()[0]


def _bump_generation(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")


def _durable_write(path: Path, data: bytes) -> None:
    """Atomically write ``path`` and fsync its folder (and the folder's parent if it is new)."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        _fsync_dir(path.parent.parent)
    atomic_write(path, data)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _metrics_json(metrics: Mapping[str, float | int | str] | None) -> str:
    """``metrics`` as a JSON object of finite numbers and strings."""
    out: dict[str, float | int | str] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, numbers.Integral):
            value = int(value)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            value = float(value)
        elif not isinstance(value, str):
            raise InvalidMetricsError(
                f"metric {name!r} = {value!r} must be a finite number or a string; convert or drop it")
        if not isinstance(name, str):
            raise InvalidMetricsError(f"metric names must be strings, got {name!r}")
        out[name] = value
    return json.dumps(out, sort_keys=True)
