"""The ``alacarte`` command line: one sub-command per module.

Each sub-command lives in its own module, which defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when
their command runs, so ``alacarte --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

COMMANDS: dict[str, str] = {
    "setup": "common.assets",
    "serve": "server.service_cli",
    "query": "server.query_cli",
    "pool": "server.pool_cli",
    "evaluate": "server.evaluate_cli",
    "config": "common.config",
}

HELPS: dict[str, str] = {
    "setup": "prepare the default backbone and dataset in ALACARTE_HOME (idempotent)",
    "serve": "serve composition queries over gRPC from a prompt pool",
    "query": "ask a composition server for predictions on image files",
    "pool": "inspect or edit a prompt pool on disk (ls, show, rm, repair, export, import)",
    "evaluate": "accuracy of a pool's prompts, alone and composed, on a labelled test split (the ServerApp's table)",
    "config": "list the Flower app's run-config keys (--run-config \"key=value ...\"), their meaning and defaults",
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the parser; only the module of the chosen sub-command is imported."""
    parser = argparse.ArgumentParser(
        prog="alacarte",
        description="Federated à-la-carte prompt tuning: set-up, pool tools and composition service.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module in COMMANDS.items():
        cmd = sub.add_parser(name, help=HELPS[name], description=HELPS[name])
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(cmd)
            cmd.set_defaults(run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alacarte`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # the output's reader left (`alacarte pool ls | head`): stop quietly, as `ls` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, what a shell reports for a killed writer


if __name__ == "__main__":
    sys.exit(main())
