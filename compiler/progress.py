"""A dependency-free progress bar on stderr (a TTY gets a live bar, logs get a line per quarter)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("vitc.progress")


def progress(it: Iterable[T], total: int | None, label: str, enabled: bool = True) -> Iterator[T]:
    tty = enabled and sys.stderr.isatty()
    t0 = time.perf_counter()
    n = 0
    next_log = 0.25
    for item in it:
        yield item
        n += 1
        if tty:
            width = 28
            frac = n / total if total else 0.0
            bar = "#" * int(frac * width)
            sys.stderr.write(f"\r{label} [{bar:<{width}}] {n}/{total or '?'} {time.perf_counter() - t0:5.1f}s")
            sys.stderr.flush()
        elif enabled and total and n / total >= next_log:
            log.info("%s: %d/%d (%.1fs)", label, n, total, time.perf_counter() - t0)
            next_log += 0.25
    if tty:
        sys.stderr.write("\n")
