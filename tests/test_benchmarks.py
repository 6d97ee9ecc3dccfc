"""The benchmark scripts run end to end (tiny settings) and write complete tables.

Speed is not asserted here (benchmarks print ratios measured in one run; see README): these
tests keep the scripts from rotting, and check what must hold at any speed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def table(path: Path) -> dict[str, list[str]]:
    """The markdown table rows of ``path``, keyed by their first cell."""
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_core_benchmark_writes_every_comparison(tmp_path):
    out = tmp_path / "core.md"
    run_script("bench_core.py", "--quick", "--reps", "1", "--img-size", "64", "--batch", "2", "--k", "2",
               "--cache-images", "4", "--threads", "1", "--out", str(out), cwd=tmp_path)
    rows = {name: cells for name, cells in table(out).items() if name != "measurement"}
    assert len(rows) == 5 and any(name.startswith("APT forward, k=2 vs k=1") for name in rows)
    for cells in rows.values():
        ratio = float(re.fullmatch(r"\*\*([0-9.]+)x\*\*", cells[6]).group(1))
        assert ratio > 0 and cells[8] in ("PASS", "FAIL", "info")


def test_service_benchmark_serves_every_request(tmp_path):
    out = tmp_path / "service.md"
    run_script("bench_service.py", "--quick", "--clients", "2", "--sources", "2", "--images-per-request", "2",
               "--max-batch", "4", "--threads", "1", "--out", str(out), cwd=tmp_path)
    rows = table(out)
    assert rows["errors"] == ["0"]
    assert rows["prompt shape"] == ["4 tokens, 4 memory tokens per layer"]  # the Flower app's default
    assert float(rows["requests/s"][0]) > 0
    assert 1.0 <= float(rows["mean server batch"][0].split()[0]) <= 4.0
