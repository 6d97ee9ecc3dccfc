"""Backbone key/value cache: skip the frozen backbone after the first epoch.

With no random augmentation an image's backbone keys/values never change (the backbone is
frozen and structured attention keeps prompts out of it), so a prompt's training needs the
backbone only once per image. ``KVCache`` stores every layer's keys/values of each image in
a memory-mapped file (fp16 by default), keyed by the image's global dataset index, up to a
size cap; images beyond the cap are recomputed each time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.model import APTViT

__all__ = ["KVCache"]

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


class KVCache:
    """Per-image backbone keys/values ``[L, 2, H, N, hd]`` on disk, memory-mapped.

    Args:
        model: the model whose backbone is cached.
        root: folder for the cache file; a temporary folder (deleted with the cache) if None.
        max_bytes: size cap of the file; images past it are not cached.
        dtype: ``torch.float16`` (default, half the disk) or ``torch.float32`` (exact).
    """

    def __init__(
        self,
        model: APTViT,
        root: str | Path | None = None,
        max_bytes: int = 4 << 30,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"cache dtype must be one of {list(_NUMPY_DTYPES)}, got {dtype}")
        self.model = model
        self.dtype = dtype
        self.max_bytes = max_bytes
        self._tmp = tempfile.TemporaryDirectory(prefix="alacarte-kv-") if root is None else None
        self.root = Path(self._tmp.name if self._tmp else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._slots: dict[int, int] = {}
        self._store: np.memmap | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    def kv(self, indices: Tensor, images: Tensor) -> Tensor:
        """Keys/values ``[L, 2, B, H, N, hd]`` of a batch, from the cache where present.

        Args:
            indices: ``[B]`` global dataset indices of the images (the cache keys).
            images: ``[B, 3, H, W]`` the images; only those not cached are run.
        """
        keys = [int(i) for i in indices]
        miss = [b for b, key in enumerate(keys) if key not in self._slots]
        hit = [b for b, key in enumerate(keys) if key in self._slots]
        self.hits, self.misses = self.hits + len(hit), self.misses + len(miss)
        device = self.model.device
        parts: list[Tensor] = []
        if miss:
            computed = self.model.backbone_kv(images[miss].to(device))  # [L, 2, m, H, N, hd]
            self._write([keys[b] for b in miss], computed)
            parts.append(computed)
        if hit:
            rows = self._store[[self._slots[keys[b]] for b in hit]]  # [h, L, 2, H, N, hd]
            parts.append(torch.from_numpy(rows).to(device, torch.float32).movedim(0, 2))
        order = torch.as_tensor(miss + hit).argsort().to(device)
        return torch.cat(parts, dim=2).index_select(2, order)

    def _write(self, keys: list[int], kv: Tensor) -> None:
        rows = kv.movedim(2, 0).to("cpu", self.dtype).numpy()  # [m, L, 2, H, N, hd]
        if self._store is None:
            self._open(rows.shape[1:])
        free = len(self._store) - len(self._slots)
        for key, row in zip(keys[:free], rows[:free]):
            self._slots[key] = len(self._slots)
            self._store[self._slots[key]] = row

    def _open(self, item_shape: tuple[int, ...]) -> None:
        item_bytes = int(np.prod(item_shape)) * np.dtype(_NUMPY_DTYPES[self.dtype]).itemsize
        capacity = max(self.max_bytes // item_bytes, 1)
        self._store = np.memmap(self.root / "kv.bin", dtype=_NUMPY_DTYPES[self.dtype], mode="w+",
                                shape=(capacity, *item_shape))

    def close(self) -> None:
        """Drop the memory map and delete a temporary cache folder."""
        self._store = None
        self._slots.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
