"""Cost of à-la-carte prompt tuning: compute vs number of prompts, memory vs clients, bytes.

* **training time per epoch** of k prompts (k = 1, 2, 4, ...): APT's batched pass (all k
  prompts in one ``forward_kv`` per batch, one optimiser) vs training them one by one
  (the product's ``train_prompt`` k times, one epoch each, no probe initialisation nor
  validation, so both do the same optimiser steps); both read the backbone keys/values from
  the same KV bank, so this is the prompt-side cost only;
* **the product's whole recipe** for one prompt on the same images (probe-initialised head,
  ``epochs`` epochs but at least ``min_steps`` steps, validation loss after every epoch on a
  10% validation split carved from those images by seed, best epoch kept): seconds and steps;
* **inference time** on a batch of images vs k: one backbone pass plus k batched prompts
  (``APTViT.forward``) vs k separate single-prompt passes (each running the backbone);
* **memory**: peak resident memory of a small Flower simulation (the product's apps) with
  2 vs 20 clients, each in its own subprocess (sum of RSS over the process tree, Ray
  included; shared pages are counted once per process);
  (the memory probes train one epoch with no step floor: they measure memory, not accuracy);
* **bytes uploaded per client per round**: the prompt arrays of each train reply, measured
  on the Grid of those simulations (the product's default ships the source's density inside
  the prompt artefact), vs the size of the frozen backbone (fp32); and, for a prompt over
  10 and over 2 classes, the reply's array bytes (``common.records.prompt_records``, what the
  ClientApp sends) with and without the density.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from common.data import Shard, backbone_transform, load_split, train_val_split
from common.model import APTViT
from common.records import prompt_records
from common.train import TrainConfig
from simulations.common import (
    LR,
    BackboneSpec,
    Bank,
    Federation,
    Stopwatch,
    backbone_spec,
    base_parser,
    fresh_prompt,
    product_run_config,
    recipe,
    run_federations,
    save_figure,
    setup_record,
    shared_subset,
    start_experiment,
    train_on_bank,
    write_csv,
    write_idx_subset,
    write_json,
)

NAME = "cost"
NUM_CLASSES = 10
ONE_EPOCH = TrainConfig(epochs=1, min_steps=0, lr=LR, probe_init=False, progress=False)  # the batched epoch's work


@dataclass(frozen=True)
class Settings:
    """Sizes of one run."""

    train_images: int  # the shared Fashion-MNIST subset (its bank is reused)
    test_images: int
    epoch_images: int
    batch_size: int
    epochs: int  # the product's recipe (whole-recipe timing)
    min_steps: int
    prompt_counts: tuple[int, ...]
    infer_images: int
    one_by_one_max: int  # largest k measured one by one at inference (k backbone passes)
    memory_clients: tuple[int, ...]
    images_per_client: int


TINY = Settings(48, 32, 32, 16, 1, 2, (1, 2, 4), 8, 4, (2,), 4)  # one memory probe: the quick run measures two
QUICK = Settings(96, 96, 32, 16, 2, 4, (1, 2, 4, 8), 8, 8, (2, 4), 4)
FULL = Settings(1000, 500, 128, 32, 10, 100, (1, 2, 4, 8, 16, 32, 64), 8, 16, (2, 10, 20), 16)


def batched_epoch(model: APTViT, prompts: list, bank: Bank, indices: np.ndarray, batch_size: int) -> None:
    """One epoch of all ``prompts`` at once: one batched APT pass and one optimiser step per batch."""
    params = [p for prompt in prompts for p in prompt.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR)
    for _, labels, idx in bank.loader(indices, batch_size, seed=0):
        logits = model.forward_kv(*bank.cache.fetch(idx, torch.zeros(0)), prompts)  # [k, B, C]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(prompts)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def training_rows(model: APTViT, bank: Bank, s: Settings) -> list[dict]:
    """Seconds per epoch (the bank's first ``epoch_images`` images) vs number of prompts,
    batched vs one by one."""
    indices = bank.index[:s.epoch_images]
    rows = []
    for k in s.prompt_counts:
        prompts = [fresh_prompt(model, NUM_CLASSES, seed=i) for i in range(k)]
        start = time.perf_counter()
        batched_epoch(model, prompts, bank, indices, s.batch_size)
        batched = time.perf_counter() - start
        start = time.perf_counter()
        for prompt in prompts:
            train_on_bank(model, prompt, bank, indices, ONE_EPOCH, s.batch_size, 0)
        rows.append({"prompts": k, "images": len(indices), "batched_s": round(batched, 3),
                     "one_by_one_s": round(time.perf_counter() - start, 3)})
    return rows


def recipe_row(model: APTViT, bank: Bank, s: Settings, seed: int) -> dict:
    """The product's whole recipe for one prompt on the first ``epoch_images`` images of the bank
    (10% of them, by seed, as its validation split): seconds, steps, epochs."""
    fit, val = train_val_split(bank.index[:s.epoch_images], 0.1, seed)
    prompt = fresh_prompt(model, NUM_CLASSES, seed=seed)
    metrics = train_on_bank(model, prompt, bank, fit, recipe(s.epochs, LR, s.min_steps), s.batch_size, seed,
                            val_indices=val)
    return {"train_images": len(fit), "val_images": len(val), "steps": int(metrics["steps"]),
            "epochs": int(metrics["epochs"]), "selected_epoch": int(metrics["selected_epoch"]),
            "seconds": round(float(metrics["seconds"]), 2)}


def reply_bytes(prompt) -> int:
    """Bytes of the prompt arrays of a train reply (``prompt_records``, as the ClientApp sends them)."""
    return sum(len(a.data) for a in prompt_records(prompt)["arrays"].values())


def bytes_rows(model: APTViT, bank: Bank, seed: int) -> list[dict]:
    """Reply bytes of a prompt over 10 and over 2 classes, with and without its source density
    (fitted on the bank's images of those classes, the product's rank and floor)."""
    rows = []
    for classes in (list(range(NUM_CLASSES)), [0, 1]):
        prompt = fresh_prompt(model, NUM_CLASSES, seed=seed, labels=classes)
        without = reply_bytes(prompt)
        prompt.density = bank.density_of(bank.index[np.isin(bank.labels, classes)])
        with_density = reply_bytes(prompt)
        rows.append({"prompt_classes": len(classes), "reply_bytes_without_density": without,
                     "reply_bytes_with_density": with_density, "density_bytes": with_density - without,
                     "with_over_without": round(with_density / without, 2)})
    return rows


@torch.no_grad()
def inference_rows(model: APTViT, images: torch.Tensor, s: Settings) -> list[dict]:
    """Seconds to score ``images`` with k prompts: one batched pass vs k single-prompt passes."""
    rows = []
    for k in s.prompt_counts:
        prompts = [fresh_prompt(model, NUM_CLASSES, seed=i) for i in range(k)]
        start = time.perf_counter()
        model(images, prompts)
        row = {"prompts": k, "images": len(images), "batched_s": round(time.perf_counter() - start, 3),
               "one_by_one_s": None}
        if k <= s.one_by_one_max:
            start = time.perf_counter()
            for prompt in prompts:
                model(images, [prompt])
            row["one_by_one_s"] = round(time.perf_counter() - start, 3)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- memory probes


def process_tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) of ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def memory_probe(clients: int, args: argparse.Namespace) -> dict:
    """Run the probe subprocess for ``clients`` clients; its stats plus the peak tree RSS."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    out = args.work_dir / f"probe-{clients}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "simulations.cost", "--memory-probe", str(clients), "--work-dir",
           str(args.work_dir), "--data-dir", args.data_dir, "--seed", str(args.seed), *_profile_flags(args)]
    log = (args.work_dir / f"probe-{clients}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, process_tree_rss(proc.pid))
        time.sleep(0.25)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe with {clients} clients failed; see {log.name}")
    return {**json.loads(out.read_text()), "peak_rss_bytes": peak}


def _profile_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--tiny"] if args.tiny else ["--quick"] if args.quick else []
    return flags + [f"--set={item}" for item in args.set]


def run_probe(clients: int, s: Settings, spec: BackboneSpec, args: argparse.Namespace) -> None:
    """(In the subprocess.) One à-la-carte round of ``clients`` clients, product apps, own caches."""
    work = args.work_dir / f"probe-{clients}"
    data_dir = write_idx_subset(args.data_dir, clients * s.images_per_client, 8, args.seed, work / "data")
    fed = Federation("probe", product_run_config(spec, data_dir, work / "pool", partitioner="iid",
                                                 **{"local-epochs": 1, "min-steps": 0, "batch-size": s.batch_size,
                                                    "share-density": True}),
                     list(range(clients)), clients)
    clock = Stopwatch()
    run_federations([fed], clients)
    write_json(args.work_dir / f"probe-{clients}.json",
               {"clients": clients, "uploads": fed.uploads, "seconds": clock.seconds()})


def memory_rows(s: Settings, spec: BackboneSpec, model: APTViT, args: argparse.Namespace) -> list[dict]:
    """Peak RSS and upload bytes of each probe; backbone bytes for the ratio."""
    backbone_bytes = sum(p.numel() * 4 for p in model.backbone.parameters())
    rows = []
    for clients in s.memory_clients:
        probe = memory_probe(clients, args)
        upload = max(probe["uploads"])
        rows.append({"clients": clients, "peak_rss_mib": round(probe["peak_rss_bytes"] / 2**20, 1),
                     "train_replies": len(probe["uploads"]), "upload_bytes_per_client_round": upload,
                     "upload_bytes_min": min(probe["uploads"]),
                     "backbone_bytes_fp32": backbone_bytes, "backbone_over_upload": round(backbone_bytes / upload, 1),
                     "seconds": probe["seconds"]})
    return rows


# --------------------------------------------------------------------------- report


def plot(train: list[dict], infer: list[dict], memory: list[dict], path: Path) -> Path:
    """Three panels: training and inference time vs prompts; peak memory vs clients."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, rows, title in ((axes[0], train, "training, one epoch (from KV bank)"),
                            (axes[1], infer, f"inference, {infer[0]['images']} images")):
        ks = [r["prompts"] for r in rows]
        ax.plot(ks, [r["batched_s"] for r in rows], "o-", label="APT batched pass")
        measured = [r for r in rows if r["one_by_one_s"] is not None]
        ax.plot([r["prompts"] for r in measured], [r["one_by_one_s"] for r in measured], "s-", label="one by one")
        ax.set(xscale="log", yscale="log", xticks=ks, xticklabels=[str(k) for k in ks], xlabel="prompts",
               ylabel="seconds", title=title)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].bar([str(r["clients"]) for r in memory], [r["peak_rss_mib"] for r in memory])
    axes[2].set(xlabel="simulated clients", ylabel="peak RSS of the process tree (MiB)", title="memory")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the experiment (or, with ``--memory-probe N``, one memory probe); returns the payload."""
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--memory-probe", type=int, default=0, metavar="N",
                        help="internal: run one small simulation with N clients and write its stats")
    args, s, label = start_experiment(parser, argv, TINY, QUICK, FULL)
    spec = backbone_spec(args.tiny)
    if args.memory_probe:
        run_probe(args.memory_probe, s, spec, args)
        return None
    clock = Stopwatch()
    model = spec.load()
    torch.manual_seed(args.seed)
    data_dir, bank, _ = shared_subset(args, model, s.train_images, s.test_images)
    test = Shard(load_split("fashion_mnist", str(data_dir), "test"), np.arange(s.infer_images),
                 backbone_transform(model.backbone))
    images = torch.stack([test[i][0] for i in range(len(test))])
    train_rows = training_rows(model, bank, s)
    whole_recipe = recipe_row(model, bank, s, args.seed)
    upload_bytes = bytes_rows(model, bank, args.seed)
    infer_rows = inference_rows(model, images, s)
    memory = memory_rows(s, spec, model, args)
    payload = {
        "experiment": NAME,
        "setup": setup_record(spec, s, label, args, dataset="Fashion-MNIST", torch_threads=torch.get_num_threads(),
                              seconds=clock.seconds()),
        "training": train_rows, "recipe": whole_recipe, "reply_bytes": upload_bytes,
        "inference": infer_rows, "memory": memory,
        "memory_ratio": round(memory[-1]["peak_rss_mib"] / memory[0]["peak_rss_mib"], 2),
        "plots": [plot(train_rows, infer_rows, memory, args.out / "cost.png").name],
    }
    write_csv(args.out / "training.csv", train_rows)
    write_csv(args.out / "inference.csv", infer_rows)
    write_csv(args.out / "memory.csv", memory)
    write_csv(args.out / "reply_bytes.csv", upload_bytes)
    write_json(args.out / "result.json", payload)
    return payload


if __name__ == "__main__":
    main()
