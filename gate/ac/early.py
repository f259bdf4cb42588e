"""Preparing each class while the rest of the data is still being extracted.

Extraction runs the model in the sandboxed child; the parent mostly waits for its batches
(at 200k rows, 1.2 of 1.9 s; bench/results/scale-200k.md). Rows come in label order, so a
class's activations are complete once its last row arrives. :class:`EarlyPrepare` collects
the rows of the class being streamed and, when it is complete, hands it to one worker thread
that reduces and splits it (:func:`gate.ac.clustering.prepare_class`, most of NumPy's work
there releases the GIL). The results are the same arrays the clustering stage would compute
itself: the same function on the same rows, whichever thread ran it, so verdicts and reports
do not depend on timing.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import numpy as np
import numpy.typing as npt

from gate.ac.clustering import ACConfig, ClassClustering, Split, prepare_class


class EarlyPrepare:
    """An extraction hook (``on_rows``) for rows in non-decreasing label order.

    ``labels`` are the rows' labels in extraction order; ``wanted`` the classes to prepare.
    Use as a context manager; :meth:`results` gives what :func:`cluster_classes` takes as
    ``early`` (a class missing there, say because extraction failed part-way or came from
    the cache, is prepared by the clustering stage as usual).
    """

    def __init__(self, labels: npt.NDArray[np.int64], wanted: list[int], cfg: ACConfig) -> None:
        if len(labels) and not bool((np.diff(labels) >= 0).all()):
            raise ValueError("EarlyPrepare needs the rows in label order")
        self._cfg = cfg
        present, starts = np.unique(labels, return_index=True)
        ends = np.append(starts[1:], len(labels))
        chosen = set(wanted)
        self._spans = [
            (int(c), int(a), int(b))
            for c, a, b in zip(present, starts, ends, strict=True)
            if int(c) in chosen
        ]
        self._next = 0  # index into _spans of the class being collected
        self._parts: list[tuple[int, npt.NDArray[np.float32]]] = []
        self._futures: dict[int, Future[ClassClustering | Split]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gate-ac-prepare")

    def __enter__(self) -> EarlyPrepare:
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        # On success the classes still queued finish here (the clustering stage would wait
        # for them anyway); on an error they are dropped.
        if _e is not None:
            for f in self._futures.values():
                f.cancel()
        self._pool.shutdown(wait=True)

    def __call__(self, first: int, rows: npt.NDArray[np.float32]) -> None:
        self._parts.append((first, rows))
        end = first + len(rows)
        while self._next < len(self._spans) and self._spans[self._next][2] <= end:
            label, a, b = self._spans[self._next]
            self._next += 1
            block = self._gather(a, b)
            idx = np.arange(a, b, dtype=np.int64)
            local = np.arange(b - a, dtype=np.int64)
            self._futures[label] = self._pool.submit(
                prepare_class, block, idx, label, self._cfg, local
            )
        # Keep only the parts that still hold rows of a class not yet submitted.
        keep_from = self._spans[self._next][1] if self._next < len(self._spans) else end
        self._parts = [(f, r) for f, r in self._parts if f + len(r) > keep_from]

    def _gather(self, a: int, b: int) -> npt.NDArray[np.float32]:
        pieces = [r[max(a - f, 0) : b - f] for f, r in self._parts if f < b and f + len(r) > a]
        return np.ascontiguousarray(np.concatenate(pieces) if len(pieces) > 1 else pieces[0])

    def results(self) -> dict[int, Callable[[], ClassClustering | Split]]:
        return {label: f.result for label, f in self._futures.items()}
