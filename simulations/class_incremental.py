"""Class-incremental learning: one prompt per task, composed over the tasks seen so far.

Split Fashion-MNIST (5 tasks x 2 classes) by default, Split CIFAR-100 (10 tasks x 10
classes) with ``--cifar100 DIR``. Each class contributes ``train_per_class`` training and
``test_per_class`` test images (stratified draws by seed). After each task t, every method
predicts among the classes seen so far, and we report the average accuracy over tasks 1..t
and the average forgetting (best earlier accuracy minus current accuracy, over tasks
1..t-1) of

* **APT (composed)**: one prompt per task, trained on that task only with the product's
  recipe (``common.train``: probe-initialised head, prompt tuning for ``epochs`` epochs but at
  least ``min_steps`` steps, the epoch with the lowest validation loss kept), never touched
  again; the prediction composes the prompts of tasks 1..t uniformly (``compose_probs``);
* **APT (density-weighted)**: the same prompts, each weighted per image by the posterior of
  its task given the image's pooled backbone features (``common.compose.density_weights``
  with the product's temperature; each task's ``SourceDensity`` is fitted on that prompt's
  own training split, as the ClientApp does; no old data used);
* **APT, task known** (``apt_task_oracle``): the same prompts, each image given only to the
  prompt of the task that owns its label. Not a method: it reads the test label, and bounds
  what any weighting of these prompts can reach; with ``task_inference`` (the share of test
  images whose largest density weight is on their own task) it shows how much of the gap to
  the joint probe is task inference;
* **linear probes, density-weighted**: one linear probe per task (``BankProbe``) composed
  with the same density weights: what the prompts add over their probe initialisation;
* **sequential prompt**: one prompt over all classes fine-tuned on task 1, then 2, ... with
  the same recipe and the same optimiser-step budget per task as each APT prompt (the probe
  initialisation happens on task 1, where its head is still zero), selecting on the current
  task's validation split (forgets);
* **linear probe, sequential**: a linear head over all classes fitted on each task in turn,
  warm-started: task t's head is the previous one plus a correction fitted on task t's
  images alone (LBFGS to convergence), whose L2 penalty, pulling it towards the previous
  head, is chosen by 5-fold cross-validation on those images (forgets);
* **linear probe, joint**: refitted on all tasks seen so far (``common.probe.fit_probe``,
  L2 by cross-validation): the reference; it sees old data, which the others never do.

Validation, and no choice on test images: each task's training images are split by seed
into the prompt's training split and a disjoint validation split (``val_fraction``, 10% in
the full profile, as the product's ClientApp does). Prompts are tuned on the training split
and select their epoch on the validation split (validation loss); the probe L2 strengths
are chosen by cross-validation on training images; the density's temperature, rank and
floor are the product's defaults (chosen on validation images by
``simulations/tune_density.py``). Probes need no separate validation split, so the probe
methods fit on all of a task's training images (training and validation split: the probe
references get at least the data the prompts get). Test images are only ever scored. (The
``--tiny`` smoke profile fixes the probes' L2 at the grid's middle value instead of
cross-validating it, to stay fast on random features.)

All methods read the same precomputed backbone bank (keys/values for the prompts, pooled
features for the probes and densities).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.compose import TEMPERATURE_PER_DIM, compose_probs, density_weights
from common.data import load_split, train_val_split
from common.density import DEFAULT_RANK, OWN_COVARIANCE, VARIANCE_FLOOR
from common.model import APTViT
from common.probe import L2_GRID, fit_probe
from simulations.common import (
    LR,
    Bank,
    BankProbe,
    Stopwatch,
    accuracy,
    add_threads_option,
    backbone_spec,
    bank_logits,
    base_parser,
    build_bank,
    fresh_prompt,
    recipe,
    save_figure,
    setup_record,
    start_experiment,
    stratified_indices,
    train_on_bank,
    write_csv,
    write_json,
)

NAME = "class_incremental"
METHODS = ("apt_composed", "apt_density", "apt_task_oracle", "probe_density", "sequential_prompt", "probe_sequential",
           "probe_joint")
LABELS = {"apt_composed": "APT (composed prompts)", "apt_density": "APT, density-weighted composition",
          "apt_task_oracle": "APT, task known (upper bound, reads the test label)",
          "probe_density": "per-task linear probes, density-weighted",
          "sequential_prompt": "sequential prompt (forgets)",
          "probe_sequential": "linear probe, sequential (forgets)",
          "probe_joint": "linear probe, joint (reference, re-uses old data)"}


@dataclass(frozen=True)
class Settings:
    """Sizes and recipe of one run."""

    train_per_class: int  # training images per class, the validation split included
    test_per_class: int
    val_fraction: float  # of each task's training images, the prompt's validation split
    epochs: int  # the recipe's epochs (at least min_steps optimiser steps)
    min_steps: int
    batch_size: int
    lr: float
    probe_cv: bool = True  # probe L2 by cross-validation (False: the grid's middle value; smoke tests only)


TINY = Settings(4, 3, 0.25, 1, 2, 16, LR, probe_cv=False)
QUICK = Settings(20, 12, 0.2, 10, 20, 32, LR)
FULL = Settings(240, 100, 0.1, 10, 100, 32, LR)  # the product's recipe and lr, 10 epochs, batch 32


@dataclass
class Task:
    """One task: its classes, the train/validation/test indices of their images."""

    classes: list[int]
    train: np.ndarray  # the prompts' training split
    val: np.ndarray  # the prompts' validation split (disjoint from train)
    test: np.ndarray

    @property
    def all_train(self) -> np.ndarray:
        """Every training image of the task (training and validation split)."""
        return np.sort(np.concatenate([self.train, self.val]))


def make_tasks(train: Bank, test: Bank, num_classes: int, per_task: int, s: Settings, seed: int) -> list[Task]:
    """Consecutive groups of ``per_task`` classes, with up to ``*_per_class`` images each; each
    task's training images split into training and validation by ``seed``."""
    tasks = []
    for t, start in enumerate(range(0, num_classes, per_task)):
        classes = list(range(start, start + per_task))
        images = train.index[stratified_indices(train.labels, s.train_per_class, classes, seed)]
        fit, val = train_val_split(images, s.val_fraction, seed + t)
        tasks.append(Task(classes, fit, val,
                          test.index[stratified_indices(test.labels, s.test_per_class, classes, seed)]))
    return tasks


def stratified_banks(args: argparse.Namespace, model: APTViT, dataset: str, s: Settings) -> tuple[Bank, Bank]:
    """Banks of ``*_per_class`` images of every class of ``dataset`` (stratified draws by seed)."""
    folder = args.cifar100 if dataset == "cifar100" else args.data_dir
    key = hashlib.sha256(str(Path(folder).resolve() if folder else "default").encode()).hexdigest()[:10]
    banks = []
    for split, n in (("train", s.train_per_class), ("test", s.test_per_class)):
        raw = load_split(dataset, folder or None, split)
        indices = stratified_indices(raw.labels, n, range(len(raw.classes)), args.seed)
        banks.append(build_bank(model, raw, indices,
                                args.work_dir / f"{dataset}-{key}-seed{args.seed}-bank-{split}-{n}"))
    return banks[0], banks[1]


Scorer = Callable[[np.ndarray], torch.Tensor]  # test indices -> [n, C] scores


def _frozen_scores(scores: torch.Tensor, test: Bank) -> Scorer:
    """A scorer over the bank's test slots, fixed now (later training does not change it)."""
    return lambda idx: scores[test.slots_of(idx)]


def _train_row(method: str, task: int, metrics: dict) -> dict:
    logging.info("%s, task %d: %d steps in %.0f s, kept epoch %d of %d (validation loss %.3f)", method, task + 1,
                 metrics["steps"], metrics["seconds"], metrics["selected_epoch"], metrics["epochs"],
                 metrics["val_loss"])
    return {"method": method, "task": task + 1, "steps": int(metrics["steps"]), "epochs": int(metrics["epochs"]),
            "selected_epoch": int(metrics["selected_epoch"]), "val_loss": round(float(metrics["val_loss"]), 4),
            "seconds": round(float(metrics["seconds"]), 1)}


def run_apt(model: APTViT, train: Bank, test: Bank, tasks: list[Task], s: Settings, num_classes: int,
            seed: int, log: list[dict]) -> tuple[dict[str, list[Scorer]], list[float]]:
    """One prompt (and one probe) per task; after task t, the composition of 1..t: prompts
    uniform (``apt_composed``), density-weighted (``apt_density``) and given the true task
    (``apt_task_oracle``), probes density-weighted (``probe_density``). Also returns the
    density's task-inference accuracy after each task."""
    prompts, probes, densities, task_inference = [], [], [], []
    out: dict[str, list[Scorer]] = {"apt_composed": [], "apt_density": [], "apt_task_oracle": [],
                                    "probe_density": []}
    test_features = torch.as_tensor(test.features)
    for t, task in enumerate(tasks):
        prompt = fresh_prompt(model, num_classes, seed=seed + t, labels=task.classes, source=f"task-{t}")
        metrics = train_on_bank(model, prompt, train, task.train, recipe(s.epochs, s.lr, s.min_steps),
                                s.batch_size, seed, val_indices=task.val)
        log.append(_train_row("apt", t, metrics))
        prompts.append(prompt)
        probes.append(fit_bank_probe(train, task.all_train, s.probe_cv).logits(test, num_classes))
        densities.append(train.density_of(task.train))
        weights = density_weights(densities, test_features)
        owner = task_owner(tasks[:t + 1], test.labels)
        task_inference.append(density_task_accuracy(weights, owner))
        logits = bank_logits(model, test, list(prompts))
        out["apt_composed"].append(_frozen_scores(compose_probs(logits), test))
        out["apt_density"].append(_frozen_scores(compose_probs(logits, weights), test))
        out["apt_task_oracle"].append(_frozen_scores(compose_probs(logits, oracle_weights(owner, t + 1)), test))
        out["probe_density"].append(_frozen_scores(compose_probs(torch.stack(probes), weights), test))
    return out, task_inference


def task_owner(tasks: Sequence[Task], labels: np.ndarray) -> np.ndarray:
    """Index of the task among ``tasks`` that owns each label ``[B]``; -1 for a task not among them."""
    owner = np.full(len(labels), -1, dtype=np.int64)
    for i, task in enumerate(tasks):
        owner[np.isin(labels, task.classes)] = i
    return owner


def oracle_weights(owner: np.ndarray, k: int) -> torch.Tensor:
    """Weights ``[k, B]``: 1 on each image's own task (uniform for images of tasks not seen yet,
    which are never scored)."""
    weights = torch.as_tensor(owner[None, :] == np.arange(k)[:, None], dtype=torch.float64)
    weights[:, owner < 0] = 1.0
    return weights


def density_task_accuracy(weights: torch.Tensor, owner: np.ndarray) -> float:
    """Share of images of the seen tasks whose largest density weight ``[k, B]`` is on their own task."""
    seen = owner >= 0
    return float((weights.argmax(0).numpy()[seen] == owner[seen]).mean())


def run_sequential_prompt(model: APTViT, train: Bank, test: Bank, tasks: list[Task], s: Settings,
                          num_classes: int, seed: int, log: list[dict]) -> list[Scorer]:
    """A single prompt over all classes fine-tuned on each task in turn (same recipe and budget)."""
    prompt = fresh_prompt(model, num_classes, seed=seed, source="sequential")
    scorers = []
    for t, task in enumerate(tasks):
        metrics = train_on_bank(model, prompt, train, task.train, recipe(s.epochs, s.lr, s.min_steps),
                                s.batch_size, seed, val_indices=task.val)
        log.append(_train_row("sequential_prompt", t, metrics))
        scorers.append(_frozen_scores(bank_logits(model, test, [prompt])[0], test))
    return scorers


# --------------------------------------------------------------------------- sequential probe


def fit_warm_probe(features: torch.Tensor, targets: torch.Tensor, num_classes: int,
                   previous: tuple[torch.Tensor, torch.Tensor] | None, grid: Sequence[float] = L2_GRID,
                   folds: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A probe over ``num_classes`` fitted on ``features``/``targets`` starting from ``previous``
    (``(weight [C, D], bias [C])``, or zero): ``previous + correction``, the correction an
    L2-penalised logistic regression on standardised features (LBFGS to convergence) with the
    previous head's logits as a fixed offset; the L2 strength (the pull towards ``previous``)
    is chosen in ``grid`` by ``folds``-fold cross-validated NLL. Returns weight, bias, L2."""
    x = features.to(torch.float64)
    y = targets.to(torch.long)
    dim = x.shape[1]
    w0, b0 = previous if previous is not None else (torch.zeros(num_classes, dim), torch.zeros(num_classes))
    w0, b0 = w0.to(x), b0.to(x)
    offset = x @ w0.T + b0  # [n, C]
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    n = len(y)
    folds = min(folds, n)
    if folds >= 2 and len(grid) > 1:
        fold_of = torch.empty(n, dtype=torch.long)
        fold_of[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n) % folds
        held = fold_of[None, :] == torch.arange(folds)[:, None]  # [F, n]
        masks = (~held).repeat(len(grid), 1)
        params = _fit_offset(z, y, offset, num_classes, masks, [l2 for l2 in grid for _ in range(folds)])
        nll = _nll(z, y, offset, params)  # [G·F, n]
        held_out = (nll * (~masks)).sum(1).reshape(len(grid), folds).sum(1)
        l2 = float(grid[int(held_out.argmin())])
    else:
        l2 = float(grid[len(grid) // 2])
    params = _fit_offset(z, y, offset, num_classes, torch.ones(1, n, dtype=torch.bool), [l2])[0]
    delta_w = params[:, :-1] / std
    weight = w0 + delta_w
    bias = b0 + params[:, -1] - delta_w @ mean
    return weight.float(), bias.float(), l2


def _nll(z: torch.Tensor, y: torch.Tensor, offset: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    logits = offset + torch.einsum("nd,pkd->pnk", z, params[:, :, :-1]) + params[:, None, :, -1]
    return -logits.log_softmax(-1).gather(2, y.expand(len(params), -1)[..., None])[..., 0]


def _fit_offset(z: torch.Tensor, y: torch.Tensor, offset: torch.Tensor, num_classes: int, masks: torch.Tensor,
                l2s: Sequence[float]) -> torch.Tensor:
    """``P`` independent corrections in one LBFGS run (as ``common.probe``), ``[P, C, D + 1]``."""
    weights = masks.to(z.dtype) / masks.sum(1, keepdim=True).to(z.dtype)
    strengths = torch.tensor(list(l2s), dtype=z.dtype)
    params = torch.zeros(len(l2s), num_classes, z.shape[1] + 1, dtype=z.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=200, tolerance_grad=1e-6, tolerance_change=1e-9,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (weights * _nll(z, y, offset, params)).sum()
        loss = loss + 0.5 * (strengths * params[:, :, :-1].pow(2).sum((1, 2))).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return params.detach()


def fit_bank_probe(bank: Bank, indices: np.ndarray, cv: bool) -> BankProbe:
    """``BankProbe.fit`` (L2 by cross-validation), or with the middle L2 of the grid when not ``cv``."""
    if cv:
        return BankProbe.fit(bank, indices)
    labels = bank.labels_of(indices)
    classes = tuple(sorted(set(labels.tolist())))
    probe = fit_probe(torch.as_tensor(bank.features[bank.slots_of(indices)]),
                      torch.as_tensor(np.searchsorted(classes, labels)), len(classes), l2=L2_GRID[len(L2_GRID) // 2])
    return BankProbe(probe, classes)


def run_probes(train: Bank, test: Bank, tasks: list[Task], num_classes: int, seed: int, cv: bool,
               log: list[dict]) -> dict[str, list[Scorer]]:
    """Sequential (warm-started) and joint linear probes on the bank's pooled features."""
    out: dict[str, list[Scorer]] = {"probe_sequential": [], "probe_joint": []}
    previous = None
    seen: list[np.ndarray] = []
    test_features = torch.as_tensor(test.features)
    for t, task in enumerate(tasks):
        images = task.all_train
        seen.append(images)
        weight, bias, l2 = fit_warm_probe(torch.as_tensor(train.features[train.slots_of(images)]),
                                          torch.as_tensor(train.labels_of(images)), num_classes, previous,
                                          grid=L2_GRID if cv else L2_GRID[len(L2_GRID) // 2:][:1], seed=seed)
        joint = fit_bank_probe(train, np.concatenate(seen), cv)
        previous = (weight, bias)
        log.append({"method": "probe_sequential", "task": t + 1, "l2": l2})
        log.append({"method": "probe_joint", "task": t + 1, "l2": joint.probe.l2})
        out["probe_sequential"].append(_frozen_scores(test_features @ weight.T + bias, test))
        out["probe_joint"].append(_frozen_scores(joint.logits(test, num_classes), test))
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
    add_threads_option(parser)
    args, s, label = start_experiment(parser, argv, TINY, QUICK, FULL)
    clock = Stopwatch()
    spec = backbone_spec(args.tiny)
    model = spec.load()
    dataset, per_task = ("cifar100", 10) if args.cifar100 else ("fashion_mnist", 2)
    train, test = stratified_banks(args, model, dataset, s)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    tasks = make_tasks(train, test, num_classes, per_task, s, args.seed)
    log: list[dict] = []
    apt, task_inference = run_apt(model, train, test, tasks, s, num_classes, args.seed, log)
    scorers = {**apt,
               "sequential_prompt": run_sequential_prompt(model, train, test, tasks, s, num_classes, args.seed, log),
               **run_probes(train, test, tasks, num_classes, args.seed, s.probe_cv, log)}
    matrices = accuracy_matrices(scorers, tasks, test)
    rows = summary_rows(matrices)
    title = f"Split {'CIFAR-100' if args.cifar100 else 'Fashion-MNIST'} ({len(tasks)} x {per_task})"
    out = args.out / dataset
    payload = {
        "experiment": NAME,
        "setup": setup_record(spec, s, label, args, dataset=title, tasks=len(tasks), classes_per_task=per_task,
                              train_images=int(sum(len(t.train) + len(t.val) for t in tasks)),
                              prompt_train_images=int(sum(len(t.train) for t in tasks)),
                              val_images=int(sum(len(t.val) for t in tasks)),
                              test_images=int(sum(len(t.test) for t in tasks)),
                              density_rank=DEFAULT_RANK, density_floor=VARIANCE_FLOOR,
                              density_own_covariance=OWN_COVARIANCE,
                              temperature_per_dim=TEMPERATURE_PER_DIM,
                              torch_threads=torch.get_num_threads(), seconds=clock.seconds()),
        "summary": rows, "matrices": matrices, "training": log, "task_inference": task_inference,
        "final": {r["method"]: {"average_accuracy": r["average_accuracy"], "forgetting": r["forgetting"]}
                  for r in rows if r["after_task"] == len(tasks)},
        "plots": [plot(rows, out / "class_incremental.png", title).name],
    }
    write_csv(out / "summary.csv", rows)
    write_json(out / "result.json", payload)
    return payload


if __name__ == "__main__":
    main()
