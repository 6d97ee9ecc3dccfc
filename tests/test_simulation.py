"""The README's main job, for real: `flwr run .` drives a local Flower simulation of 3 clients.

A tiny random ViT and generated images keep it to about a minute; everything else is the
product path (local SuperLink, Ray workers, ClientApp/ServerApp, durable pool).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from synthetic import make_idx_dataset

from common.cli import main as cli_main
from common.config import AppConfig, build_model
from server.pool import PromptPool

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_mentioning(text: str) -> None:
    """SIGKILL every process whose command line contains ``text`` (the detached SuperLink)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and text in cmdline and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_flwr_run_simulation_fills_the_pool(tmp_path, capsys):
    flwr_home = tmp_path / "flwr"
    data = make_idx_dataset(tmp_path / "data", n_train=150, n_test=50)
    pool_dir = tmp_path / "pool"
    run_config = {"backbone": "vit_tiny_patch16_224", "pretrained": False, "img-size": 32,
                  "data-dir": str(data), "pool-dir": str(pool_dir), "examples-per-source": 40,
                  "test-examples": 50, "local-epochs": 1, "min-steps": 2, "num-server-rounds": 2,
                  "partitioner": "classes"}
    overrides = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower()}" for k, v in run_config.items())
    env = os.environ | {
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    cmd = ["flwr", "run", str(REPO), "--stream", "--run-config", overrides,
           "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    finally:
        kill_processes_mentioning(str(flwr_home))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    row = r"\s+all\s+\d+\s+([0-9.]+)"
    table = re.search(rf"composed uniform \(3\){row}\s*\n.*composed density \(3\){row}", output)
    assert table, output[-3000:]  # both composed rows: every source shipped its density
    assert all(0.0 <= float(acc) <= 1.0 for acc in table.groups())

    model = build_model(AppConfig.from_run_config(run_config), device="cpu")
    pool = PromptPool(pool_dir)
    assert pool.sources() == ["source-0", "source-1", "source-2"]
    labels = set()
    for source in pool.sources():
        assert [e.version for e in pool.history(source)] == [1, 2]
        prompt = pool.get(source, model=model)  # validates shapes, values and backbone fingerprint
        assert prompt.config.source == source and prompt.config.num_examples > 0
        assert not labels & set(prompt.config.labels)  # class-group partition: disjoint label sets
        labels |= set(prompt.config.labels)
    assert labels == set(range(10))

    # `alacarte evaluate` on the filled pool prints the ServerApp's rows: same images, same numbers
    assert cli_main(["evaluate", "--pool", str(pool_dir), "--data-dir", str(data), "--examples", "50",
                     "--backbone", "vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--device", "cpu"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 5 and rows == _table_rows(output.split("Server test split (50 images)")[1])  # 3 + 2 composed


def _table_rows(text: str) -> list[list[str]]:
    """The rows of the first accuracy table in ``text``: the lines after its header, up to a blank line."""
    after_header = text.split("acc (own classes)\n", 1)[1]
    return [line.split() for line in after_header.split("\n\n", 1)[0].splitlines()]
