"""Small generated image datasets for tests (no network, no shared files)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from common.assets import write_idx_gz

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def separable_images(n: int, num_classes: int = 10, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` grey ``size``x``size`` images; class ``c`` is a bright block at a class-specific place."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    cell = size // 4
    for i, c in enumerate(labels):
        r, q = divmod(int(c) % 16, 4)
        images[i, r * cell:(r + 1) * cell, q * cell:(q + 1) * cell] = 255
    return images, labels.astype(np.uint8)


def make_idx_dataset(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Write a Fashion-MNIST-shaped IDX dataset (10 classes) under ``root``; returns ``root``."""
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = separable_images(n, seed=seed + (split == "test"))
        write_idx_gz(images, root / IDX_FILES[split][0])
        write_idx_gz(labels, root / IDX_FILES[split][1])
    return root


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """``[n, 32, 32, 3]`` images as CIFAR pickle rows (channel-major, ``[n, 3072]``)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def dump_pickle(path: Path, obj: dict) -> None:
    """Write ``obj`` like the CIFAR python pickles (bytes keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({k.encode(): v for k, v in obj.items()}))


def make_cifar100_folder(root: Path, per_class_train: int, per_class_test: int) -> Path:
    """Write a ``cifar-100-python`` folder of separable colour images under ``root``; returns ``root``."""
    folder = root / "cifar-100-python"
    dump_pickle(folder / "meta", {"fine_label_names": [f"f{k}".encode() for k in range(100)],
                                  "coarse_label_names": [b"x"] * 20})
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        grey, labels = separable_images(100 * per_class, num_classes=100, size=32, seed=split == "test")
        rows = cifar_rows(np.repeat(grey[..., None], 3, axis=-1))
        dump_pickle(folder / split, {"data": rows, "fine_labels": labels.tolist(),
                                     "coarse_labels": [0] * len(labels)})
    return root
