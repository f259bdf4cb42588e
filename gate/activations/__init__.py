"""Running inputs through a model in bounded batches and collecting layer activations."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gate.models.base import Array, ForwardResult, LoadedModel

DEFAULT_BATCH = 256
PROGRESS_MIN_BATCHES = 8
# Bytes of outputs plus captured activations per batch; GATE_BATCH_MEMORY_MB overrides.
DEFAULT_BATCH_MEMORY = 256 * 2**20
_MEASURE_ROWS = 4


def batch_memory() -> int:
    try:
        return max(1, int(float(os.environ.get("GATE_BATCH_MEMORY_MB", "")) * 2**20))
    except ValueError:
        return DEFAULT_BATCH_MEMORY


def forward_batches(
    model: LoadedModel,
    x: Array,
    layers: Sequence[str],
    batch_size: int = DEFAULT_BATCH,
    memory: int | None = None,
    progress: str | None = None,
    quiet: bool = True,
    order: np.ndarray | None = None,
) -> Iterator[tuple[int, ForwardResult]]:
    """Forward ``x`` in batches, yielding ``(first row, result)``; with ``order`` (a
    permutation of the rows) the rows ``x[order]`` in that order, one batch gathered at a
    time, and ``first row`` counts positions in ``order``.

    The first few rows run alone to measure what one row's outputs and activations take;
    later batches hold at most ``memory`` bytes of them (and at most ``batch_size`` rows),
    so a wide layer or a long sequence cannot exhaust memory. The schedule depends only on
    shapes, so results are deterministic. With ``progress`` (a label) and more than
    :data:`PROGRESS_MIN_BATCHES` batches, progress goes to stderr unless ``quiet``.
    """
    from gate.progress import Progress

    n = len(x)

    def rows(start: int, stop: int) -> Array:
        return x[start:stop] if order is None else x[order[start:stop]]

    first = min(_MEASURE_ROWS, batch_size, n)
    res = model.forward(rows(0, first), layers)
    row_bytes = (
        np.asarray(res.outputs).nbytes + sum(np.asarray(a).nbytes for a in res.activations.values())
    ) / max(first, 1)
    budget = batch_memory() if memory is None else memory
    size = max(1, min(batch_size, int(budget // max(row_bytes, 1.0))))
    n_batches = 1 + -(-(n - first) // size)
    show = progress is not None and not quiet and n_batches >= PROGRESS_MIN_BATCHES
    with Progress(n_batches, progress or "extract", unit="batches", quiet=not show) as bar:
        yield 0, res
        bar.update()
        for start in range(first, n, size):
            yield start, model.forward(rows(start, start + size), layers)
            bar.update()


def extract(
    model: LoadedModel,
    x: Array,
    layers: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH,
    progress: str | None = None,
    quiet: bool = True,
) -> ForwardResult:
    """Forward ``x`` in bounded batches (:func:`forward_batches`); returns the outputs and
    each layer flattened per sample."""
    outputs: list[Array] = []
    acts: dict[str, list[Array]] = {name: [] for name in layers}
    for _, res in forward_batches(model, x, layers, batch_size, progress=progress, quiet=quiet):
        outputs.append(res.outputs)
        for name in layers:
            acts[name].append(res.activations[name].reshape(len(res.outputs), -1))
    return ForwardResult(
        outputs=np.concatenate(outputs),
        activations={name: np.concatenate(parts) for name, parts in acts.items()},
    )


DEFAULT_CACHE_DIR = ".gate-cache/activations"
_CACHE_VERSION = "3"  # 2: bounded batches (first rows run alone); 3: AC batches of 1024


class ActivationCache:
    """Extraction results on disk, keyed by model sha256 + input hash + layers.

    Each entry is a directory of ``.npy`` files (``outputs.npy`` and one ``layer-K.npy``
    per requested layer), written atomically and read with ``allow_pickle=False``. An
    entry that is unreadable or has the wrong shape is ignored and recomputed.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def key(self, model_sha256: str, input_hash: str, layers: Sequence[str]) -> str:
        h = hashlib.sha256()
        for part in (_CACHE_VERSION, model_sha256, input_hash, *layers):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def get(self, key: str, n_rows: int, layers: Sequence[str]) -> ForwardResult | None:
        entry = self.root / key[:2] / key
        try:
            outputs = _load_npy(entry / "outputs.npy", n_rows)
            acts = {
                name: _load_npy(entry / f"layer-{i}.npy", n_rows) for i, name in enumerate(layers)
            }
        except (OSError, ValueError, EOFError):
            self.misses += 1
            return None
        self.hits += 1
        return ForwardResult(outputs=outputs, activations=acts)

    def put(self, key: str, result: ForwardResult, layers: Sequence[str]) -> None:
        from gate._io import write_npy_atomic

        entry = self.root / key[:2] / key
        arrays = {"layer-" + str(i): result.activations[name] for i, name in enumerate(layers)}
        try:
            for stem, arr in {**arrays, "outputs": result.outputs}.items():
                write_npy_atomic(entry / f"{stem}.npy", arr)
        except OSError:  # a read-only or full disk only costs the cache
            pass


def _load_npy(path: Path, n_rows: int) -> Array:
    # Memory-mapped: a hit on a large AC matrix costs page cache, not a second copy in RAM.
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 2:
        raise ValueError(f"{path}: not a float32 matrix")
    if arr.shape[0] != n_rows:
        raise ValueError(f"{path}: {arr.shape[0]} rows, expected {n_rows}")
    return arr


def extract_cached(
    model: LoadedModel,
    x: Array,
    layers: Sequence[str],
    input_hash: str,
    cache: ActivationCache | None,
    batch_size: int = DEFAULT_BATCH,
    progress: str | None = None,
    quiet: bool = True,
) -> ForwardResult:
    """:func:`extract`, through ``cache`` when given (``input_hash`` identifies ``x``)."""
    layers = tuple(layers)
    # Models built from the user's code (--arch) also key on that code, not only the file.
    identity = str(getattr(model, "cache_identity", model.sha256))
    key = cache.key(identity, input_hash, layers) if cache is not None else ""
    if cache is not None:
        hit = cache.get(key, len(x), layers)
        if hit is not None:
            return hit
    res = extract(model, x, layers, batch_size, progress=progress, quiet=quiet)
    if cache is not None:
        cache.put(key, res, layers)
    return res
