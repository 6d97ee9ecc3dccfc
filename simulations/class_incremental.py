"""Class-incremental learning: one prompt per task, composed over the tasks seen so far.

Split Fashion-MNIST (5 tasks x 2 classes) by default, Split CIFAR-100 (10 tasks x 10
classes) with ``--cifar100 DIR``. After each task t, every method predicts among the
classes seen so far, and we report the average accuracy over tasks 1..t and the average
forgetting (best earlier accuracy minus current accuracy, over tasks 1..t-1) of

* **APT (composed)**: one prompt per task, trained on that task only, never touched again;
  the prediction composes the prompts of tasks 1..t (``compose_probs``);
* **APT (density-weighted)**: the same prompts, each weighted per image by the posterior of
  its task given the image's pooled backbone features (``common.density``: a small PPCA
  density of each task's own training features, fitted with its prompt; no old data used);
* **sequential prompt**: one prompt over all classes fine-tuned on task 1, then 2, ... (forgets);
* **linear probe, sequential**: a linear head on frozen backbone features, trained on each
  task in turn (forgets);
* **linear probe, joint**: retrained from scratch on all tasks seen so far (an upper
  bound: it sees old data, which the others never do).

All methods read the same precomputed backbone bank (keys/values for the prompts, pooled
features for the probes).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from common.data import load_split
from common.density import density_weights
from common.model import APTViT, compose_probs
from simulations.common import (
    Bank,
    Stopwatch,
    accuracy,
    backbone_spec,
    bank_logits,
    base_parser,
    build_bank,
    configure_logging,
    fresh_prompt,
    save_figure,
    select_profile,
    setup_record,
    shared_subset,
    stratified_indices,
    train_on_bank,
    write_csv,
    write_json,
)

NAME = "class_incremental"
METHODS = ("apt_composed", "apt_density", "sequential_prompt", "probe_sequential", "probe_joint")
LABELS = {"apt_composed": "APT (composed prompts)", "apt_density": "APT, density-weighted composition",
          "sequential_prompt": "sequential prompt (forgets)",
          "probe_sequential": "linear probe, sequential (forgets)",
          "probe_joint": "linear probe, joint (upper bound)"}


@dataclass(frozen=True)
class Settings:
    """Sizes of one run."""

    train_images: int  # the shared Fashion-MNIST subset the tasks draw from
    test_images: int
    train_per_class: int  # at most this many per class (Split CIFAR-100: exactly)
    test_per_class: int
    epochs: int
    batch_size: int
    lr: float
    probe_epochs: int
    probe_lr: float


TINY = Settings(48, 32, 4, 3, 1, 16, 3e-3, 5, 1e-2)
QUICK = Settings(96, 96, 8, 8, 10, 16, 1e-2, 20, 1e-2)
FULL = Settings(600, 500, 60, 50, 10, 16, 1e-2, 50, 1e-2)


@dataclass
class Task:
    """One task: its classes and the train/test indices of their images."""

    classes: list[int]
    train: np.ndarray
    test: np.ndarray


def make_tasks(train: Bank, test: Bank, num_classes: int, per_task: int, s: Settings, seed: int) -> list[Task]:
    """Consecutive groups of ``per_task`` classes, with up to ``*_per_class`` images each."""
    tasks = []
    for start in range(0, num_classes, per_task):
        classes = list(range(start, start + per_task))
        tasks.append(Task(classes, train.index[stratified_indices(train.labels, s.train_per_class, classes, seed)],
                          test.index[stratified_indices(test.labels, s.test_per_class, classes, seed)]))
    return tasks


def cifar100_banks(args: argparse.Namespace, model: APTViT, s: Settings) -> tuple[Bank, Bank]:
    """Banks of ``*_per_class`` images of every CIFAR-100 class."""
    banks = []
    for split, n in (("train", s.train_per_class), ("test", s.test_per_class)):
        raw = load_split("cifar100", args.cifar100, split)
        banks.append(build_bank(model, raw, stratified_indices(raw.labels, n, range(len(raw.classes)), args.seed),
                                args.work_dir / f"cifar100-bank-{split}"))
    return banks[0], banks[1]


Scorer = Callable[[np.ndarray], torch.Tensor]  # test indices -> [n, C] scores


def run_apt(model: APTViT, train: Bank, test: Bank, tasks: list[Task], s: Settings,
            num_classes: int, seed: int) -> dict[str, list[Scorer]]:
    """One prompt per task; after task t, the composition of prompts 1..t: uniform
    (``apt_composed``) and weighted by each task's source density (``apt_density``)."""
    prompts, densities = [], []
    out: dict[str, list[Scorer]] = {"apt_composed": [], "apt_density": []}
    test_features = torch.as_tensor(test.features)
    for t, task in enumerate(tasks):
        prompt = fresh_prompt(model, num_classes, seed=seed + t, labels=task.classes, source=f"task-{t}")
        train_on_bank(model, prompt, train, task.train, s.epochs, s.batch_size, s.lr, seed)
        prompts.append(prompt)
        densities.append(train.density_of(task.train))
        logits = bank_logits(model, test, list(prompts))
        out["apt_composed"].append(_frozen_scores(compose_probs(logits), test))
        weights = density_weights(densities, test_features)
        out["apt_density"].append(_frozen_scores(compose_probs(logits, weights), test))
    return out


def run_sequential_prompt(model: APTViT, train: Bank, test: Bank, tasks: list[Task], s: Settings,
                          num_classes: int, seed: int) -> list[Scorer]:
    """A single prompt over all classes fine-tuned on each task in turn."""
    prompt = fresh_prompt(model, num_classes, seed=seed, source="sequential")
    scorers = []
    for task in tasks:
        train_on_bank(model, prompt, train, task.train, s.epochs, s.batch_size, s.lr, seed)
        scorers.append(_frozen_scores(bank_logits(model, test, [prompt])[0], test))
    return scorers


def _frozen_scores(scores: torch.Tensor, test: Bank) -> Scorer:
    """A scorer over the bank's test slots, fixed now (later training does not change it)."""
    return lambda idx: scores[test.slots_of(idx)]


def train_probe(head: torch.nn.Linear, features: np.ndarray, labels: np.ndarray, s: Settings, seed: int) -> None:
    """Mini-batch AdamW on cross-entropy over all classes (the head's outputs)."""
    x, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    optimizer = torch.optim.AdamW(head.parameters(), lr=s.probe_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(s.probe_epochs):
        for batch in torch.randperm(len(y), generator=gen).split(s.batch_size):
            loss = F.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def run_probes(train: Bank, test: Bank, tasks: list[Task], s: Settings, num_classes: int,
               seed: int) -> dict[str, list[Scorer]]:
    """Sequential and joint linear probes on the bank's pooled features."""
    dim = train.features.shape[1]
    torch.manual_seed(seed)
    sequential = torch.nn.Linear(dim, num_classes)
    out: dict[str, list[Scorer]] = {"probe_sequential": [], "probe_joint": []}
    seen: list[int] = []
    for task in tasks:
        rows = train.slots_of(task.train)
        train_probe(sequential, train.features[rows], train.labels[rows], s, seed)
        seen += rows
        torch.manual_seed(seed)
        joint = torch.nn.Linear(dim, num_classes)
        train_probe(joint, train.features[seen], train.labels[seen], s, seed)
        for name, head in (("probe_sequential", sequential), ("probe_joint", joint)):
            with torch.no_grad():
                out[name].append(_frozen_scores(head(torch.as_tensor(test.features)), test))
    return out


def accuracy_matrices(scorers: dict[str, list[Scorer]], tasks: list[Task], test: Bank) -> dict[str, list[list[float]]]:
    """``R[t][j]``: accuracy on task j's test images after task t (j <= t), predicting among
    the classes of tasks 1..t."""
    out = {}
    for name, per_step in scorers.items():
        matrix = []
        for t, score in enumerate(per_step):
            allowed = [c for task in tasks[:t + 1] for c in task.classes]
            matrix.append([accuracy(score(task.test), test.labels_of(task.test), allowed) for task in tasks[:t + 1]])
        out[name] = matrix
    return out


def summary_rows(matrices: dict[str, list[list[float]]]) -> list[dict]:
    """Average accuracy and average forgetting after each task, per method."""
    rows = []
    for name, matrix in matrices.items():
        for t, accs in enumerate(matrix):
            drops = [max(matrix[step][j] for step in range(j, t)) - accs[j] for j in range(t)]
            rows.append({"method": name, "after_task": t + 1, "average_accuracy": float(np.mean(accs)),
                         "forgetting": float(np.mean(drops)) if drops else 0.0,
                         "accuracy_per_task": " ".join(f"{a:.3f}" for a in accs)})
    return rows


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Average accuracy and forgetting vs number of tasks seen."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in METHODS:
        part = [r for r in rows if r["method"] == name]
        steps = [r["after_task"] for r in part]
        axes[0].plot(steps, [100 * r["average_accuracy"] for r in part], "o-", label=LABELS[name])
        axes[1].plot(steps, [100 * r["forgetting"] for r in part], "o-", label=LABELS[name])
    axes[0].set(xlabel="tasks seen", ylabel="average accuracy (%)", title=title)
    axes[1].set(xlabel="tasks seen", ylabel="average forgetting (points)", title="forgetting")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the JSON payload it wrote."""
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--cifar100", default="", metavar="DIR",
                        help="run Split CIFAR-100 (10 x 10) from this cifar-100-python folder")
    args = parser.parse_args(argv)
    configure_logging()
    s, label = select_profile(args, TINY, QUICK, FULL)
    clock = Stopwatch()
    spec = backbone_spec(args.tiny)
    model = spec.load()
    if args.cifar100:
        dataset, per_task = "cifar100", 10
        train, test = cifar100_banks(args, model, s)
    else:
        dataset, per_task = "fashion_mnist", 2
        _, train, test = shared_subset(args, model, s.train_images, s.test_images)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    tasks = make_tasks(train, test, num_classes, per_task, s, args.seed)
    scorers = {**run_apt(model, train, test, tasks, s, num_classes, args.seed),
               "sequential_prompt": run_sequential_prompt(model, train, test, tasks, s, num_classes, args.seed),
               **run_probes(train, test, tasks, s, num_classes, args.seed)}
    matrices = accuracy_matrices(scorers, tasks, test)
    rows = summary_rows(matrices)
    title = f"Split {'CIFAR-100' if args.cifar100 else 'Fashion-MNIST'} ({len(tasks)} x {per_task})"
    out = args.out / dataset
    payload = {
        "experiment": NAME,
        "setup": setup_record(spec, s, label, args, dataset=title, tasks=len(tasks), classes_per_task=per_task,
                              train_images=int(sum(len(t.train) for t in tasks)),
                              test_images=int(sum(len(t.test) for t in tasks)),
                              seconds=clock.seconds()),
        "summary": rows, "matrices": matrices,
        "final": {r["method"]: {"average_accuracy": r["average_accuracy"], "forgetting": r["forgetting"]}
                  for r in rows if r["after_task"] == len(tasks)},
        "plots": [plot(rows, out / "class_incremental.png", title).name],
    }
    write_csv(out / "summary.csv", rows)
    write_json(out / "result.json", payload)
    return payload


if __name__ == "__main__":
    main()
