"""Choosing the density's temperature, covariance blend, variance floor and rank on validation images.

Density-weighted composition (``common.compose``) has four knobs: the posterior temperature
per feature dimension (``TEMPERATURE_PER_DIM``), the weight of a class's own covariance
against the pooled one (``OWN_COVARIANCE``), and the variance floor and PPCA rank a source
fits its density with (``VARIANCE_FLOOR``, ``DEFAULT_RANK``). They are chosen here, never on
test images: 2,000 Fashion-MNIST training-split images are split into sources by several
partitioners (IID, label skew of different strength, disjoint classes; 5 to 20 sources; two
seeds each), each source fits a linear probe and its density on its own images, and every
grid point is scored by the density-weighted composition's accuracy on 1,000 *other*
training-split images (the validation set). The experts are linear probes rather than
prompts so the grid costs minutes; the product's prompts start from exactly such a probe
(``common.train``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common.compose import compose_probs, tempered_posterior
from common.data import limit_per_partition, load_split
from common.density import SourceDensity, pooled_log_densities
from simulations.common import (
    BankProbe,
    Stopwatch,
    accuracy,
    backbone_spec,
    base_parser,
    build_bank,
    setup_record,
    start_experiment,
    write_csv,
    write_json,
)

NAME = "tune_density"
NUM_CLASSES = 10


@dataclass(frozen=True)
class Settings:
    """Sizes and the grid."""

    train_images: int
    val_images: int
    partitions: tuple[str, ...]  # "iid-<sources>", "dirichlet-<alpha>-<sources>" or "classes-<sources>"
    seeds: tuple[int, ...]  # each partition is drawn once per seed (offsets to --seed)
    temperatures: tuple[float, ...]  # per feature dimension
    own_covariances: tuple[float, ...]  # weight of a class's own covariance against the pooled one
    floors: tuple[float, ...]
    ranks: tuple[int, ...]


TINY = Settings(64, 32, ("dirichlet-1.0-2",), (0,), (1 / 128,), (0.1,), (0.1,), (2,))
QUICK = Settings(600, 300, ("dirichlet-0.1-5", "classes-5"), (0,), (1 / 512, 1 / 128, 1 / 32), (0.0, 0.1),
                 (0.1,), (8,))
FULL = Settings(2000, 1000, ("iid-10", "iid-20", "dirichlet-0.1-5", "dirichlet-0.1-10", "dirichlet-0.1-20",
                             "dirichlet-1.0-10", "dirichlet-1.0-20", "classes-5"), (0, 1),
                (1 / 512, 1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16), (0.0, 0.05, 0.1, 0.2),
                (0.01, 0.03, 0.1), (16, 32))


def split_sources(labels: np.ndarray, indices: np.ndarray, partition: str, seed: int) -> list[np.ndarray]:
    """Split ``indices`` into sources: IID, Dirichlet(α) label skew, or disjoint class groups."""
    parts = partition.split("-")
    rng = np.random.default_rng(seed)
    if parts[0] == "iid":
        return [np.sort(x) for x in np.array_split(rng.permutation(indices), int(parts[1]))]
    if parts[0] == "classes":
        groups = np.array_split(np.arange(NUM_CLASSES), int(parts[1]))
        return [indices[np.isin(labels[indices], g)] for g in groups]
    alpha, n = float(parts[1]), int(parts[2])
    owner = np.empty(len(indices), dtype=np.int64)
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels[indices] == c)
        shares = rng.dirichlet(np.full(n, alpha))
        owner[members] = rng.choice(n, size=len(members), p=shares)
    return [indices[owner == k] for k in range(n) if (owner == k).any()]


def main(argv: list[str] | None = None) -> dict:
    """Run the grid; returns the JSON payload it wrote."""
    args, s, label = start_experiment(base_parser(NAME, __doc__.split("\n\n")[0]), argv, TINY, QUICK, FULL)
    clock = Stopwatch()
    spec = backbone_spec(args.tiny)
    model = spec.load()
    raw = load_split("fashion_mnist", args.data_dir or None, "train")
    chosen = limit_per_partition(np.arange(len(raw)), s.train_images + s.val_images, args.seed + 2)
    train_idx, val_idx = np.sort(chosen[:s.train_images]), np.sort(chosen[s.train_images:])
    bank = build_bank(model, raw, chosen, args.work_dir / f"bank-{model.backbone_name}-{len(chosen)}")
    val_feats = torch.as_tensor(bank.features[bank.slots_of(val_idx)], dtype=torch.float64)
    val_labels = bank.labels_of(val_idx)
    rows = []
    for partition, offset in tqdm(list(itertools.product(s.partitions, s.seeds)), desc="partitions"):
        sources = split_sources(raw.labels, train_idx, partition, args.seed + offset)
        logits = torch.stack([BankProbe.fit(bank, x).logits(bank, NUM_CLASSES, val_idx) for x in sources]).double()
        uniform = accuracy(compose_probs(logits), val_labels)
        for rank, floor in itertools.product(s.ranks, s.floors):
            densities = [SourceDensity.fit(torch.as_tensor(bank.features[bank.slots_of(x)]),
                                           torch.as_tensor(bank.labels_of(x)), rank=rank, floor=floor)
                         for x in sources]
            for own in s.own_covariances:
                log_post = pooled_log_densities(densities, val_feats, own)  # as density_weights, untempered
                for t in s.temperatures:
                    weights = tempered_posterior(log_post, t * val_feats.shape[1])
                    rows.append({"partition": f"{partition} (seed {args.seed + offset})", "sources": len(sources),
                                 "rank": rank, "floor": floor, "own_covariance": own, "temperature_per_dim": t,
                                 "uniform": uniform,
                                 "density": accuracy(compose_probs(logits, weights), val_labels)})
    best = _best(rows)
    payload = {"experiment": NAME,
               "setup": setup_record(spec, s, label, args, train_images=s.train_images,
                                     val_images=s.val_images, seconds=clock.seconds()),
               "chosen": best, "grid": rows, "plots": []}
    write_csv(args.out / "grid.csv", rows)
    write_json(args.out / "result.json", payload)
    return payload


KNOBS = ("rank", "floor", "own_covariance", "temperature_per_dim")


def _best(rows: list[dict]) -> dict:
    """The knobs with the highest mean validation accuracy over partitions (ties: the first in grid order)."""
    keys = list(dict.fromkeys(tuple(r[k] for k in KNOBS) for r in rows))
    means = {key: float(np.mean([r["density"] for r in rows if tuple(r[k] for k in KNOBS) == key])) for key in keys}
    best = max(keys, key=means.__getitem__)
    return {**dict(zip(KNOBS, best, strict=True)), "mean_val_accuracy": means[best],
            "per_partition": {r["partition"]: r["density"] for r in rows if tuple(r[k] for k in KNOBS) == best}}


if __name__ == "__main__":
    main()
