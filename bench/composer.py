"""Masks composed in worker processes, for the benchmarks that measure many of them.

A campaign recomposes every evaluation target whose answers changed at each measurement, and
GrabCut is most of its time (about three quarters of a demo arm on 2 cores). The product's
composition is single-threaded, so the benchmark hands each target's ``MaskInputs`` to a pool
of processes and goes on answering while they compose: a measurement reads the database when it
is taken (the inputs are plain values), so what it measures does not move with the answers that
come after. The worker imports only the composition, not the web app.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.services.masks.composition import MaskInputs, read_pixels


@dataclass(frozen=True)
class Hard:
    """A hard mask, ``(H, W)`` bool, composed or being composed: call it for the mask."""

    get: Callable[[], np.ndarray]
    ready: Callable[[], bool]

    def __call__(self) -> np.ndarray:
        return self.get()

    @staticmethod
    def of(mask: np.ndarray) -> Hard:
        return Hard(lambda: mask, lambda: True)

    @staticmethod
    def union(parts: Sequence[Hard], shape: tuple[int, int]) -> Hard:
        """The union of ``parts`` (an empty mask of ``shape`` without any)."""
        if not parts:
            return Hard.of(np.zeros(shape, dtype=bool))
        return Hard(
            lambda: np.logical_or.reduce([p() for p in parts]),
            lambda: all(p.ready() for p in parts),
        )


@functools.lru_cache(maxsize=32)
def _pixels(path: str) -> np.ndarray:
    return read_pixels(Path(path))


def compose_hard(path: str, inputs: MaskInputs) -> np.ndarray:
    """The hard mask of ``inputs`` on the image file at ``path`` (its pixels are kept for the
    next target of the same image)."""
    return inputs.compose(_pixels(path)).hard


class Composer:
    """Composes masks in ``pools`` (one process each), a target always in the same one: its
    GrabCut cuts are kept there (``ml.composition.KEPT_CUTS``), and composing it again after
    answers that moved nothing across a threshold does not cut again. Without pools, here and
    now."""

    def __init__(self, pools: Sequence[Executor] = ()) -> None:
        self.pools = list(pools)

    def submit(self, target_id: int, path: Path, inputs: MaskInputs) -> Hard:
        if not self.pools:
            return Hard.of(compose_hard(str(path), inputs))
        pool = self.pools[target_id % len(self.pools)]
        future: Future[np.ndarray] = pool.submit(compose_hard, str(path), inputs)
        return Hard(future.result, future.done)


def default_workers() -> int:
    """One composing process per core."""
    return os.cpu_count() or 1


@contextlib.contextmanager
def composer(workers: int) -> Iterator[Composer]:
    """A ``Composer`` of ``workers`` processes (spawned: the caller's threads and open
    databases are not copied into them); 0: composing in the caller's process."""
    with contextlib.ExitStack() as stack:
        context = multiprocessing.get_context("spawn")
        pools = [
            stack.enter_context(ProcessPoolExecutor(1, mp_context=context))
            for _ in range(max(0, workers))
        ]
        yield Composer(pools)
