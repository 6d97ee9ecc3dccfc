"""Backbone key/value cache: skip the frozen backbone after the first epoch.

With no random augmentation an image's backbone keys/values never change (the backbone is
frozen and structured attention keeps prompts out of it), so a prompt's training needs the
backbone only once per image. ``KVCache`` stores every layer's keys/values of each image in
a memory-mapped file (fp16 by default), keyed by the image's global dataset index, up to a
size cap; images beyond the cap are recomputed each time. It keeps each image's pooled
backbone features ``[D]`` too (what a source density is fitted on), in memory.

Every key/value the cache returns is in its precision (fp16 values as float32), also those it
has just computed: otherwise what a prompt learns would depend on which images a cache
already held, and a simulated client's cache lives in whichever Ray actor trained that source
before: a multi-round run would change with Ray's scheduling.

On POSIX the file is unlinked as soon as it is mapped: nothing else can open it, and its disk
space goes back when the cache is closed or its process ends, however it ends (a Flower
simulation kills its Ray actors, so a finaliser would never run and each run would leave its
caches behind in the temporary folder).

``Prefetch`` fills a cache in a background thread at the lowest CPU priority, so a backbone
pass can use cores that would otherwise idle (the server's test split while the clients train).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.model import APTViT

__all__ = ["KVCache", "Prefetch"]

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
# The output of all-hit batches (see ``KVCache.fetch``): one per thread, shared by every cache
# the thread reads, so a process that keeps a cache per simulated client holds one buffer, not
# one per client (76 MB each at batch 32 and 112 px).
_HIT_BUFFER = threading.local()


class KVCache:
    """Per-image backbone keys/values ``[L, 2, H, N, hd]`` on disk, memory-mapped.

    Args:
        model: the model whose backbone is cached.
        root: folder for the cache file; the system's temporary folder if None.
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
        self.root = Path(tempfile.gettempdir() if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._slots: dict[int, int] = {}
        self._store: np.memmap | None = None
        self._pooled: np.ndarray | None = None  # [capacity, D] float32, row = slot
        self._path: Path | None = None  # the file while it has a name (not on POSIX, see the module doc)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def full(self) -> bool:
        """No further image fits under the size cap (False until the first image is stored)."""
        return self._store is not None and len(self._slots) >= len(self._store)

    def kv(self, indices: Tensor, images: Tensor) -> Tensor:
        """Keys/values ``[L, 2, B, H, N, hd]`` of a batch, from the cache where present.

        Args:
            indices: ``[B]`` global dataset indices of the images (the cache keys).
            images: ``[B, 3, H, W]`` the images; only those not cached are run.
        """
        return self.fetch(indices, images)[0]

    def fetch(self, indices: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values ``[L, 2, B, H, N, hd]`` and pooled features ``[B, D]`` of a batch (see ``kv``).

        Keys/values are rounded to the cache's dtype whether they are read back or just computed,
        so a batch's values do not depend on which of its images were already cached.

        The keys/values of a batch that is all hits are written into one buffer that every
        cache of the calling thread reuses (a fresh 76 MB tensor per step would cost more in page
        faults than the copy): they are valid until the thread's next ``fetch``/``kv`` call on
        any cache; ``clone()`` them to keep them.
        """
        keys = [int(i) for i in indices]
        miss = [b for b, key in enumerate(keys) if key not in self._slots]
        hit = [b for b, key in enumerate(keys) if key in self._slots]
        self.hits, self.misses = self.hits + len(hit), self.misses + len(miss)
        device = self.model.device
        if miss:
            features, computed = self.model.backbone_forward(images[miss].to(device))  # kv: [L, 2, m, H, N, hd]
            stored = computed.to(self.dtype)
            computed = stored.to(computed.dtype)  # what a hit returns (module doc)
            pooled = self.model.pooled(features)  # [m, D]
            self._write([keys[b] for b in miss], stored, pooled)
            if not hit:
                return computed, pooled
            out = computed.new_empty(*computed.shape[:2], len(keys), *computed.shape[3:])
            out_pooled = pooled.new_empty(len(keys), pooled.shape[1])
            for j, b in enumerate(miss):
                out[:, :, b], out_pooled[b] = computed[:, :, j], pooled[j]
        else:
            out = self._hit_buffer(len(keys), device)
            out_pooled = torch.empty(len(keys), self._pooled.shape[1], dtype=torch.float32, device=device)
        if hit:
            slots = [self._slots[keys[b]] for b in hit]
            rows = self._store[slots]  # [h, L, 2, H, N, hd], one read
            for j, b in enumerate(hit):  # one strided copy (and cast to float32) per image
                out[:, :, b] = torch.from_numpy(rows[j])
            out_pooled[hit] = torch.from_numpy(self._pooled[slots]).to(out_pooled)
        return out, out_pooled

    def _hit_buffer(self, batch: int, device: torch.device) -> Tensor:
        """The thread's reused ``[L, 2, batch, H, N, hd]`` float32 output of all-hit batches: a
        slice of the leading batch rows, so every layer's keys and values stay contiguous."""
        L, two, *rest = self._store.shape[1:]
        buffer = getattr(_HIT_BUFFER, "tensor", None)
        fits = (buffer is not None and buffer.shape[:2] == (L, two) and buffer.shape[3:] == tuple(rest)
                and buffer.shape[2] >= batch and buffer.device == device)
        if not fits:
            buffer = _HIT_BUFFER.tensor = torch.empty(L, two, batch, *rest, dtype=torch.float32, device=device)
        return buffer[:, :, :batch]

    def _write(self, keys: list[int], kv: Tensor, pooled: Tensor) -> None:
        rows = kv.movedim(2, 0).to("cpu", self.dtype).numpy()  # [m, L, 2, H, N, hd]
        pooled_rows = pooled.to("cpu", torch.float32).numpy()  # [m, D]
        if self._store is None:
            self._open(rows.shape[1:], pooled_rows.shape[1])
        for key, row, pooled_row in zip(keys, rows, pooled_rows):
            if len(self._slots) >= len(self._store):
                break
            if key not in self._slots:  # an index may repeat within a batch
                slot = len(self._slots)
                self._store[slot] = row
                self._pooled[slot] = pooled_row
                self._slots[key] = slot

    def _open(self, item_shape: tuple[int, ...], dim: int) -> None:
        dtype = _NUMPY_DTYPES[self.dtype]
        item_bytes = int(np.prod(item_shape)) * np.dtype(dtype).itemsize
        capacity = self.max_bytes // item_bytes
        self._pooled = np.empty((max(capacity, 0), dim), dtype=np.float32)
        if capacity < 1:  # not even one image fits under the cap: cache nothing
            self._store = np.empty((0, *item_shape), dtype=dtype)
            return
        # a unique file, so caches sharing a root folder never map the same file
        fd, name = tempfile.mkstemp(dir=self.root, prefix="alacarte-kv-", suffix=".bin")
        os.close(fd)
        self._store = np.memmap(name, dtype=dtype, mode="w+", shape=(capacity, *item_shape))
        if os.name == "posix":  # the mapping keeps the file alive; the name is not needed any more
            os.unlink(name)
        else:
            self._path = Path(name)

    def close(self) -> None:
        """Drop the memory map and delete the cache file."""
        self._store = self._pooled = None
        self._slots.clear()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None


class Prefetch:
    """Fill ``cache`` with the images of ``loader`` in a background thread.

    The thread runs torch on one intra-op thread and, on Linux, under ``SCHED_IDLE``, so it
    takes only cores nothing else wants: started before a Flower round, it computes the
    server's test-split keys/values while the clients train (a nice-19 thread would still take
    a share of a busy core). It stops when the loader is exhausted, the cache is full, or
    ``result``/``close`` is called.

    Args:
        cache: the cache to fill; not to be used by anyone else until ``result`` returns.
        loader: batches of ``(images, labels, indices)`` (``common.data.Shard``).
    """

    def __init__(self, cache: KVCache, loader: Iterable[Sequence[Tensor]]) -> None:
        self._cache = cache
        self._threads = torch.get_num_threads()  # the caller's count, restored by close()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fill, args=(loader,), name="kv-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, loader: Iterable[Sequence[Tensor]]) -> None:
        try:
            torch.set_num_threads(1)
            if sys.platform.startswith("linux"):  # per-thread idle scheduling is Linux's
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            for batch in loader:
                if self._stop.is_set() or self._cache.full:
                    break
                self._cache.fetch(batch[2], batch[0])
        except BaseException as err:  # handed to result(), which re-raises it in the caller's thread
            self._error = err

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (forever if None) for the fill to end on its own; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> KVCache:
        """Stop the fill after its current batch and return the cache: the images it did not
        reach are computed by whoever fetches them, on every core. Raises the fill's error."""
        self.close()
        if self._error is not None:
            raise RuntimeError(f"prefetching backbone keys/values failed: {self._error}") from self._error
        return self._cache

    def close(self) -> None:
        """Stop the fill after its current batch and wait for the thread."""
        self._stop.set()
        self._thread.join()
        torch.set_num_threads(self._threads)  # in case the thread count is process-wide in this build

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
