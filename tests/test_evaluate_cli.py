"""``alacarte evaluate``: the ServerApp's accuracy table for any subset of a pool, and its errors.

(That its rows equal the ServerApp's after a real ``flwr run`` is checked in ``test_simulation``.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_idx_dataset
from torch.utils.data import DataLoader

from common.cli import main as cli_main
from common.config import AppConfig, build_model
from common.data import Shard, backbone_transform, limit_per_partition, load_split
from common.density import SourceDensity
from common.model import APTViT
from common.prompt import Prompt
from common.train import evaluate
from server.pool import PromptPool

BACKBONE = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--device", "cpu"]
EXAMPLES = 30


@pytest.fixture(scope="module")
def model() -> APTViT:
    return build_model(AppConfig(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32), device="cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("idx"), n_train=40, n_test=60)


@pytest.fixture()
def pool(tmp_path: Path, model: APTViT) -> PromptPool:
    """Sources a (classes 0-4) and b (5-9), each with a density, as a run would store them."""
    pool = PromptPool(tmp_path / "pool")
    for seed, (source, labels) in enumerate((("a", range(5)), ("b", range(5, 10)))):
        prompt = Prompt.init(model, 10, seed=seed, labels=labels, source=source)
        with torch.no_grad():
            prompt.head.weight.normal_(generator=torch.Generator().manual_seed(seed))
        prompt.density = SourceDensity.fit(torch.randn(30, model.backbone.embed_dim), torch.arange(30) % 5 + labels[0])
        pool.add(source, prompt)
    return pool


def table_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith(("a ", "b ", "composed"))]


def test_a_chosen_subset_is_evaluated_on_the_servers_test_images(pool, model, data_dir, capsys):
    assert cli_main(["evaluate", "--pool", str(pool.root), "--sources", "b", "--data-dir", str(data_dir),
                     "--examples", str(EXAMPLES), *BACKBONE]) == 0
    out = capsys.readouterr().out
    assert f"Test split of fashion_mnist ({EXAMPLES} images)" in out
    raw = load_split("fashion_mnist", str(data_dir), "test")
    test = Shard(raw, limit_per_partition(np.arange(len(raw)), EXAMPLES, 0), backbone_transform(model.backbone))
    want = evaluate(model, [pool.get("b", model=model)], DataLoader(test, batch_size=32))
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["b", "composed", "composed"]  # one source; uniform and density rows
    assert float(rows[0][3]) == pytest.approx(want["prompt_accuracy"][0], abs=5e-4)
    assert [float(row[-1]) for row in rows[1:]] == pytest.approx(list(want["composed"].values()), abs=5e-4)
    assert rows[1][:3] == ["composed", "uniform", "(1)"] and rows[2][:3] == ["composed", "density", "(1)"]


def test_every_source_by_default(pool, data_dir, capsys):
    assert cli_main(["evaluate", "--pool", str(pool.root), "--data-dir", str(data_dir), "--examples", "8",
                     *BACKBONE]) == 0
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == ["a", "b", "composed", "composed"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--sources", "a,zz"], "['zz'] not in pool"),
    (["--sources", " , "], "none given"),
    (["--examples", "0"], "--examples must be at least 1"),
    (["--img-size", "48"], "backbone"),
    (["--dataset", "no_such_dataset"], "no_such_dataset"),
])
def test_bad_requests_exit_1_with_the_reason(extra, message, pool, data_dir, capsys):
    entries = pool.entries()
    args = ["evaluate", "--pool", str(pool.root), "--data-dir", str(data_dir), *BACKBONE, *extra]
    assert cli_main(args) == 1
    assert message in capsys.readouterr().err
    assert pool.entries() == entries


def test_prompts_of_another_label_space_are_refused(pool, model, data_dir, capsys):
    pool.add("c", Prompt.init(model, 12, seed=3, labels=range(12), source="c"))
    assert cli_main(["evaluate", "--pool", str(pool.root), "--data-dir", str(data_dir), *BACKBONE]) == 1
    assert "sources ['c'] have heads over another label space than the 10 classes" in capsys.readouterr().err


def test_a_missing_or_empty_pool_is_reported(tmp_path, data_dir, capsys):
    assert cli_main(["evaluate", "--pool", str(tmp_path / "nope"), *BACKBONE]) == 1
    assert "no prompt pool" in capsys.readouterr().err and not (tmp_path / "nope").exists()
    PromptPool(tmp_path / "empty")
    assert cli_main(["evaluate", "--pool", str(tmp_path / "empty"), "--data-dir", str(data_dir), *BACKBONE]) == 1
    assert "is empty; nothing to evaluate" in capsys.readouterr().err
