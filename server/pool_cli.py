"""``alacarte pool ls|show|rm|repair``: inspect or edit a prompt pool on disk.

The pool directory is ``--pool DIR`` (before or after the action), else ``$ALACARTE_POOL``,
else ``$ALACARTE_HOME/pool`` (as ``alacarte serve`` and the ServerApp). ``ls`` and ``show``
open the pool read-only (they work on a read-only folder and never change a file) and read
only the index, never the tensors; ``rm`` and ``repair`` write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.pool import POOL_ENV, PoolError, PromptPool, default_pool_dir
from server.table import format_labels, format_metrics, format_table, format_time

__all__ = ["HELP", "add_arguments", "run"]

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
    print(format_table(("SOURCE", "VERSION", "LABELS", "EXAMPLES", "CREATED"),
                       ((e.source, e.version, format_labels(e.labels, e.num_classes), e.num_examples,
                         format_time(e.created_at)) for e in entries)))


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
    print(format_table(("VERSION", "ROUND", "EXAMPLES", "CREATED", "METRICS"),
                       ((e.version, "-" if e.round is None else e.round, e.num_examples, format_time(e.created_at),
                         format_metrics(e.metrics)) for e in history)))


def _rm(pool: PromptPool, args: argparse.Namespace) -> None:
    count = pool.remove(args.source)
    print(f"removed source {args.source!r}: {count} version(s) deleted from {pool.root}")


def _repair(pool: PromptPool, _args: argparse.Namespace) -> None:
    report = pool.repair()
    print(f"repaired {pool.root}: deleted {len(report.orphans)} orphan file(s), dropped "
          f"{len(report.dangling)} row(s) whose file was missing {list(report.dangling) or ''}".rstrip())
