"""Progress on stderr: a live tqdm bar on a terminal; otherwise a log line per quarter of the work."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("vitc.progress")


def progress(it: Iterable[T], total: int | None, label: str, enabled: bool = True) -> Iterator[T]:
    if enabled and sys.stderr.isatty():
        yield from tqdm(it, total=total, desc=label, file=sys.stderr, dynamic_ncols=True)
        return
    t0 = time.perf_counter()
    next_log = 0.25
    for n, item in enumerate(it, 1):
        yield item
        if enabled and total and n / total >= next_log:
            log.info("%s: %d/%d (%.1fs)", label, n, total, time.perf_counter() - t0)
            next_log += 0.25
