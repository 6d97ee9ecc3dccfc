"""Shared machinery of the experiment scripts.

* command line: one argument set for every experiment (``--tiny``/``--quick``/full profiles,
  ``--set key=value`` overrides converted as the product converts run-config values,
  ``--out`` (default ``./results/<experiment>`` under the working directory), ``--data-dir``,
  ``--work-dir``);
* backbones: the random tiny ViT of the tests, or the pretrained DINOv2 ViT-S/14 at 112 px;
* data: fixed subsets of a dataset, written as IDX files so the Flower clients partition
  exactly the images the other methods use;
* :class:`Bank`: the backbone keys/values (fp16, memory-mapped) and pooled features of a
  fixed set of images, computed once and shared by every method. ``Bank.cache`` is a
  read-only ``KVCache`` over that file, so the product's ``train_prompt`` (and the product's
  ClientApp, see below) never run the backbone for an image already in the bank;
* :func:`run_federations`: several runs of the product's ServerApp (``server.server_app.main``)
  and ClientApp handlers in **one** ``flwr.simulation.run_simulation`` (one Ray start-up).
  A thin Grid wrapper gives each run its own run config, node subset and partition ids by
  adding a ``simulation`` record to every message; the wrapping ClientApp moves it into
  ``context.run_config``/``context.node_config`` (``run_simulation`` itself passes an empty
  run config) and hands the message to the product's handler. With one Ray actor (the
  default 2 CPUs per client on a 2-core machine) all clients run in one worker process, so
  the wrapper also lends them the shared bank as their KV cache;
* results: JSON/CSV writers and a matplotlib (Agg) figure helper.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from common.assets import default_checkpoint, write_idx_gz  # noqa: E402
from common.compose import compose_probs, density_weights  # noqa: E402
from common.config import AppConfig, ConfigError, build_model, coerce_value  # noqa: E402
from common.data import RawDataset, Shard, backbone_transform, limit_per_partition, load_split  # noqa: E402
from common.density import SourceDensity  # noqa: E402
from common.kv_cache import KVCache  # noqa: E402
from common.model import APTViT, load_backbone  # noqa: E402
from common.probe import LinearProbe, fit_probe  # noqa: E402
from common.prompt import Prompt  # noqa: E402
from common.train import TrainConfig, train_prompt  # noqa: E402

RESULTS_ROOT = Path("results")  # relative: under the working directory, never the package
WORK_ROOT = Path("/tmp/alacarte-sim")
SIM_RECORD = "simulation"
SIGNIFICANCE = 0.05  # level at which the experiments call a paired_comparison's split significant
LR = TrainConfig().lr  # every experiment's prompts learn at the product's rate (chosen by main_job --sweep)
P = TypeVar("P")


# --------------------------------------------------------------------------- command line


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The arguments every experiment takes; ``name`` picks the default result folder
    (``./results/<name>`` under the working directory)."""
    parser = argparse.ArgumentParser(prog=f"python -m simulations.{name}", description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small real run (DINOv2, <= 3 min on 2 cores)")
    size.add_argument("--tiny", action="store_true",
                      help="smoke test: random tiny ViT at 32 px, a handful of images (for the tests)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the selected profile (repeatable); a full run with "
                             "overrides is reported as reduced")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / name,
                        help="results folder (JSON, CSV, PNG; default: %(default)s under the working directory)")
    parser.add_argument("--data-dir", default="", help="Fashion-MNIST IDX folder (default: the prepared one)")
    parser.add_argument("--work-dir", type=Path, default=WORK_ROOT / name,
                        help="scratch folder (data subsets, KV banks, prompt pools)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data subsets, partitions and draws")
    return parser


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch threads of an experiment whose time goes into many small probe fits."""
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (and the Ray worker's, where simulated clients run; default 1: the "
                             "probe fits' many small LBFGS ops ran 2-4x faster on one thread than on two on the "
                             "shared 2-core machine)")


def start_experiment(parser: argparse.ArgumentParser, argv: list[str] | None, tiny: P, quick: P,
                     full: P) -> tuple[argparse.Namespace, P, str]:
    """What every experiment does first: parse ``argv``, log with timestamps, apply ``--threads``
    (when the parser has it; also for the Ray worker that runs simulated clients) and pick the
    profile (:func:`select_profile`). Returns the arguments, the profile and its label."""
    args = parser.parse_args(argv)
    configure_logging()
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    profile, label = select_profile(args, tiny, quick, full)
    return args, profile, label


def select_profile(args: argparse.Namespace, tiny: P, quick: P, full: P) -> tuple[P, str]:
    """The profile picked by ``--tiny``/``--quick`` (else full) with ``--set`` overrides applied.

    Returns the profile and its label: ``tiny``, ``quick``, ``full`` or ``reduced`` (full with
    overrides).
    """
    label, profile = ("tiny", tiny) if args.tiny else ("quick", quick) if args.quick else ("full", full)
    if args.set:
        try:
            profile = apply_overrides(profile, args.set)
        except ConfigError as err:
            raise SystemExit(f"error: {err}") from None
        label = "reduced" if label == "full" else label
    return profile, label


def apply_overrides(profile: P, items: Iterable[str]) -> P:
    """``dataclasses.replace`` with ``key=value`` strings, each converted to its field's type.

    Values are converted as the product converts run-config values
    (:func:`common.config.coerce_value`); a tuple field takes comma-separated values of its
    elements' type.

    Raises:
        ConfigError: an item without ``=``, an unknown key, or a value not of the field's type.
    """
    fields = [f.name for f in dataclasses.fields(profile)]
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY among {', '.join(fields)}")
        changes[key] = _override_value(f"--set {key}", value, getattr(profile, key))
    return dataclasses.replace(profile, **changes)


def _override_value(name: str, text: str, current: Any) -> Any:
    """``text`` as the type of the field's ``current`` value (a tuple: comma-separated items)."""
    if isinstance(current, tuple):
        kind = type(current[0]) if current else int
        return tuple(coerce_value(name, item, kind) for item in text.split(",") if item)
    return coerce_value(name, text, type(current))


# --------------------------------------------------------------------------- backbone


@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen backbone an experiment uses, as product run-config keys and a label."""

    name: str
    img_size: int
    pretrained: bool
    checkpoint: str
    label: str

    def run_config(self) -> dict[str, Any]:
        """The run-config keys (kebab-case) that make the product load this backbone."""
        return {"backbone": self.name, "img-size": self.img_size, "pretrained": self.pretrained,
                "checkpoint": self.checkpoint}

    def load(self) -> APTViT:
        """The process-wide frozen backbone, wrapped in ``APTViT`` (on CPU)."""
        return APTViT(load_backbone(self.name, checkpoint=self.checkpoint or None, pretrained=self.pretrained,
                                    img_size=self.img_size, device="cpu"))


def backbone_spec(tiny: bool) -> BackboneSpec:
    """Random ``vit_tiny_patch16_224`` at 32 px for ``--tiny``, else DINOv2 ViT-S/14 at 112 px."""
    if tiny:
        return BackboneSpec("vit_tiny_patch16_224", 32, False, "", "vit_tiny_patch16_224 (random init)")
    checkpoint = default_checkpoint()
    if checkpoint is None:
        raise SystemExit("the DINOv2 checkpoint is not prepared; run `alacarte setup` (or bash setup.sh) first")
    return BackboneSpec("vit_small_patch14_dinov2", 112, True, str(checkpoint), "DINOv2 ViT-S/14 (pretrained)")


# --------------------------------------------------------------------------- data


def stratified_indices(labels: np.ndarray, per_class: int, classes: Iterable[int], seed: int) -> np.ndarray:
    """``per_class`` random examples of each of ``classes`` (sorted global indices)."""
    picks = [limit_per_partition(np.flatnonzero(labels == c), per_class, seed) for c in classes]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def subset_indices(split_size: int, n: int, seed: int) -> np.ndarray:
    """The images of a split (of ``split_size``) that :func:`write_idx_subset` keeps for ``n`` and ``seed``."""
    return limit_per_partition(np.arange(split_size), n, seed)


def write_idx_subset(data_dir: str, n_train: int, n_test: int, seed: int, dest: Path) -> Path:
    """Write a random ``n_train``/``n_test`` subset of Fashion-MNIST as IDX files in ``dest``.

    The Flower clients then partition exactly these training images, so a bank over the
    subset covers every client, the paragon's union and every baseline.
    """
    for split, n, stem in (("train", n_train, "train"), ("test", n_test, "t10k")):
        raw = load_split("fashion_mnist", data_dir or None, split)
        idx = subset_indices(len(raw), n, seed)
        write_idx_gz(np.ascontiguousarray(raw.images[idx]), dest / f"{stem}-images-idx3-ubyte.gz")
        write_idx_gz(raw.labels[idx].astype(np.uint8), dest / f"{stem}-labels-idx1-ubyte.gz")
    return dest


def shared_subset(args: argparse.Namespace, model: APTViT, n_train: int, n_test: int) -> tuple[Path, Bank, Bank]:
    """A Fashion-MNIST subset (IDX files) and the banks of all its train and test images.

    They live under ``<work-dir>/../shared``, keyed by data folder, seed, backbone and each
    split's size (a split's subset depends only on its size and the seed), so experiments
    that use the same sizes share one backbone pass.
    """
    root = _shared_root(args)
    data_dir = write_idx_subset(args.data_dir, n_train, n_test, args.seed, root / f"data-{n_train}-{n_test}")
    banks = [build_bank(model, load_split("fashion_mnist", str(data_dir), split), np.arange(n),
                        root / f"bank-{model.backbone_name}-{split}-{n}")
             for split, n in (("train", n_train), ("test", n_test))]
    return data_dir, banks[0], banks[1]


def held_out_bank(args: argparse.Namespace, model: APTViT, n_train: int, n_held_out: int) -> Bank:
    """The bank of ``n_held_out`` random training-split images outside the ``n_train``-image
    subset of :func:`shared_subset` (same seed): validation images no source, paragon or probe
    trains on, for comparisons that must not read test images. Stored beside that subset's banks."""
    raw = load_split("fashion_mnist", args.data_dir or None, "train")
    outside = np.setdiff1d(np.arange(len(raw)), subset_indices(len(raw), n_train, args.seed))
    chosen = limit_per_partition(outside, n_held_out, args.seed + 1)
    return build_bank(model, raw, chosen,
                      _shared_root(args) / f"bank-{model.backbone_name}-held-out-{n_train}-{n_held_out}")


def _shared_root(args: argparse.Namespace) -> Path:
    """Where the banks shared between experiments live: ``<work-dir>/../shared``, by data folder and seed."""
    key = hashlib.sha256(data_folder(args).encode()).hexdigest()[:10]
    return args.work_dir.parent / "shared" / f"fashion_mnist-seed{args.seed}-{key}"


# --------------------------------------------------------------------------- KV bank


class BankCache(KVCache):
    """A read-only ``KVCache`` over a bank file: every image of the bank is a hit.

    It is full from the start, so the inherited ``kv`` never writes (a miss is computed and
    returned, not stored), and ``close`` never deletes the bank.
    """

    def __init__(self, model: APTViT, root: Path, index: np.ndarray, shape: tuple[int, ...],
                 features: np.ndarray) -> None:
        super().__init__(model, root=root, max_bytes=0)
        # copy-on-write: readable as ordinary (writable) arrays, the file itself is never changed
        self._store = np.memmap(root / "kv.f16", dtype=np.float16, mode="c", shape=shape)
        self._pooled = features.astype(np.float32)
        self._slots = {int(k): slot for slot, k in enumerate(index)}


@dataclass
class Bank:
    """Backbone keys/values, pooled features and labels of a fixed set of images of one split."""

    root: Path
    index: np.ndarray  # global indices into the split, in slot order
    labels: np.ndarray
    features: np.ndarray  # [n, D] the backbone's pooled (pre-logits) features
    cache: BankCache

    def loader(self, indices: np.ndarray, batch_size: int, seed: int | None = None) -> DataLoader:
        """Batches ``(placeholder, label, global index)`` of ``indices`` for ``train_prompt``;
        shuffled by ``seed`` (like the ClientApp's loader), in order when ``seed`` is None."""
        return DataLoader(_BankItems(self, indices), batch_size=batch_size, shuffle=seed is not None,
                          generator=torch.Generator().manual_seed(seed) if seed is not None else None)

    @functools.cached_property
    def _slots(self) -> dict[int, int]:
        """Global index -> bank slot."""
        return {int(k): s for s, k in enumerate(self.index)}

    def slots_of(self, indices: np.ndarray) -> list[int]:
        """Bank slots of global ``indices``."""
        return [self._slots[int(i)] for i in indices]

    def labels_of(self, indices: np.ndarray) -> np.ndarray:
        """Labels of global ``indices``."""
        return self.labels[self.slots_of(indices)]

    def density_of(self, indices: np.ndarray) -> SourceDensity:
        """The :class:`SourceDensity` of the images ``indices`` (a source's training data)."""
        slots = self.slots_of(indices)
        return SourceDensity.fit(torch.as_tensor(self.features[slots]), torch.as_tensor(self.labels[slots]))


class _BankItems(Dataset):
    """``(empty image, label, index)``: the bank has every image, so none is decoded."""

    def __init__(self, bank: Bank, indices: np.ndarray) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = bank.labels_of(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int]:
        return torch.zeros(0), int(self.labels[k]), int(self.indices[k])


def build_bank(model: APTViT, raw: RawDataset, indices: np.ndarray, root: Path, batch_size: int = 32) -> Bank:
    """The bank of ``raw[indices]`` under ``root``; reused when the backbone and images match."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    key = hashlib.sha256(model.fingerprint.encode() + indices.tobytes()).hexdigest()
    meta_path = root / "meta.json"
    if not (meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key):
        _compute_bank(model, Shard(raw, indices, backbone_transform(model.backbone)), root, batch_size, key)
    return open_bank(model, root)


def open_bank(model: APTViT, root: Path) -> Bank:
    """Open a bank written by :func:`build_bank`."""
    meta = json.loads((root / "meta.json").read_text())
    index = np.load(root / "index.npy")
    features = np.load(root / "features.npy")
    cache = BankCache(model, root, index, tuple(meta["shape"]), features)
    return Bank(root, index, np.load(root / "labels.npy"), features, cache)


@torch.no_grad()
def _compute_bank(model: APTViT, shard: Shard, root: Path, batch_size: int, key: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").unlink(missing_ok=True)
    store, feats = None, []
    logging.info("bank %s: running the backbone on %d images", root, len(shard))
    for start, (images, _, _) in zip(range(0, len(shard), batch_size), DataLoader(shard, batch_size=batch_size)):
        features, kv = model.backbone_forward(images.to(model.device))
        rows = kv.movedim(2, 0).to("cpu", torch.float16).numpy()  # [b, L, 2, H, N, hd]
        if store is None:
            shape = (len(shard), *rows.shape[1:])
            store = np.memmap(root / "kv.f16", dtype=np.float16, mode="w+", shape=shape)
        store[start:start + len(rows)] = rows
        feats.append(model.pooled(features).cpu().numpy())
    store.flush()
    np.save(root / "index.npy", shard.indices)
    np.save(root / "labels.npy", shard.labels)
    np.save(root / "features.npy", np.concatenate(feats))
    (root / "meta.json").write_text(json.dumps({"key": key, "shape": list(store.shape)}))


# --------------------------------------------------------------------------- prompts on the bank


def fresh_prompt(model: APTViT, num_classes: int, seed: int, labels: Iterable[int] | None = None,
                 source: str = "", n_prompt: int = AppConfig.n_prompt, n_memory: int = AppConfig.n_memory) -> Prompt:
    """``Prompt.init`` with the product's default shape (the run-config's ``n-prompt`` and ``n-memory``)."""
    return Prompt.init(model, num_classes, n_prompt=n_prompt, n_memory=n_memory, seed=seed, labels=labels,
                       source=source)


def train_on_bank(model: APTViT, prompt: Prompt, bank: Bank, indices: np.ndarray, config: TrainConfig,
                  batch_size: int, seed: int, val_indices: np.ndarray | None = None) -> dict[str, float]:
    """The product's recipe (``train_prompt``) on ``indices`` of ``bank``, selecting on
    ``val_indices`` when given (KV from the bank, no backbone)."""
    val = bank.loader(val_indices, batch_size) if val_indices is not None and len(val_indices) else None
    return train_prompt(model, prompt, bank.loader(indices, batch_size, seed), config, cache=bank.cache,
                        val_loader=val)


def recipe(epochs: int, lr: float, min_steps: int = 100, **knobs: float) -> TrainConfig:
    """The product's training recipe with these epochs / learning rate / step floor and any other
    ``TrainConfig`` knobs (``selection_level``, ``head_lr_scale``), quiet."""
    return TrainConfig(epochs=epochs, lr=lr, min_steps=min_steps, progress=False, **knobs)


@dataclass(frozen=True)
class BankProbe:
    """A linear probe on the bank's pooled backbone features over ``classes`` (global labels)."""

    probe: LinearProbe
    classes: tuple[int, ...]

    @classmethod
    def fit(cls, bank: Bank, indices: np.ndarray) -> BankProbe:
        """Fit on the images ``indices`` of ``bank`` (L2 chosen by cross-validation on them)."""
        labels = bank.labels_of(indices)
        classes = tuple(sorted(set(labels.tolist())))
        local = torch.as_tensor(np.searchsorted(classes, labels))
        return cls(fit_probe(torch.as_tensor(bank.features[bank.slots_of(indices)]), local, len(classes)), classes)

    def logits(self, bank: Bank, num_classes: int, indices: np.ndarray | None = None) -> torch.Tensor:
        """Logits ``[n, num_classes]`` on ``indices`` (default: the whole bank), ``-inf`` outside its classes."""
        feats = bank.features if indices is None else bank.features[bank.slots_of(indices)]
        out = torch.full((len(feats), num_classes), float("-inf"))
        out[:, list(self.classes)] = self.probe.logits(torch.as_tensor(feats)).float()
        return out


@torch.no_grad()
def bank_logits(model: APTViT, bank: Bank, prompts: Sequence[Prompt], indices: np.ndarray | None = None,
                batch_size: int = 64) -> torch.Tensor:
    """Per-prompt logits ``[k, n, C]`` on ``indices`` (default: the whole bank), one batched
    APT pass per batch over the cached backbone keys/values."""
    indices = bank.index if indices is None else np.asarray(indices)
    out = []
    for start in range(0, len(indices), batch_size):
        idx = torch.as_tensor(indices[start:start + batch_size])
        out.append(model.forward_kv(*bank.cache.fetch(idx, torch.zeros(0)), list(prompts)))
    return torch.cat(out, dim=1)


def accuracy(probs: torch.Tensor, labels: np.ndarray, allowed: Sequence[int] | None = None) -> float:
    """Top-1 accuracy of ``[n, C]`` scores; with ``allowed``, only those classes can be predicted."""
    if allowed is not None:
        mask = torch.full((probs.shape[-1],), float("-inf"))
        mask[list(allowed)] = 0.0
        probs = probs + mask
    return float((probs.argmax(-1).numpy() == np.asarray(labels)).mean())


def paired_comparison(probs: torch.Tensor, reference: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Two methods' ``[n, C]`` scores on the same images: ``won`` (``probs`` right, ``reference``
    wrong), ``lost`` (the reverse) and ``p``, the exact two-sided sign-test (McNemar) p-value of
    that split: the chance of a split at least this uneven if both methods were equally good."""
    y = np.asarray(labels)
    right, reference_right = probs.argmax(-1).numpy() == y, reference.argmax(-1).numpy() == y
    won, lost = int((right & ~reference_right).sum()), int((~right & reference_right).sum())
    tail = sum(math.comb(won + lost, i) for i in range(min(won, lost) + 1)) / 2 ** (won + lost)
    return {"won": won, "lost": lost, "p": min(1.0, 2 * tail)}


def density_probs(logits: torch.Tensor, densities: list, bank: Bank, indices: np.ndarray | None = None) -> torch.Tensor:
    """``logits [k, n, C]`` of the images ``indices`` of ``bank`` (default: all of them, in bank
    order) composed with ``densities``' weights: ``[n, C]``."""
    feats = bank.features if indices is None else bank.features[bank.slots_of(indices)]
    return compose_probs(logits, density_weights(densities, torch.as_tensor(feats)))


def composed_accuracy(logits: torch.Tensor, labels: np.ndarray, which: Sequence[int] | None = None,
                      allowed: Sequence[int] | None = None) -> float:
    """Accuracy of the uniform composition (``compose_probs``) of prompts ``which`` of ``logits``."""
    chosen = logits if which is None else logits[list(which)]
    return accuracy(compose_probs(chosen), labels, allowed)


# --------------------------------------------------------------------------- Flower harness


@dataclass
class Federation:
    """One run of the product's ServerApp: its run config and participating partitions."""

    name: str
    run_config: dict[str, Any]
    partitions: list[int]  # partition ids that take part (others stay silent)
    num_partitions: int
    uploads: list[int] = field(default_factory=list)  # bytes of prompt arrays per train reply
    seconds: float = 0.0


class _FederationGrid(Grid):
    """The simulation's Grid, restricted to a federation's nodes, tagging every message.

    Node ``i`` (in sorted id order) plays partition ``federation.partitions[i]``.
    """

    def __init__(self, grid: Grid, federation: Federation, bank_dir: str) -> None:
        self._grid, self._fed = grid, federation
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) < len(federation.partitions):
            raise ValueError(f"{federation.name}: needs {len(federation.partitions)} nodes, have {len(node_ids)}")
        self._partition = dict(zip(node_ids, federation.partitions))
        self._bank_dir = bank_dir

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:
        return list(self._partition)

    def _tag(self, messages: Iterable[Message]) -> list[Message]:
        """Give each message its own content with its node's partition: Flower's strategies
        send one shared ``RecordDict`` to every node, so tagging it in place would give every
        node the last node's partition."""
        out = []
        for msg in messages:
            tag = ConfigRecord({
                "run-config": json.dumps(self._fed.run_config), "bank": self._bank_dir,
                "partition-id": self._partition[msg.metadata.dst_node_id],
                "num-partitions": self._fed.num_partitions})
            msg.content = RecordDict({**msg.content, SIM_RECORD: tag})
            out.append(msg)
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._tag(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._count(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._count(self._grid.send_and_receive(self._tag(messages), timeout=timeout))

    def _count(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error() and "arrays" in reply.content:
                self._fed.uploads.append(sum(len(a.data) for a in reply.content["arrays"].values()))
        return replies


def _federation_server(federations: list[Federation], bank_dir: str, num_supernodes: int) -> ServerApp:
    from server.server_app import main as product_main

    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        _wait_for_nodes(grid, num_supernodes)
        for fed in federations:
            start = time.perf_counter()
            ctx = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                          state=RecordDict(), run_config=dict(fed.run_config))
            product_main(_FederationGrid(grid, fed, bank_dir), ctx)
            fed.seconds = time.perf_counter() - start
            logging.info("federation %s done in %.1f s", fed.name, fed.seconds)

    return app


def _wait_for_nodes(grid: Grid, count: int, timeout: float = 600.0) -> None:
    """Block until ``count`` SuperNodes have registered (they come up after the ServerApp)."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {count} nodes came up in {timeout:.0f} s")
        time.sleep(0.5)


client_app = ClientApp()


def _delegate(handler: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    """Move the ``simulation`` record into the context, lend the bank, call the product handler."""
    from client import client_app as product

    sim = msg.content[SIM_RECORD]
    del msg.content[SIM_RECORD]
    run_config = json.loads(str(sim["run-config"]))
    pid = int(sim["partition-id"])
    source = f"source-{pid}"
    node_config = {"partition-id": pid, "num-partitions": int(sim["num-partitions"]), "source": source}
    if sim["bank"]:
        model = build_model(AppConfig.from_run_config(run_config), device="cpu")
        product.use_kv_cache(source, model, _shared_bank(model, str(sim["bank"])))
    return handler(msg, Context(run_id=context.run_id, node_id=context.node_id, node_config=node_config,
                                state=context.state, run_config=run_config))


_BANKS: dict[str, BankCache] = {}


def _shared_bank(model: APTViT, root: str) -> BankCache:
    if root not in _BANKS:
        _BANKS[root] = open_bank(model, Path(root)).cache
    return _BANKS[root]


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    from client.client_app import identify

    return _delegate(identify, msg, context)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    from client.client_app import train

    return _delegate(train, msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    from client.client_app import evaluate_prompts

    return _delegate(evaluate_prompts, msg, context)


def run_federations(federations: list[Federation], num_supernodes: int, bank_dir: Path | None = None) -> None:
    """Run every federation, in order, in one Flower simulation of ``num_supernodes`` nodes.

    Each federation runs the product's ``server.server_app.main`` with its own run config;
    its prompts end up in its ``pool-dir``; ``uploads`` and ``seconds`` are filled in.
    """
    from flwr.simulation import run_simulation

    # Ray starts its workers at nice 15; on a busy shared machine that starves the clients
    os.environ.setdefault("RAY_worker_niceness", "0")
    backend = {"client_resources": {"num_cpus": 2, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "num_gpus": 0, "log_to_driver": False}}
    run_simulation(_federation_server(federations, str(bank_dir or ""), num_supernodes), client_app, num_supernodes,
                   backend_config=backend)


def product_run_config(spec: BackboneSpec, data_dir: Path, pool_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Run config of a simulated federation over an IDX subset: no server test split nor
    federated evaluation (the experiments evaluate on their own bank), every shard image
    used (10% of each as the source's validation split, as in the product)."""
    return {**spec.run_config(), "dataset": "fashion_mnist", "data-dir": str(data_dir), "pool-dir": str(pool_dir),
            "examples-per-source": 0, "val-fraction": 0.1, "test-examples": 0, "federated-eval": False,
            "kv-cache": True, **overrides}


def pool_prompts(pool_dir: Path, model: APTViT) -> dict[str, Prompt]:
    """Latest prompt of every source of a pool, by source id (sorted by partition number)."""
    from server.pool import PromptPool

    pool = PromptPool(pool_dir)
    return {s: pool.get(s, model=model) for s in sorted(pool.sources(), key=_source_order)}


def _source_order(source: str) -> tuple[int, str]:
    tail = source.rsplit("-", 1)[-1]
    return (int(tail) if tail.isdigit() else -1, source)


def partition_shards(data_dir: Path, num_partitions: int, partitioner: str, alpha: float,
                     seed: int, val_fraction: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, validation) indices each partition's ClientApp uses (same call as the product's)."""
    from common.data import load_client_shard

    return [tuple(s.indices for s in load_client_shard(
        "fashion_mnist", str(data_dir), pid, num_partitions, partitioner, alpha=alpha, seed=seed,
        max_examples=None, val_fraction=val_fraction, transform=lambda x: x))
        for pid in range(num_partitions)]


# --------------------------------------------------------------------------- results


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (creating folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write dict rows as CSV (columns from the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def setup_record(spec: BackboneSpec, profile: Any, label: str, args: argparse.Namespace,
                 **extra: Any) -> dict[str, Any]:
    """What every result file states: backbone, resolution, prompt shape, profile, seeds, the
    data folder (:func:`data_folder`) and more."""
    return {"backbone": spec.label, "backbone_name": spec.name, "resolution": spec.img_size,
            "n_prompt": AppConfig.n_prompt, "n_memory": AppConfig.n_memory,
            "profile": label, "settings": dataclasses.asdict(profile), "seed": args.seed,
            "overrides": list(args.set), "data_dir": data_folder(args), **extra}


def data_folder(args: argparse.Namespace) -> str:
    """``--data-dir`` as results and bank folders name it: the resolved folder, or ``"default"``
    for the Fashion-MNIST that ``alacarte setup`` prepared."""
    return str(Path(args.data_dir).resolve()) if args.data_dir else "default"


@dataclass
class Stopwatch:
    """Wall-clock seconds since creation."""

    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Save and close a figure as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def configure_logging() -> None:
    """INFO logs with timestamps (the experiments run for minutes)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
