"""Streaming a layer's activations to a memory-mapped file, batch by batch (and the cache)."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gate.activations import ActivationCache, forward_batches
from gate.models.base import Array, ForwardResult, LoadedModel

BATCH = 256
HASH_CHUNK = 1 << 24  # bytes of input hashed at a time


@dataclass
class Streamed:
    activations: npt.NDArray[np.float32]  # a read-only np.memmap (N x D), or a cached array
    predictions: npt.NDArray[np.int64]
    path: Path | None
    cached: bool = False


def stream_activations(
    model: LoadedModel,
    x: Array,
    layer: str,
    directory: str | Path | None = None,
    pool: bool = False,
    batch_size: int = BATCH,
    progress: str | None = None,
    quiet: bool = True,
) -> Streamed:
    """Forward ``x`` in bounded batches (:func:`gate.activations.forward_batches`); each
    batch's activations go straight to an on-disk memmap.

    With ``pool``, 4-D conv maps (N, C, H, W) are global-average-pooled to (N, C). The
    caller owns ``path`` (put it in a temporary directory that it removes). With
    ``progress`` (a label) and enough batches, progress goes to stderr unless ``quiet``.
    """
    directory = (
        Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="gate-ac-"))
    )
    path = directory / f"activations-{hashlib.sha256(layer.encode()).hexdigest()[:16]}.f32"
    n = len(x)
    preds = np.empty(n, dtype=np.int64)
    out: np.memmap | None = None
    for start, res in forward_batches(model, x, [layer], batch_size, None, progress, quiet):
        a = np.asarray(res.activations[layer])
        if pool and a.ndim == 4:
            a = a.mean(axis=(2, 3))
        a = a.reshape(len(a), -1).astype(np.float32, copy=False)
        if out is None:
            out = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, a.shape[1]))
        out[start : start + len(a)] = a
        logits = np.asarray(res.outputs).reshape(len(a), -1)
        preds[start : start + len(a)] = logits.argmax(axis=1)
    assert out is not None  # x is never empty (validated on load)
    out.flush()
    shape = out.shape
    del out
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=shape)
    return Streamed(activations=ro, predictions=preds, path=path)


def input_digest(x: Array) -> str:
    """sha256 of ``x``'s dtype, shape and bytes (hashed in chunks)."""
    h = hashlib.sha256(f"{x.dtype.str}{tuple(x.shape)}".encode())
    flat = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    for s in range(0, len(flat), HASH_CHUNK):
        h.update(flat[s : s + HASH_CHUNK].tobytes())
    return h.hexdigest()


def cached_activations(
    model: LoadedModel,
    x: Array,
    layer: str,
    directory: str | Path,
    cache: ActivationCache | None,
    input_hash: str | None = None,
    pool: bool = False,
    progress: str | None = None,
    quiet: bool = True,
) -> Streamed:
    """:func:`stream_activations` through ``cache``: keyed by the model's sha256, the data's
    hash, the layer and the pooling. A hit is memory-mapped, not read into memory."""
    if cache is None:
        return stream_activations(
            model, x, layer, directory, pool=pool, progress=progress, quiet=quiet
        )
    digest = input_hash or input_digest(x)
    key = cache.key(model.sha256, digest, (layer, "ac-pool" if pool else "ac-flat"))
    hit = cache.get(key, len(x), [layer])
    if hit is not None:
        preds = np.asarray(hit.outputs, dtype=np.float32)[:, 0].astype(np.int64)
        return Streamed(hit.activations[layer], preds, None, cached=True)
    streamed = stream_activations(
        model, x, layer, directory, pool=pool, progress=progress, quiet=quiet
    )
    # The entry's "outputs" hold the predicted class (a float32 column), all AC needs.
    outputs = streamed.predictions.astype(np.float32)[:, None]
    cache.put(
        key, ForwardResult(outputs=outputs, activations={layer: streamed.activations}), [layer]
    )
    return streamed
