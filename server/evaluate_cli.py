"""``alacarte evaluate``: accuracy of a pool's prompts, alone and composed, on a labelled test split.

The table the ServerApp prints at the end of a run (``server.table.accuracy_table``), for
any subset of the pool's sources, at any time: one row per selected source (its accuracy on
all images and on the images of its own classes), then one ``composed`` row per weighting
(uniform, and density when every selected prompt carries its source's density). The images
are chosen as the ServerApp chooses its test split (``test-examples`` images of the dataset's
test split drawn with ``partition-seed``), so with the run's dataset and these defaults the
rows are the ServerApp's. The pool is opened read-only; the backbone is the Flower app's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.utils.data import DataLoader

from common.config import AppConfig, add_backbone_arguments, backbone_config, build_model
from common.prompt import Prompt
from common.train import evaluate
from server.pool import PoolError, PromptPool
from server.server_app import server_test_split
from server.table import accuracy_table

__all__ = ["HELP", "add_arguments", "run"]

HELP = "accuracy of a pool's prompts, alone and composed, on a labelled test split (the ServerApp's table)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``alacarte evaluate``."""
    defaults = AppConfig()
    parser.add_argument("--pool", type=Path, default=None,
                        help="prompt pool directory (default: $ALACARTE_POOL, else $ALACARTE_HOME/pool)")
    parser.add_argument("--sources", default=None,
                        help="comma-separated sources to compose (default: every source in the pool)")
    data = parser.add_argument_group("test images")
    data.add_argument("--dataset", default=defaults.dataset,
                      help="dataset whose test split is used, as the run config's `dataset` (default: %(default)s)")
    data.add_argument("--data-dir", default="", help="its folder (default: the prepared one)")
    data.add_argument("--examples", type=int, default=defaults.test_examples,
                      help="test images (the whole split if it is smaller), drawn with --seed as the ServerApp "
                           "draws its own (default: %(default)s)")
    data.add_argument("--seed", type=int, default=defaults.partition_seed,
                      help="the run config's partition-seed (default: %(default)s)")
    data.add_argument("--batch-size", type=int, default=defaults.batch_size,
                      help="images per backbone pass (default: %(default)s)")
    add_backbone_arguments(parser.add_argument_group("backbone"))


def run(args: argparse.Namespace) -> int:
    """Print the table: 0 on success, 1 (message on stderr) on a bad pool, source, dataset or prompt."""
    try:
        config = backbone_config(args, dataset=args.dataset, data_dir=args.data_dir, pool_dir=str(args.pool or ""),
                                 test_examples=args.examples, partition_seed=args.seed, batch_size=args.batch_size)
        pool = PromptPool(config.pool_path(), create=False, read_only=True)
        sources = _selected(pool, args.sources)
        model = build_model(config, device=args.device)
        prompts = {source: pool.get(source, model=model) for source in sources}
        test = server_test_split(config, model)
        if test is None:
            raise ValueError("--examples must be at least 1")
        _check_label_space(prompts, len(test.classes), config.dataset)
        result = evaluate(model, list(prompts.values()), DataLoader(test, batch_size=config.batch_size),
                          progress=True)
    except (PoolError, ValueError, OSError, RuntimeError) as err:  # ValueError: ConfigError, PromptError
        print(f"alacarte evaluate: {err}", file=sys.stderr)
        return 1
    print(accuracy_table(f"Test split of {config.dataset} ({len(test)} images)", prompts, result))
    return 0


def _selected(pool: PromptPool, spec: str | None) -> list[str]:
    """The sources of ``--sources`` (all the pool's when ``None``); raises ``ValueError`` naming
    what the pool lacks."""
    stored = pool.sources()
    if spec is None:
        if not stored:
            raise ValueError(f"pool {pool.root} is empty; nothing to evaluate")
        return stored
    chosen = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    missing = [s for s in chosen if s not in stored]
    if not chosen or missing:
        raise ValueError(f"--sources: {missing or 'none given'} not in pool {pool.root} (it holds {stored})")
    return chosen


def _check_label_space(prompts: dict[str, Prompt], num_classes: int, dataset: str) -> None:
    """Raise ``ValueError`` naming the prompts whose head is over another label space than the dataset's."""
    foreign = [source for source, prompt in prompts.items() if prompt.config.num_classes != num_classes]
    if foreign:
        raise ValueError(f"sources {foreign} have heads over another label space than the {num_classes} classes of "
                         f"{dataset}; evaluate them on the dataset they were trained on")
