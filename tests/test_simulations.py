"""The experiment scripts: each one's ``--tiny`` mode runs end to end and writes its JSON and
PNG, and ``simulations.render`` turns the results into a RESULTS.md that mentions them.

``--tiny`` uses the random tiny ViT at 32 px and generated IDX data; the Flower experiments
start a real (Ray) simulation, so each takes tens of seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_idx_dataset

from common.data import load_split
from simulations.common import apply_overrides, backbone_spec, build_bank
from simulations.render import render

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("alacarte_vs_paragon", "class_incremental", "forgetting", "cost")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("idx"), n_train=200, n_test=100)


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


def run_tiny(name: str, data_dir: Path, results: Path, work: Path) -> dict:
    """Run ``python -m simulations.<name> --tiny`` and return its result.json."""
    cmd = [sys.executable, "-m", f"simulations.{name}", "--tiny", "--data-dir", str(data_dir),
           "--out", str(results / name), "--work-dir", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = sorted((results / name).glob("**/result.json"))
    assert len(found) == 1
    payload = json.loads(found[0].read_text())
    for png in payload["plots"]:
        assert (found[0].parent / png).stat().st_size > 1000
    assert payload["setup"]["profile"] == "tiny" and payload["setup"]["resolution"] == 32
    return payload


def test_help_of_every_script():
    for name in (*EXPERIMENTS, "render"):
        proc = subprocess.run([sys.executable, "-m", f"simulations.{name}", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage" in proc.stdout, name


def test_overrides_convert_types():
    from simulations.alacarte_vs_paragon import FULL

    changed = apply_overrides(FULL, ["epochs=2", "sources=1,2", "lr=0.01"])
    assert (changed.epochs, changed.sources, changed.lr) == (2, (1, 2), 0.01)


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


def test_alacarte_vs_paragon_tiny(data_dir, results, tmp_path):
    payload = run_tiny("alacarte_vs_paragon", data_dir, results, tmp_path)
    row = payload["comparison"][0]
    assert row["prompts_in_pool"] == row["sources"] == 2
    for key in ("composed", "paragon", "fedavg", "alone_mean"):
        assert 0.0 <= row[key] <= 1.0
    assert payload["subsets"] and payload["setup"]["upload_bytes_per_reply"] > 0


def test_class_incremental_tiny(data_dir, results, tmp_path):
    payload = run_tiny("class_incremental", data_dir, results, tmp_path)
    assert payload["setup"]["tasks"] == 5
    assert set(payload["final"]) == {"apt_composed", "sequential_prompt", "probe_sequential", "probe_joint"}
    assert all(len(m) == 5 for m in payload["matrices"].values())


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


def test_render_mentions_every_experiment(results, tmp_path):
    """Runs last: renders what the tiny runs above wrote (skipped when run alone)."""
    if not any(results.iterdir()):
        pytest.skip("no tiny results in this session; run the whole module")
    text = render(results, tmp_path / "RESULTS.md")
    for name in EXPERIMENTS:
        if (results / name).exists():
            assert f"simulations.{name}" in text
    assert "vit_tiny_patch16_224" in text and ".png)" in text and "Not the full configuration" in text
