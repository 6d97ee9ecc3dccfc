"""Bearer tokens of the composition service: who may compose which sources.

A *tokens file* (JSON, private: mode 0600) maps each user to a salted hash of their token
and to the sources they may compose::

    {"format": "alacarte-tokens", "version": 1,
     "users": {"alice": {"key_id": "9f2c41d07a5be813", "salt": "<hex>", "sha256": "<hex>",
                         "sources": ["hospital-a", "hospital-b"]},
               "ops":   {"key_id": "...", "salt": "...", "sha256": "...", "sources": "*"}}}

Tokens look like ``alc_<key_id>_<secret>``: the key id finds the entry without trying every
user, the secret (256 random bits) is checked against ``sha256(salt || secret)`` in
constant time. The file never holds a token; a token is shown once, when ``add_user``
creates it. A fast hash is enough because the secret is random, not a password.

``TokenStore`` re-reads the file whenever it changes (size, mtime or inode), so tokens can
be added or revoked while the server runs. If the file becomes unreadable, every request is
refused until it is fixed (fail closed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.files import atomic_write
from server.pool import validate_source

__all__ = [
    "ALL_SOURCES",
    "AuthenticationError",
    "Principal",
    "TokenFileError",
    "TokenStore",
    "add_user",
    "remove_user",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "alacarte-tokens"
FORMAT_VERSION = 1
ALL_SOURCES = "*"
TOKEN_PREFIX = "alc"
_USER_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


class AuthenticationError(Exception):
    """The request carries no valid bearer token (gRPC status UNAUTHENTICATED)."""


class TokenFileError(ValueError):
    """The tokens file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and the sources it may compose (``None`` = every source)."""

    user: str
    sources: frozenset[str] | None

    def may_use(self, source: str) -> bool:
        """Whether this caller may compose ``source``."""
        return self.sources is None or source in self.sources


@dataclass(frozen=True)
class _Entry:
    user: str
    salt: bytes
    digest: bytes
    sources: frozenset[str] | None


class TokenStore:
    """Checks bearer tokens against a tokens file, re-reading it when it changes."""

    def __init__(self, path: str | Path) -> None:
        """Load ``path``; raises ``TokenFileError`` if it is missing or malformed."""
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._stamp = _stamp(self.path)
        self._entries = _read_entries(self.path)

    def __len__(self) -> int:
        return len(self._current())

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The caller of a request with gRPC ``metadata``; raises ``AuthenticationError``."""
        token = _bearer_token(metadata)
        parts = token.split("_", 2)
        entries = self._current()
        entry = entries.get(parts[1]) if len(parts) == 3 and parts[0] == TOKEN_PREFIX else None
        if entry is None or not hmac.compare_digest(_digest(entry.salt, parts[2]), entry.digest):
            raise AuthenticationError("invalid or revoked token; ask the server operator for a new one")
        return Principal(entry.user, entry.sources)

    def _current(self) -> dict[str, _Entry]:
        """The entries by key id, re-read if the file changed since the last call."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return self._entries
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._entries = _read_entries(self.path)
                    logger.info("tokens file %s reloaded: %d user(s)", self.path, len(self._entries))
                except TokenFileError as err:
                    self._entries = {}
                    logger.error("tokens file unusable, refusing every request until it is fixed: %s", err)
                self._stamp = stamp
        return self._entries


def add_user(tokens_file: str | Path, user: str, sources: Sequence[str] | str) -> str:
    """Give ``user`` a new token allowed to compose ``sources`` (a list of ids, or ``"*"``).

    Creates the tokens file (mode 0600) if needed; an existing token of ``user`` is replaced
    (revoked). Returns the token: it is stored only as a salted hash, so show it to the user
    now, it cannot be recovered later.
    """
    if not isinstance(user, str) or not _USER_RE.fullmatch(user):
        raise ValueError(f"invalid user name {user!r}: use 1-128 letters, digits, '_', '.', '@' or '-'")
    allowed = _parse_sources(sources)
    key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_bytes(16)
    with _edit(Path(tokens_file).expanduser()) as users:
        users[user] = {"key_id": key_id, "salt": salt.hex(), "sha256": _digest(salt, secret).hex(),
                       "sources": allowed}
    return f"{TOKEN_PREFIX}_{key_id}_{secret}"


def remove_user(tokens_file: str | Path, user: str) -> None:
    """Revoke ``user``'s token; raises ``KeyError`` if the file has no such user."""
    with _edit(Path(tokens_file).expanduser()) as users:
        if users.pop(user, None) is None:
            raise KeyError(f"no user {user!r} in tokens file {tokens_file}")


@contextlib.contextmanager
def _edit(path: Path) -> Iterator[dict[str, dict]]:
    """Read-modify-write the users of ``path`` under an exclusive lock, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        users = _read_document(path)["users"] if path.exists() else {}
        yield users
        document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "users": users}
        atomic_write(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
        os.chmod(path, 0o600)


def _parse_sources(sources: Sequence[str] | str) -> list[str] | str:
    if sources == ALL_SOURCES or (not isinstance(sources, str) and list(sources) == [ALL_SOURCES]):
        return ALL_SOURCES
    if isinstance(sources, str) or not sources:
        raise ValueError(f"sources must be a non-empty list of source ids or {ALL_SOURCES!r}, got {sources!r}")
    return sorted({validate_source(s) for s in sources})


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        raise AuthenticationError("missing `authorization: Bearer <token>` metadata; pass your token "
                                  "(alacarte query --token, or CompositionClient(token=...))")
    scheme, _, token = str(values[0]).strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("the authorization metadata must read `Bearer <token>`")
    return token.strip()


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read_document(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise TokenFileError(f"tokens file {path} does not exist; create it with "
                             "`alacarte serve --tokens FILE --add-token USER --sources a,b`") from err
    except (OSError, ValueError) as err:
        raise TokenFileError(f"tokens file {path} is unreadable ({err})") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME \
            or document.get("version") != FORMAT_VERSION or not isinstance(document.get("users"), dict):
        raise TokenFileError(f"{path} is not an {FORMAT_NAME} file of version {FORMAT_VERSION}")
    return document


def _read_entries(path: Path) -> dict[str, _Entry]:
    entries = {}
    for user, raw in _read_document(path)["users"].items():
        try:
            key_id, sources = raw["key_id"], raw["sources"]
            if sources != ALL_SOURCES and not isinstance(sources, list):
                raise TypeError(f"sources must be a list or {ALL_SOURCES!r}")
            entry = _Entry(user, bytes.fromhex(raw["salt"]), bytes.fromhex(raw["sha256"]),
                           None if sources == ALL_SOURCES else frozenset(map(str, sources)))
        except (KeyError, TypeError, ValueError) as err:
            raise TokenFileError(f"tokens file {path}: entry of user {user!r} is malformed ({err!r})") from err
        if not _KEY_ID_RE.fullmatch(str(key_id)) or key_id in entries:
            raise TokenFileError(f"tokens file {path}: user {user!r} has an invalid or duplicate key_id")
        entries[key_id] = entry
    return entries
