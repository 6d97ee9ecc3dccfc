"""``alacarte pool ls|show|rm|repair``: inspect or edit a prompt pool on disk.

The pool directory is ``--pool DIR`` (before or after the action), else ``$ALACARTE_POOL``,
else ``$ALACARTE_HOME/pool`` (as ``alacarte serve`` and the ServerApp). ``ls`` and ``show``
open the pool read-only (they work on a read-only folder and never change a file) and read
only the index, never the tensors; ``rm`` and ``repair`` write.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from server.pool import POOL_ENV, PoolError, PromptPool, default_pool_dir

__all__ = ["HELP", "add_arguments", "format_labels", "format_metrics", "format_time", "run"]

HELP = "inspect or edit a prompt pool on disk (ls, show, rm, repair)"
READERS = ("ls", "show")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``alacarte pool``."""
    pool_help = f"pool directory (default: ${POOL_ENV}, else $ALACARTE_HOME/pool)"
    parser.add_argument("--pool", type=Path, default=None, help=pool_help)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    # repeated on each action so `--pool` may follow it; SUPPRESS keeps an earlier value
    pool_opt = argparse.ArgumentParser(add_help=False)
    pool_opt.add_argument("--pool", type=Path, default=argparse.SUPPRESS, help=pool_help)
    actions.add_parser("ls", parents=[pool_opt], help="list sources with their latest version")
    show = actions.add_parser("show", parents=[pool_opt], help="print a source's metadata and history")
    show.add_argument("source", help="source id")
    show.add_argument("--version", type=int, default=None, help="version to show (default: the latest)")
    rm = actions.add_parser("rm", parents=[pool_opt], help="forget a source: delete all its versions")
    rm.add_argument("source", help="source id")
    actions.add_parser("repair", parents=[pool_opt],
                       help="delete orphan files of interrupted writes, drop rows whose file is gone")


def run(args: argparse.Namespace) -> int:
    """Run ``alacarte pool``: 0 on success, 1 (message on stderr) on a pool error."""
    root = args.pool or default_pool_dir()
    try:
        pool = PromptPool(root, create=False, read_only=args.action in READERS)
        {"ls": _ls, "show": _show, "rm": _rm, "repair": _repair}[args.action](pool, args)
    except PoolError as err:
        print(f"alacarte pool: {err}", file=sys.stderr)
        return 1
    return 0


def _ls(pool: PromptPool, _args: argparse.Namespace) -> None:
    entries = pool.entries()
    if not entries:
        print(f"pool {pool.root} is empty")
        return
    _print_table(("SOURCE", "VERSION", "LABELS", "EXAMPLES", "CREATED"),
                 ((e.source, e.version, format_labels(e.labels, e.num_classes), e.num_examples,
                   format_time(e.created_at)) for e in entries))


def _show(pool: PromptPool, args: argparse.Namespace) -> None:
    entry = pool.info(args.source, args.version)
    history = pool.history(args.source)
    fields = {
        "source": entry.source,
        "version": f"{entry.version} (latest {history[-1].version})",
        "path": entry.path,
        "backbone": entry.backbone,
        "fingerprint": entry.fingerprint,
        "labels": format_labels(entry.labels, entry.num_classes),
        "num_examples": entry.num_examples,
        "created_at": format_time(entry.created_at),
        "added_at": format_time(entry.added_at),
        "round": "-" if entry.round is None else entry.round,
        "sha256": entry.sha256,
        "metrics": format_metrics(entry.metrics),
    }
    width = max(map(len, fields))
    for name, value in fields.items():
        print(f"{name + ':':<{width + 2}}{value}")
    print("\nhistory:")
    _print_table(("VERSION", "ROUND", "EXAMPLES", "CREATED", "METRICS"),
                 ((e.version, "-" if e.round is None else e.round, e.num_examples, format_time(e.created_at),
                   format_metrics(e.metrics)) for e in history))


def _rm(pool: PromptPool, args: argparse.Namespace) -> None:
    count = pool.remove(args.source)
    print(f"removed source {args.source!r}: {count} version(s) deleted from {pool.root}")


def _repair(pool: PromptPool, _args: argparse.Namespace) -> None:
    report = pool.repair()
    print(f"repaired {pool.root}: deleted {len(report.orphans)} orphan file(s), dropped "
          f"{len(report.dangling)} row(s) whose file was missing {list(report.dangling) or ''}".rstrip())


def format_labels(labels: Sequence[int], num_classes: int) -> str:
    """Class ids as ranges, e.g. ``0-4,7 (6/10)``."""
    runs: list[list[int]] = []
    for c in labels:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    parts = [str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs]
    return f"{','.join(parts)} ({len(labels)}/{num_classes})"


def format_time(timestamp: float) -> str:
    """A POSIX time as ISO 8601 UTC, to the second; ``invalid (<value>)`` when it is no representable time."""
    try:
        if not math.isfinite(timestamp):
            raise ValueError(timestamp)
        return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError, TypeError):
        return f"invalid ({timestamp!r})"


def format_metrics(metrics: dict[str, float | int | str]) -> str:
    """Metrics as compact ``name=value`` pairs (``-`` when there are none)."""
    if not metrics:
        return "-"
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items()))


def _print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())

