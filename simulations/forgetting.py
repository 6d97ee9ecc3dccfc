"""Forgetting a source: removing its prompt equals never having trained with it, bitwise.

A pool of N sources is trained through the product's Flower apps (one à-la-carte round,
fixed seeds: the ClientApp seeds each prompt by its source id and its data order by the
partition seed). Every source trains with the product's recipe and defaults (probe-initialised
head, ``local-epochs`` epochs but at least ``min-steps`` steps, the epoch with the lowest loss
on its own validation split kept; the validation split is 10% of its shard, carved by the
partition seed, as the ClientApp does) and ships its ``SourceDensity`` (fitted on its
training split) inside its prompt artefact. Then, for every source k:

* **forgotten**: a copy of the full pool with ``PromptPool.remove("source-k")``;
* **retrained**: a second federation in which node k never takes part (same partitions,
  so every other source trains on the same data with the same seeds).

The composed predictions (probabilities) of the two on the whole test set are compared
bitwise, for the uniform composition and for the density-weighted one (the densities come
from the pools' prompt artefacts, so removing a prompt removes its density too), the two
pools' artefacts (prompt and density arrays) are compared by digest, and the accuracy of the
density-weighted composition on source k's own data (its training split, and the test
images of its classes) is reported before and after the removal. Nothing is chosen here:
the recipe and the density's temperature are the product's defaults (chosen on validation
data), and test images are only scored.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.compose import compose_probs, density_weights
from common.model import APTViT
from common.prompt import Prompt
from common.train import planned_epochs
from server.pool import PromptPool
from simulations.common import (
    LR,
    Bank,
    Federation,
    Stopwatch,
    accuracy,
    add_threads_option,
    backbone_spec,
    bank_logits,
    base_parser,
    partition_shards,
    pool_prompts,
    product_run_config,
    recipe,
    run_federations,
    save_figure,
    setup_record,
    shared_subset,
    start_experiment,
    write_csv,
    write_json,
)

NAME = "forgetting"


@dataclass(frozen=True)
class Settings:
    """Sizes of one run."""

    train_images: int
    test_images: int
    sources: int
    partitioner: str  # "classes", "iid" or "dirichlet"
    alpha: float
    epochs: int  # the recipe's local epochs (at least min_steps optimiser steps)
    min_steps: int
    batch_size: int
    lr: float
    val_fraction: float  # of each source's shard, its validation split


TINY = Settings(48, 32, 2, "classes", 1.0, 1, 2, 16, LR, 0.1)
QUICK = Settings(96, 96, 3, "classes", 1.0, 10, 20, 32, LR, 0.1)
FULL = Settings(1000, 500, 5, "classes", 1.0, 10, 100, 32, LR, 0.1)  # the product's recipe and lr; 10 epochs


def federations(s: Settings, run_config: dict, work: Path) -> list[Federation]:
    """The full federation, then one without each source."""
    runs = []
    for skip in (None, *range(s.sources)):
        name = "all" if skip is None else f"without-{skip}"
        pool = work / "pools" / name
        shutil.rmtree(pool, ignore_errors=True)
        runs.append(Federation(name, {**run_config, "pool-dir": str(pool)},
                               [k for k in range(s.sources) if k != skip], s.sources))
    return runs


def digest(prompts: list[Prompt]) -> str:
    """SHA-256 of the prompts' tensors, in order."""
    h = hashlib.sha256()
    for p in prompts:
        for name, array in sorted(p.arrays().items()):
            h.update(name.encode() + array.tobytes())
    return h.hexdigest()


def forget(full_pool: Path, source: str, dest: Path) -> Path:
    """A copy of the full pool with ``source`` removed through ``PromptPool.remove``."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(full_pool, dest)
    PromptPool(dest).remove(source)
    return dest


def composed_probs(model: APTViT, bank: Bank, prompts: dict[str, Prompt], rule: str,
                   indices: np.ndarray | None = None) -> torch.Tensor:
    """Composition of ``prompts`` on ``indices`` of ``bank``: ``rule`` "uniform", or "density"
    (weighted by the densities the prompts carry)."""
    indices = bank.index if indices is None else indices
    logits = bank_logits(model, bank, list(prompts.values()), indices)
    if rule == "uniform":
        return compose_probs(logits)
    features = torch.as_tensor(bank.features[bank.slots_of(indices)])
    return compose_probs(logits, density_weights([p.density for p in prompts.values()], features))


def source_rows(s: Settings, runs: dict[str, Federation], model: APTViT, data_dir: Path, train: Bank,
                test: Bank, work: Path, seed: int) -> list[dict]:
    """For each source: bitwise checks, and accuracy on its data before/after forgetting."""
    full_dir = Path(runs["all"].run_config["pool-dir"])
    full = pool_prompts(full_dir, model)
    shards = partition_shards(data_dir, s.sources, s.partitioner, s.alpha, seed, s.val_fraction)
    missing = [name for name, p in full.items() if p.density is None]
    if missing:
        raise RuntimeError(f"sources {missing} shipped no density with their prompt")
    full_test = composed_probs(model, test, full, "density")
    rows = []
    for k in range(s.sources):
        source = f"source-{k}"
        forgotten = pool_prompts(forget(full_dir, source, work / "forgotten" / source), model)
        retrained = pool_prompts(Path(runs[f"without-{k}"].run_config["pool-dir"]), model)
        after = {rule: composed_probs(model, test, forgotten, rule) for rule in ("uniform", "density")}
        identical = {rule: torch.equal(after[rule], composed_probs(model, test, retrained, rule)) for rule in after}
        after_test = after["density"]
        own_test = np.flatnonzero(np.isin(test.labels, list(full[source].config.labels)))
        own_train, own_val = shards[k]
        batches = math.ceil(len(own_train) / s.batch_size)
        rows.append({
            "source": source, "labels": " ".join(map(str, full[source].config.labels)),
            "train_images": len(own_train), "val_images": len(own_val),
            "steps": batches * planned_epochs(batches, recipe(s.epochs, s.lr, s.min_steps)),
            "test_images_of_its_classes": len(own_test),
            "density_bytes": sum(a.nbytes for n, a in full[source].arrays().items() if n.startswith("density.")),
            "bitwise_identical": all(identical.values()),
            "bitwise_identical_uniform": identical["uniform"], "bitwise_identical_density": identical["density"],
            "prompts_identical": digest(list(forgotten.values())) == digest(list(retrained.values())),
            "own_train_acc_before": accuracy(composed_probs(model, train, full, "density", own_train),
                                             train.labels_of(own_train)),
            "own_train_acc_after": accuracy(composed_probs(model, train, forgotten, "density", own_train),
                                            train.labels_of(own_train)),
            "own_classes_test_acc_before": accuracy(full_test[own_test], test.labels[own_test]),
            "own_classes_test_acc_after": accuracy(after_test[own_test], test.labels[own_test]),
            "test_acc_before": accuracy(full_test, test.labels),
            "test_acc_after": accuracy(after_test, test.labels),
        })
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy on each source's data before and after removing it."""
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(rows) + 2), 3.6))
    x = np.arange(len(rows))
    bars = (("own_train_acc_before", "its training images, before"), ("own_train_acc_after", "… after"),
            ("own_classes_test_acc_before", "test images of its classes, before"),
            ("own_classes_test_acc_after", "… after"))
    for i, (key, label) in enumerate(bars):
        ax.bar(x + (i - 1.5) * 0.2, [100 * r[key] for r in rows], 0.2, label=label)
    ax.set_xticks(x, [f"{r['source']}\n{'identical' if r['bitwise_identical'] else 'DIFFERENT'}" for r in rows])
    ax.set(ylabel="composed accuracy (%)", title="forgetting one source (label: bitwise check vs retrained)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the JSON payload it wrote."""
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    add_threads_option(parser)
    args, s, label = start_experiment(parser, argv, TINY, QUICK, FULL)
    clock = Stopwatch()
    spec = backbone_spec(args.tiny)
    model = spec.load()
    data_dir, train, test = shared_subset(args, model, s.train_images, s.test_images)
    run_config = product_run_config(spec, data_dir, args.work_dir, partitioner=s.partitioner,
                                    **{"dirichlet-alpha": s.alpha, "partition-seed": args.seed,
                                       "local-epochs": s.epochs, "min-steps": s.min_steps,
                                       "batch-size": s.batch_size, "learning-rate": s.lr,
                                       "val-fraction": s.val_fraction, "share-density": True})
    runs = federations(s, run_config, args.work_dir)
    run_federations(runs, s.sources, train.root)
    rows = source_rows(s, {r.name: r for r in runs}, model, data_dir, train, test, args.work_dir, args.seed)
    payload = {
        "experiment": NAME,
        "setup": setup_record(spec, s, label, args, dataset="Fashion-MNIST", train_images=s.train_images,
                              test_images=s.test_images, torch_threads=args.threads, seconds=clock.seconds()),
        "sources": rows,
        "all_bitwise_identical": all(r["bitwise_identical"] and r["prompts_identical"] for r in rows),
        "plots": [plot(rows, args.out / "forgetting.png").name],
    }
    write_csv(args.out / "forgetting.csv", rows)
    write_json(args.out / "result.json", payload)
    return payload


if __name__ == "__main__":
    main()
