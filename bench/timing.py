"""Interleaved timing: every contestant runs once per round, in a rotated order, so load
from other processes hits all of them alike; results are medians over rounds and the
median of per-round ratios (paired, which cancels slow drifts of the machine)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def race(contestants: dict[str, Callable[[], object]], repeats: int, inner: int = 1, warmup: int = 1) -> dict:
    """Time each zero-arg callable ``inner`` times per round for ``repeats`` rounds.

    Returns ``{"median_s": {name: s}, "rounds_s": {name: [s, ...]}}`` (seconds per call).
    """
    names = list(contestants)
    for name in names:
        for _ in range(warmup):
            contestants[name]()
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = contestants[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            rounds[name].append((time.perf_counter() - t0) / inner)
    return {"median_s": {n: statistics.median(v) for n, v in rounds.items()}, "rounds_s": rounds}


def ratio(result: dict, num: str, den: str) -> float:
    """Median over rounds of ``time[num] / time[den]`` measured in the same round."""
    a, b = result["rounds_s"][num], result["rounds_s"][den]
    return statistics.median(x / y for x, y in zip(a, b))
