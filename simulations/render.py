"""Render a RESULTS.md from the experiments' result files (nothing typed by hand).

Reads ``<results>/<experiment>/result.json`` (``class_incremental`` has one folder per
dataset) and links the PNGs next to them. Experiments without a result file are listed as
not run. ``--results`` defaults to ``./results`` (where the experiments write by default) and
``--out`` to ``RESULTS.md`` beside that folder; the repository's record is
``--results simulations/results``, which writes ``simulations/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulations.common import RESULTS_ROOT, SIGNIFICANCE

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
            f"{images} · {prompt_shape(setup)}seed {setup['seed']} · profile **{setup['profile']}** · wall time "
            f"{setup['seconds']:.0f} s.")
    if setup["profile"] != "full":
        changes = ", ".join(setup["overrides"]) or "the built-in small settings"
        text += (f"\n\n> **Not the full configuration**: this is a `{setup['profile']}` run ({changes}); "
                 "the numbers are smaller-scale than the full mode of the script.")
    if "earlier_code" in setup:
        text += f"\n\n> **Run with earlier code**: {setup['earlier_code']}"
    return text


def prompt_shape(setup: dict) -> str:
    """``"4 prompt tokens and 4 memory tokens per layer · "``, or nothing for records made before
    result files carried the prompt shape."""
    if "n_prompt" not in setup:
        return ""
    return f"{setup['n_prompt']} prompt tokens and {setup['n_memory']} memory tokens per layer · "


def figures(folder: Path, payload: dict, output: Path) -> str:
    """Markdown image links of a result's PNGs, relative to the output file."""
    return "\n\n".join(f"![{name}]({os.path.relpath(folder / name, output.parent)})" for name in payload["plots"])


def main_job_section(folder: Path, payload: dict, output: Path) -> str:
    s = payload["setup"]
    rows = payload["sources"]
    paired = all("vs_probe_won" in r for r in rows)  # results recorded before the paired test lack it
    prompts, probes = payload["composed_prompts"], payload["composed_probes"]
    origin = ("the prompts `flwr run .` stored in its pool" if s["prompts"].startswith("read from")
              else "prompts trained by the script with the product's recipe")
    body = [
        f"## 0. The main job against linear probes on the same images ({origin})",
        "`python -m simulations.main_job` — the README's main job (5 sources, Dirichlet(1.0), 400 images each of "
        "which 10% is the source's validation split) rebuilt with the product's partitioning. Each source's "
        f"prompt ({origin}) against a linear probe fitted on the frozen backbone's pooled features of the "
        "same training images (`common.probe`, L2 chosen by 5-fold cross-validation on those images); on the "
        f"server's {s['test_images']} test images.",
        setup_line(s, f"{sum(r['train_images'] for r in rows)} training images over {len(rows)} sources"),
        table(["source", "train images", "classes", "linear probe", "prompt", "prompt − probe (points)",
               *(["prompt vs probe: won / lost (p)"] if paired else [])],
              [[r["source"], r["train_images"], r["classes"], pct(r["probe"]), pct(r["prompt"]),
                f"{r['prompt_minus_probe_points']:+.1f}",
                *([f"{r['vs_probe_won']} / {r['vs_probe_lost']} ({r['vs_probe_p']:.2f})"] if paired else [])]
               for r in rows]),
        table(["composition", "uniform", "density-weighted"],
              [["prompts", pct(prompts["uniform"]), pct(prompts["density"])],
               ["per-source linear probes", pct(probes["uniform"]), pct(probes["density"])],
               ["one linear probe on the union (paragon of probing)", pct(payload["union_probe"]), "–"]]),
    ]
    if "sweep" in payload:
        body += [
            "### Choosing the recipe's defaults (validation images, never the test images)",
            "Every (learning rate, head learning-rate scale, epochs, selection level) of the grid trains the "
            "five prompts (at least the profile's minimum of steps); each is scored on images of the training "
            "split outside every source's shard, and compared image by image with the product's defaults "
            "(marked *): won / lost over every (source, image) prediction of the prompts alone, and of their "
            "density composition, with the sign test's p. A row replaces the defaults only if it beats them on "
            "the per-source predictions at p < 0.05; otherwise the defaults stay.",
            table(["lr", "head lr scale", "epochs", "min. steps", "selection level",
                   "per-source val. accuracy (mean)", "composed uniform (val.)", "composed density (val.)",
                   "per-source vs defaults: won / lost (p)", "density vs defaults: won / lost (p)",
                   "kept epochs", "steps"],
                  [[r["lr"], r["head_lr_scale"], r["epochs"], r["min_steps"],
                    f"{r['selection_level']}{' *' if r['defaults'] else ''}",
                    pct(r["val_alone_mean"]), pct(r["val_composed_uniform"]), pct(r["val_composed_density"]),
                    f"{r['vs_defaults_won']} / {r['vs_defaults_lost']} ({r['vs_defaults_p']:.2f})",
                    f"{r['density_vs_defaults_won']} / {r['density_vs_defaults_lost']} "
                    f"({r['density_vs_defaults_p']:.2f})", r["kept_epochs"], r["steps"]]
                   for r in payload["sweep"]]),
            payload.get("sweep_note", ""),
        ]
    if "token_inits" in payload:
        body += [
            "### Choosing where the prompt tokens start (validation images, never the test images)",
            "Each row is the five probe-initialised prompts *before any tuning*: the head is a linear probe on "
            "`[out_1 ; … ; out_P ; pooled feature]` (each prompt token's output) of the source's training images, "
            "with the prompt token started at the backbone's class token or at random (standard normal, several "
            "seeds, one to four tokens); the first row is the "
            "linear probe on the pooled feature alone. Scored on the same validation images as the grid above.",
            table(["prompt tokens start at", "seed", "tokens", "per-source val. accuracy", "mean",
                   "composed uniform (val.)", "composed density (val.)"],
                  [[r["tokens_init"], r["seed"], r["n_prompt"] or "", r["val_alone"], pct(r["val_alone_mean"]),
                    pct(r["val_composed_uniform"]), pct(r["val_composed_density"])] for r in payload["token_inits"]]),
        ]
    if "seed_spread" in payload:
        body += seed_spread_part(payload["seed_spread"])
    return "\n\n".join(body)


def seed_spread_part(rows: list[dict]) -> list[str]:
    """The ``--seed-spread`` table of the main job: each source's start minus its probe, per token seed."""
    body = [
        "### How much of a source's margin is its token's draw (a diagnostic: nothing is chosen from it)",
        "`--seed-spread`: each source's probe-initialised start (the prompt before tuning, which the selection keeps "
        "unless the source's validation split shows that tuning helps) minus its linear probe, in points, on the "
        "test images and on the validation images, for the product's token seed (from the source's name, the "
        "first row) and for other seeds.",
        table(["token seed", "test: start − probe, per source", "worst (test)",
               "validation: start − probe, per source"],
              [[r["token_seed"], r["test_gaps"], f"{r['worst_test_gap']:+.1f}", r["val_gaps"]] for r in rows]),
    ]
    others = rows[1:]
    if others:
        within = sum(r["worst_test_gap"] >= -1.0 for r in others)
        means = {split: " ".join(f"{m:+.1f}" for m in np.mean(
            [[float(g) for g in r[f"{split}_gaps"].split()] for r in others], axis=0)) for split in ("test", "val")}
        body.append(f"Every source within 1 point of its probe on the test images: {within} of {len(others)} other "
                    f"seeds. Mean over those seeds, per source: {means['test']} on the test images, {means['val']} "
                    "on the validation images.")
    return body


def probe_curve_section(folder: Path, payload: dict, output: Path) -> str:
    s = payload["setup"]
    rows = payload["curve"]
    body = [
        "## 0b. Where prompt tuning starts to beat a linear probe",
        "`python -m simulations.probe_curve` — one IID source of n images (10% its validation split) trains a "
        "linear probe on the pooled feature, a prompt with the product's recipe (random tokens, head started as a "
        "probe on `[token outputs ; pooled feature]`, tuning kept only where the validation loss improves: "
        "*kept epoch* 0 means that start was kept), and the same "
        f"prompt's last tuning epoch without that selection; {s['settings']['epochs']} epochs, at least "
        f"{s['settings']['min_steps']} steps, lr {s['settings']['lr']}. *Train accuracy* is on the source's own "
        "training images: what the probe leaves for tuning to fit.",
        setup_line(s, f"{s['test_images']} test images"),
        table(["images", "train / val", "linear probe", "prompt (recipe)", "kept epoch", "prompt, last epoch",
               "recipe − probe (points)", "last epoch − probe (points)", "train accuracy: probe / last epoch"],
              [[r["images"], f"{r['train_images']} / {r['val_images']}", pct(r["probe"]), pct(r["prompt"]),
                r["kept_epoch"], pct(r["prompt_last_epoch"]), f"{r['prompt_minus_probe_points']:+.1f}",
                f"{r['last_epoch_minus_probe_points']:+.1f}",
                f"{pct(r['probe_train'])} / {pct(r['prompt_last_epoch_train'])}"] for r in rows]),
        figures(folder, payload, output),
    ]
    return "\n\n".join(body)


def won_lost_sum(rows: list[dict]) -> str:
    """Images won / lost by the prompts' density composition against the probes', summed over ``rows``
    (no p-value: the rows share their test images)."""
    won, lost = (sum(r[f"density_vs_probes_{k}"] for r in rows) for k in ("won", "lost"))
    return f"{won} images won and {lost} lost in all"


def tune_density_section(folder: Path, payload: dict, output: Path) -> str:
    s = payload["setup"]
    best = payload["chosen"]
    body = [
        "## 0c. Choosing the density's temperature, covariance blend, floor and rank (validation images)",
        "`python -m simulations.tune_density` — training-split images only: sources (IID, label-skewed and "
        "disjoint-class partitions, two draws each) fit a linear probe and a density each on their own images, "
        "and every grid point is scored by the density-weighted composition's accuracy on other training-split "
        "images. The product's constants (`common.compose.TEMPERATURE_PER_DIM`, `common.density.OWN_COVARIANCE`, "
        "`VARIANCE_FLOOR`, `DEFAULT_RANK`) are the best mean over partitions; the rank grid ends at "
        "`common.density.MAX_RANK`, the most directions per class a density may carry.",
        setup_line(s, f"{s['train_images']} training / {s['val_images']} validation images"),
        f"**Chosen: rank {best['rank']}, floor {best['floor']}, own covariance {best['own_covariance']:g}, "
        f"temperature {best['temperature_per_dim']:g} × D** "
        f"(mean validation accuracy {pct(best['mean_val_accuracy'])}).",
        table(["partition", "uniform (val.)", "density at the chosen point (val.)"],
              [[name, pct(next(r["uniform"] for r in payload["grid"] if r["partition"] == name)), pct(acc)]
               for name, acc in best["per_partition"].items()]),
    ]
    return "\n\n".join(body)


def alacarte_section(folder: Path, payload: dict, output: Path) -> str:
    s = payload["setup"]
    st = s["settings"]
    rows = payload["comparison"]
    met = sum(r["gap_points"] <= GOAL_POINTS for r in rows)
    body = [
        "## 1. Composed pool vs paragon vs FedAvg vs linear probes",
        f"`python -m simulations.alacarte_vs_paragon` — {s['dataset']}; the union of all sources is the same "
        f"{s['train_images']} images for every N (each source keeps 10% as its validation split); test accuracy "
        f"on {s['test_images']} held-out test images. Pool prompts and FedAvg come from the product's Flower apps "
        f"in `flwr.simulation`. Every prompt uses the product's recipe ({st['epochs']} epochs, at least "
        f"{st['min_steps']} steps, lr {st['lr']}, batch {st['batch_size']}; probe-initialised head; selection on "
        "validation loss); the paragon trains on the union of the row's training images (the same images as the "
        "union probe) and selects on the union of its validation splits; "
        f"FedAvg runs {st['epochs']} rounds of one local epoch of the same recipe (each client selects on its "
        "validation split), so all its clients' steps together match the paragon's (step counts in the "
        "table), and keeps the round whose shared prompt has the lowest validation loss over all the clients' "
        "validation splits (the table names the round kept and, in brackets, the steps up to it)"
        f"{fedavg_rerun_text(payload)}. *composed*: uniform mean of the pool's prompts; *density*: "
        "weighted per image by the density each source shipped with its prompt. *probes*: linear probes on the "
        "same training images (per source, composed with density weights; one on the union). Gap = paragon − "
        "composed, in points. *density vs probes*: test images the density composition of the prompts gets "
        "right and that of the probes wrong / the reverse, with the exact two-sided sign-test (McNemar) p-value.",
        setup_line(s, f"{s['train_images']} images split over N sources (training images per source in the table)"),
        table(["partition", "N", "train images/source mean (min–max)", "composed", "density", "paragon",
               "union probe", "probes composed (density)", "FedAvg", "alone (mean)", "gap", "gap, density",
               "density vs probes: won / lost (p)", "steps: à-la-carte / paragon / FedAvg"],
              [[r["partition"], r["sources"], f"{r['train_images_per_source_mean']:.0f} "
                f"({r['train_images_per_source_min']}–{r['train_images_per_source_max']})", pct(r["composed"]),
                pct(r["composed_density"]), pct(r["paragon"]), pct(r["union_probe"]),
                f"{pct(r['probes_composed'])} ({pct(r['probes_composed_density'])})", fedavg_cell(r),
                pct(r["alone_mean"]), f"{r['gap_points']:+.1f}", f"{r['gap_density_points']:+.1f}",
                f"{r['density_vs_probes_won']} / {r['density_vs_probes_lost']} ({r['density_vs_probes_p']:.2f})",
                f"{r['steps_alacarte']} / {r['steps_paragon']} / {fedavg_steps_cell(r)}"] for r in rows]),
        f"**Goal (density composition within {GOAL_POINTS:.0f} points of the paragon): met in "
        f"{payload['density_within_3_points']} of {len(rows)} configurations (uniform: {met}); largest gap "
        f"{payload['max_gap_density_points']:+.1f} points (uniform: {payload['max_gap_points']:+.1f}). Density "
        f"composition of the prompts ≥ composed per-source probes (density) in "
        f"{payload['density_not_below_probes']} of {len(rows)} (significantly below, sign test at "
        f"{SIGNIFICANCE:.0%}, in {payload['density_significantly_below_probes']}; "
        f"{won_lost_sum(rows)}); paragon ≥ the union probe (same images) in "
        f"{payload['paragon_not_below_union_probe']} of {len(rows)}.**",
        *held_out_part(payload),
        "### À-la-carte subsets",
        f"Random subsets of the IID pool of {st['subset_pool']} sources, composed, vs a paragon trained with the "
        "same recipe on exactly the union of the chosen sources' data.",
        table(["subset size", "draw", "sources", "train images", "composed", "density", "paragon on subset",
               "gap", "gap, density"],
              [[r["subset_size"], r["draw"], r["sources"], r["train_images"], pct(r["composed"]),
                pct(r["composed_density"]), pct(r["paragon"]), f"{r['gap_points']:+.1f}",
                f"{r['gap_density_points']:+.1f}"] for r in payload["subsets"]]),
        figures(folder, payload, output),
    ]
    return "\n\n".join(body)


def fedavg_cell(row: dict) -> str:
    """FedAvg's accuracy, with the round it kept when the result records it."""
    kept = row.get("fedavg_kept_round")
    return pct(row["fedavg"]) + (f" (round {kept})" if kept else "")


def fedavg_steps_cell(row: dict) -> str:
    """FedAvg's optimiser steps, with those up to the kept round when the result records them."""
    kept = row.get("steps_fedavg_kept")
    return f"{row['steps_fedavg']}" + (f" ({kept} to the kept round)" if kept is not None else "")


def fedavg_rerun_text(payload: dict) -> str:
    """Where the FedAvg column comes from when ``--fedavg-only`` replaced it after the run."""
    rerun = payload.get("fedavg_rerun")
    if not rerun:
        return ""
    return (f"; the FedAvg column was rerun on {rerun['date']} with `--fedavg-only` ({rerun['seconds']:.0f} s of "
            "federations), every other column is from the original run")


def held_out_part(payload: dict) -> list[str]:
    """The density compositions and the paragon on held-out training-split images."""
    rows = payload["comparison"]
    n = payload["setup"]["settings"]["held_out_images"]
    return [
        "### The same comparisons on held-out training-split images (validation)",
        f"{n} training-split images outside the experiment's subset: no source, paragon or probe trains on "
        "them, and they are not test images. A second, larger sample for the comparisons the test images "
        "decide by a few images.",
        table(["partition", "N", "density", "probes composed (density)", "density − probes (points)",
               "density vs probes: won / lost (p)", "paragon", "gap, density"],
              [[r["partition"], r["sources"], pct(r["held_out_density"]), pct(r["held_out_probes_density"]),
                f"{100 * (r['held_out_density'] - r['held_out_probes_density']):+.1f}",
                f"{r['held_out_density_vs_probes_won']} / {r['held_out_density_vs_probes_lost']} "
                f"({r['held_out_density_vs_probes_p']:.2f})", pct(r["held_out_paragon"]),
                f"{r['held_out_gap_density_points']:+.1f}"] for r in rows]),
        f"**On these images: density composition of the prompts ≥ composed per-source probes (density) in "
        f"{payload['held_out_density_not_below_probes']} of {len(rows)}; within {GOAL_POINTS:.0f} points of the "
        f"paragon in {payload['held_out_density_within_3_points']} of {len(rows)}.**",
        *source_probe_part(payload),
    ]


def source_probe_part(payload: dict) -> list[str]:
    """Sources whose prompt is not below its own probe on its own classes (results recorded
    before that count was added have none)."""
    if "sources_not_below_probe" not in payload:
        return []
    return [f"Each source's prompt against its own linear probe, on the images of its own classes, over all "
            f"configurations: at least as accurate for {payload['sources_not_below_probe']} of "
            f"{payload['sources_with_probe']} sources on the test images, and "
            f"{payload['held_out_sources_not_below_probe']} of {payload['sources_with_probe']} on the held-out "
            "images."]


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
        "linear probes on the frozen backbone's pooled features (sequential: forgets; joint: upper bound that "
        "re-uses old data). Predictions "
        f"are among all classes seen so far. {s['settings']['epochs']} epochs per task for the prompts.",
        setup_line(s, f"{s['settings']['train_per_class']} training / {s['settings']['test_per_class']} test images "
                      f"per class ({s['train_images']} / {s['test_images']} in all)"),
        table(["method", "final average accuracy", "final average forgetting (points)"],
              [[m, pct(v["average_accuracy"]), f"{100 * v['forgetting']:.1f}"] for m, v in final.items()]),
        "Average accuracy / forgetting (points) after each task:",
        table(["method"] + [f"after task {t}" for t in steps], per_step),
        task_inference_line(payload),
        figures(folder, payload, output),
    ]
    return "\n\n".join(body)


def task_inference_line(payload: dict) -> str:
    """How far the density-weighted prompts are from the prompts given the true task, and why."""
    final, shares = payload["final"], payload["task_inference"]
    return (f"Task inference is the gap: after the last task the density puts its largest weight on an image's own "
            f"task for {pct(shares[-1])}% of the test images (after each task: "
            f"{', '.join(pct(x) for x in shares)}). Given the true task, the same prompts reach "
            f"{pct(final['apt_task_oracle']['average_accuracy'])} (`apt_task_oracle`, an upper bound that reads the "
            f"test label) against {pct(final['apt_density']['average_accuracy'])} density-weighted and "
            f"{pct(final['probe_joint']['average_accuracy'])} for the joint probe.")


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
    ("main_job", main_job_section),
    ("main_job_sweep", main_job_section),
    ("probe_curve", probe_curve_section),
    ("tune_density", tune_density_section),
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
            parts.append(replicate_heading(section(path.parent, payloads[-1], output), payloads[-1]["setup"]))
            if payloads[-1].get("note"):  # written by hand into result.json, e.g. what code the run predates
                parts.append(f"> **Note.** {payloads[-1]['note']}")
    reduced = [p["experiment"] for p in payloads if p["setup"]["profile"] == "reduced"]
    if reduced:
        parts.insert(3, "> **Scale of these results.** " + ", ".join(f"`{r}`" for r in reduced) + " ran below the "
                     "full configuration of its script (see each section's profile and overrides): the full modes "
                     "did not fit the session's time budget on the shared, heavily loaded 2-core machine.")
    return "\n\n".join(parts) + "\n"


def replicate_heading(text: str, setup: dict) -> str:
    """A section rendered from a run at a seed other than 0 (a replicate) names its seed in its heading."""
    if not setup["seed"]:
        return text
    heading, rest = text.split("\n", 1)
    return f"{heading} (replicate: seed {setup['seed']})\n{rest}"


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
    parser.add_argument("--results", type=Path, default=RESULTS_ROOT,
                        help="folder with the experiments' results (default: %(default)s under the working "
                             "directory; the repository's record: simulations/results)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write (default: RESULTS.md beside the results folder)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"no results folder {args.results}: run an experiment first, or pass --results DIR "
                     "(the repository's record: simulations/results)")
    out = args.out or args.results.parent / "RESULTS.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(args.results.resolve(), out.resolve()))
    return out


if __name__ == "__main__":
    main()
