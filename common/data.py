"""Data layer: raw image datasets, deterministic backbone transforms, partitions, shards.

Each federated client (a *data source*) owns a private shard of images. This module

* loads a split of an image classification dataset as a :class:`RawDataset` from local
  files (IDX, CIFAR pickles, an ImageFolder tree, an HF ``save_to_disk`` folder) or, when
  online, from the Hugging Face Hub (:func:`load_split`, cached per process);
* builds the deterministic backbone transform (:func:`image_transform`,
  :func:`backbone_transform`) -- no random augmentation, so a per-image backbone
  key/value cache stays valid;
* partitions a label array into disjoint client shards (:func:`partition_indices`);
* wraps a subset of a raw split as a torch :class:`Shard` yielding
  ``(image_tensor, label, global_index)``.
"""

from __future__ import annotations

import functools
import gzip
import operator
import pickle
import struct
from abc import ABC, abstractmethod
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DatasetNotFoundError",
    "RawDataset",
    "ArrayImageDataset",
    "FileImageDataset",
    "HFImageDataset",
    "SUPPORTED_DATASETS",
    "Partitioner",
    "load_split",
    "image_transform",
    "backbone_data_config",
    "backbone_transform",
    "partition_indices",
    "limit_per_partition",
    "train_val_split",
    "Shard",
    "load_client_shard",
    "load_local_dataset",
]

SPLITS = ("train", "test")
SUPPORTED_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "hf-disk")


class Partitioner(StrEnum):
    """How a train split is divided among simulated sources (see :func:`partition_indices`)."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    CLASSES = "classes"


#: Fraction of each class held out as the "test" split when a source has no split of its own
#: (a flat ImageFolder tree, a single saved HF ``Dataset``); the split is fixed by
#: :data:`HOLDOUT_SEED` so train and test never overlap across calls.
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]
#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_LAYOUT = {  # dataset -> (class names, sub-folder names a data_dir may hold the files in)
    "fashion_mnist": (FASHION_MNIST_CLASSES, ("fashion-mnist", "FashionMNIST/raw")),
    "mnist": (MNIST_CLASSES, ("mnist", "MNIST/raw")),
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_SPLIT_ALIASES = {"train": ("train",), "test": ("test", "val", "validation")}


class DatasetNotFoundError(FileNotFoundError):
    """The files (or hub dataset) of a requested dataset could not be found or loaded."""


# --------------------------------------------------------------------------- raw datasets


class RawDataset(ABC):
    """An indexable image classification split: ``ds[i] -> (RGB PIL image, int label)``.

    Attributes:
        labels: all labels as an int64 array, readable without decoding any image.
        classes: class names; label ``k`` is ``classes[k]``.
    """

    def __init__(self, labels: np.ndarray | Sequence[int], classes: Sequence[str]) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        return self._image(i).convert("RGB"), int(self.labels[i])

    @abstractmethod
    def _image(self, i: int) -> Image.Image:
        """Decode image ``i`` (any PIL mode; ``__getitem__`` converts it to RGB)."""


class ArrayImageDataset(RawDataset):
    """Images held in memory as a uint8 array of shape (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        super().__init__(labels, classes)
        self.images = images

    def _image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


class FileImageDataset(RawDataset):
    """Images stored as files; only the paths are kept, images are decoded on access."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, classes: Sequence[str]) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        super().__init__(labels, classes)
        self.paths = list(paths)

    def _image(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as img:
            img.load()
            return img


class HFImageDataset(RawDataset):
    """A Hugging Face ``datasets.Dataset`` with an image column and an integer label column."""

    def __init__(self, ds: Any) -> None:
        image_col, label_col = _hf_columns(ds)
        labels = ds.select_columns([label_col]).with_format("arrow")[label_col].to_numpy()
        feature = ds.features[label_col]
        classes = list(feature.names) if hasattr(feature, "names") else _numbered_classes(labels)
        super().__init__(labels, classes)
        self.image_col = image_col
        self._images = ds.select_columns([image_col])

    def _image(self, i: int) -> Image.Image:
        return self._images[i][self.image_col]


def _numbered_classes(labels: np.ndarray) -> list[str]:
    return [str(k) for k in range(int(labels.max()) + 1 if len(labels) else 0)]


def _hf_columns(ds: Any) -> tuple[str, str]:
    """Find the image column (``Image`` feature) and label column (``ClassLabel`` preferred)."""
    import datasets

    images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    class_labels = [c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    named = [c for c in ("label", "labels", "fine_label") if c in ds.features]
    if not images:
        raise ValueError(
            f"no image column (datasets.Image feature) among columns {list(ds.features)}; "
            "cast the image column with ds.cast_column(name, datasets.Image()) before saving"
        )
    preferred = [c for c in named if c in class_labels] or class_labels or named
    if not preferred:
        raise ValueError(
            f"no label column (ClassLabel feature or a column named label/labels) among "
            f"columns {list(ds.features)}"
        )
    return images[0], preferred[0]


# --------------------------------------------------------------------------- loading


def load_split(dataset: str, data_dir: str | Path | None, split: str) -> RawDataset:
    """Load one split of an image classification dataset (cached per process).

    Args:
        dataset: ``"mnist"``, ``"fashion_mnist"`` (IDX files), ``"cifar10"``, ``"cifar100"``
            (python pickle folders), ``"imagefolder"`` (``<dir>/<split>/<class>/*`` or
            ``<dir>/<class>/*`` with a fixed stratified hold-out as "test"), ``"hf-disk"``
            (a folder written by ``datasets`` ``save_to_disk``), or a Hugging Face Hub name
            containing ``/`` (needs network; ``data_dir`` is then used as the cache dir).
            Hyphens and underscores are interchangeable in the local names.
        data_dir: folder with the files; ``None`` or ``""`` means "use the default", which
            exists only for Fashion-MNIST (Debian's ``/usr/share/datasets/fashion-mnist``,
            then ``common.assets.default_data_dir()``).
        split: ``"train"`` or ``"test"``.

    Raises:
        DatasetNotFoundError: the files are missing (the message says what to pass).
        ValueError: unknown dataset name or split, or malformed files.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = dataset if "/" in dataset else dataset.lower().replace("-", "_")
    if "/" not in name and name not in {d.replace("-", "_") for d in SUPPORTED_DATASETS}:
        raise ValueError(
            f"unknown dataset {dataset!r}; supported: {', '.join(SUPPORTED_DATASETS)}, "
            "or a Hugging Face Hub name such as 'zalando-datasets/fashion_mnist'"
        )
    root = str(Path(data_dir).expanduser().resolve()) if data_dir else None
    return _load_split_cached(name, root, split)


@functools.lru_cache(maxsize=8)
def _load_split_cached(name: str, root: str | None, split: str) -> RawDataset:
    data_dir = Path(root) if root else None
    if "/" in name:
        return _load_hub(name, data_dir, split)
    if name in _IDX_LAYOUT:
        return _load_idx(name, data_dir, split)
    if data_dir is None:
        raise DatasetNotFoundError(f"dataset {name!r} has no default location; pass data_dir")
    loaders = {
        "cifar10": _load_cifar10,
        "cifar100": _load_cifar100,
        "imagefolder": _load_imagefolder,
        "hf_disk": _load_hf_disk,
    }
    return loaders[name](data_dir, split)


# IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------


def _load_idx(name: str, data_dir: Path | None, split: str) -> ArrayImageDataset:
    classes, subdirs = _IDX_LAYOUT[name]
    prefix = "train" if split == "train" else "t10k"
    wanted = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    roots = [data_dir] if data_dir is not None else _default_idx_roots(name)
    folders = [folder for root in roots for folder in (root, *(root / s for s in subdirs))]
    for folder in folders:
        files = [_existing(folder / stem) for stem in wanted]
        if all(files):
            images, labels = (_read_idx(f) for f in files)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(f"IDX files in {folder} disagree: images {images.shape}, labels {labels.shape}")
            return ArrayImageDataset(images, labels, classes)
    raise DatasetNotFoundError(
        f"{name} {split} split: no {wanted[0]}[.gz] and {wanted[1]}[.gz] in "
        f"{', '.join(map(str, folders)) or '(no default location)'}; pass data_dir=<folder with "
        "the IDX files>"
    )


def _default_idx_roots(name: str) -> list[Path]:
    """Default folders for ``data_dir=None``; only Fashion-MNIST has any."""
    if name != "fashion_mnist":
        return []
    roots = [DEBIAN_FASHION_MNIST_DIR]
    try:
        from common.assets import default_data_dir
    except ImportError:
        return roots
    default = default_data_dir()
    return roots + ([Path(default)] if default else [])


def _existing(stem: Path) -> Path | None:
    for path in (stem, stem.with_name(stem.name + ".gz")):
        if path.is_file():
            return path
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzip-compressed) into an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    array = np.frombuffer(data, dtype=np.uint8, offset=header)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


# CIFAR -----------------------------------------------------------------------------------


def _load_cifar10(data_dir: Path, split: str) -> ArrayImageDataset:
    folder = _find_folder(data_dir, "cifar-10-batches-py", "batches.meta", "cifar10")
    names = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
    batches = [_unpickle(folder / n) for n in names]
    images = np.concatenate([b[b"data"] for b in batches])
    labels = np.concatenate([b[b"labels"] for b in batches])
    classes = [c.decode() for c in _unpickle(folder / "batches.meta")[b"label_names"]]
    return ArrayImageDataset(_cifar_images(images), labels, classes)


def _load_cifar100(data_dir: Path, split: str) -> ArrayImageDataset:
    folder = _find_folder(data_dir, "cifar-100-python", "meta", "cifar100")
    batch = _unpickle(folder / split)
    classes = [c.decode() for c in _unpickle(folder / "meta")[b"fine_label_names"]]
    return ArrayImageDataset(_cifar_images(batch[b"data"]), np.asarray(batch[b"fine_labels"]), classes)


def _find_folder(data_dir: Path, folder_name: str, marker: str, dataset: str) -> Path:
    for folder in (data_dir, data_dir / folder_name):
        if (folder / marker).is_file():
            return folder
    raise DatasetNotFoundError(
        f"{dataset}: no {marker} in {data_dir} or {data_dir / folder_name}; pass data_dir=<the "
        f"extracted {folder_name} folder or its parent>"
    )


def _unpickle(path: Path) -> dict[bytes, Any]:
    """Read one CIFAR python batch (a pickle: only load files from a trusted source)."""
    if not path.is_file():
        raise DatasetNotFoundError(f"missing CIFAR batch file {path}; re-extract the archive there")
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_images(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) channel-major rows -> (N, 32, 32, 3) uint8 images."""
    return np.ascontiguousarray(np.asarray(rows, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


# ImageFolder -------------------------------------------------------------------------------


def _load_imagefolder(data_dir: Path, split: str) -> FileImageDataset:
    if not data_dir.is_dir():
        raise DatasetNotFoundError(f"imagefolder: {data_dir} is not a folder; pass data_dir=<root>")
    split_dirs = {s: _first_dir(data_dir, _SPLIT_ALIASES[s]) for s in SPLITS}
    if any(split_dirs.values()):
        folder = split_dirs[split]
        if folder is None:
            raise DatasetNotFoundError(
                f"imagefolder: {data_dir} has split folders but none of "
                f"{'/'.join(_SPLIT_ALIASES[split])} for the {split} split"
            )
        classes = sorted({c.name for d in split_dirs.values() if d for c in _class_dirs(d)})
        paths, labels = _scan_classes(folder, classes)
    else:
        classes = [c.name for c in _class_dirs(data_dir)]
        paths, labels = _scan_classes(data_dir, classes)
        keep = _holdout_mask(labels, HOLDOUT_FRACTION, HOLDOUT_SEED) == (split == "test")
        paths, labels = [p for p, k in zip(paths, keep) if k], labels[keep]
    if not paths:
        raise DatasetNotFoundError(
            f"imagefolder: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) for the {split} split "
            f"under {data_dir}; expected <data_dir>/[train|test/]<class>/<image>"
        )
    return FileImageDataset(paths, labels, classes)


def _first_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_classes(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask selecting ``round(fraction * n_c)`` random examples of every class c."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        mask[rng.permutation(members)[: int(round(fraction * len(members)))]] = True
    return mask


# Hugging Face ------------------------------------------------------------------------------


def _load_hf_disk(data_dir: Path, split: str) -> HFImageDataset:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(data_dir))
    except FileNotFoundError as err:
        raise DatasetNotFoundError(
            f"hf-disk: {data_dir} is not a folder written by Dataset(Dict).save_to_disk ({err}); "
            "pass data_dir=<that folder>"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        key = next((k for k in _SPLIT_ALIASES[split] if k in loaded), None)
        if key is not None:
            return HFImageDataset(loaded[key])
        if len(loaded) != 1:
            raise DatasetNotFoundError(
                f"hf-disk: {data_dir} has splits {list(loaded)}, none of "
                f"{'/'.join(_SPLIT_ALIASES[split])} for the {split} split"
            )
        loaded = next(iter(loaded.values()))
    whole = HFImageDataset(loaded)
    keep = _holdout_mask(whole.labels, HOLDOUT_FRACTION, HOLDOUT_SEED) == (split == "test")
    return HFImageDataset(loaded.select(np.flatnonzero(keep)))


def _load_hub(name: str, cache_dir: Path | None, split: str) -> HFImageDataset:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # network, auth and hub errors come in many types
        raise DatasetNotFoundError(
            f"could not load {name!r} ({split}) from the Hugging Face Hub: {err}. Without "
            "network access, pass a local dataset instead (e.g. dataset='fashion_mnist' with "
            "data_dir=<IDX folder>, 'imagefolder' or 'hf-disk' with data_dir=<folder>)"
        ) from err
    return HFImageDataset(ds)


# --------------------------------------------------------------------------- transforms


def image_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic backbone input transform: RGB, resize to ``input_size``, normalise.

    Args:
        data_config: a timm data config with ``input_size`` ``(C, H, W)``, ``mean``,
            ``std`` and optionally ``interpolation`` (default ``"bicubic"``).

    Returns:
        A picklable callable mapping a PIL image to a float tensor of shape (3, H, W).
    """
    from torchvision import transforms

    _, height, width = data_config["input_size"]
    interpolation = data_config.get("interpolation") or "bicubic"
    try:
        mode = transforms.InterpolationMode(interpolation)
    except ValueError as err:
        raise ValueError(
            f"unsupported interpolation {interpolation!r}; use one of "
            f"{[m.value for m in transforms.InterpolationMode]}"
        ) from err
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize((height, width), interpolation=mode),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"])),
    ])


def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


def backbone_data_config(backbone: torch.nn.Module) -> dict[str, Any]:
    """timm's data config for ``backbone``, with ``input_size`` set to the size it was built for.

    ``timm.data.resolve_data_config`` reports the pretrained size (518 for DINOv2) even when the
    model was created with another ``img_size``; the patch embedding knows the real one.
    """
    from timm.data import resolve_data_config

    config = dict(resolve_data_config(model=backbone))
    img_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], *tuple(img_size))
    return config


def backbone_transform(backbone: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """:func:`image_transform` for the data config of a timm ``backbone``."""
    return image_transform(backbone_data_config(backbone))


# --------------------------------------------------------------------------- partitions


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: Partitioner | str = Partitioner.IID,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split example indices into ``num_partitions`` disjoint shards.

    Args:
        labels: the label of every example (1-D integers).
        num_partitions: number of shards (clients).
        partitioner: a :class:`Partitioner` or its value: ``"iid"`` (uniform at random, equal
            sizes), ``"dirichlet"`` (per-class proportions drawn from Dirichlet(alpha),
            flwr-datasets' ``DirichletPartitioner``) or ``"classes"`` (shard k gets every example
            of the k-th contiguous group of the sorted classes; groups are as even as possible;
            ``seed`` plays no role).
        alpha: Dirichlet concentration (smaller is more skewed); only for "dirichlet".
        seed: makes "iid" and "dirichlet" deterministic.
        min_size: minimum number of examples in every shard.

    Returns:
        One sorted int64 array of global indices per shard; "iid" and "dirichlet" cover every
        index, "classes" too.

    Raises:
        ValueError: bad arguments, or a partition that cannot reach ``min_size``.
    """
    partitioner = _partitioner(partitioner)
    labels = _check_partition_args(labels, num_partitions, partitioner, alpha, min_size)
    if partitioner is Partitioner.CLASSES:
        shards = _class_group_shards(labels, num_partitions)
    else:
        shards = _flwr_shards(labels, num_partitions, partitioner, alpha, seed, min_size)
    small = [k for k, s in enumerate(shards) if len(s) < min_size]
    if small:
        raise ValueError(
            f"partitions {small} have fewer than min_size={min_size} examples; use fewer "
            "partitions or a smaller min_size"
        )
    return [np.sort(s).astype(np.int64) for s in shards]


def _partitioner(name: Partitioner | str) -> Partitioner:
    try:
        return Partitioner(name)
    except ValueError:
        raise ValueError(f"unknown partitioner {name!r}; use one of {', '.join(Partitioner)}") from None


def _check_partition_args(
    labels: np.ndarray, num_partitions: int, partitioner: Partitioner, alpha: float, min_size: int
) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if len(labels) < num_partitions * max(min_size, 1):
        raise ValueError(
            f"{len(labels)} examples cannot fill {num_partitions} partitions of at least "
            f"{max(min_size, 1)}; use fewer partitions or a smaller min_size"
        )
    if partitioner is Partitioner.DIRICHLET and not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    num_classes = len(np.unique(labels))
    if partitioner is Partitioner.CLASSES and num_partitions > num_classes:
        raise ValueError(
            f"partitioner 'classes' gives every partition its own classes, but there are "
            f"{num_partitions} partitions and only {num_classes} classes; use at most "
            f"{num_classes} partitions or the 'dirichlet'/'iid' partitioner"
        )
    return labels


def _class_group_shards(labels: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    groups = np.array_split(np.unique(labels), num_partitions)
    return [np.flatnonzero(np.isin(labels, group)) for group in groups]


def _flwr_shards(
    labels: np.ndarray, num_partitions: int, partitioner: Partitioner, alpha: float, seed: int, min_size: int
) -> list[np.ndarray]:
    """Run a flwr-datasets partitioner on an in-memory label table carrying global indices."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    if partitioner is Partitioner.IID:  # IidPartitioner takes contiguous shards: shuffle first
        part = IidPartitioner(num_partitions)
        table = table.shuffle(seed=seed)
    else:
        part = DirichletPartitioner(
            num_partitions, "label", alpha, min_partition_size=min_size, seed=seed
        )
    part.dataset = table
    return [
        part.load_partition(k).with_format("arrow")["idx"].to_numpy()
        for k in range(num_partitions)
    ]


def limit_per_partition(indices: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """Deterministically subsample ``indices`` to at most ``n`` (sorted; ``None``/0 = all)."""
    indices = np.asarray(indices, dtype=np.int64)
    if n is not None and n < 0:
        raise ValueError(f"max examples must be >= 0 (0 or None = no limit), got {n}")
    if not n or len(indices) <= n:
        return np.sort(indices)
    chosen = np.random.default_rng(seed).choice(len(indices), size=n, replace=False)
    return np.sort(indices[chosen])


def train_val_split(
    indices: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically split ``indices`` into sorted (train, val) arrays.

    ``round(val_fraction * n)`` examples go to validation, but train keeps at least one.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(int(round(val_fraction * len(indices))), max(len(indices) - 1, 0))
    order = np.random.default_rng(seed).permutation(len(indices))
    return np.sort(indices[order[n_val:]]), np.sort(indices[order[:n_val]])


# --------------------------------------------------------------------------- shards


class Shard(Dataset):
    """A subset of a :class:`RawDataset` yielding ``(image_tensor, label, global_index)``.

    ``global_index`` is the index into ``raw`` and keys per-image caches.
    """

    def __init__(
        self,
        raw: RawDataset,
        indices: np.ndarray | Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(raw))):
            raise IndexError(f"shard indices must be a 1-D array in [0, {len(raw)})")
        self.raw = raw
        self.indices = indices
        self.transform = transform
        self.labels = raw.labels[indices]
        self.classes = raw.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int]:
        index = int(self.indices[k])
        image, label = self.raw[index]
        return self.transform(image), label, index

    def label_set(self) -> list[int]:
        """Sorted distinct labels present in the shard."""
        return [int(c) for c in np.unique(self.labels)]


def load_client_shard(
    dataset: str,
    data_dir: str | Path | None,
    partition_id: int,
    num_partitions: int,
    partitioner: Partitioner | str = Partitioner.IID,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    max_examples: int | None = None,
    val_fraction: float = 0.1,
    transform: Callable[[Image.Image], torch.Tensor],
) -> tuple[Shard, Shard]:
    """(train, val) shards of simulated client ``partition_id`` from the train split.

    The partition is computed once per process and argument set; it is then capped at
    ``max_examples`` (``None``/0 = no cap) and split with ``val_fraction``, both by ``seed``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    raw = load_split(dataset, data_dir, "train")
    shards = _cached_partitions(raw, num_partitions, partitioner, alpha, seed)
    indices = limit_per_partition(shards[partition_id], max_examples, seed)
    train_idx, val_idx = train_val_split(indices, val_fraction, seed)
    return Shard(raw, train_idx, transform), Shard(raw, val_idx, transform)


@functools.lru_cache(maxsize=8)
def _cached_partitions(
    raw: RawDataset, num_partitions: int, partitioner: Partitioner | str, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    shards = partition_indices(raw.labels, num_partitions, partitioner, alpha=alpha, seed=seed)
    for shard in shards:
        shard.setflags(write=False)
    return tuple(shards)


def load_local_dataset(
    data_dir: str | Path,
    dataset: str,
    transform: Callable[[Image.Image], torch.Tensor],
    max_examples: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[Shard, Shard]:
    """(train, val) shards of a deployment client whose private data is the train split of
    ``data_dir`` (any local format of :func:`load_split`), capped at ``max_examples``."""
    raw = load_split(dataset, data_dir, "train")
    indices = limit_per_partition(np.arange(len(raw)), max_examples, seed)
    train_idx, val_idx = train_val_split(indices, val_fraction, seed)
    return Shard(raw, train_idx, transform), Shard(raw, val_idx, transform)
