"""Checking and analysing many image files, each once, in this process or in ``workers`` CPU processes.

    with FileAnalyzer(analyzer, workers=2) as batch:
        for path, error in batch.check(paths): ...          # error: ImageReadError or None (full decode)
        for path, result in batch.analyze(paths): ...       # result: list[Face] or ImageReadError

Results come back in the order of ``paths``. Worker processes are started with ``spawn`` (no fork of a
process that holds torch/onnxruntime threads); each rebuilds the analyzer from its pickle (the dlib and
insightface analyzers pickle as their settings and reload their models once per worker) and ignores Ctrl-C,
which the main process handles. Workers help CPU backends that use one core per image (dlib); onnxruntime
already spreads one image over the cores, and a GPU analyzer must stay in one process.
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ImageReadError, InputError
from ..images import check_image, load_image
from .base import Face, FaceAnalyzer

__all__ = ["FileAnalyzer"]

log = logging.getLogger("idglow")
_WORKER_ANALYZER: FaceAnalyzer | None = None


def _init_worker(analyzer: FaceAnalyzer) -> None:
    global _WORKER_ANALYZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the pool
    _WORKER_ANALYZER = analyzer


def _check_one(path: Path) -> ImageReadError | None:
    try:
        check_image(path)
    except ImageReadError as exc:
        return exc
    return None


def _analyze_one(path: Path, analyzer: FaceAnalyzer | None = None) -> list[Face] | ImageReadError:
    try:
        image = load_image(path)
    except ImageReadError as exc:
        return exc
    return (analyzer or _WORKER_ANALYZER).analyze(image)


class FileAnalyzer:
    """Runs :func:`~idglow_core.images.check_image` / ``analyzer.analyze(load_image(path))`` over files."""

    def __init__(self, analyzer: FaceAnalyzer, workers: int = 1):
        if not isinstance(workers, int) or workers < 1:
            raise InputError(f"workers must be a whole number >= 1, got {workers!r}. Use 1 (this process) or up "
                             f"to the number of CPU cores.")
        self.analyzer, self.workers = analyzer, workers
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            try:
                pickle.dumps(analyzer)
            except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing
                raise InputError(f"The face analyzer {type(analyzer).__name__} cannot be sent to worker processes "
                                 f"({exc}). Use workers=1.") from exc

    def _map(self, fn, paths: list[Path]) -> Iterator:
        if self.workers == 1 or len(paths) < 2:
            return (fn(p, self.analyzer) if fn is _analyze_one else fn(p) for p in paths)
        if self._pool is None:
            log.info("starting %d face-analysis worker processes", self.workers)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.analyzer,))
        return self._pool.map(fn, paths)

    def check(self, paths: Iterable[Path]) -> Iterator[tuple[Path, ImageReadError | None]]:
        """``(path, error or None)`` per file: every file fully decoded, nothing converted or kept."""
        paths = list(paths)
        return zip(paths, self._map(_check_one, paths))

    def analyze(self, paths: Iterable[Path]) -> Iterator[tuple[Path, list[Face] | ImageReadError]]:
        """``(path, faces)`` per file, or ``(path, ImageReadError)`` for a file that cannot be read."""
        paths = list(paths)
        return zip(paths, self._map(_analyze_one, paths))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "FileAnalyzer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
