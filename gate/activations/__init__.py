"""Running inputs through a model in bounded batches and collecting layer activations."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gate.models.base import Array, ForwardResult, LoadedModel

DEFAULT_BATCH = 256
PROGRESS_MIN_BATCHES = 8


def extract(
    model: LoadedModel,
    x: Array,
    layers: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH,
    progress: str | None = None,
    quiet: bool = True,
) -> ForwardResult:
    """Forward ``x`` in batches; returns outputs and each layer flattened per sample.

    With ``progress`` (a label) and more than :data:`PROGRESS_MIN_BATCHES` batches, a
    progress bar or periodic log lines go to stderr unless ``quiet``.
    """
    from gate.progress import Progress

    outputs: list[Array] = []
    acts: dict[str, list[Array]] = {name: [] for name in layers}
    n_batches = -(-len(x) // batch_size)
    show = progress is not None and not quiet and n_batches >= PROGRESS_MIN_BATCHES
    bar = Progress(n_batches, progress or "extract", unit="batches", quiet=not show)
    for start in range(0, len(x), batch_size):
        res = model.forward(x[start : start + batch_size], layers)
        outputs.append(res.outputs)
        for name in layers:
            acts[name].append(res.activations[name].reshape(len(res.outputs), -1))
        bar.update()
    bar.close()
    return ForwardResult(
        outputs=np.concatenate(outputs),
        activations={name: np.concatenate(parts) for name, parts in acts.items()},
    )


DEFAULT_CACHE_DIR = ".gate-cache/activations"
_CACHE_VERSION = "1"


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
