"""The experiment scripts: each one's ``--tiny`` and ``--quick`` modes run end to end and write
their JSON and PNG to ``--out`` (and nothing to the working directory), and
``simulations.render`` turns the results into a RESULTS.md that mentions them.

``--tiny`` uses the random tiny ViT at 32 px and generated IDX data; ``--quick`` uses the real
assets ``bash setup.sh`` prepares (pretrained DINOv2 ViT-S/14 at 112 px, Fashion-MNIST), so
its accuracies are meaningful. The Flower experiments start a real (Ray) simulation, so each
takes tens of seconds (tiny) to a few minutes (quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from synthetic import make_cifar100_folder, make_idx_dataset

from common.assets import default_checkpoint, default_data_dir
from common.config import ConfigError
from common.data import load_split
from simulations import main_job
from simulations.common import (
    SIM_RECORD,
    Federation,
    _FederationGrid,
    apply_overrides,
    backbone_spec,
    base_parser,
    build_bank,
    held_out_bank,
    paired_comparison,
    select_profile,
    shared_subset,
    subset_indices,
)
from simulations.render import main as render_main
from simulations.render import render

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("alacarte_vs_paragon", "class_incremental", "forgetting", "cost", "main_job", "probe_curve",
               "tune_density")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("idx"), n_train=200, n_test=100)


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="session")
def quick_work(tmp_path_factory) -> Path:
    """One scratch root for the ``--quick`` runs, so they share the DINOv2 key/value bank."""
    if default_checkpoint() is None or default_data_dir() is None:
        pytest.fail("the --quick experiments need the prepared DINOv2 and Fashion-MNIST: run `bash setup.sh`")
    return tmp_path_factory.mktemp("quick")


def run_profile(name: str, profile: str, results: Path, work: Path, *extra: str) -> dict:
    """Run ``python -m simulations.<name> --<profile> [extra...]`` in an empty working directory,
    check it wrote nothing there, and return its result.json."""
    cmd = [sys.executable, "-m", f"simulations.{name}", f"--{profile}", "--out", str(results / name),
           "--work-dir", str(work / name), *extra]
    cwd = work / f"{name}-cwd"
    cwd.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not any(cwd.iterdir()), sorted(cwd.iterdir())
    found = sorted((results / name).glob("**/result.json"))
    assert len(found) == 1
    payload = json.loads(found[0].read_text())
    for png in payload["plots"]:
        assert (found[0].parent / png).stat().st_size > 1000
    assert payload["setup"]["profile"] == profile
    text = render(results, work / f"{name}-RESULTS.md")  # this run's section, among the session's results
    assert f"simulations.{payload['experiment']}" in text and payload["setup"]["backbone"] in text
    assert all(f"{plot})" in text for plot in payload["plots"])
    assert "Not the full configuration" in text
    return payload


def run_tiny(name: str, data_dir: Path, results: Path, work: Path) -> dict:
    """Run ``python -m simulations.<name> --tiny`` on the generated IDX data."""
    payload = run_profile(name, "tiny", results, work, "--data-dir", str(data_dir))
    assert payload["setup"]["resolution"] == 32
    return payload


def run_quick(name: str, results: Path, work: Path) -> dict:
    """Run ``python -m simulations.<name> --quick`` on the prepared DINOv2 and Fashion-MNIST."""
    payload = run_profile(name, "quick", results, work)
    assert payload["setup"]["resolution"] == 112 and "DINOv2" in payload["setup"]["backbone"]
    return payload


@pytest.mark.filterwarnings("ignore:'simulations.:RuntimeWarning")  # runpy: the module is already imported
@pytest.mark.parametrize("name", [*EXPERIMENTS, "render"])
def test_help_of_every_script(name, monkeypatch, capsys):
    """``python -m simulations.<name> --help``, run as ``__main__`` in this process (a subprocess
    per script spent a minute importing torch and flwr again)."""
    monkeypatch.setattr(sys, "argv", [f"simulations/{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"simulations.{name}", run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m simulations.{name}")


@pytest.mark.parametrize(("won", "lost", "p"), [(0, 1, 1.0), (0, 6, 2 / 64), (7, 0, 2 / 128), (3, 3, 1.0),
                                                 (1, 5, 2 * 7 / 64), (0, 0, 1.0)])
def test_paired_comparison_counts_split_images_and_sign_test(won, lost, p):
    """``won`` images only the first method gets right, ``lost`` only the reference, 4 both, 2 neither."""
    labels = np.zeros(won + lost + 6, dtype=np.int64)
    right, wrong = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    first = [right] * won + [wrong] * lost + [right] * 4 + [wrong] * 2
    reference = [wrong] * won + [right] * lost + [right] * 4 + [wrong] * 2
    got = paired_comparison(torch.stack(first), torch.stack(reference), labels)
    assert (got["won"], got["lost"]) == (won, lost)
    assert got["p"] == pytest.approx(p)


def test_overrides_convert_types():
    from simulations.alacarte_vs_paragon import FULL

    changed = apply_overrides(FULL, ["epochs=2", "sources=1,2", "lr=0.01"])
    assert (changed.epochs, changed.sources, changed.lr) == (2, (1, 2), 0.01)


def test_overrides_convert_booleans_as_the_product_does():
    from simulations.class_incremental import FULL

    assert apply_overrides(FULL, ["probe_cv=false"]).probe_cv is False
    assert apply_overrides(FULL, ["probe_cv=0"]).probe_cv is False
    assert apply_overrides(FULL, ["probe_cv=True"]).probe_cv is True


@pytest.mark.parametrize(("item", "message"), [
    ("probe_cv=maybe", "--set probe_cv must be a bool (true, false, 1 or 0), got 'maybe'"),
    ("epochs=2.5", "--set epochs must be an integer, got '2.5'"),
    ("probe_cv", "--set 'probe_cv': expected KEY=VALUE with KEY among train_per_class, "),
    ("folds=3", "--set 'folds=3': expected KEY=VALUE"),
])
def test_bad_overrides_are_rejected(item, message):
    from simulations.class_incremental import FULL

    with pytest.raises(ConfigError) as err:
        apply_overrides(FULL, [item])
    assert str(err.value).startswith(message)


def test_bad_override_on_the_command_line_exits_with_the_message():
    from simulations.class_incremental import FULL, QUICK, TINY

    args = base_parser("class_incremental", "test").parse_args(["--tiny", "--set", "probe_cv=maybe"])
    with pytest.raises(SystemExit, match="^error: --set probe_cv must be a bool"):
        select_profile(args, TINY, QUICK, FULL)


def test_results_default_to_the_working_directory():
    args = base_parser("forgetting", "test").parse_args([])
    assert args.out == Path("results") / "forgetting" and not args.out.is_absolute()


def test_render_command_writes_beside_the_results_folder(tmp_path):
    (tmp_path / "results").mkdir()
    assert render_main(["--results", str(tmp_path / "results")]) == tmp_path / "RESULTS.md"
    assert "Not run yet" in (tmp_path / "RESULTS.md").read_text()
    out = tmp_path / "elsewhere" / "R.md"
    assert render_main(["--results", str(tmp_path / "results"), "--out", str(out)]) == out and out.is_file()
    with pytest.raises(SystemExit):
        render_main(["--results", str(tmp_path / "missing")])


def test_render_of_the_recorded_results_shows_their_notes(tmp_path):
    """The committed results render, and a hand-written ``note`` of a result shows under its section."""
    recorded = tmp_path / "results"
    shutil.copytree(REPO / "simulations" / "results", recorded)
    marked = recorded / "forgetting" / "result.json"
    marked.write_text(json.dumps(json.loads(marked.read_text()) | {"note": "Ran on an older recipe."}))
    text = render(recorded, tmp_path / "RESULTS.md")
    notes = [json.loads(p.read_text()).get("note") for p in recorded.glob("*/**/result.json")]
    for note in filter(None, notes):
        assert f"> **Note.** {note}" in text
    forgetting = text[text.index("## 3. Forgetting a source"):text.index("## 4. Cost")]
    assert "> **Note.** Ran on an older recipe." in forgetting


@pytest.mark.parametrize(("recorded_fields", "shown"), [
    ({"fedavg_rerun": {"date": "2026-12-07", "seconds": 1234.5}},
     "the FedAvg column was rerun on 2026-12-07 with `--fedavg-only` (1234 s of federations)"),
    ({"sources_not_below_probe": 101, "held_out_sources_not_below_probe": 105, "sources_with_probe": 113},
     "at least as accurate for 101 of 113 sources on the test images, and 105 of 113 on the held-out images"),
])
def test_render_shows_optional_alacarte_vs_paragon_fields_only_when_recorded(tmp_path, recorded_fields, shown):
    recorded = tmp_path / "results"
    shutil.copytree(REPO / "simulations" / "results", recorded)
    result = recorded / "alacarte_vs_paragon" / "result.json"
    payload = {k: v for k, v in json.loads(result.read_text()).items() if k not in recorded_fields}
    result.write_text(json.dumps(payload))
    assert shown not in render(recorded, tmp_path / "RESULTS.md")
    result.write_text(json.dumps(payload | recorded_fields))
    assert shown in render(recorded, tmp_path / "RESULTS.md")


def test_render_names_fedavgs_kept_round_and_its_steps_only_when_recorded(tmp_path):
    recorded = tmp_path / "results"
    shutil.copytree(REPO / "simulations" / "results", recorded)
    result = recorded / "alacarte_vs_paragon" / "result.json"
    payload = json.loads(result.read_text())
    columns = ("fedavg_kept_round", "steps_fedavg_kept")
    for i, row in enumerate(payload["comparison"]):
        row.update({"fedavg": 0.5, "steps_fedavg": 500, "fedavg_kept_round": 2 + i, "steps_fedavg_kept": 200 + i})
    result.write_text(json.dumps(payload))
    text = render(recorded, tmp_path / "RESULTS.md")
    for i in range(len(payload["comparison"])):
        assert f"| 50.0 (round {2 + i}) |" in text and f"/ 500 ({200 + i} to the kept round) |" in text
    for row in payload["comparison"]:
        for key in columns:
            del row[key]
    result.write_text(json.dumps(payload))
    text = render(recorded, tmp_path / "RESULTS.md")
    assert "(round " not in text and "to the kept round" not in text and "/ 500 |" in text


def test_sources_not_below_probe_counts_sources_at_least_as_accurate_as_their_probe():
    from simulations.alacarte_vs_paragon import sources_not_below_probe

    inf = float("-inf")
    labels = np.array([0, 1, 2, 2])
    # source 0 covers classes 0 and 1, source 1 covers 1 and 2 ([k, n, C] logits, -inf outside)
    probe = torch.tensor([[[1, 0, inf], [1, 0, inf], [1, 0, inf], [1, 0, inf]],  # right on image 0 only
                          [[inf, 1, 0], [inf, 1, 0], [inf, 0, 1], [inf, 0, 1]]])  # right on images 1, 2, 3
    better = torch.tensor([[[1, 0, inf], [0, 1, inf], [1, 0, inf], [1, 0, inf]],  # images 0 and 1
                           [[inf, 1, 0], [inf, 1, 0], [inf, 0, 1], [inf, 1, 0]]])  # images 1 and 2
    assert sources_not_below_probe(probe, probe, labels) == 2  # a tie counts
    assert sources_not_below_probe(better, probe, labels) == 1  # source 1 lost image 3
    assert sources_not_below_probe(probe, better, labels) == 1
    with pytest.raises(ValueError, match="same sources"):
        sources_not_below_probe(better[:1], probe, labels)


def test_render_shows_a_replicate_seed_as_its_own_section(tmp_path):
    """A result in a sub-folder (another seed of the same experiment) renders after the main one,
    its heading naming its seed."""
    results = tmp_path / "results" / "alacarte_vs_paragon"
    results.mkdir(parents=True)
    payload = json.loads((REPO / "simulations/results/alacarte_vs_paragon/result.json").read_text())
    (results / "result.json").write_text(json.dumps(payload))
    payload["setup"]["seed"] = 3
    (results / "seed-3").mkdir()
    (results / "seed-3" / "result.json").write_text(json.dumps(payload))
    text = render(tmp_path / "results", tmp_path / "RESULTS.md")
    heading = "## 1. Composed pool vs paragon vs FedAvg vs linear probes"
    assert text.count(heading) == 2
    assert text.index(heading + "\n") < text.index(heading + " (replicate: seed 3)")


class _RecordingGrid:
    """The part of a Grid ``_FederationGrid`` uses: three node ids, pushed messages recorded."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return [30, 10, 20]

    def push_messages(self, messages):
        self.pushed.extend(messages)
        return [str(i) for i in range(len(self.pushed))]


@pytest.mark.usefixtures("task_identity")
def test_federation_grid_tags_each_node_with_its_own_partition():
    """Flower's FedAvg sends one RecordDict to every node: each message must still carry its
    own node's partition, and the strategy's RecordDict must be left as it was."""
    inner = _RecordingGrid()
    grid = _FederationGrid(inner, Federation("f", {"mode": "fedavg"}, [4, 5, 6], 7), "")
    shared = RecordDict({"config": ConfigRecord({"round": 1})})
    grid.push_messages([Message(content=shared, dst_node_id=node, message_type="train") for node in (10, 20, 30)])
    assert [int(m.content[SIM_RECORD]["partition-id"]) for m in inner.pushed] == [4, 5, 6]
    assert all(m.content["config"]["round"] == 1 for m in inner.pushed)
    assert list(shared) == ["config"]


def test_bank_cache_matches_the_backbone(data_dir, tmp_path):
    model = backbone_spec(tiny=True).load()
    raw = load_split("fashion_mnist", str(data_dir), "test")
    bank = build_bank(model, raw, np.arange(6), tmp_path / "bank")
    images, _, idx = next(iter(bank.loader(np.arange(6), 6)))
    from common.data import Shard, backbone_transform

    shard = Shard(raw, np.arange(6), backbone_transform(model.backbone))
    live = model.backbone_kv(torch.stack([shard[i][0] for i in range(6)]))
    torch.testing.assert_close(bank.cache.kv(idx, images), live, atol=2e-2, rtol=1e-2)
    assert bank.cache.misses == 0 and bank.features.shape == (6, model.embed_dim)


def test_held_out_bank_is_outside_the_subset(data_dir, tmp_path):
    model = backbone_spec(tiny=True).load()
    args = argparse.Namespace(data_dir=str(data_dir), work_dir=tmp_path / "work", seed=0)
    _, train, _ = shared_subset(args, model, 120, 20)
    held_out = held_out_bank(args, model, 120, 50)
    raw = load_split("fashion_mnist", str(data_dir), "train")
    subset = subset_indices(len(raw), 120, 0)  # the training images shared_subset wrote
    assert len(held_out.index) == 50 and not set(held_out.index) & set(subset)
    np.testing.assert_array_equal(held_out.labels, raw.labels[held_out.index])
    assert held_out_bank(args, model, 120, 50).index.tolist() == held_out.index.tolist()  # reused, same images
    assert train.features.shape == (120, model.embed_dim)


def test_alacarte_vs_paragon_tiny(data_dir, results, tmp_path):
    payload = run_tiny("alacarte_vs_paragon", data_dir, results, tmp_path)
    row = payload["comparison"][0]
    assert row["prompts_in_pool"] == row["sources"] == 2
    for key in ("composed", "composed_density", "paragon", "fedavg", "alone_mean", "probes_composed",
                "probes_composed_density", "union_probe", "held_out_density", "held_out_probes_density",
                "held_out_paragon"):
        assert 0.0 <= row[key] <= 1.0
    n_held_out = 16  # TINY.held_out_images
    assert row["held_out_density_vs_probes_won"] - row["held_out_density_vs_probes_lost"] == round(
        n_held_out * (row["held_out_density"] - row["held_out_probes_density"]))
    assert row["steps_alacarte"] > 0 and row["steps_paragon"] > 0 and row["steps_fedavg"] > 0
    rounds = 1  # TINY.epochs: FedAvg's rounds
    assert 1 <= row["fedavg_kept_round"] <= rounds
    assert row["steps_fedavg_kept"] * rounds == row["steps_fedavg"] * row["fedavg_kept_round"]
    for key in ("sources_not_below_probe", "held_out_sources_not_below_probe"):
        assert 0 <= row[key] <= row["sources"]
        assert payload[key] == sum(r[key] for r in payload["comparison"])
    assert payload["sources_with_probe"] == sum(r["prompts_in_pool"] for r in payload["comparison"])
    assert payload["subsets"] and payload["setup"]["upload_bytes_per_reply"] > 0

    rerun = run_profile("alacarte_vs_paragon", "tiny", results, tmp_path / "rerun", "--data-dir", str(data_dir),
                        "--fedavg-only")
    assert rerun["fedavg_rerun"]["seconds"] > 0
    for before, after in zip(payload["comparison"], rerun["comparison"], strict=True):
        assert 0.0 <= after["fedavg"] <= 1.0 and after["fedavg_seconds"] > 0
        kept = set(before) - {"fedavg", "fedavg_seconds", "fedavg_kept_round", "steps_fedavg_kept"}
        assert {k: after[k] for k in kept} == {k: before[k] for k in kept}


def test_federations_of_one_mode_leave_the_other_modes_pools_alone(tmp_path):
    from simulations.alacarte_vs_paragon import TINY, federations

    spec = backbone_spec(tiny=True)
    everything = federations(TINY, spec, tmp_path / "data", tmp_path, seed=0)
    assert sorted(r.name for r in everything) == ["iid-2-alacarte", "iid-2-fedavg"]
    pools = {r.name: Path(r.run_config["pool-dir"]) for r in everything}
    for pool in pools.values():
        (pool / "prompts").mkdir(parents=True)
    fedavg = federations(TINY, spec, tmp_path / "data", tmp_path, seed=0, modes=("fedavg",))
    assert [r.name for r in fedavg] == ["iid-2-fedavg"]
    assert (pools["iid-2-alacarte"] / "prompts").is_dir()  # a --fedavg-only rerun keeps the recorded pools
    assert not pools["iid-2-fedavg"].exists()


def test_fedavg_only_needs_the_recorded_result_of_the_same_run(tmp_path, monkeypatch):
    from simulations.alacarte_vs_paragon import TINY
    from simulations.alacarte_vs_paragon import main as avp_main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="does not exist: run the experiment first"):
        avp_main(["--tiny", "--fedavg-only", "--out", str(tmp_path)])
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(SystemExit, match="is not a result of this experiment"):
        avp_main(["--tiny", "--fedavg-only", "--out", str(tmp_path)])
    setup = {"profile": "tiny", "settings": {}, "seed": 0}
    (tmp_path / "result.json").write_text(json.dumps({"setup": setup, "comparison": []}))
    with pytest.raises(SystemExit, match="needs the same profile, --set overrides and --seed"):
        avp_main(["--tiny", "--fedavg-only", "--out", str(tmp_path)])
    setup = {"profile": "tiny", "settings": dataclasses.asdict(TINY), "seed": 0}  # no data_dir: the default one
    (tmp_path / "result.json").write_text(json.dumps({"setup": setup, "comparison": []}))
    with pytest.raises(SystemExit, match=re.escape(f"run on data folder 'default', not '{tmp_path.resolve()}'")):
        avp_main(["--tiny", "--fedavg-only", "--out", str(tmp_path), "--data-dir", str(tmp_path)])


def test_main_job_tiny_with_sweep(data_dir, results, tmp_path):
    payload = run_profile("main_job", "tiny", results, tmp_path, "--data-dir", str(data_dir), "--sweep",
                          "--seed-spread")
    assert [r["source"] for r in payload["sources"]] == [f"source-{i}" for i in range(5)]
    n = payload["setup"]["test_images"]
    for row in payload["sources"]:
        assert 0.0 <= row["probe"] <= 1.0 and 0.0 <= row["prompt"] <= 1.0 and row["train_images"] > 0
        assert row["vs_probe_won"] - row["vs_probe_lost"] == round(n * (row["prompt"] - row["probe"]))
        assert 0.0 < row["vs_probe_p"] <= 1.0
    assert set(payload["composed_prompts"]) == set(payload["composed_probes"]) == {"uniform", "density"}
    grid_row, defaults_row = payload["sweep"]  # TINY's grid lacks the defaults: they are trained and listed last
    assert [grid_row["defaults"], defaults_row["defaults"]] == [False, True] and grid_row["steps"]
    assert [defaults_row[f"vs_defaults_{k}"] for k in ("won", "lost", "p")] == [0, 0, 1]
    n_val = main_job.TINY.validation_images
    assert grid_row["vs_defaults_won"] - grid_row["vs_defaults_lost"] == round(
        5 * n_val * (grid_row["val_alone_mean"] - defaults_row["val_alone_mean"]))
    assert grid_row["density_vs_defaults_won"] - grid_row["density_vs_defaults_lost"] == round(
        n_val * (grid_row["val_composed_density"] - defaults_row["val_composed_density"]))
    inits = payload["token_inits"]
    starts = [[r["tokens_init"], r["seed"], r["n_prompt"]] for r in inits[1:]]
    assert starts == [list(x) for x in main_job.TINY.token_inits]
    assert [r["n_prompt"] for r in inits] == [0, 1, 1, 2]  # pooled probe, class token, one and two random tokens
    for row in inits:
        alone = [float(a) for a in row["val_alone"].split()]
        assert len(alone) == 5 and all(0 <= a <= 100 for a in alone)
        assert row["val_alone_mean"] == pytest.approx(sum(alone) / 500, abs=1e-3)
        assert 0.0 <= row["val_composed_uniform"] <= 1.0 and 0.0 <= row["val_composed_density"] <= 1.0
    spread = payload["seed_spread"]
    assert [r["token_seed"] for r in spread] == ["source name", *main_job.TINY.spread_seeds]
    for row in spread:
        test_gaps = [float(g) for g in row["test_gaps"].split()]
        assert len(test_gaps) == len(row["val_gaps"].split()) == 5
        assert row["worst_test_gap"] == min(test_gaps) and all(-100 <= g <= 100 for g in test_gaps)
    assert len({r["test_gaps"] + r["val_gaps"] for r in spread}) > 1  # the seeds draw different tokens
    text = render(results, tmp_path / "RESULTS.md")
    assert f"| source name | {spread[0]['test_gaps']} |" in text
    within = sum(r["worst_test_gap"] >= -1 for r in spread[1:])
    assert f"within 1 point of its probe on the test images: {within} of 2 other seeds" in text


def test_probe_curve_tiny(data_dir, results, tmp_path):
    payload = run_tiny("probe_curve", data_dir, results, tmp_path)
    assert [r["images"] for r in payload["curve"]] == [16, 32]
    for row in payload["curve"]:
        assert row["train_images"] + row["val_images"] == row["images"] and 0 <= row["kept_epoch"]
        assert all(0.0 <= row[k] <= 1.0 for k in ("probe_train", "prompt_train", "prompt_last_epoch_train"))


def test_tune_density_tiny(data_dir, results, tmp_path):
    payload = run_tiny("tune_density", data_dir, results, tmp_path)
    chosen = payload["chosen"]
    knobs = (chosen["rank"], chosen["floor"], chosen["own_covariance"], chosen["temperature_per_dim"])
    assert knobs == (2, 0.1, 0.1, 1 / 128)  # TINY's one point
    assert 0.0 <= chosen["mean_val_accuracy"] <= 1.0 and payload["grid"]


def test_class_incremental_tiny(data_dir, results, tmp_path):
    payload = run_tiny("class_incremental", data_dir, results, tmp_path)
    assert payload["setup"]["tasks"] == 5
    assert set(payload["final"]) == {"apt_composed", "apt_density", "apt_task_oracle", "sequential_prompt",
                                     "probe_sequential", "probe_joint", "probe_density"}
    assert all(len(m) == 5 for m in payload["matrices"].values())
    shares = payload["task_inference"]
    assert len(shares) == 5 and shares[0] == 1.0 and all(0.0 <= x <= 1.0 for x in shares)  # one task: always right
    first = {m: payload["matrices"][m][0] for m in ("apt_composed", "apt_density", "apt_task_oracle")}
    assert first["apt_composed"] == first["apt_density"] == first["apt_task_oracle"]  # one prompt is that prompt


def test_class_incremental_task_oracle_weights():
    from simulations.class_incremental import Task, density_task_accuracy, oracle_weights, task_owner

    empty = np.array([], dtype=np.int64)
    tasks = [Task([0, 1], empty, empty, empty), Task([2, 3], empty, empty, empty)]
    owner = task_owner(tasks, np.array([0, 3, 2, 5]))
    assert owner.tolist() == [0, 1, 1, -1]  # label 5 belongs to no task seen yet
    weights = oracle_weights(owner, 2)
    assert weights.tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]]
    density = torch.tensor([[0.9, 0.6, 0.2, 0.0], [0.1, 0.4, 0.8, 1.0]])
    assert density_task_accuracy(density, owner) == pytest.approx(2 / 3)  # the unseen-task image is not counted


def test_class_incremental_split_cifar100_tiny(tmp_path):
    folder = make_cifar100_folder(tmp_path / "cifar", per_class_train=5, per_class_test=3)
    payload = run_profile("class_incremental", "tiny", tmp_path / "results", tmp_path / "work", "--cifar100",
                          str(folder))
    assert payload["setup"]["dataset"] == "Split CIFAR-100 (10 x 10)" and payload["setup"]["tasks"] == 10
    assert payload["setup"]["train_images"] == 100 * 4  # TINY keeps 4 training images per class
    assert all(len(m) == 10 and len(m[-1]) == 10 for m in payload["matrices"].values())


def test_forgetting_tiny_is_bitwise_exact(data_dir, results, tmp_path):
    payload = run_tiny("forgetting", data_dir, results, tmp_path)
    assert payload["all_bitwise_identical"]
    for row in payload["sources"]:
        assert row["own_classes_test_acc_after"] == 0.0  # "classes" partition: nobody else knows them


def test_cost_tiny(data_dir, results, tmp_path):
    payload = run_tiny("cost", data_dir, results, tmp_path)
    assert [r["prompts"] for r in payload["training"]] == [1, 2, 4]
    for row in payload["memory"]:
        assert row["peak_rss_mib"] > 0 and row["upload_bytes_per_client_round"] < row["backbone_bytes_fp32"]


@pytest.mark.slow
def test_alacarte_vs_paragon_quick(results, quick_work):
    payload = run_quick("alacarte_vs_paragon", results, quick_work)
    rows = {(r["partition"], r["sources"]): r for r in payload["comparison"]}
    assert set(rows) == {("iid", 1), ("iid", 4), ("dirichlet-0.1", 1), ("dirichlet-0.1", 4)}
    single = rows["iid", 1]
    assert single["composed"] == single["composed_density"] == single["alone_mean"]  # one prompt is that prompt
    assert single["paragon"] > 0.4  # pretrained features: far above the 10-class chance level
    assert all(r["prompts_in_pool"] == r["sources"] for r in rows.values())


@pytest.mark.slow
def test_class_incremental_quick(results, quick_work):
    payload = run_quick("class_incremental", results, quick_work)
    first_task = payload["matrices"]["apt_composed"][0][0]
    assert first_task > 0.7  # two Fashion-MNIST classes on DINOv2 features are easy
    final = payload["final"]
    assert final["probe_joint"]["average_accuracy"] > final["probe_sequential"]["average_accuracy"]
    assert final["apt_density"]["average_accuracy"] > final["apt_composed"]["average_accuracy"]
    assert final["apt_task_oracle"]["average_accuracy"] >= final["apt_density"]["average_accuracy"]


@pytest.mark.slow
def test_forgetting_quick_is_bitwise_exact(results, quick_work):
    payload = run_quick("forgetting", results, quick_work)
    assert payload["all_bitwise_identical"] and len(payload["sources"]) == 3
    assert all(row["bitwise_identical_density"] and row["prompts_identical"] for row in payload["sources"])
    assert all(row["own_classes_test_acc_after"] == 0.0 for row in payload["sources"])


@pytest.mark.slow
def test_cost_quick(results, quick_work):
    payload = run_quick("cost", results, quick_work)
    assert [r["prompts"] for r in payload["training"]] == [1, 2, 4, 8]
    assert [r["clients"] for r in payload["memory"]] == [2, 4]
    assert all(r["batched_s"] > 0 and r["one_by_one_s"] > 0 for r in payload["inference"])
