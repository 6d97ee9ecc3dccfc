"""Where does prompt tuning start to beat a linear probe? Accuracy against images per source.

One IID source of n Fashion-MNIST training images (nested draws: each larger source holds
the smaller ones; 10% is its validation split, as in the product) trains

* a **linear probe** on the frozen backbone's pooled features of its training images
  (``common.probe``, L2 by cross-validation on them);
* a **prompt with the product's recipe** over the classes of its training images, as a
  ClientApp's (``common.train``: probe-initialised head, tuning for ``epochs`` epochs but at
  least ``min_steps`` steps, a tuned epoch kept only where a paired test on the validation
  loss says it beats the probe-initialised prompt, else that prompt, epoch 0);
* the **same prompt without the selection** (the last tuning epoch), to show what tuning alone
  does at each size;

all measured on the same 1,000 test images (nothing is chosen on them), and on their own
training images (how much of what tuning learns is fitting them rather than the task).
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from common.data import limit_per_partition, load_split, train_val_split
from simulations.common import (
    LR,
    BankProbe,
    Stopwatch,
    accuracy,
    backbone_spec,
    bank_logits,
    base_parser,
    build_bank,
    fresh_prompt,
    recipe,
    save_figure,
    setup_record,
    start_experiment,
    train_on_bank,
    write_csv,
    write_json,
)

NAME = "probe_curve"
NUM_CLASSES = 10
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Settings:
    """Source sizes (images before the validation split) and the recipe."""

    sizes: tuple[int, ...]
    test_images: int
    epochs: int
    min_steps: int
    lr: float
    batch_size: int


TINY = Settings((16, 32), 32, 1, 0, LR, 16)
QUICK = Settings((50, 200), 300, 5, 20, LR, 32)
FULL = Settings((50, 100, 200, 400, 800, 1600, 3200, 6400), 1000, 10, 100, LR, 32)


def main(argv: list[str] | None = None) -> dict:
    """Run the curve; returns the JSON payload it wrote."""
    args, s, label = start_experiment(base_parser(NAME, __doc__.split("\n\n")[0]), argv, TINY, QUICK, FULL)
    clock = Stopwatch()
    spec = backbone_spec(args.tiny)
    model = spec.load()
    raw, raw_test = (load_split("fashion_mnist", args.data_dir or None, split) for split in ("train", "test"))
    order = limit_per_partition(np.arange(len(raw)), max(s.sizes), args.seed + 3)  # nested: sizes take prefixes
    bank = build_bank(model, raw, order, args.work_dir / f"bank-train-{model.backbone_name}-{max(s.sizes)}")
    test_idx = limit_per_partition(np.arange(len(raw_test)), s.test_images, args.seed)
    test = build_bank(model, raw_test, test_idx, args.work_dir / f"bank-test-{model.backbone_name}-{s.test_images}")
    config = recipe(s.epochs, s.lr, s.min_steps)
    rows = []
    for n in s.sizes:
        train_idx, val_idx = train_val_split(order[:n], VAL_FRACTION, args.seed)
        probe = BankProbe.fit(bank, train_idx)
        train_labels = bank.labels_of(train_idx)
        row = {"images": n, "train_images": len(train_idx), "val_images": len(val_idx),
               "probe": accuracy(probe.logits(test, NUM_CLASSES).softmax(-1), test.labels),
               "probe_train": accuracy(probe.logits(bank, NUM_CLASSES, train_idx).softmax(-1), train_labels)}
        for name, val in (("prompt", val_idx), ("prompt_last_epoch", None)):
            prompt = fresh_prompt(model, NUM_CLASSES, seed=args.seed, labels=probe.classes, source=f"n{n}")
            metrics = train_on_bank(model, prompt, bank, train_idx, config, s.batch_size, args.seed, val)
            row[name] = accuracy(bank_logits(model, test, [prompt])[0].softmax(-1), test.labels)
            row[f"{name}_train"] = accuracy(bank_logits(model, bank, [prompt], train_idx)[0].softmax(-1), train_labels)
            row[f"{name}_steps"] = metrics["steps"]
            row.setdefault("kept_epoch", metrics["selected_epoch"])
        row["prompt_minus_probe_points"] = round(100 * (row["prompt"] - row["probe"]), 2)
        row["last_epoch_minus_probe_points"] = round(100 * (row["prompt_last_epoch"] - row["probe"]), 2)
        rows.append(row)
    payload = {"experiment": NAME,
               "setup": setup_record(spec, s, label, args, test_images=len(test_idx), seconds=clock.seconds()),
               "curve": rows, "plots": [plot(rows, args.out / "probe_curve.png").name]}
    write_csv(args.out / "curve.csv", rows)
    write_json(args.out / "result.json", payload)
    return payload


def plot(rows: list[dict], path):
    """Test accuracy of the three against images per source (log scale)."""
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    xs = [r["images"] for r in rows]
    for key, style in (("probe", "k--o"), ("prompt", "-D"), ("prompt_last_epoch", ":s")):
        ax.plot(xs, [100 * r[key] for r in rows], style, label=key.replace("_", " "))
    ax.set(xscale="log", xticks=xs, xticklabels=[str(x) for x in xs], xlabel="images per source",
           ylabel="test accuracy (%)", title="prompt (recipe) vs linear probe")
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
