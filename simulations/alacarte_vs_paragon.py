"""Composed pool vs paragon vs FedAvg vs linear probes, for 1..20 sources (Fashion-MNIST).

For every partitioner (IID, Dirichlet α) and number of sources N, a fixed random subset of
Fashion-MNIST is split into N sources (each keeps 10% of its images as its validation
split, as the product's ClientApp does) and

* **composed**: each source trains its own prompt through the product's Flower apps
  (``server.server_app.main`` + the ClientApp handlers in ``flwr.simulation``, mode
  ``alacarte``, the product's recipe: probe-initialised head, tuning kept only where the
  source's validation loss improves); the pool's prompts are composed uniformly and
  weighted per image by the density each source shipped with its prompt (``composed_density``);
* **paragon**: one prompt trained with the same recipe on the union of the sources' training
  images, selecting on the union of their validation splits (per row: the validation splits,
  and so the training images, differ with N and the partitioning);
* **FedAvg**: one shared prompt through the same Flower apps, mode ``fedavg``, the same recipe
  (selection on each client's validation split included): one local epoch per round and as
  many rounds as the paragon has epochs, so the optimiser steps of all clients together
  match the paragon's (each method's step count is reported); the round kept is the one
  whose shared prompt has the lowest validation loss over all the clients' validation
  splits (as the paragon selects on their union);
* **alone**: each pool prompt by itself (mean over sources);
* **probes**: references on the frozen backbone's pooled features of the same training
  images: each source's linear probe, composed uniformly and density-weighted, and one probe
  on the union (``common.probe``, L2 by cross-validation on the training images); and per
  source, whether its prompt is at least as accurate as its probe on the images of its own
  classes (``sources_not_below_probe``: how many are).

The "à-la-carte subset" curve takes random subsets of one pool and compares their
composition with a paragon trained on exactly that subset's data.

Every method reads the backbone keys/values of the same precomputed fp16 bank (the Flower
clients too: all clients run in one Ray worker, which gets the bank as its KV cache), and
every accuracy is measured on the same held-out test images; no choice is made on them.
The density compositions (prompts and probes) and the paragon are also scored on held-out
*training-split* images that no source, paragon or probe trains on (``held_out_images``,
validation images): a second, larger sample for the comparisons the test images decide by a
handful of images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.model import APTViT
from common.train import planned_epochs
from server.fedavg import FEDAVG_SOURCE
from server.pool import PromptPool
from simulations.common import (
    LR,
    SIGNIFICANCE,
    BackboneSpec,
    Bank,
    BankProbe,
    Federation,
    Stopwatch,
    accuracy,
    add_threads_option,
    backbone_spec,
    bank_logits,
    base_parser,
    composed_accuracy,
    data_folder,
    density_probs,
    fresh_prompt,
    held_out_bank,
    paired_comparison,
    partition_shards,
    pool_prompts,
    product_run_config,
    recipe,
    run_federations,
    save_figure,
    setup_record,
    shared_subset,
    start_experiment,
    train_on_bank,
    write_csv,
    write_json,
)

NAME = "alacarte_vs_paragon"
NUM_CLASSES = 10
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Settings:
    """Sizes of one run (see the module doc)."""

    train_images: int  # union of all sources (each keeps VAL_FRACTION for validation)
    test_images: int
    sources: tuple[int, ...]
    partitions: tuple[str, ...]  # "iid" or "dirichlet-<alpha>"
    epochs: int
    min_steps: int
    batch_size: int
    lr: float
    subset_pool: int  # N of the IID pool the subset curve draws from
    subset_sizes: tuple[int, ...]
    subset_draws: int
    held_out_images: int  # training-split images outside the subset: the validation comparison


TINY = Settings(48, 32, (2,), ("iid",), 1, 0, 16, LR, 2, (1,), 1, 16)
QUICK = Settings(200, 200, (1, 4), ("iid", "dirichlet-0.1"), 5, 20, 32, LR, 4, (1, 2), 1, 200)
FULL = Settings(2000, 1000, (1, 2, 5, 10, 20), ("iid", "dirichlet-0.1", "dirichlet-1"), 5, 50, 32, LR,
                10, (1, 2, 5), 1, 4000)


@dataclass(frozen=True)
class Partitioning:
    """A partitioner as the product names it, with its Dirichlet α."""

    label: str
    partitioner: str
    alpha: float

    @classmethod
    def parse(cls, label: str) -> Partitioning:
        if label == "iid":
            return cls(label, "iid", 0.5)
        kind, _, alpha = label.partition("-")
        if kind != "dirichlet" or not alpha:
            raise SystemExit(f"partition {label!r}: use 'iid' or 'dirichlet-<alpha>'")
        return cls(label, "dirichlet", float(alpha))


def federations(s: Settings, spec: BackboneSpec, data_dir: Path, work: Path, seed: int,
                modes: tuple[str, ...] = ("alacarte", "fedavg")) -> list[Federation]:
    """The runs of ``modes`` (à-la-carte, FedAvg) for every (partitioning, N), their pools
    emptied (the pools of other modes are left alone); N = 1 runs once (all coincide)."""
    runs = []
    for label in s.partitions:
        part = Partitioning.parse(label)
        for n in s.sources:
            if n == 1 and label != s.partitions[0]:
                continue
            common = {"partitioner": part.partitioner, "dirichlet-alpha": part.alpha, "partition-seed": seed,
                      "batch-size": s.batch_size, "learning-rate": s.lr, "val-fraction": VAL_FRACTION}
            for mode, rounds, local, min_steps in (("alacarte", 1, s.epochs, s.min_steps),
                                                   ("fedavg", s.epochs, 1, 0)):
                if mode not in modes:
                    continue
                name = f"{label}-{n}-{mode}"
                pool = work / "pools" / name
                shutil.rmtree(pool, ignore_errors=True)
                config = product_run_config(spec, data_dir, pool, mode=mode, **common,
                                            **{"num-server-rounds": rounds, "local-epochs": local,
                                               "min-steps": min_steps})
                runs.append(Federation(name, config, list(range(n)), n))
    return runs


def run_key(s: Settings, partition: str, n: int) -> str:
    """The name of the federations of (``partition``, ``n`` sources): ``n = 1`` runs once, under
    the first partitioning."""
    return f"{partition if n > 1 else s.partitions[0]}-{n}"


def source_shards(data_dir: Path, partition: str, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, validation) indices of the ``n`` sources of ``partition`` (as their ClientApps load them)."""
    part = Partitioning.parse(partition)
    return partition_shards(data_dir, n, part.partitioner, part.alpha, seed, VAL_FRACTION)


def fedavg_columns(run: Federation, model: APTViT, test: Bank, steps_per_round: int) -> dict:
    """The FedAvg columns of a row: the test accuracy of the shared prompt the federation left in
    its pool, the round it kept (lowest validation loss), the optimiser steps of all its clients
    in all rounds and up to the kept round, and its wall-clock."""
    pool = PromptPool(run.run_config["pool-dir"], create=False, read_only=True)
    shared, record = pool.get(FEDAVG_SOURCE, model=model), pool.info(FEDAVG_SOURCE).metrics
    return {"fedavg": composed_accuracy(bank_logits(model, test, [shared]), test.labels),
            "fedavg_kept_round": record["kept-round"], "steps_fedavg": record["rounds"] * steps_per_round,
            "steps_fedavg_kept": record["kept-round"] * steps_per_round, "fedavg_seconds": round(run.seconds, 1)}


def steps(n_images: int, s: Settings, epochs: int | None = None, min_steps: int | None = None) -> int:
    """Optimiser steps of the recipe on ``n_images`` (as ``train_prompt`` plans them)."""
    batches = math.ceil(n_images / s.batch_size)
    config = recipe(s.epochs if epochs is None else epochs, s.lr, s.min_steps if min_steps is None else min_steps)
    return planned_epochs(batches, config) * batches


def fedavg_round_steps(sizes: list[int], s: Settings) -> int:
    """Optimiser steps of one FedAvg round: one local epoch on each source's ``sizes`` images."""
    return sum(steps(x, s, epochs=1, min_steps=0) for x in sizes)


def paragon(model: APTViT, bank: Bank, shards: list[tuple[np.ndarray, np.ndarray]], s: Settings, seed: int):
    """One prompt over every class, the recipe on the union of ``shards`` (selection on their validation)."""
    train, val = (np.concatenate([x[i] for x in shards]) for i in (0, 1))
    prompt = fresh_prompt(model, NUM_CLASSES, seed=seed, source="paragon")
    train_on_bank(model, prompt, bank, train, recipe(s.epochs, s.lr, s.min_steps), s.batch_size, seed, val)
    return prompt


@dataclass
class SourceProbes:
    """The per-source linear probes of one configuration, their densities and one probe on the union."""

    probes: list[BankProbe]
    densities: list
    union: BankProbe

    @classmethod
    def fit(cls, train: Bank, shards: list[tuple[np.ndarray, np.ndarray]]) -> SourceProbes:
        return cls([BankProbe.fit(train, x) for x, _ in shards], [train.density_of(x) for x, _ in shards],
                   BankProbe.fit(train, np.concatenate([x for x, _ in shards])))

    def logits(self, bank: Bank) -> torch.Tensor:
        """Each source probe's logits ``[k, n, C]`` on every image of ``bank``."""
        return torch.stack([p.logits(bank, NUM_CLASSES) for p in self.probes])


def sources_not_below_probe(prompt_logits: torch.Tensor, probe_logits: torch.Tensor, labels: np.ndarray) -> int:
    """How many sources' prompts are at least as accurate as their own probes on the images of
    their own classes. ``prompt_logits`` and ``probe_logits`` are ``[k, n, C]``, ``-inf``
    outside a source's classes (as both give them), in the same source order; so a source is
    right only on images of its own classes, and comparing its images right over all ``n``
    compares its accuracies there."""
    if prompt_logits.shape != probe_logits.shape:
        raise ValueError(f"prompt logits {tuple(prompt_logits.shape)} and probe logits {tuple(probe_logits.shape)} "
                         "must cover the same sources, images and classes")
    y = torch.as_tensor(np.asarray(labels))  # [n]
    prompt_right = (prompt_logits.argmax(-1) == y).sum(1)  # [k]
    probe_right = (probe_logits.argmax(-1) == y).sum(1)
    return int((prompt_right >= probe_right).sum())


def probe_rows(probes: SourceProbes, test: Bank, prompt_logits: torch.Tensor,
               density: torch.Tensor) -> dict[str, float]:
    """Per-source linear probes composed (uniform, density) and one probe on the union; the
    pool's ``density`` composition ``[n, C]`` against the probes' (images won, lost, sign-test p),
    and how many of its prompts (``prompt_logits [k, n, C]``) are not below their own probes."""
    logits = probes.logits(test)
    composed = density_probs(logits, probes.densities, test)
    paired = paired_comparison(density, composed, test.labels)
    return {"probes_composed": composed_accuracy(logits, test.labels),
            "probes_composed_density": accuracy(composed, test.labels),
            "union_probe": accuracy(probes.union.logits(test, NUM_CLASSES).softmax(-1), test.labels),
            "sources_not_below_probe": sources_not_below_probe(prompt_logits, logits, test.labels),
            **{f"density_vs_probes_{k}": v for k, v in paired.items()}}


def held_out_row(model: APTViT, held_out: Bank, prompts: list, probes: SourceProbes, para) -> dict[str, float]:
    """The density compositions of the pool's prompts and of the per-source probes, and the
    paragon, on the held-out training-split images (validation: no test image)."""
    prompt_logits, probe_logits = bank_logits(model, held_out, prompts), probes.logits(held_out)
    density = density_probs(prompt_logits, [p.density for p in prompts], held_out)
    composed = density_probs(probe_logits, probes.densities, held_out)
    paragon_acc = accuracy(bank_logits(model, held_out, [para])[0].softmax(-1), held_out.labels)
    density_acc = accuracy(density, held_out.labels)
    return {"held_out_density": density_acc,
            "held_out_probes_density": accuracy(composed, held_out.labels), "held_out_paragon": paragon_acc,
            "held_out_gap_density_points": round(100 * (paragon_acc - density_acc), 2),
            "held_out_sources_not_below_probe": sources_not_below_probe(prompt_logits, probe_logits, held_out.labels),
            **{f"held_out_density_vs_probes_{k}": v
               for k, v in paired_comparison(density, composed, held_out.labels).items()}}


def comparison_rows(s: Settings, runs: dict[str, Federation], model: APTViT, data_dir: Path, train: Bank,
                    test: Bank, held_out: Bank, seed: int) -> list[dict]:
    """One row per (partitioning, N): accuracies of every method, gaps to the paragon, step counts;
    the density compositions and the paragon again on the held-out (validation) images."""
    rows = []
    paragons: dict[bytes, tuple] = {}  # (paragon, test accuracy) by the sorted training images it was trained on
    for label in s.partitions:
        for n in s.sources:
            clock = Stopwatch()
            key = run_key(s, label, n)
            prompts = list(pool_prompts(Path(runs[f"{key}-alacarte"].run_config["pool-dir"]), model).values())
            logits = bank_logits(model, test, prompts)
            alone = [accuracy(logits[i].softmax(-1), test.labels) for i in range(len(prompts))]
            shards = source_shards(data_dir, label, n, seed)
            sizes = [len(x) for x, _ in shards]
            composed = composed_accuracy(logits, test.labels)
            density = density_probs(logits, [p.density for p in prompts], test)
            density_acc = accuracy(density, test.labels)
            union = np.sort(np.concatenate([x for x, _ in shards]))
            trained_on = union.tobytes()
            if trained_on not in paragons:
                para = paragon(model, train, shards, s, seed)
                paragons[trained_on] = para, accuracy(bank_logits(model, test, [para])[0].softmax(-1), test.labels)
            para, paragon_acc = paragons[trained_on]
            probes = SourceProbes.fit(train, shards)
            rows.append({
                "partition": label, "sources": n, "prompts_in_pool": len(prompts),
                "train_images_per_source_mean": float(np.mean(sizes)), "train_images_per_source_min": min(sizes),
                "train_images_per_source_max": max(sizes),
                "composed": composed, "composed_density": density_acc, "paragon": paragon_acc,
                "alone_mean": float(np.mean(alone)), "alone_min": min(alone), "alone_max": max(alone),
                **probe_rows(probes, test, logits, density),
                "gap_points": round(100 * (paragon_acc - composed), 2),
                "gap_density_points": round(100 * (paragon_acc - density_acc), 2),
                "steps_alacarte": sum(steps(x, s) for x in sizes), "steps_paragon": steps(len(union), s),
                "alacarte_seconds": round(runs[f"{key}-alacarte"].seconds, 1),
                **fedavg_columns(runs[f"{key}-fedavg"], model, test, fedavg_round_steps(sizes, s)),
                **held_out_row(model, held_out, prompts, probes, para),
            })
            logging.info("evaluated %s: density %.3f, probes (density) %.3f, paragon %.3f in %.0f s (%d of %d)", key,
                         density_acc, rows[-1]["probes_composed_density"], paragon_acc, clock.seconds(), len(rows),
                         len(s.partitions) * len(s.sources))
    return rows


def subset_rows(s: Settings, runs: dict[str, Federation], model: APTViT, data_dir: Path, train: Bank,
                test: Bank, seed: int) -> list[dict]:
    """Random subsets of the IID pool: composed subset vs a paragon trained on that subset's data."""
    n = s.subset_pool
    pool = list(pool_prompts(Path(runs[f"iid-{n}-alacarte"].run_config["pool-dir"]), model).values())
    logits = bank_logits(model, test, pool)
    shards = source_shards(data_dir, "iid", n, seed)
    rng = np.random.default_rng(seed)
    rows = []
    for size in s.subset_sizes:
        for draw in range(s.subset_draws):
            chosen = sorted(int(i) for i in rng.choice(n, size=size, replace=False))
            composed = composed_accuracy(logits, test.labels, chosen)
            density = accuracy(density_probs(logits[chosen], [pool[i].density for i in chosen], test), test.labels)
            para = paragon(model, train, [shards[i] for i in chosen], s, seed)
            para_acc = accuracy(bank_logits(model, test, [para])[0].softmax(-1), test.labels)
            rows.append({"subset_size": size, "draw": draw, "sources": " ".join(map(str, chosen)),
                         "train_images": sum(len(shards[i][0]) for i in chosen), "composed": composed,
                         "composed_density": density, "paragon": para_acc,
                         "gap_points": round(100 * (para_acc - composed), 2),
                         "gap_density_points": round(100 * (para_acc - density), 2)})
            logging.info("evaluated subset %s of iid-%d: density %.3f, paragon %.3f", chosen, n, density, para_acc)
    return rows


def plot_comparison(rows: list[dict], s: Settings, path: Path) -> Path:
    """Accuracy vs number of sources, one panel per partitioning."""
    fig, axes = plt.subplots(1, len(s.partitions), figsize=(4.2 * len(s.partitions), 3.6), squeeze=False)
    for ax, label in zip(axes[0], s.partitions):
        part = [r for r in rows if r["partition"] == label]
        xs = [r["sources"] for r in part]
        for key, style in (("paragon", "k--"), ("union_probe", "k:"), ("composed", "o-"), ("composed_density", "D-"),
                           ("probes_composed_density", "x--"), ("fedavg", "s-"), ("alone_mean", "^:")):
            ax.plot(xs, [100 * r[key] for r in part], style, label=key.replace("_mean", " (mean)"))
        ax.set(xscale="log", xticks=xs, xticklabels=[str(x) for x in xs], xlabel="sources",
               ylabel="test accuracy (%)", title=label)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def plot_subsets(rows: list[dict], path: Path) -> Path:
    """Composed subset vs paragon-on-subset accuracy against subset size."""
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    sizes = sorted({r["subset_size"] for r in rows})
    for key, style in (("paragon", "k--o"), ("composed", "-s"), ("composed_density", "-D")):
        means = [100 * np.mean([r[key] for r in rows if r["subset_size"] == k]) for k in sizes]
        ax.plot(sizes, means, style, label=f"{key} (mean of draws)")
        ax.scatter([r["subset_size"] for r in rows], [100 * r[key] for r in rows], s=10, alpha=0.5)
    ax.set(xlabel="sources in the subset", ylabel="test accuracy (%)", title="à-la-carte subsets (IID pool)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def recorded_result(args: argparse.Namespace, s: Settings, label: str) -> dict:
    """The result in ``--out`` that ``--fedavg-only`` updates; it must come from the same
    profile, settings, seed and data folder (results recorded before the data folder was
    recorded used the default one)."""
    path = args.out / "result.json"
    if not path.is_file():
        raise SystemExit(f"--fedavg-only updates {path}, which does not exist: run the experiment first")
    try:
        payload = json.loads(path.read_text())
        profile, settings, seed = (payload["setup"][k] for k in ("profile", "settings", "seed"))
        payload["comparison"]  # KeyError unless the result holds its table
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path} is not a result of this experiment ({err!r}): run the experiment first") from None
    if (profile, settings, seed) != (label, json.loads(json.dumps(dataclasses.asdict(s))), args.seed):
        raise SystemExit(f"{path} is a {profile} run with seed {seed} and other settings: "
                         "--fedavg-only needs the same profile, --set overrides and --seed")
    recorded_data, asked = payload["setup"].get("data_dir", "default"), data_folder(args)
    if recorded_data != asked:
        raise SystemExit(f"{path} was run on data folder {recorded_data!r}, not {asked!r} ('default': "
                         "the prepared Fashion-MNIST): --fedavg-only needs the same --data-dir")
    return payload


def rerun_fedavg(payload: dict, args: argparse.Namespace, s: Settings, spec: BackboneSpec, model: APTViT,
                 data_dir: Path, train: Bank, test: Bank) -> dict:
    """Run only the FedAvg federations again and replace the FedAvg columns (:func:`fedavg_columns`)
    of ``payload``, the recorded result (:func:`recorded_result`); every other number in it is
    kept. Writes and returns the updated payload."""
    runs = federations(s, spec, data_dir, args.work_dir, args.seed, modes=("fedavg",))
    run_federations(runs, max(s.sources), train.root)
    by_name = {r.name: r for r in runs}
    for row in payload["comparison"]:
        shards = source_shards(data_dir, row["partition"], row["sources"], args.seed)
        row.update(fedavg_columns(by_name[f"{run_key(s, row['partition'], row['sources'])}-fedavg"], model, test,
                                  fedavg_round_steps([len(x) for x, _ in shards], s)))
    payload["fedavg_rerun"] = {"date": time.strftime("%Y-%m-%d"), "seconds": round(sum(r.seconds for r in runs), 1)}
    plot_comparison(payload["comparison"], s, args.out / "accuracy_vs_sources.png")
    write_csv(args.out / "comparison.csv", payload["comparison"])
    write_json(args.out / "result.json", payload)
    return payload


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the JSON payload it wrote."""
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    add_threads_option(parser)
    parser.add_argument("--fedavg-only", action="store_true",
                        help="run only the FedAvg federations again and replace the FedAvg column of the "
                             "result already in --out (same profile, --set and --seed); all else is kept")
    args, s, label = start_experiment(parser, argv, TINY, QUICK, FULL)
    if s.subset_pool not in s.sources or "iid" not in s.partitions:
        raise SystemExit("settings: subset_pool must be one of sources and 'iid' among partitions")
    recorded = recorded_result(args, s, label) if args.fedavg_only else None
    clock = Stopwatch()
    spec = backbone_spec(args.tiny)
    model = spec.load()
    data_dir, train, test = shared_subset(args, model, s.train_images, s.test_images)
    if recorded is not None:
        return rerun_fedavg(recorded, args, s, spec, model, data_dir, train, test)
    runs = federations(s, spec, data_dir, args.work_dir, args.seed)
    run_federations(runs, max(s.sources), train.root)
    by_name = {r.name: r for r in runs}
    held_out = held_out_bank(args, model, s.train_images, s.held_out_images)
    rows = comparison_rows(s, by_name, model, data_dir, train, test, held_out, args.seed)
    subsets = subset_rows(s, by_name, model, data_dir, train, test, args.seed)
    uploads = [b for r in runs for b in r.uploads]
    payload = {
        "experiment": NAME,
        "setup": setup_record(spec, s, label, args, dataset="Fashion-MNIST", train_images=s.train_images,
                              test_images=s.test_images, seconds=clock.seconds(),
                              upload_bytes_per_reply=max(uploads) if uploads else 0),
        "comparison": rows, "subsets": subsets,
        "max_gap_points": max(r["gap_points"] for r in rows),
        "max_gap_density_points": max(r["gap_density_points"] for r in rows),
        "density_within_3_points": sum(r["gap_density_points"] <= 3 for r in rows),
        "density_not_below_probes": sum(r["composed_density"] >= r["probes_composed_density"] for r in rows),
        "density_significantly_below_probes": sum(r["composed_density"] < r["probes_composed_density"]
                                                  and r["density_vs_probes_p"] < SIGNIFICANCE for r in rows),
        "paragon_not_below_union_probe": sum(r["paragon"] >= r["union_probe"] for r in rows),
        "held_out_density_not_below_probes": sum(r["held_out_density"] >= r["held_out_probes_density"]
                                                 for r in rows),
        "held_out_density_within_3_points": sum(r["held_out_gap_density_points"] <= 3 for r in rows),
        "sources_not_below_probe": sum(r["sources_not_below_probe"] for r in rows),
        "held_out_sources_not_below_probe": sum(r["held_out_sources_not_below_probe"] for r in rows),
        "sources_with_probe": sum(r["prompts_in_pool"] for r in rows),
        "plots": [plot_comparison(rows, s, args.out / "accuracy_vs_sources.png").name,
                  plot_subsets(subsets, args.out / "subsets.png").name],
    }
    write_csv(args.out / "comparison.csv", rows)
    write_csv(args.out / "subsets.csv", subsets)
    write_json(args.out / "result.json", payload)
    return payload


if __name__ == "__main__":
    main()
