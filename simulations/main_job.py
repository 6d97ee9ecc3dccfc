"""The main job's sources against linear probes on exactly their images.

The README's main job (``flwr run .`` with the defaults of ``pyproject.toml``: 5 sources,
Dirichlet(1.0), 400 images each of which 10% is the source's validation split, DINOv2
ViT-S/14 at 112 px) is rebuilt here with the product's own partitioning, and on the
server's 1,000 test images it compares

* each source's **prompt** (trained here with the product's recipe, ``common.train``, on
  the same train/validation split as its ClientApp, or read from a pool that ``flwr run``
  filled: ``--pool``) with a **linear probe** fitted on the frozen backbone's pooled
  features of the same training images (``common.probe``, L2 by cross-validation), image by
  image (won, lost and the sign test's p);
* the composition of the prompts (uniform and density-weighted) with the composition of
  the per-source probes (same two weightings) and with **one probe on the union** of the
  sources' training images (the paragon of linear probing).

``--sweep`` also chooses the recipe's defaults: every (learning rate, head learning-rate
scale, epochs, selection level) of a small grid trains the five prompts, scored on 1,000
*validation* images drawn from the training split outside every source's shard (never on
the test images); on the same images it compares the prompt tokens' initialisation (the
class token against one, two or four random tokens, three seeds each) before any tuning.

``--seed-spread`` measures how much of a source's margin over its probe is the draw of its
random token: each source's probe-initialised start (the prompt before tuning, which the
selection keeps unless validation shows tuning helps) for the product's token seed and for
other seeds, against the probe on the test and on the validation images. A diagnostic only:
nothing is chosen from it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.compose import compose_probs
from common.config import AppConfig
from common.data import limit_per_partition, load_client_shard, load_split
from common.model import APTViT
from common.prompt import Prompt, source_seed
from common.train import probe_init_head
from simulations.common import (
    Bank,
    BankProbe,
    Stopwatch,
    accuracy,
    backbone_spec,
    bank_logits,
    base_parser,
    build_bank,
    density_probs,
    fresh_prompt,
    paired_comparison,
    pool_prompts,
    recipe,
    setup_record,
    start_experiment,
    train_on_bank,
    write_csv,
    write_json,
)

NAME = "main_job"
NUM_CLASSES = 10


@dataclass(frozen=True)
class Settings:
    """What to run besides the comparison (the shards are always the main job's)."""

    sweep_lrs: tuple[float, ...]
    sweep_head_lr_scales: tuple[float, ...]
    sweep_epochs: tuple[int, ...]
    sweep_levels: tuple[float, ...]
    validation_images: int
    min_steps: int  # -1: the product's default (AppConfig.min_steps)
    examples_per_source: int  # -1: the product's default (AppConfig.examples_per_source)
    token_seeds: tuple[int, ...]  # seeds of the random tokens that ``--sweep`` compares with the class token
    token_counts: tuple[int, ...]  # numbers of random prompt tokens (``n_prompt``) compared at each seed
    spread_seeds: tuple[int, ...]  # token seeds ``--seed-spread`` compares with the product's

    @property
    def token_inits(self) -> list[tuple[str, int, int]]:
        """The tokens' starts ``--sweep`` compares, as (start, seed, n_prompt): the class token,
        then random tokens of each count and seed."""
        return [("class token", 0, 1), *(("random", seed, count) for count in self.token_counts
                                          for seed in self.token_seeds)]

    def config(self, data_dir: str) -> AppConfig:
        """The main job's run configuration, with this profile's sizes."""
        sizes = {"min_steps": self.min_steps, "examples_per_source": self.examples_per_source}
        return AppConfig(data_dir=data_dir, **{k: v for k, v in sizes.items() if v >= 0})


TINY = Settings((3e-3,), (0.01,), (1,), (0.05,), 32, 2, 20, (0,), (1, 2), (0, 1))
QUICK = Settings((3e-3,), (0.01,), (10,), (0.05,), 200, -1, -1, (0,), (1,), (0,))
FULL = Settings((1e-3, 3e-3, 1e-2), (1.0, 0.01), (5,), (0.05, 0.5), 1000, -1, -1, (0, 1, 2), (1, 2, 4),
                tuple(range(10)))


@dataclass(frozen=True)
class Source:
    """One source of the main job: its ClientApp's train and validation indices."""

    name: str
    train: np.ndarray
    val: np.ndarray


def main_job_sources(config: AppConfig) -> list[Source]:
    """The five sources exactly as the ClientApps of ``flwr run .`` split them."""
    return [Source(f"source-{pid}", *(s.indices for s in load_client_shard(
        config.dataset, config.data_path(), pid, 5, config.partitioner, alpha=config.dirichlet_alpha,
        seed=config.partition_seed, max_examples=config.examples_per_source or None,
        val_fraction=config.val_fraction, transform=lambda x: x))) for pid in range(5)]


def validation_indices(config: AppConfig, sources: list[Source], n: int, seed: int) -> np.ndarray:
    """``n`` training-split images outside every source's shard (for choosing the defaults)."""
    used = np.concatenate([np.concatenate([s.train, s.val]) for s in sources])
    labels = load_split(config.dataset, config.data_path(), "train").labels
    free = np.setdiff1d(np.arange(len(labels)), used)
    if len(free) < n:
        raise SystemExit(f"only {len(free)} training-split images lie outside the sources' shards; need {n}")
    return limit_per_partition(free, n, seed + 1)


def train_prompts(model: APTViT, bank: Bank, sources: list[Source], config: AppConfig, lr: float,
                  head_lr_scale: float, epochs: int, level: float,
                  seed: int | None = None) -> tuple[list[Prompt], list[dict]]:
    """Each source's prompt with the product's recipe on its own train/validation split, from the
    token seed ``seed`` (``None``: the product's, ``source_seed`` of the source's name)."""
    prompts, metrics = [], []
    plan = recipe(epochs, lr, config.min_steps, selection_level=level, head_lr_scale=head_lr_scale)
    for src in sources:
        labels = sorted(set(bank.labels_of(src.train).tolist()))
        prompt = fresh_prompt(model, NUM_CLASSES, _token_seed(src, seed), labels, src.name, n_prompt=config.n_prompt)
        metrics.append(train_on_bank(model, prompt, bank, src.train, plan, config.batch_size,
                                     config.partition_seed, src.val))
        prompt.density = bank.density_of(src.train)
        prompts.append(prompt)
    return prompts, metrics


def composed(logits: torch.Tensor, densities: list, bank: Bank, indices: np.ndarray | None = None) -> dict[str, float]:
    """Uniform and density-weighted accuracy of ``logits [k, n, C]`` on ``indices`` of ``bank`` (default: all)."""
    indices = bank.index if indices is None else indices
    labels = bank.labels_of(indices)
    return {"uniform": accuracy(compose_probs(logits), labels),
            "density": accuracy(density_probs(logits, densities, bank, indices), labels)}


def source_probes(bank: Bank, sources: list[Source]) -> list[BankProbe]:
    """Each source's reference: a linear probe on the pooled features of its training images."""
    return [BankProbe.fit(bank, s.train) for s in sources]


def comparison(model: APTViT, train: Bank, test: Bank, sources: list[Source], prompts: list[Prompt],
               probes: list[BankProbe]) -> dict:
    """Per-source prompt vs its probe (``source_probes`` of ``train``), and every composition, on the ``test`` bank."""
    densities = [train.density_of(s.train) for s in sources]
    prompt_logits = bank_logits(model, test, prompts)
    probe_logits = torch.stack([p.logits(test, NUM_CLASSES) for p in probes])
    union = BankProbe.fit(train, np.concatenate([s.train for s in sources]))
    rows = [{"source": s.name, "train_images": len(s.train), "val_images": len(s.val),
             "classes": len(probes[i].classes), "probe_l2": probes[i].probe.l2,
             "probe": accuracy(probe_logits[i].softmax(-1), test.labels),
             "prompt": accuracy(prompt_logits[i].softmax(-1), test.labels)} for i, s in enumerate(sources)]
    for i, row in enumerate(rows):
        row["prompt_minus_probe_points"] = round(100 * (row["prompt"] - row["probe"]), 2)
        paired = paired_comparison(prompt_logits[i].softmax(-1), probe_logits[i].softmax(-1), test.labels)
        row |= {f"vs_probe_{k}": v for k, v in paired.items()}
    return {"sources": rows,
            "composed_prompts": composed(prompt_logits, densities, test),
            "composed_probes": composed(probe_logits, densities, test),
            "union_probe": accuracy(union.logits(test, NUM_CLASSES).softmax(-1), test.labels)}


def sweep(model: APTViT, bank: Bank, val: np.ndarray, sources: list[Source], config: AppConfig,
          s: Settings) -> list[dict]:
    """Every (lr, head lr scale, epochs, selection level) of the grid, and the product's defaults
    (``config``'s, listed last when the grid lacks them), scored on the held-out validation images
    (token seed 0 for every source, as recorded) and compared image by image with the defaults:
    ``vs_defaults_*`` over every (source, image) prediction of the prompts alone, and
    ``density_vs_defaults_*`` for their density composition (won, lost, sign-test p)."""
    defaults = (config.learning_rate, config.head_lr_scale, config.local_epochs, config.selection_level)
    grid = list(dict.fromkeys([*itertools.product(s.sweep_lrs, s.sweep_head_lr_scales, s.sweep_epochs,
                                                  s.sweep_levels), defaults]))
    points = {}
    for k, point in enumerate(grid, 1):
        clock = Stopwatch()
        points[point] = _sweep_point(model, bank, val, sources, config, point)
        logging.info("sweep %d of %d (lr %g, head lr scale %g, epochs %d, level %g) in %.0f s", k, len(grid), *point,
                     clock.seconds())
    labels = bank.labels_of(val)
    reference_logits, reference_density, _ = points[defaults]
    rows = []
    for (lr, scale, epochs, level), (logits, density, metrics) in points.items():
        versus = paired_comparison(logits.flatten(0, 1), reference_logits.flatten(0, 1), np.tile(labels, len(logits)))
        density_versus = paired_comparison(density, reference_density, labels)
        rows.append({"lr": lr, "head_lr_scale": scale, "epochs": epochs, "selection_level": level,
                     "min_steps": config.min_steps, "defaults": (lr, scale, epochs, level) == defaults,
                     "val_alone_mean": float(np.mean([accuracy(x, labels) for x in logits])),
                     "val_composed_uniform": accuracy(compose_probs(logits), labels),
                     "val_composed_density": accuracy(density, labels),
                     **{f"vs_defaults_{key}": v for key, v in versus.items()},
                     **{f"density_vs_defaults_{key}": v for key, v in density_versus.items()},
                     "kept_epochs": " ".join(str(m["selected_epoch"]) for m in metrics),
                     "steps": " ".join(str(m["steps"]) for m in metrics)})
    return rows


def _sweep_point(model: APTViT, bank: Bank, val: np.ndarray, sources: list[Source], config: AppConfig,
                 point: tuple[float, float, int, float]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The five prompts trained at ``point`` (lr, head lr scale, epochs, level) with token seed 0:
    their logits ``[k, n, C]`` and density-composed probabilities ``[n, C]`` on the validation
    images ``val``, and their training metrics."""
    prompts, metrics = train_prompts(model, bank, sources, config, *point, seed=0)
    logits = bank_logits(model, bank, prompts, val)
    density = density_probs(logits, [p.density for p in prompts], bank, val)
    return logits, density, metrics


def token_inits(model: APTViT, bank: Bank, val: np.ndarray, sources: list[Source], config: AppConfig,
                s: Settings, probes: list[BankProbe]) -> list[dict]:
    """The five probe-initialised prompts (before tuning) for each tokens' start of ``s.token_inits``
    (several random tokens: the head reads each one's output), and the probes on the
    pooled feature alone, scored on the validation images."""
    densities = [bank.density_of(src.train) for src in sources]
    rows = [_init_row("none (linear probe on the pooled feature)", "", 0, torch.stack(
        [p.logits(bank, NUM_CLASSES, val) for p in probes]), densities, bank, val)]
    for init, seed, count in s.token_inits:
        tokens = _class_token(model) if init == "class token" else None
        prompts = [started_prompt(model, bank, src, config, seed, count, tokens) for src in sources]
        rows.append(_init_row(init, seed, count, bank_logits(model, bank, prompts, val), densities, bank, val))
    return rows


def started_prompt(model: APTViT, bank: Bank, src: Source, config: AppConfig, seed: int | None,
                   count: int | None = None, tokens: torch.Tensor | None = None) -> Prompt:
    """``src``'s fresh prompt of ``count`` tokens (``None``: the run config's ``n-prompt``) drawn with
    ``seed`` (``None``: the product's seed), or started at ``tokens [D]``, with its head made a probe on
    its training images: the recipe before tuning."""
    labels = sorted(set(bank.labels_of(src.train).tolist()))
    prompt = fresh_prompt(model, NUM_CLASSES, _token_seed(src, seed), labels, src.name,
                          n_prompt=config.n_prompt if count is None else count)
    if tokens is not None:
        with torch.no_grad():
            prompt.tokens.copy_(tokens.expand_as(prompt.tokens))
    probe_init_head(model, prompt, bank.loader(src.train, config.batch_size), bank.cache)
    return prompt


def seed_spread(model: APTViT, bank: Bank, test: Bank, val: np.ndarray, sources: list[Source], config: AppConfig,
                s: Settings, probes: list[BankProbe]) -> list[dict]:
    """Each source's start minus its probe (points), on the test and on the validation images, for
    the product's token seed and every seed of ``s.spread_seeds`` (module doc; nothing is chosen here)."""
    val_labels = bank.labels_of(val)
    probe_test = [accuracy(p.logits(test, NUM_CLASSES).softmax(-1), test.labels) for p in probes]
    probe_val = [accuracy(p.logits(bank, NUM_CLASSES, val).softmax(-1), val_labels) for p in probes]
    rows = []
    for seed in (None, *s.spread_seeds):
        prompts = [started_prompt(model, bank, src, config, seed) for src in sources]
        on_test = [accuracy(x.softmax(-1), test.labels) for x in bank_logits(model, test, prompts)]
        on_val = [accuracy(x.softmax(-1), val_labels) for x in bank_logits(model, bank, prompts, val)]
        test_gaps = [round(100 * (a - p), 1) for a, p in zip(on_test, probe_test)]
        rows.append({"token_seed": "source name" if seed is None else seed,
                     "test_gaps": " ".join(f"{g:+.1f}" for g in test_gaps), "worst_test_gap": min(test_gaps),
                     "val_gaps": " ".join(f"{100 * (a - p):+.1f}" for a, p in zip(on_val, probe_val))})
    return rows


def _token_seed(src: Source, seed: int | None) -> int:
    """``seed``, or the product's token seed of ``src`` when ``None``."""
    return source_seed(src.name) if seed is None else seed


def _init_row(init: str, seed: int | str, count: int, logits: torch.Tensor, densities: list, bank: Bank,
              val: np.ndarray) -> dict:
    labels = bank.labels_of(val)
    alone = [accuracy(logits[i].softmax(-1), labels) for i in range(len(logits))]
    both = composed(logits, densities, bank, val)
    return {"tokens_init": init, "seed": seed, "n_prompt": count, "val_alone_mean": float(np.mean(alone)),
            "val_composed_uniform": both["uniform"], "val_composed_density": both["density"],
            "val_alone": " ".join(f"{100 * a:.1f}" for a in alone)}


def _class_token(model: APTViT) -> torch.Tensor:
    """``[D]`` the backbone's class token plus its position embedding (where a prompt token started before)."""
    bb = model.backbone
    return (bb.cls_token[0, 0] + bb.pos_embed[0, 0]).detach()


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison (and ``--sweep``); returns the JSON payload it wrote."""
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, default=None,
                        help="read the prompts from this pool (filled by `flwr run .`) instead of training them")
    parser.add_argument("--sweep", action="store_true", help="also choose lr/epochs on validation images")
    parser.add_argument("--seed-spread", action="store_true",
                        help="also measure each source's start against its probe over token seeds (a diagnostic)")
    args, s, label = start_experiment(parser, argv, TINY, QUICK, FULL)
    clock = Stopwatch()
    config = s.config(args.data_dir)
    spec = backbone_spec(args.tiny)
    model = spec.load()
    sources = main_job_sources(config)
    val = validation_indices(config, sources, s.validation_images, args.seed)
    raw = load_split(config.dataset, config.data_path(), "train")
    bank = build_bank(model, raw, np.concatenate([*(np.concatenate([x.train, x.val]) for x in sources), val]),
                      args.work_dir / f"bank-train-{model.backbone_name}")
    raw_test = load_split(config.dataset, config.data_path(), "test")
    test = limit_per_partition(np.arange(len(raw_test)), config.test_examples, config.partition_seed)
    test_bank = build_bank(model, raw_test, test, args.work_dir / f"bank-test-{model.backbone_name}")
    if args.pool:
        prompts = list(pool_prompts(args.pool, model).values())
        how = f"read from the pool {args.pool}"
    else:
        prompts, _ = train_prompts(model, bank, sources, config, config.learning_rate, config.head_lr_scale,
                                   config.local_epochs, config.selection_level)
        how = "trained here with the product's recipe and defaults"
    probes = source_probes(bank, sources)
    payload = {"experiment": NAME,
               "setup": setup_record(spec, s, label, args, prompts=how, test_images=len(test),
                                     seconds=clock.seconds()),
               **comparison(model, bank, test_bank, sources, prompts, probes), "plots": []}
    if args.sweep:
        payload["token_inits"] = token_inits(model, bank, val, sources, config, s, probes)
        write_csv(args.out / "token_inits.csv", payload["token_inits"])
        payload["sweep"] = sweep(model, bank, val, sources, config, s)
        write_csv(args.out / "sweep.csv", payload["sweep"])
    if args.seed_spread:
        payload["seed_spread"] = seed_spread(model, bank, test_bank, val, sources, config, s, probes)
        write_csv(args.out / "seed_spread.csv", payload["seed_spread"])
    payload["setup"]["seconds"] = clock.seconds()
    write_csv(args.out / "sources.csv", payload["sources"])
    write_json(args.out / "result.json", payload)
    return payload


if __name__ == "__main__":
    main()
