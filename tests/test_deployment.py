"""Flower's deployment engine for real: a SuperLink and SuperNodes as separate processes.

Fast tests drive the server's round loop (``server.federation``) in-process with a fake
Grid and the real ClientApp handlers: nodes that fail, time out, leave, join late or send
stale replies. Slow tests start ``deploy/superlink.sh`` and ``deploy/supernode.sh`` on
127.0.0.1 (free ports, temporary FLWR_HOMEs, each SuperNode with its own data folder and
source name) and submit ``flwr run . CONNECTION`` through a ``deploy/connect.sh`` entry:
3 nodes fill the pool; a node killed mid-round does not stop the run; TLS with
certificates from ``deploy/certs.sh`` and SuperNode authentication with
``deploy/keys.sh`` keys. Every process started is stopped by process group at teardown,
and every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from synthetic import IDX_FILES, separable_images

from client.client_app import identify, train
from common.assets import write_idx_gz
from common.config import AppConfig, build_model
from common.model import APTViT
from common.prompt import Prompt
from common.records import prompt_from_records, prompt_records
from server.federation import AlaCarteFederation
from server.pool import PromptPool, StaleParentError

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
SOURCES = {"src-a": (0, 1, 2), "src-b": (3, 4, 5, 6), "src-c": (7, 8, 9)}
PER_CLASS = 12
BASE_CONFIG = {"backbone": "vit_tiny_patch16_224", "pretrained": False, "img-size": 32, "local-epochs": 1,
               "min-steps": 2, "batch-size": 16, "examples-per-source": 200, "kv-cache": False, "test-examples": 0,
               "federated-eval": False}
START_TIMEOUT_S = 90.0  # a process is up (port open / SuperNode connected)
RUN_TIMEOUT_S = 420.0  # one `flwr run` on a busy 2-core machine
STOP_GRACE_S = 3.0

pytestmark = pytest.mark.usefixtures("task_identity")


# ---------------------------------------------------------------------------- data


def write_node_data(root: Path, classes: Sequence[int], seed: int) -> Path:
    """A node's private folder: IDX *train* files holding only ``classes`` (no test split)."""
    images, labels = separable_images(PER_CLASS * 10, seed=seed)
    keep = np.isin(labels, classes)
    write_idx_gz(images[keep], root / IDX_FILES["train"][0])
    write_idx_gz(labels[keep], root / IDX_FILES["train"][1])
    return root


def write_server_data(root: Path) -> Path:
    """The server's folder: IDX *test* files only, so a client reading it would fail."""
    images, labels = separable_images(40, seed=99)
    write_idx_gz(images, root / IDX_FILES["test"][0])
    write_idx_gz(labels, root / IDX_FILES["test"][1])
    return root


def run_config_arg(config: dict) -> str:
    """``--run-config`` text: strings quoted, booleans lower-case."""
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower()}" for k, v in config.items())


# ---------------------------------------------------------------------- fast: fake Grid


Handler = Callable[[Message], "Message | None"]


class FakeGrid:
    """A Grid stand-in: each connected node id has a handler returning its reply (None = silent)."""

    def __init__(self, nodes: dict[int, Handler]) -> None:
        self.nodes = nodes
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Sequence[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as a real Grid does when pushing
            self.sent.append(msg)
            handler = self.nodes.get(msg.metadata.dst_node_id)
            reply = handler(msg) if handler else superlink_error(msg)
            if reply is not None:
                replies.append(reply)
        return replies


def superlink_error(msg: Message) -> Message:
    """The error reply the SuperLink makes for an unreachable node: sent *by the SuperLink* (id 1)."""
    metadata = Metadata(run_id=msg.metadata.run_id, message_id="", src_node_id=1, dst_node_id=1,
                        reply_to_message_id=msg.metadata.message_id, group_id=msg.metadata.group_id,
                        created_at=time.time(), ttl=60.0, message_type=msg.metadata.message_type)
    return Message(metadata=metadata, error=Error(code=5, reason="node unavailable"))


def client(run_config: dict, source: str, data_dir: Path, model: APTViT | None = None) -> Handler:
    """A deployed node: the real ClientApp handlers with node config ``source`` + ``data-dir``.

    With ``model``, training is stubbed (a reply of the exact shape the ClientApp sends, from
    the prompt it was sent or a fresh one) to keep round-logic tests fast.
    """
    context = Context(run_id=1, node_id=0, node_config={"source": source, "data-dir": str(data_dir)},
                      state=RecordDict(), run_config=run_config)
    handlers = {MessageType.QUERY: identify, MessageType.TRAIN: train}
    if model is not None:
        handlers[MessageType.TRAIN] = lambda msg, _: stub_train(msg, model, source)
    return lambda msg: handlers[msg.metadata.message_type](msg, context)


def stub_train(msg: Message, model: APTViT, source: str) -> Message:
    """Reply like ``client_app.train`` without training: the sent prompt (or a fresh one)."""
    if "prompt" in msg.content:
        prompt = prompt_from_records(msg.content, model)
    else:
        prompt = Prompt.init(model, 10, labels=list(SOURCES.get(source, range(10))), source=source)
    metrics = MetricRecord({"num-examples": 30, "train-loss": 1.0, "train-accuracy": 0.5, "seconds": 0.1,
                            "parent-version": int(msg.content["config"]["parent-version"])})
    parent = ConfigRecord({"sha256": str(msg.content["config"].get("parent-sha256", ""))})
    return Message(RecordDict({**prompt_records(prompt), "metrics": metrics, "parent": parent}), reply_to=msg)


def silent_in_training(handler: Handler) -> Handler:
    """A node that identifies itself, then dies (or times out) during training."""
    return lambda msg: None if msg.metadata.message_type == MessageType.TRAIN else handler(msg)


@pytest.fixture(scope="module")
def node_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nodes")
    return {src: write_node_data(root / src, classes, seed=i) for i, (src, classes) in enumerate(SOURCES.items())}


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> dict:
    """Fast-test run config; its data-dir does not exist, so only node data-dirs can be read."""
    return BASE_CONFIG | {"data-dir": str(tmp_path_factory.mktemp("x") / "missing"), "batch-size": 32}


def nodes_of(run_config: dict, node_dirs: dict[str, Path], model: APTViT) -> dict[int, Handler]:
    """Nodes 10, 11, 12 = src-a, src-b, src-c (stubbed training)."""
    return {10 + i: client(run_config, src, node_dirs[src], model) for i, src in enumerate(SOURCES)}


def test_node_reads_only_its_own_data_dir(run_config, node_dirs):
    for src, classes in SOURCES.items():
        msg = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
        msg.metadata.__dict__["_message_id"] = "q"
        node = client(run_config, src, node_dirs[src])(msg).content["node"]
        assert node["source"] == src and node["labels"] == str(list(classes))


def test_round_survives_dead_and_unreachable_nodes(run_config, node_dirs, app_config, app_model, tmp_path, flwr_log):
    pool = PromptPool(tmp_path / "pool")
    nodes = nodes_of(run_config, node_dirs, app_model)
    grid = FakeGrid(nodes)
    first = AlaCarteFederation(pool, app_model, app_config).train_round(grid, dict(zip(nodes, SOURCES)), server_round=1)
    assert first.stored == {"src-a": 1, "src-b": 1, "src-c": 1} and not first.rejected

    grid.nodes = {10: nodes[10], 11: silent_in_training(nodes[11])}  # node 12 gone: the SuperLink answers
    federation = AlaCarteFederation(pool, app_model, app_config)
    second = federation.train_round(grid, dict(zip(nodes, SOURCES)), server_round=2)
    assert second.stored == {"src-a": 2}
    assert "no reply within reply-timeout" in second.rejected[11]
    assert "node unavailable" in second.rejected[12]  # matched to node 12 although the SuperLink sent it
    assert [e.version for e in pool.history("src-b")] == [1] and [e.version for e in pool.history("src-c")] == [1]
    assert "source src-b keeps v1" in flwr_log.text() and "source src-c keeps v1" in flwr_log.text()


def test_late_joiner_is_trained_next_round_and_leaver_skipped(run_config, node_dirs, app_model, tmp_path, flwr_log):
    nodes = nodes_of(run_config, node_dirs, app_model)
    grid = FakeGrid({10: nodes[10], 11: nodes[11]})

    def join_while_training(msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.TRAIN:
            grid.nodes[12] = nodes[12]  # node 12 connects during round 1 ...
            grid.nodes.pop(11)  # ... and node 11 leaves after replying
        return nodes[11](msg)

    grid.nodes[11] = join_while_training
    config = AppConfig.from_run_config(run_config | {"num-server-rounds": 2})
    pool = PromptPool(tmp_path / "pool")
    participants = AlaCarteFederation(pool, app_model, config).start(grid)
    assert participants == {10: "src-a", 11: "src-b", 12: "src-c"}
    assert {s: pool.info(s).version for s in pool.sources()} == {"src-a": 2, "src-b": 1, "src-c": 1}
    assert "node 11 (source src-b) is no longer connected" in flwr_log.text()


def test_restarted_server_continues_from_the_pool(run_config, node_dirs, app_model, tmp_path):
    config = AppConfig.from_run_config(run_config)
    pool = PromptPool(tmp_path / "pool")
    AlaCarteFederation(pool, app_model, config).start(FakeGrid(nodes_of(run_config, node_dirs, app_model)))
    stored = pool.get("src-a", model=app_model)

    restarted = FakeGrid(nodes_of(run_config, node_dirs, app_model))  # a new ServerApp process, same pool
    AlaCarteFederation(pool, app_model, config).start(restarted)
    assert {s: pool.info(s).version for s in pool.sources()} == {"src-a": 2, "src-b": 2, "src-c": 2}
    sent = next(m for m in restarted.sent
                if m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id == 10)
    assert sent.content["config"]["parent-version"] == 1
    resumed = prompt_from_records(sent.content, app_model)
    assert all(np.array_equal(resumed.arrays()[k], v) for k, v in stored.arrays().items())


def test_stale_and_duplicate_replies_never_overwrite(run_config, node_dirs, app_config, app_model, tmp_path):
    pool = PromptPool(tmp_path / "pool")
    same = client(run_config, "src-a", node_dirs["src-a"], app_model)
    grid = FakeGrid({10: same, 11: same})  # two nodes claim one source: both train from version 0
    federation = AlaCarteFederation(pool, app_model, app_config)
    report = federation.train_round(grid, {10: "src-a", 11: "src-a"}, server_round=1)
    assert report.stored == {"src-a": 1} and "StaleParentError" in next(iter(report.rejected.values()))

    old_reply = next(iter(FakeGrid({10: same}).send_and_receive(  # a reply trained from version 0
        [Message(RecordDict({"config": ConfigRecord({"parent-version": 0})}), dst_node_id=10,
                 message_type=MessageType.TRAIN)])))
    late = FakeGrid({10: lambda msg: old_reply})  # arrives in round 2, answering a round-1 message
    assert federation.train_round(late, {10: "src-a"}, server_round=2).rejected[10].startswith("no reply")
    with pytest.raises(StaleParentError):
        federation.accept_reply(old_reply, "src-a")
    with pytest.raises(ValueError, match="server sent"):
        federation.accept_reply(old_reply, "src-a", parent_sha256_sent=pool.info("src-a").sha256)
    assert [e.version for e in pool.history("src-a")] == [1]


def test_unusable_stored_prompt_is_retrained_as_next_version(run_config, node_dirs, app_config, app_model, tmp_path):
    other = build_model(AppConfig.from_run_config(BASE_CONFIG | {"img-size": 48}), device="cpu")
    pool = PromptPool(tmp_path / "pool")
    pool.add("src-a", Prompt.init(other, 10, source="src-a"), parent_version=0)
    real_node = client(run_config, "src-a", node_dirs["src-a"])  # the real train handler
    report = AlaCarteFederation(pool, app_model, app_config).train_round(FakeGrid({10: real_node}), {10: "src-a"},
                                                                 server_round=1)
    assert report.stored == {"src-a": 2}
    assert pool.get("src-a", model=app_model).config.fingerprint == app_model.fingerprint


# ------------------------------------------------------------------ fast: deploy scripts


def bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], check=False, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("name", ["certs.sh", "superlink.sh", "supernode.sh", "keys.sh", "connect.sh"])
def test_scripts_have_help(name):
    done = bash(str(DEPLOY / name), "--help")
    assert done.returncode == 0 and done.stdout.startswith("Usage: deploy/"), done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["supernode.sh", "--superlink", "h:1", "--source", ".hidden", "--data-dir", "/"], "invalid --source"),
    (["supernode.sh", "--superlink", "h:1", "--source", "a", "--data-dir", "/no/such/dir"], "is not a folder"),
    (["supernode.sh", "--superlink", "h:1", "--source", "a", "--data-dir", "/"], "--root-certificates ca.crt is req"),
    (["superlink.sh", "--certs", "/no/such/dir"], "/no/such/dir/ca.crt is missing"),
    (["certs.sh", "--superlink", "bad host"], "neither a host name nor an IP address"),
    (["connect.sh", "x", "h:1"], "give --root-certificates ca.crt (or --insecure)"),
])
def test_scripts_reject_bad_arguments(args, message):
    done = bash(str(DEPLOY / args[0]), *args[1:])
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_certs_script_signs_server_certificates_with_sans(tmp_path):
    out = tmp_path / "certs"
    done = bash(str(DEPLOY / "certs.sh"), "--out", str(out), "--superlink", "link.example.org,10.0.0.5",
                "--service", "pool.example.org")
    assert done.returncode == 0, done.stderr
    for name in ("superlink", "service"):
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / f"{name}.crt")],
                                check=False, capture_output=True, text=True, timeout=30)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert oct((out / f"{name}.key").stat().st_mode & 0o777) == "0o600"
    sans = subprocess.run(["openssl", "x509", "-in", str(out / "superlink.crt"), "-noout", "-ext", "subjectAltName"],
                          check=True, capture_output=True, text=True, timeout=30).stdout
    for san in ("DNS:link.example.org", "IP Address:10.0.0.5", "DNS:localhost", "IP Address:127.0.0.1"):
        assert san in sans
    ca = (out / "ca.crt").read_bytes()
    assert bash(str(DEPLOY / "certs.sh"), "--out", str(out), "--service", "x").returncode == 2  # no silent overwrite
    assert bash(str(DEPLOY / "certs.sh"), "--out", str(out), "--service", "x", "--force").returncode == 0
    assert (out / "ca.crt").read_bytes() == ca  # the CA is kept: certificates already handed out stay valid


def test_connect_script_writes_a_connection(tmp_path):
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n')
    env = os.environ | {"FLWR_HOME": str(tmp_path)}
    assert bash(str(DEPLOY / "connect.sh"), "lab", "10.0.0.5:8000", "--insecure", env=env).returncode == 0
    (tmp_path / "ca.crt").write_text("x")
    assert bash(str(DEPLOY / "connect.sh"), "prod", "link.example.org:8000", "--root-certificates",
                str(tmp_path / "ca.crt"), env=env).returncode == 0
    config = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert config["lab"] == {"address": "10.0.0.5:8000", "insecure": True}
    assert config["prod"] == {"address": "link.example.org:8000", "root-certificates": str(tmp_path / "ca.crt")}
    assert bash(str(DEPLOY / "connect.sh"), "lab", "h:1", "--insecure", env=env).returncode == 2  # never changed


# ----------------------------------------------------------------- slow: real processes


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def stop_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> None:
    """Stop ``proc`` like ``stop_trees``."""
    stop_trees([proc], sig, grace)


def stop_trees(procs: Sequence[subprocess.Popen], sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> None:
    """Signal the process groups of ``procs`` and of all their descendants (e.g. the
    SuperLink's SuperExec, which starts its own session) at once; SIGKILL those groups
    after ``grace`` seconds."""
    groups = set()
    for pid in [pid for proc in procs for pid in (proc.pid, *child_pids(proc.pid))]:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))  # never our own group
    for group in groups:
        _signal_group(group, sig)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    for group in groups:
        _signal_group(group, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=10)


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Proc:
    """A started process and its log file."""

    popen: subprocess.Popen
    log: Path

    def text(self, start: int = 0) -> str:
        return self.log.read_text(errors="replace")[start:]

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """Wait until ``pattern`` appears in the log (after offset ``start``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text(start))
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.log.name}: exited ({self.popen.returncode}) before "
                                     f"{pattern!r}:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{self.log.name}: no {pattern!r} within {timeout:g} s:\n{self.text()[-3000:]}")


@dataclass
class Cluster:
    """A SuperLink, its SuperNodes and a CLI connection to it, all under ``root``."""

    root: Path
    env: dict[str, str]
    connection: str
    procs: list[Proc] = field(default_factory=list)
    nodes: dict[str, Proc] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str], home: str) -> Proc:
        """Start ``cmd`` in its own process group, logging to ``root/name.log``."""
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env | {"FLWR_HOME": str(self.root / home)}, cwd=self.root)
        proc = Proc(popen, log)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Stop every process started here (and its descendants)."""
        stop_trees([proc.popen for proc in self.procs if proc.popen.poll() is None or child_pids(proc.popen.pid)])


def cluster_env(root: Path) -> dict[str, str]:
    """Environment of every process: this Python's scripts first, no network side-trips,
    no dependency installation, one BLAS thread per process (2-core machine)."""
    return os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(root / "cli-home"),
        "ALACARTE_HOME": str(root / "alacarte-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def script(cluster: Cluster, *args: str, timeout: float = 60.0) -> str:
    """Run a deploy/ script to completion (bounded); returns its output, fails with it."""
    done = subprocess.run(["bash", *args], check=False, env=cluster.env, cwd=cluster.root, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def wait_for_port(port: int, proc: Proc, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until something listens on 127.0.0.1:``port``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.log.name} exited ({proc.popen.returncode}):\n{proc.text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout:g} s:\n{proc.text()[-3000:]}")


def start_superlink(cluster: Cluster, port: int, *security: str) -> Proc:
    """``deploy/superlink.sh`` on 127.0.0.1:``port`` (``security``: --insecure or --certs DIR)."""
    return cluster.start("superlink", ["bash", str(DEPLOY / "superlink.sh"), "--host", "127.0.0.1", "--port",
                                       str(port), "--state", str(cluster.root / "state"), *security], "link-home")


def start_supernode(cluster: Cluster, source: str, data_dir: Path, link_port: int, *security: str) -> Proc:
    """``deploy/supernode.sh`` for ``source`` reading ``data_dir``, with its own FLWR_HOME and port."""
    node = cluster.start(f"node-{source}", [
        "bash", str(DEPLOY / "supernode.sh"), "--superlink", f"127.0.0.1:{link_port}", "--source", source,
        "--data-dir", str(data_dir), "--port", str(free_port()), "--max-wait-time", str(START_TIMEOUT_S),
        *security], f"{source}-home")
    cluster.nodes[source] = node
    return node


@dataclass
class RunResult:
    """A finished ``flwr run``: exit code, streamed output, wall time."""

    returncode: int
    output: str
    seconds: float


def flwr_run(cluster: Cluster, config: dict, on_started: Callable[[], None] | None = None) -> RunResult:
    """``flwr run REPO CONNECTION --stream``; ``on_started`` runs while the run is going."""
    log = cluster.root / f"run-{uuid.uuid4().hex[:6]}.log"
    start = time.monotonic()
    with log.open("wb") as out:
        popen = subprocess.Popen(["flwr", "run", str(REPO), cluster.connection, "--stream", "--run-config",
                                  run_config_arg(config)], stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=cluster.env, cwd=cluster.root)
    try:
        if on_started is not None:
            on_started()
        popen.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if popen.poll() is None:
            stop_tree(popen, signal.SIGKILL)
    return RunResult(popen.returncode, log.read_text(errors="replace"), time.monotonic() - start)


def pool_versions(pool_dir: Path) -> dict[str, int]:
    """Latest version of every source in the pool."""
    pool = PromptPool(pool_dir, create=False)
    return {s: pool.info(s).version for s in pool.sources()}


def check_pool(pool_dir: Path, versions: dict[str, int]) -> None:
    """The pool holds exactly ``versions``; each prompt covers exactly its node's classes."""
    assert pool_versions(pool_dir) == versions
    model = build_model(AppConfig.from_run_config(BASE_CONFIG), device="cpu")
    pool = PromptPool(pool_dir, create=False)
    for source in versions:
        prompt = pool.get(source, model=model)
        assert list(prompt.config.labels) == list(SOURCES[source]), source  # trained on its own data-dir only
        assert 0 < prompt.config.num_examples < PER_CLASS * len(SOURCES[source]), source  # its train split


@pytest.fixture(scope="module")
def insecure_cluster(tmp_path_factory, node_dirs) -> Iterator[Cluster]:
    """An insecure SuperLink + 3 SuperNodes (src-a, src-b, src-c) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("insecure")
    cluster = Cluster(root, cluster_env(root), "test")
    try:
        port = free_port()
        link = start_superlink(cluster, port, "--insecure")
        for source in SOURCES:
            start_supernode(cluster, source, node_dirs[source], port, "--insecure")
        script(cluster, str(DEPLOY / "connect.sh"), cluster.connection, f"127.0.0.1:{port}", "--insecure")
        wait_for_port(port, link)
        for node in cluster.nodes.values():
            node.wait_for(r"SuperNode ID: \d+", START_TIMEOUT_S)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def first_run(insecure_cluster, tmp_path_factory) -> tuple[RunResult, Path]:
    """One round over the 3 SuperNodes, with the server's own test split (test files only)."""
    root = tmp_path_factory.mktemp("first-run")
    pool_dir = root / "pool"
    config = BASE_CONFIG | {"pool-dir": str(pool_dir), "data-dir": str(write_server_data(root / "server")),
                            "test-examples": 40, "reply-timeout": RUN_TIMEOUT_S}
    return flwr_run(insecure_cluster, config), pool_dir


@pytest.mark.slow
def test_three_supernodes_fill_the_pool(first_run):
    result, pool_dir = first_run
    assert result.returncode == 0, result.output[-3000:]
    for source in SOURCES:
        assert f"stored {source} v1" in result.output, result.output[-3000:]
    assert "composed uniform (3)" in result.output and "composed density (3)" in result.output, result.output[-3000:]
    check_pool(pool_dir, {"src-a": 1, "src-b": 1, "src-c": 1})


@pytest.mark.slow
def test_supernode_killed_mid_round_does_not_stop_the_run(insecure_cluster, first_run, tmp_path):
    """A restarted run on the first run's pool; src-c's SuperNode is SIGKILLed once it got its
    train message. The round stores the others and src-c keeps v1. The round ends at
    ``reply-timeout`` or when the SuperLink declares the node unavailable (no heartbeat for
    2 x 30 s), whichever is first; ``reply-timeout`` is the first run's duration, ample for
    a healthy node on this machine."""
    result, first_pool = first_run
    assert result.returncode == 0, result.output[-3000:]
    pool_dir = tmp_path / "pool"
    shutil.copytree(first_pool, pool_dir)
    victim = insecure_cluster.nodes["src-c"]
    offset = len(victim.text())

    def kill_victim() -> None:
        victim.wait_for(r"Receiving: train message", RUN_TIMEOUT_S / 2, start=offset)
        stop_tree(victim.popen, signal.SIGKILL, grace=0)

    timeout = min(max(result.seconds, 30.0), 180.0)
    config = BASE_CONFIG | {"pool-dir": str(pool_dir), "reply-timeout": timeout}
    run = flwr_run(insecure_cluster, config, on_started=kill_victim)
    assert run.returncode == 0, run.output[-3000:]
    assert "stored src-a v2" in run.output and "stored src-b v2" in run.output, run.output[-3000:]
    missing = re.search(r"source src-c\) not stored: (.*); source src-c keeps v1", run.output)
    assert missing, run.output[-3000:]
    assert "no reply within reply-timeout" in missing[1] or "Node Unavailable" in missing[1], missing[0]
    assert pool_versions(pool_dir) == {"src-a": 2, "src-b": 2, "src-c": 1}


@pytest.mark.slow
def test_tls_and_supernode_authentication(tmp_path, node_dirs):
    """Certificates from certs.sh; keys from keys.sh registered through the Control API (over
    TLS), which binds each registered node id to its source in node-sources.json; a SuperNode
    with an unregistered key is refused; a registered node claiming another source than its
    key's is not trained; one round runs over TLS."""
    cluster = Cluster(tmp_path, cluster_env(tmp_path), "secure")
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    try:
        port = free_port()
        script(cluster, str(DEPLOY / "certs.sh"), "--out", str(certs), "--superlink", "127.0.0.1")
        script(cluster, str(DEPLOY / "keys.sh"), "--out", str(keys), "src-a", "src-b", "rogue")
        link = start_superlink(cluster, port, "--certs", str(certs))
        script(cluster, str(DEPLOY / "connect.sh"), cluster.connection, f"127.0.0.1:{port}",
               "--root-certificates", str(certs / "ca.crt"))
        wait_for_port(port, link)
        script(cluster, str(DEPLOY / "keys.sh"), "--out", str(keys), "--register", cluster.connection,
               "src-a", "src-b")
        bindings = {v: int(k) for k, v in json.loads((keys / "node-sources.json").read_text()).items()}
        assert set(bindings) == {"src-a", "src-b"}
        ca = ("--root-certificates", str(certs / "ca.crt"))
        node = start_supernode(cluster, "src-a", node_dirs["src-a"], port, *ca, "--key", str(keys / "src-a.key"))
        rogue = start_supernode(cluster, "rogue", node_dirs["src-b"], port, *ca, "--key", str(keys / "rogue.key"))
        # registered with src-b's key, but claims to be src-a (and holds other data)
        impostor = cluster.start("node-impostor", [
            "bash", str(DEPLOY / "supernode.sh"), "--superlink", f"127.0.0.1:{port}", "--source", "src-a",
            "--data-dir", str(node_dirs["src-b"]), "--port", str(free_port()), "--max-wait-time",
            str(START_TIMEOUT_S), *ca, "--key", str(keys / "src-b.key")], "impostor-home")
        for proc in (node, impostor):
            proc.wait_for(r"SuperNode ID: \d+", START_TIMEOUT_S)
        assert int(impostor.wait_for(r"SuperNode ID: (\d+)", START_TIMEOUT_S)[1]) == bindings["src-b"]

        pool_dir = tmp_path / "pool"
        run = flwr_run(cluster, BASE_CONFIG | {"pool-dir": str(pool_dir), "reply-timeout": RUN_TIMEOUT_S,
                                               "node-sources": str(keys / "node-sources.json")})
        assert run.returncode == 0, run.output[-3000:]
        assert f"node {bindings['src-b']} claims source 'src-a' but is bound to 'src-b'" in run.output, \
            run.output[-3000:]
        check_pool(pool_dir, {"src-a": 1})  # trained on src-a's own data only (check_pool checks the labels)
        assert [e.version for e in PromptPool(pool_dir, read_only=True).history("src-a")] == [1]
        assert rogue.popen.wait(timeout=START_TIMEOUT_S) != 0  # gave up meanwhile: never got a node id
        assert "Failed to activate SuperNode" in rogue.text()
    finally:
        cluster.stop()
