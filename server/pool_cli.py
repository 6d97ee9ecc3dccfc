"""``alacarte pool ls|show|rm|repair|export|import``: inspect or edit a prompt pool on disk.

The pool directory is ``--pool DIR`` (before or after the action), else ``$ALACARTE_POOL``,
else ``$ALACARTE_HOME/pool`` (as ``alacarte serve`` and the ServerApp). ``ls`` and ``show``
open the pool read-only (they work on a read-only folder and never change a file) and read
only the index, never the tensors; ``export`` also opens it read-only and copies one stored
artefact, byte for byte, to a file; ``rm``, ``repair`` and ``import`` write.

``export`` and ``import`` move one source's prompt between pools (say, from the SuperLink's
to a composition server on another machine): the file is the prompt artefact itself
(safetensors: tokens, memory, head, density and metadata). An imported file is untrusted: it
is bounded in size and validated like an upload, and stored as the next version of its
source, or of nothing at all.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from common.files import atomic_write
from common.prompt import Prompt
from server.pool import POOL_ENV, PoolError, PromptPool, default_pool_dir
from server.table import format_labels, format_metrics, format_table, format_time

__all__ = ["HELP", "add_arguments", "run"]

HELP = "inspect or edit a prompt pool on disk (ls, show, rm, repair, export, import)"
READERS = ("ls", "show", "export")


class ImportRejectedError(ValueError):
    """A file ``alacarte pool import`` refuses before parsing it, or that names no source."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``alacarte pool``."""
    pool_help = f"pool directory (default: ${POOL_ENV}, else $ALACARTE_HOME/pool)"
    parser.add_argument("--pool", type=Path, default=None, help=pool_help)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    # repeated on each action so `--pool` may follow it; SUPPRESS keeps an earlier value
    pool_opt = argparse.ArgumentParser(add_help=False)
    pool_opt.add_argument("--pool", type=Path, default=argparse.SUPPRESS, help=pool_help)

    def action(name: str, text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, parents=[pool_opt], help=text, description=text)

    action("ls", "list sources with their latest version")
    show = action("show", "print a source's metadata and history")
    show.add_argument("source", help="source id")
    show.add_argument("--version", type=int, default=None, help="version to show (default: the latest)")
    rm = action("rm", "forget a source: delete all its versions")
    rm.add_argument("source", help="source id")
    action("repair", "delete orphan files of interrupted writes, drop rows whose file is gone")
    export = action("export", "copy a source's stored prompt to a file")
    export.add_argument("source", help="source id")
    export.add_argument("--version", type=int, default=None, help="version to export (default: the latest)")
    export.add_argument("--out", type=Path, default=None,
                        help="file to write (default: SOURCE-vVERSION.safetensors in the current folder)")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    imp = action("import", "store a prompt file (from `export`) as the next version of its source")
    imp.add_argument("file", type=Path, help="prompt artefact (.safetensors)")
    imp.add_argument("--source", default=None,
                     help="source id for a file that names none (a file that names one keeps it)")
    imp.add_argument("--max-bytes", type=int, default=None,
                     help="reject larger files (default: the ServerApp's default max-prompt-bytes, 8 MiB)")


def run(args: argparse.Namespace) -> int:
    """Run ``alacarte pool``: 0 on success, 1 (message on stderr) on a pool error, an invalid
    prompt file or a file that cannot be read or written."""
    root = args.pool or default_pool_dir()
    actions = {"ls": _ls, "show": _show, "rm": _rm, "repair": _repair, "export": _export, "import": _import}
    try:
        pool = PromptPool(root, create=False, read_only=args.action in READERS)
        actions[args.action](pool, args)
    except BrokenPipeError:  # the reader of our output left (`alacarte pool ls | head`): common.cli handles it
        raise
    except (PoolError, ValueError, OSError) as err:  # ValueError: PromptError, ImportRejectedError
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


def _export(pool: PromptPool, args: argparse.Namespace) -> None:
    version = pool.info(args.source, args.version).version
    out = args.out or Path(f"{args.source}-v{version}.safetensors")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force to overwrite it")
    atomic_write(out, pool.read_bytes(args.source, version))
    print(f"exported source {args.source!r} version {version} to {out}")


def _import(pool: PromptPool, args: argparse.Namespace) -> None:
    from common.config import AppConfig  # here, not at the top: the pool's other actions start faster without
    from server.admission import check_prompt

    data = _read_bounded(args.file, AppConfig().max_prompt_bytes if args.max_bytes is None else args.max_bytes)
    prompt = check_prompt(Prompt.from_bytes(data), None)  # an upload's checks: format, values, shape limits
    source = args.source or prompt.config.source
    if not source:
        raise ImportRejectedError(f"{args.file} names no source; pass --source NAME")
    version = pool.add(source, prompt, {"imported-sha256": hashlib.sha256(data).hexdigest()})
    print(f"imported {args.file} as source {source!r} version {version} into {pool.root}")


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    """``path``'s bytes, refused (unread) when there are more than ``max_bytes``."""
    if max_bytes < 1:
        raise ImportRejectedError(f"--max-bytes must be positive, got {max_bytes}")
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImportRejectedError(f"{path} is larger than {max_bytes} bytes (--max-bytes); it is not a prompt "
                                  "this pool accepts")
    return data
