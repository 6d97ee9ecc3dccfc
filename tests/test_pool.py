"""Tests of ``server.pool`` (the prompt pool) and ``alacarte pool`` (its CLI)."""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import server.pool
from common.cli import main as cli_main
from common.model import APTViT, load_backbone
from common.prompt import BackboneMismatchError, Prompt, PromptConfig, PromptError
from server.pool import (
    InvalidMetricsError,
    InvalidPromptMetadataError,
    InvalidSourceError,
    PoolCorruptError,
    PoolNotFoundError,
    PromptPool,
    ReadOnlyPoolError,
    SourceMismatchError,
    StaleParentError,
    StaleVersionError,
    UnknownSourceError,
)

NUM_CLASSES = 10
FORK = multiprocessing.get_context("fork")  # children share the parent's imports and prompts: fast start


@pytest.fixture(scope="module")
def model() -> APTViT:
    return APTViT(load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32, device="cpu"))


@pytest.fixture(scope="module")
def bank(model: APTViT) -> dict[str, list[Prompt]]:
    """Three distinct prompts per source; version ``v`` of a source stores ``bank[source][(v - 1) % 3]``."""
    out = {}
    for s, source in enumerate(("a", "b", "c")):
        out[source] = []
        for i in range(3):
            prompt = Prompt.init(model, NUM_CLASSES, seed=10 * s + i, labels=range(3 * s, 3 * s + 3))
            prompt.config = replace(prompt.config, num_examples=100 * s + i)
            out[source].append(prompt)
    return out


@pytest.fixture()
def pool(tmp_path: Path) -> PromptPool:
    return PromptPool(tmp_path / "pool")


def assert_same(got: Prompt, want: Prompt, source: str) -> None:
    """Bitwise-equal tensors and equal metadata (the stored source id is ``source``)."""
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for name in want_state:
        assert torch.equal(got_state[name].cpu(), want_state[name].cpu()), name
    assert got.config.to_metadata() == want.config.to_metadata() | {"source": source}


def pool_files(root: Path) -> set[Path]:
    return {p for p in (root / "prompts").rglob("*") if p.is_file()}


def stored_versions(pool: PromptPool) -> int:
    return sum(len(pool.history(source)) for source in pool.sources())


def latest_version(pool: PromptPool, source: str) -> int:
    return {e.source: e.version for e in pool.entries()}.get(source, 0)


# ---------------------------------------------------------------- basic API


def test_add_get_round_trip_is_bitwise(pool: PromptPool, bank, model: APTViT) -> None:
    want = bank["a"][0]
    assert pool.add("a", want) == 1
    assert_same(pool.get("a"), want, "a")
    assert_same(pool.get("a", 1, model=model), want, "a")
    assert want.config.source == "", "add must not modify the caller's prompt"
    assert pool.get("a").config.source == "a"


def test_versions_history_info_and_latest(pool: PromptPool, bank) -> None:
    for i, prompt in enumerate(bank["a"]):
        assert pool.add("a", prompt, {"acc": 0.5 + i / 10, "loss": np.float32(1.5), "n": np.int64(7), "tag": "x"},
                        round=i + 1) == i + 1
    pool.add("b", bank["b"][0])

    history = pool.history("a")
    assert [e.version for e in history] == [1, 2, 3]
    assert [e.round for e in history] == [1, 2, 3]
    assert history[1].metrics == {"acc": 0.6, "loss": 1.5, "n": 7, "tag": "x"}
    assert [e.num_examples for e in history] == [p.config.num_examples for p in bank["a"]]
    assert all(e.labels == (0, 1, 2) and e.num_classes == NUM_CLASSES for e in history)
    assert all(e.path == pool.root / "prompts" / "a" / f"v{e.version}.safetensors" and e.path.is_file()
               for e in history)
    assert pool.info("a") == history[-1] and pool.info("a", 1) == history[0]
    assert pool.info("b").round is None and pool.info("b").metrics == {}

    assert pool.sources() == ["a", "b"]
    assert [(e.source, e.version) for e in pool.entries()] == [("a", 3), ("b", 1)]
    latest = pool.latest()
    assert sorted(latest) == ["a", "b"]
    assert_same(latest["a"], bank["a"][2], "a")
    assert_same(latest["b"], bank["b"][0], "b")
    assert_same(pool.get("a", 2), bank["a"][1], "a")


def test_remove_deletes_files_and_forgets(pool: PromptPool, bank) -> None:
    for prompt in bank["a"]:
        pool.add("a", prompt)
    pool.add("b", bank["b"][0])
    paths = [e.path for e in pool.history("a")]
    other = PromptPool(pool.root)  # another handle (own connections) sees the removal
    generation = other.generation()

    assert pool.remove("a") == 3
    assert not any(p.exists() for p in paths)
    assert not (pool.root / "prompts" / "a").exists()
    assert other.generation() > generation
    assert other.sources() == ["b"]
    with pytest.raises(UnknownSourceError, match="known sources: b"):
        other.get("a")
    with pytest.raises(UnknownSourceError):
        pool.remove("a")
    assert set(pool.latest()) == {"b"}
    assert pool.add("a", bank["a"][1]) == 1, "a forgotten source starts again at version 1"


def test_unknown_source_and_version(pool: PromptPool, bank) -> None:
    pool.add("a", bank["a"][0])
    pool.add("b", bank["b"][0])
    with pytest.raises(UnknownSourceError, match=r"unknown source 'zz'.*known sources: a, b") as info:
        pool.get("zz")
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownSourceError, match=r"source 'a' has no version 7.*versions 1\.\.1"):
        pool.get("a", 7)
    for call in (pool.info, pool.history, pool.remove):
        with pytest.raises(UnknownSourceError):
            call("zz")


@pytest.mark.parametrize("source", ["", ".", "..", ".hidden", "a/b", "../a", "a\\b", "a b", "é", "x" * 129, None])
def test_invalid_source_ids(pool: PromptPool, bank, source) -> None:
    with pytest.raises(InvalidSourceError, match="invalid source id") as info:
        pool.add(source, bank["a"][0])
    assert isinstance(info.value, ValueError)
    assert pool.sources() == [] and pool_files(pool.root) == set()


@pytest.mark.parametrize("source", ["client-3", "A_b.c", "0", "x" * 128])
def test_valid_source_ids(pool: PromptPool, bank, source: str) -> None:
    assert pool.add(source, bank["a"][0]) == 1
    assert pool.get(source).config.source == source


def test_prompt_source_must_match(pool: PromptPool, model: APTViT) -> None:
    prompt = Prompt.init(model, NUM_CLASSES, source="b")
    with pytest.raises(SourceMismatchError, match="belongs to source 'b'"):
        pool.add("a", prompt)
    assert pool.add("b", prompt) == 1


def test_invalid_metrics_are_rejected(pool: PromptPool, bank) -> None:
    for metrics in ({"loss": float("nan")}, {"acc": [0.5]}, {3: 1.0}):
        with pytest.raises(InvalidMetricsError):
            pool.add("a", bank["a"][0], metrics)
    assert pool.sources() == []


def test_backbone_is_checked_on_get(pool: PromptPool, model: APTViT) -> None:
    foreign = Prompt(PromptConfig(embed_dim=model.embed_dim, depth=model.depth, num_classes=NUM_CLASSES,
                                  backbone="other", fingerprint="0" * 64))
    pool.add("a", foreign)
    pool.get("a")  # without a model only the file itself is validated
    with pytest.raises(BackboneMismatchError):
        pool.get("a", model=model)


def test_stale_version_guard(pool: PromptPool, bank) -> None:
    a0, a1 = bank["a"][:2]
    assert pool.add("a", a0, parent_version=0) == 1
    with pytest.raises(StaleVersionError, match="trained from version 0 but its latest version is 1") as info:
        pool.add("a", a1, parent_version=0)  # duplicate of the reply just stored
    assert (info.value.parent_version, info.value.latest_version) == (0, 1)
    assert pool.add("a", a1, parent_version=1) == 2
    for stale in (1, 0, 5):
        with pytest.raises(StaleVersionError):
            pool.add("a", a0, parent_version=stale)
    assert_same(pool.get("a"), a1, "a")
    assert [e.version for e in pool.history("a")] == [1, 2]

    pool.remove("a")
    with pytest.raises(StaleVersionError, match="no version"):
        pool.add("a", a1, parent_version=2)  # a late reply must not resurrect a forgotten source
    assert pool.sources() == []


def test_concurrent_threads(pool: PromptPool, bank) -> None:
    """Many threads add at once: versions stay contiguous; of racing guarded adds exactly one wins."""
    def add(i: int) -> int:
        return pool.add("abc"[i % 3], bank["abc"[i % 3]][i % 3], {"i": i})

    with ThreadPoolExecutor(6) as ex:
        list(ex.map(add, range(24)))
    assert all([e.version for e in pool.history(s)] == list(range(1, 9)) for s in "abc")

    def guarded(_: int) -> bool:
        try:
            pool.add("d", bank["a"][0], parent_version=0)
            return True
        except StaleVersionError:
            return False

    with ThreadPoolExecutor(6) as ex:
        assert sum(ex.map(guarded, range(6))) == 1
    assert [e.version for e in pool.history("d")] == [1]


def test_generation_counts_changes(pool: PromptPool, bank) -> None:
    g0 = pool.generation()
    pool.add("a", bank["a"][0])
    g1 = pool.generation()
    pool.sources(), pool.entries(), pool.get("a"), pool.history("a")
    assert pool.generation() == g1 > g0
    pool.remove("a")
    assert pool.generation() > g1


def test_repair_cleans_orphans_and_dangling_rows(pool: PromptPool, bank) -> None:
    pool.add("a", bank["a"][0])
    pool.add("b", bank["b"][0])
    orphans = [pool.root / "prompts" / "a" / "v2.safetensors", pool.root / "prompts" / "a" / ".v3.safetensors.x.tmp",
               pool.root / "prompts" / "gone" / "v1.safetensors"]
    for path in orphans:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    pool.info("b").path.unlink()  # a file deleted behind the pool's back

    generation = pool.generation()
    report = pool.repair()
    assert set(report.orphans) == set(orphans)
    assert report.dangling == (("b", 1),)
    assert pool.generation() > generation
    assert not any(p.exists() for p in orphans) and not (pool.root / "prompts" / "gone").exists()
    assert pool.sources() == ["a"]
    assert pool_files(pool.root) == {pool.info("a").path}
    assert not PromptPool(pool.root).repair()


def test_opening_never_repairs_open_and_repair_does(pool: PromptPool, bank) -> None:
    pool.add("a", bank["a"][0])
    orphan = pool.root / "prompts" / "a" / "v2.safetensors"
    orphan.write_bytes(b"partial")
    PromptPool(pool.root)
    PromptPool(pool.root, read_only=True)
    assert orphan.exists()
    PromptPool.open_and_repair(pool.root)  # what the ServerApp does on start
    assert not orphan.exists()


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` (but SQLite's -wal/-shm side files) with its bytes and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def test_read_only_use_never_changes_the_pool(pool: PromptPool, bank, tmp_path: Path, capsys) -> None:
    """The issue's reproduction: prompts/ moved away, `pool ls`, moved back: nothing may be lost."""
    pool.add("a", bank["a"][0])
    pool.add("b", bank["b"][0])
    (pool.root / "prompts" / "a" / "v9.safetensors").write_bytes(b"orphan of an interrupted write")
    moved = tmp_path / "moved"
    (pool.root / "prompts").rename(moved)
    before = snapshot(pool.root)
    assert cli_main(["pool", "--pool", str(pool.root), "ls"]) == 0
    assert cli_main(["pool", "--pool", str(pool.root), "show", "a"]) == 0
    reader = PromptPool(pool.root, read_only=True)
    assert reader.sources() == ["a", "b"] and reader.generation() == pool.generation()
    with pytest.raises(ReadOnlyPoolError):
        reader.repair()
    with pytest.raises(ReadOnlyPoolError):
        reader.add("c", bank["c"][0])
    with pytest.raises(ReadOnlyPoolError):
        reader.remove("a")
    assert snapshot(pool.root) == before
    moved.rename(pool.root / "prompts")
    capsys.readouterr()
    assert cli_main(["pool", "--pool", str(pool.root), "ls"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # header, a, b: nothing was deleted
    assert (pool.root / "prompts" / "a" / "v9.safetensors").exists()
    assert cli_main(["pool", "--pool", str(pool.root), "repair"]) == 0  # the explicit writer action
    assert "deleted 1 orphan file(s)" in capsys.readouterr().out
    assert not (pool.root / "prompts" / "a" / "v9.safetensors").exists()


def test_read_only_pool_opens_with_sqlite_read_only_uri(pool: PromptPool, bank, monkeypatch) -> None:
    pool.add("a", bank["a"][0])
    opened = []
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: opened.append((a, k)) or connect(*a, **k))
    reader = PromptPool(pool.root, read_only=True)
    assert_same(reader.get("a"), bank["a"][0], "a")
    assert opened and all(a[0].startswith("file:") and "mode=ro" in a[0] and k.get("uri") for a, k in opened)


def test_a_chmod_read_only_pool_is_readable(pool: PromptPool, bank) -> None:
    """As root permissions are not enforced; otherwise this checks the immutable fallback."""
    pool.add("a", bank["a"][0])
    before = snapshot(pool.root)
    modes = {p: p.stat().st_mode for p in [pool.root, *pool.root.rglob("*")]}
    try:
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        assert PromptPool(pool.root, read_only=True).sources() == ["a"]
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert snapshot(pool.root) == before


def test_staleness_is_decided_by_the_parent_hash(pool: PromptPool, bank) -> None:
    pool.add("a", bank["a"][0], parent_sha256="")
    first = pool.info("a").sha256
    with pytest.raises(StaleParentError):
        pool.add("a", bank["a"][1], parent_sha256="")  # a duplicate reply for "no prompt yet"
    pool.remove("a")
    pool.add("a", bank["a"][2])  # re-added: version 1 again, another prompt
    assert pool.info("a").version == 1
    with pytest.raises(StaleParentError, match="latest is v1"):
        pool.add("a", bank["a"][1], parent_sha256=first)  # trained from the forgotten v1
    assert pool.add("a", bank["a"][1], parent_sha256=pool.info("a").sha256) == 2


@pytest.mark.parametrize("created_at", [math.inf, -math.inf, math.nan, 1e12, -1.0])
def test_implausible_created_at_is_never_stored(pool: PromptPool, bank, created_at: float) -> None:
    prompt = bank["a"][0]
    odd = Prompt.from_bytes(prompt.to_bytes())
    odd.config = replace(odd.config, created_at=created_at)
    with pytest.raises((InvalidPromptMetadataError, PromptError), match="created_at"):
        pool.add("a", odd)
    assert pool.sources() == []


@pytest.mark.parametrize("created_at", ["1e12", "'Inf'", "-1e300"])
def test_listing_survives_odd_values_already_stored(pool: PromptPool, bank, capsys, created_at: str) -> None:
    pool.add("a", bank["a"][0])
    with sqlite3.connect(pool.index_path) as conn:  # written by an older build, or by hand
        conn.execute(f"UPDATE prompts SET created_at = {created_at}, added_at = {created_at}")
    assert cli_main(["pool", "--pool", str(pool.root), "ls"]) == 0
    assert cli_main(["pool", "--pool", str(pool.root), "show", "a"]) == 0
    assert "invalid (" in capsys.readouterr().out


def test_corrupt_file_is_reported(pool: PromptPool, bank) -> None:
    pool.add("a", bank["a"][0])
    path = pool.info("a").path
    path.write_bytes(bank["a"][1].to_bytes())  # valid prompt, but not the one indexed
    with pytest.raises(PoolCorruptError, match="alacarte pool rm a"):
        pool.get("a")


def test_open_without_create(tmp_path: Path) -> None:
    with pytest.raises(PoolNotFoundError, match="no prompt pool"):
        PromptPool(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    PromptPool(tmp_path / "p")
    PromptPool(tmp_path / "p", create=False)
    assert (tmp_path / "p" / "pool.sqlite").is_file()


# ---------------------------------------------------------------- processes


def _write_versions(root: Path, bank: dict[str, list[Prompt]], per_source: int, forget: str) -> None:
    """Child: add ``per_source`` versions to every source of ``bank``, then forget ``forget``."""
    torch.set_num_threads(1)  # no OpenMP in a forked child
    pool = PromptPool(root)
    for v in range(per_source):
        for source, prompts in bank.items():
            pool.add(source, prompts[v % len(prompts)], {"step": v}, parent_version=v)
    pool.remove(forget)


@pytest.mark.slow
def test_other_process_reads_consistent_pool_while_one_writes(tmp_path: Path, bank, model: APTViT) -> None:
    root, per_source = tmp_path / "pool", 15
    reader = PromptPool(root)
    writer = FORK.Process(target=_write_versions, args=(root, bank, per_source, "b"))
    writer.start()
    seen: dict[str, int] = {}
    generations = set()
    while True:
        done = not writer.is_alive()  # read once more after the writer has finished
        generations.add(reader.generation())
        for entry in reader.entries():
            assert entry.version >= seen.get(entry.source, 0), "versions never go back"
            seen[entry.source] = entry.version
            try:
                assert [e.version for e in reader.history(entry.source)][:entry.version] == \
                    list(range(1, entry.version + 1))
                got = reader.get(entry.source, entry.version, model=model)
            except UnknownSourceError:
                assert entry.source == "b", "only the forgotten source may vanish"
                continue
            assert_same(got, bank[entry.source][(entry.version - 1) % 3], entry.source)
        if done:
            break
    writer.join()
    assert writer.exitcode == 0
    assert len(generations) > 2, "the reader should have seen intermediate states"
    assert reader.sources() == ["a", "c"]
    assert all(latest_version(reader, s) == per_source for s in ("a", "c"))
    assert not (root / "prompts" / "b").exists()


def _add_forever(root: Path, bank: dict[str, list[Prompt]]) -> None:
    """Child: add versions round-robin until killed."""
    torch.set_num_threads(1)
    pool = PromptPool(root)
    while True:
        for source, prompts in bank.items():
            v = latest_version(pool, source)
            pool.add(source, prompts[v % len(prompts)], {"step": v}, parent_version=v)


def _wait_for_generation(pool: PromptPool, above: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while pool.generation() <= above:
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.005)


def assert_consistent(pool: PromptPool, bank: dict[str, list[Prompt]], model: APTViT) -> int:
    """Contiguous versions, every row's file loads and is the expected prompt, no stray files."""
    total = 0
    for source in pool.sources():
        history = pool.history(source)
        assert [e.version for e in history] == list(range(1, len(history) + 1))
        for e in history:
            assert_same(pool.get(source, e.version, model=model), bank[source][(e.version - 1) % 3], source)
            assert e.metrics == {"step": e.version - 1}
        total += len(history)
    indexed = {e.path for s in pool.sources() for e in pool.history(s)}
    assert pool_files(pool.root) == indexed, "orphans or temporary files were left behind"
    return total


def _index_and_files(root: Path) -> tuple[set[str], set[str]]:
    """Indexed paths and files on disk, read without opening (and so repairing) the pool."""
    conn = sqlite3.connect(root / "pool.sqlite")
    try:
        indexed = {rel for (rel,) in conn.execute("SELECT path FROM prompts")}
    finally:
        conn.close()
    return indexed, {p.relative_to(root).as_posix() for p in pool_files(root)}


@pytest.mark.slow
def test_sigkill_mid_write_leaves_a_consistent_pool(tmp_path: Path, bank, model: APTViT) -> None:
    """Kill a writer at random moments until several kills hit a write (about 40% do)."""
    root, rng = tmp_path / "pool", random.Random(0)
    watcher = PromptPool(root)
    kills = mid_write = 0
    while kills < 6 or (mid_write < 3 and kills < 40):
        child = FORK.Process(target=_add_forever, args=(root, bank))
        child.start()
        _wait_for_generation(watcher, watcher.generation() + 2)
        time.sleep(rng.uniform(0.0, 0.05))
        child.kill()  # SIGKILL: no cleanup, no exception handlers
        child.join()
        assert child.exitcode == -signal.SIGKILL
        kills += 1
        indexed, files = _index_and_files(root)
        assert indexed <= files, "an index row points at a missing file"
        mid_write += bool(files - indexed)  # a temporary or orphan file: killed mid-write
    assert mid_write >= 1
    assert assert_consistent(PromptPool.open_and_repair(root), bank, model) >= 2 * kills


def _die_after_file_write(root: Path, prompt: Prompt) -> None:
    """Child: crash right after the prompt file is durable, before the index row commits."""
    torch.set_num_threads(1)
    pool = PromptPool(root)
    real_write = server.pool.atomic_write

    def write_then_die(path: Path, data: bytes) -> Path:
        real_write(path, data)
        os._exit(17)

    server.pool.atomic_write = write_then_die
    pool.add("a", prompt)


@pytest.mark.slow
def test_crash_between_file_and_index_leaves_an_ignored_orphan(tmp_path: Path, bank, model: APTViT) -> None:
    root = tmp_path / "pool"
    PromptPool(root).add("a", bank["a"][0], {"step": 0})
    child = FORK.Process(target=_die_after_file_write, args=(root, bank["a"][1]))
    child.start()
    child.join()
    assert child.exitcode == 17
    orphan = root / "prompts" / "a" / "v2.safetensors"
    assert orphan.is_file(), "the crash left the written file behind"

    pool = PromptPool.open_and_repair(root)  # as the ServerApp on start
    assert not orphan.exists(), "repair deletes orphans"
    assert [e.version for e in pool.history("a")] == [1]
    assert pool.add("a", bank["a"][1], {"step": 1}) == 2
    assert assert_consistent(pool, bank, model) == 2


# ---------------------------------------------------------------- CLI


def test_cli_ls_show_rm(pool: PromptPool, bank, capsys, monkeypatch) -> None:
    pool.add("a", bank["a"][0], {"acc": 0.25}, round=1)
    pool.add("a", bank["a"][1], {"acc": 0.5}, round=2)
    pool.add("b", bank["b"][0])

    assert cli_main(["pool", "--pool", str(pool.root), "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SOURCE", "VERSION", "LABELS", "EXAMPLES", "CREATED"]
    assert lines[1].split()[:5] == ["a", "2", "0-2", "(3/10)", "1"]
    assert lines[2].split()[:5] == ["b", "1", "3-5", "(3/10)", "100"]

    monkeypatch.setenv("ALACARTE_POOL", str(pool.root))
    assert cli_main(["pool", "show", "a", "--version", "1"]) == 0
    out = capsys.readouterr().out
    assert "version:      1 (latest 2)" in out and "round:        1" in out and "acc=0.25" in out
    assert pool.info("a").fingerprint in out
    history = out.split("history:")[1].splitlines()
    assert [line.split()[0] for line in history[2:]] == ["1", "2"]

    assert cli_main(["pool", "rm", "a"]) == 0
    assert "2 version(s) deleted" in capsys.readouterr().out
    assert pool.sources() == ["b"]

    assert cli_main(["pool", "show", "a"]) == 1
    assert "unknown source 'a'" in capsys.readouterr().err


def test_cli_needs_an_existing_pool(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("ALACARTE_POOL", raising=False)
    monkeypatch.setenv("ALACARTE_HOME", str(tmp_path / "home"))
    assert cli_main(["pool", "ls"]) == 1
    assert f"no prompt pool at {tmp_path / 'home' / 'pool'}" in capsys.readouterr().err
    PromptPool(tmp_path / "home" / "pool")  # $ALACARTE_HOME/pool, as `alacarte serve` finds it
    assert cli_main(["pool", "ls"]) == 0
    assert "is empty" in capsys.readouterr().out
    assert cli_main(["pool", "ls", "--pool", str(tmp_path / "nope")]) == 1
    assert "no prompt pool" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
    PromptPool(tmp_path / "empty")
    assert cli_main(["pool", "ls", "--pool", str(tmp_path / "empty")]) == 0
    assert "is empty" in capsys.readouterr().out


def test_cli_reports_an_unreadable_index(tmp_path: Path, capsys) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "pool.sqlite").write_bytes(b"not a database" * 100)
    assert cli_main(["pool", "--pool", str(tmp_path / "pool"), "ls"]) == 1
    assert "is unreadable" in capsys.readouterr().err


# ---------------------------------------------------------------- export / import between pools


def test_cli_export_then_import_moves_a_prompt_with_its_density_bit_for_bit(pool, bank, model, tmp_path, capsys):
    from common.density import SourceDensity

    prompt = bank["a"][1]
    prompt.density = SourceDensity.fit(torch.randn(40, model.backbone.embed_dim), torch.arange(40) % 3)
    pool.add("a", bank["a"][0])
    pool.add("a", prompt, round=2)
    prompt.density = None
    out = tmp_path / "a.safetensors"
    assert cli_main(["pool", "--pool", str(pool.root), "export", "a", "--out", str(out)]) == 0
    assert "exported source 'a' version 2" in capsys.readouterr().out
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pool.info("a").sha256  # the stored artefact itself

    other = PromptPool(tmp_path / "other")
    other.add("a", bank["a"][2])
    assert cli_main(["pool", "--pool", str(other.root), "import", str(out)]) == 0
    assert f"as source 'a' version 2 into {other.root}" in capsys.readouterr().out
    imported, stored = other.get("a"), pool.get("a")
    assert_same(imported, stored, "a")
    assert imported.density is not None and imported.arrays().keys() == stored.arrays().keys()
    assert all(np.array_equal(imported.arrays()[k], v) for k, v in stored.arrays().items())
    assert other.info("a").metrics == {"imported-sha256": pool.info("a").sha256}
    assert other.read_bytes("a") == pool.read_bytes("a")  # stored bytes are a function of the prompt alone

    before = out.read_bytes()
    assert cli_main(["pool", "--pool", str(pool.root), "export", "a", "--version", "1", "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert cli_main(["pool", "--pool", str(pool.root), "export", "a", "--version", "1", "--out", str(out),
                     "--force"]) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pool.info("a", 1).sha256


def _bad_files(data: bytes) -> dict[str, tuple[bytes, list[str], str]]:
    """Files ``import`` must refuse: content, extra arguments, words of the message."""
    return {
        "garbage": (b"\x00\xffnot safetensors" * 10, [], "truncated"),
        "truncated": (data[: len(data) // 2], [], "corrupt"),
        "empty": (b"", [], "truncated"),
        "oversized": (data, ["--max-bytes", str(len(data) - 1)], "larger than"),
        "non-positive bound": (data, ["--max-bytes", "0"], "must be positive"),
        "another source's": (data, ["--source", "b"], "belongs to source 'a'"),
    }


@pytest.mark.parametrize("case", list(_bad_files(b"x")))
def test_cli_import_rejects_a_bad_file_and_leaves_the_pool_unchanged(case, pool, bank, tmp_path, capsys):
    pool.add("a", bank["a"][0])
    content, extra, message = _bad_files(pool.read_bytes("a"))[case]
    path = tmp_path / "prompt.safetensors"
    path.write_bytes(content)
    files, entries = pool_files(pool.root), pool.entries()
    assert cli_main(["pool", "--pool", str(pool.root), "import", str(path), *extra]) == 1
    assert message in capsys.readouterr().err
    assert pool_files(pool.root) == files and pool.entries() == entries


def test_cli_import_names_a_sourceless_prompt_only_with_source(pool, bank, tmp_path, capsys):
    path = bank["c"][0].save(tmp_path / "unnamed.safetensors")  # Prompt.init names no source
    assert bank["c"][0].config.source == ""
    assert cli_main(["pool", "--pool", str(pool.root), "import", str(path)]) == 1
    assert "names no source; pass --source" in capsys.readouterr().err and pool.sources() == []
    assert cli_main(["pool", "--pool", str(pool.root), "import", str(path), "--source", "c"]) == 0
    assert_same(pool.get("c"), bank["c"][0], "c")


def test_cli_stops_quietly_when_its_reader_leaves(pool, bank):
    """``alacarte pool ls | head``: the reader is gone before the output; exit 141 (SIGPIPE's
    code), no traceback and no error message."""
    pool.add("a", bank["a"][0])
    proc = subprocess.Popen([sys.executable, "-m", "common.cli", "pool", "--pool", str(pool.root), "ls"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the child has imported anything, let alone printed
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b""


def test_cli_import_of_corrupted_files_never_raises_and_stores_only_valid_prompts(pool, bank, tmp_path, capsys):
    """Seeded single-byte corruptions of an exported prompt (half in the JSON header): each is
    refused (exit 1, the pool unchanged) or stored as a prompt that loads; nothing raises."""
    pool.add("a", bank["a"][0])
    data = pool.read_bytes("a")
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    path = tmp_path / "corrupt.safetensors"
    codes = set()
    for i in range(60):
        corrupt = bytearray(data)
        corrupt[rng.randrange(header_end) if i % 2 else rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(corrupt))
        before = stored_versions(pool)
        code = cli_main(["pool", "--pool", str(pool.root), "import", str(path)])
        capsys.readouterr()
        codes.add(code)
        assert stored_versions(pool) == before + (code == 0) and code in (0, 1)
        assert len(pool.latest()) == len(pool.sources())  # what was stored validates (a header byte may rename it)
    assert codes == {0, 1}  # both outcomes occurred: the corruptions are not all caught by one check


@pytest.mark.parametrize(("action", "says"), [
    ("ls", "list sources"), ("show", "metadata and history"), ("rm", "forget a source"),
    ("repair", "orphan files"), ("export", "copy a source's stored prompt"), ("import", "next version"),
])
def test_every_pool_action_explains_itself_in_its_help(action, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pool", action, "--help"])
    assert exit_info.value.code == 0
    usage, description = capsys.readouterr().out.split("\n\n")[:2]
    assert usage.startswith(f"usage: alacarte pool {action}") and says in description
