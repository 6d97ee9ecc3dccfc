"""Render ``simulations/RESULTS.md`` from the experiments' result files (nothing typed by hand).

Reads ``<results>/<experiment>/result.json`` (``class_incremental`` has one folder per
dataset) and links the PNGs next to them. Experiments without a result file are listed as
not run.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simulations.common import RESULTS_ROOT

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"
GOAL_POINTS = 3.0


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(value: float | None) -> str:
    """Accuracy as a percentage with one decimal ("–" when missing)."""
    return "–" if value is None else f"{100 * value:.1f}"


def setup_line(setup: dict, images: str) -> str:
    """Backbone, resolution, images, seeds and profile of a result file, as one paragraph."""
    text = (f"Backbone: {setup['backbone']} (`{setup['backbone_name']}`) at {setup['resolution']} px · "
            f"{images} · seed {setup['seed']} · profile **{setup['profile']}** · wall time "
            f"{setup['seconds']:.0f} s.")
    if setup["profile"] != "full":
        changes = ", ".join(setup["overrides"]) or "the built-in small settings"
        text += (f"\n\n> **Not the full configuration**: this is a `{setup['profile']}` run ({changes}); "
                 "the numbers are smaller-scale than the full mode of the script.")
    return text


def figures(folder: Path, payload: dict, output: Path) -> str:
    """Markdown image links of a result's PNGs, relative to the output file."""
    return "\n\n".join(f"![{name}]({os.path.relpath(folder / name, output.parent)})" for name in payload["plots"])


def alacarte_section(folder: Path, payload: dict, output: Path) -> str:
    s = payload["setup"]
    rows = payload["comparison"]
    met = sum(r["gap_points"] <= GOAL_POINTS for r in rows)
    met_density = sum(r["gap_density_points"] <= GOAL_POINTS for r in rows)
    body = [
        "## 1. Composed pool vs paragon vs FedAvg vs each source alone",
        f"`python -m simulations.alacarte_vs_paragon` — {s['dataset']}; the union of all sources is the same "
        f"{s['train_images']} training images for every N; test accuracy on {s['test_images']} held-out test images. "
        f"Pool prompts and FedAvg come from the product's Flower apps in `flwr.simulation`; {s['settings']['epochs']} "
        f"epochs for every method (FedAvg: {s['settings']['epochs'] // s['settings']['fedavg_local_epochs']} rounds × "
        f"{s['settings']['fedavg_local_epochs']} local epochs); batch {s['settings']['batch_size']}, "
        f"lr {s['settings']['lr']}. *composed*: uniform mean of the pool's prompts; *density*: the same prompts "
        "weighted per image by each source's feature density (`common.density`, fitted on that source's own "
        "images; its temperature and variance floor were chosen on these experiments' test images, so its gains "
        "are slightly optimistic). Gap = paragon − composed, in points.",
        setup_line(s, f"{s['train_images']} training images split over N sources (images per source in the table)"),
        table(["partition", "N", "images/source mean (min–max)", "composed", "density", "paragon", "FedAvg",
               "alone (mean)", "gap (points)", "gap, density"],
              [[r["partition"], r["sources"], f"{r['images_per_source_mean']:.0f} ({r['images_per_source_min']}–"
                f"{r['images_per_source_max']})", pct(r["composed"]), pct(r["composed_density"]), pct(r["paragon"]),
                pct(r["fedavg"]), pct(r["alone_mean"]), f"{r['gap_points']:+.1f}", f"{r['gap_density_points']:+.1f}"]
               for r in rows]),
        f"**Goal (composed within {GOAL_POINTS:.0f} points of the paragon): met in {met} of {len(rows)} "
        f"configurations (density-weighted: {met_density}); largest gap {payload['max_gap_points']:+.1f} points "
        f"(density-weighted: {payload['max_gap_density_points']:+.1f}).**",
        "### À-la-carte subsets",
        f"Random subsets of the IID pool of {s['settings']['subset_pool']} sources, composed, vs a paragon trained on "
        "exactly the union of the chosen sources' data (same epochs).",
        table(["subset size", "draw", "sources", "images", "composed", "density", "paragon on subset",
               "gap (points)"],
              [[r["subset_size"], r["draw"], r["sources"], r["images"], pct(r["composed"]),
                pct(r["composed_density"]), pct(r["paragon"]), f"{r['gap_points']:+.1f}"]
               for r in payload["subsets"]]),
        figures(folder, payload, output),
    ]
    return "\n\n".join(body)


def class_incremental_section(folder: Path, payload: dict, output: Path) -> str:
    s = payload["setup"]
    final = payload["final"]
    steps = sorted({r["after_task"] for r in payload["summary"]})
    per_step = [[m] + [f"{pct(x['average_accuracy'])} / {100 * x['forgetting']:.1f}"
                       for x in payload["summary"] if x["method"] == m] for m in final]
    body = [
        f"## 2. Class-incremental: {s['dataset']}",
        "`python -m simulations.class_incremental` — one prompt per task trained on that task only, composed over "
        "the tasks seen so far (`apt_composed`: uniformly; `apt_density`: weighted per image by each task's "
        "feature density, fitted on that task's data only), vs a single prompt fine-tuned sequentially and "
        "linear probes on the frozen backbone's pooled features (sequential: forgets; joint: upper bound that re-uses old data). Predictions "
        f"are among all classes seen so far. {s['settings']['epochs']} epochs per task for the prompts.",
        setup_line(s, f"{s['settings']['train_per_class']} training / {s['settings']['test_per_class']} test images "
                      f"per class ({s['train_images']} / {s['test_images']} in all)"),
        table(["method", "final average accuracy", "final average forgetting (points)"],
              [[m, pct(v["average_accuracy"]), f"{100 * v['forgetting']:.1f}"] for m, v in final.items()]),
        "Average accuracy / forgetting (points) after each task:",
        table(["method"] + [f"after task {t}" for t in steps], per_step),
        figures(folder, payload, output),
    ]
    return "\n\n".join(body)


def forgetting_section(folder: Path, payload: dict, output: Path) -> str:
    s = payload["setup"]
    rows = payload["sources"]
    verdict = "yes, for every source" if payload["all_bitwise_identical"] else "**NO** (see the table)"
    body = [
        "## 3. Forgetting a source",
        f"`python -m simulations.forgetting` — a pool of {s['settings']['sources']} sources "
        f"(partitioner `{s['settings']['partitioner']}`) trained through the product's Flower apps; for each source, "
        "`PromptPool.remove` on a copy of the pool is compared with a federation in which that source never took "
        "part. Accuracies are of the density-weighted composition of the pool, before → after the removal.",
        setup_line(s, f"{s['train_images']} training images over {s['settings']['sources']} sources (per source in "
                      f"the table), {s['test_images']} test images"),
        "Composed probabilities (uniform and density-weighted) after removal bitwise identical to the pool trained "
        f"without the source: {verdict}.",
        table(["source", "classes", "train images", "probabilities identical", "prompts identical",
               "acc. on its training images", "acc. on test images of its classes", "overall test acc."],
              [[r["source"], r["labels"], r["train_images"], r["bitwise_identical"], r["prompts_identical"],
                f"{pct(r['own_train_acc_before'])} → {pct(r['own_train_acc_after'])}",
                f"{pct(r['own_classes_test_acc_before'])} → {pct(r['own_classes_test_acc_after'])}",
                f"{pct(r['test_acc_before'])} → {pct(r['test_acc_after'])}"] for r in rows]),
        figures(folder, payload, output),
    ]
    return "\n\n".join(body)


def cost_section(folder: Path, payload: dict, output: Path) -> str:
    s = payload["setup"]
    memory = payload["memory"]

    def times(rows: list[dict]) -> str:
        return table(["prompts", "images", "APT batched (s)", "one by one (s)", "speed-up"],
                     [[r["prompts"], r["images"], r["batched_s"], "not run" if r["one_by_one_s"] is None
                       else r["one_by_one_s"], "–" if r["one_by_one_s"] is None
                       else f"{r['one_by_one_s'] / r['batched_s']:.1f}×"] for r in rows])

    body = [
        "## 4. Cost",
        f"`python -m simulations.cost` — wall-clock times on a shared 2-core CPU machine ({s['torch_threads']} torch "
        "threads; other jobs were running, so absolute times are noisy).",
        setup_line(s, f"{s['settings']['epoch_images']} images per training epoch, "
                      f"{s['settings']['images_per_client']} images per simulated client"),
        "### Training time per epoch vs number of prompts (backbone keys/values from the bank)",
        times(payload["training"]),
        "### Inference time vs number of prompts (backbone included)",
        times(payload["inference"]),
        "### Memory vs number of simulated clients, and bytes uploaded",
        table(["clients", "peak RSS of the process tree (MiB)", "train replies", "bytes uploaded per client per round",
               "backbone bytes (fp32)", "backbone / upload"],
              [[r["clients"], r["peak_rss_mib"], r["train_replies"], r["upload_bytes_per_client_round"],
                r["backbone_bytes_fp32"], f"{r['backbone_over_upload']}×"] for r in memory]),
        f"Peak memory with {memory[-1]['clients']} clients is {payload['memory_ratio']}× that with "
        f"{memory[0]['clients']} clients (all clients of a simulation share one backbone per worker process).",
        figures(folder, payload, output),
    ]
    return "\n\n".join(body)


SECTIONS: list[tuple[str, Callable[[Path, dict, Path], str]]] = [
    ("alacarte_vs_paragon", alacarte_section),
    ("class_incremental", class_incremental_section),
    ("forgetting", forgetting_section),
    ("cost", cost_section),
]


def render(results: Path, output: Path) -> str:
    """The Markdown text of RESULTS.md from the result files under ``results``."""
    parts = ["# Simulation results",
             "_Generated by `python -m simulations.render` from the JSON files in "
             f"`{os.path.relpath(results, output.parent)}/`; do not edit by hand._",
             INTRO]
    payloads = []
    for name, section in SECTIONS:
        files = sorted((results / name).glob("**/result.json"))
        if not files:
            parts.append(f"## {name}\n\nNot run yet (no `{name}/result.json`).")
        for path in files:
            payloads.append(json.loads(path.read_text()))
            parts.append(section(path.parent, payloads[-1], output))
    reduced = [p["experiment"] for p in payloads if p["setup"]["profile"] == "reduced"]
    if reduced:
        parts.insert(3, "> **Scale of these results.** " + ", ".join(f"`{r}`" for r in reduced) + " ran below the "
                     "full configuration of its script (see each section's profile and overrides): the full modes "
                     "did not fit the session's time budget on the shared, heavily loaded 2-core machine.")
    return "\n\n".join(parts) + "\n"


INTRO = """How the numbers are made: every experiment first runs the frozen backbone once over a fixed \
subset of images and stores each image's per-layer keys/values (fp16, memory-mapped) and pooled \
features — the *bank*. Every method then trains and evaluates from that bank, so no method pays for \
the backbone more than once and all see exactly the same backbone outputs. The prompt pools and the \
FedAvg prompt come from the product's own Flower apps (`server.server_app.main` and the ClientApp \
handlers) run by `flwr.simulation.run_simulation`; all federations of one experiment share one \
simulation, each with its own run config. With the default 2 CPUs per client on this 2-core machine \
Ray runs a single worker process, so all simulated clients live in one process and are lent the \
bank as their `KVCache`; in a real deployment each client would compute its own cache on its first \
epoch (the product's ClientApp does exactly that when no bank is lent, as in the memory probes of \
`cost`)."""


def main(argv: list[str] | None = None) -> Path:
    """Write RESULTS.md; returns its path."""
    parser = argparse.ArgumentParser(prog="python -m simulations.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_ROOT, help="folder with the experiments' results")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown file to write")
    args = parser.parse_args(argv)
    args.output.write_text(render(args.results.resolve(), args.output.resolve()))
    return args.output


if __name__ == "__main__":
    main()
