"""Plain-text tables, as the command line and the ServerApp print them, and the cells they share.

One row per line, columns two spaces apart, text left-aligned (``right`` columns
right-aligned, for numbers), no trailing spaces::

    >>> print(format_table(("SOURCE", "VERSION"), [("a", 2), ("bb", 10)], right={1}))
    SOURCE  VERSION
    a             2
    bb           10
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.prompt import Prompt

__all__ = ["accuracy_table", "format_labels", "format_metrics", "format_table", "format_time"]

SEPARATOR = "  "


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[int] = ()) -> str:
    """``headers`` then ``rows`` (cells shown with ``str``) in aligned columns; ``right``: column indices."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        SEPARATOR.join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in cells)


def format_labels(labels: Sequence[int], num_classes: int) -> str:
    """Class ids as ranges, e.g. ``0-4,7 (6/10)``."""
    runs: list[list[int]] = []
    for c in labels:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    parts = [str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs]
    return f"{','.join(parts)} ({len(labels)}/{num_classes})"


def format_time(timestamp: float) -> str:
    """A POSIX time as ISO 8601 UTC, to the second; ``invalid (<value>)`` when it is no representable time."""
    try:
        if not math.isfinite(timestamp):
            raise ValueError(timestamp)
        return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError, TypeError):
        return f"invalid ({timestamp!r})"


def format_metrics(metrics: dict[str, float | int | str]) -> str:
    """Metrics as compact ``name=value`` pairs (``-`` when there are none)."""
    if not metrics:
        return "-"
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items()))


def accuracy_table(title: str, prompts: dict[str, Prompt], result: dict) -> str:
    """Per-source accuracy, then one ``composed <weighting> (k)`` row per weighting: uniform, and
    density when every prompt carries its source's density."""
    rows: list[tuple[object, ...]] = [
        (source, _shown_labels(prompt.config.labels), prompt.config.num_examples, f"{acc:.3f}", f"{own:.3f}")
        for (source, prompt), acc, own in zip(prompts.items(), result["prompt_accuracy"],
                                              result["prompt_accuracy_own"])]
    total = sum(p.config.num_examples for p in prompts.values())
    rows += [(f"composed {weighting} ({len(prompts)})", "all", total, f"{acc:.3f}", "")
             for weighting, acc in result["composed"].items()]
    table = format_table(("source", "labels", "train n", "acc (all)", "acc (own classes)"), rows, right={2, 3, 4})
    return f"\n{title}\n{table}"


def _shown_labels(labels: Sequence[int]) -> str:
    """A prompt's classes, listed when there are few (``0,3,4``), else counted (``9 classes``)."""
    return ",".join(map(str, labels)) if len(labels) <= 6 else f"{len(labels)} classes"
