"""Streaming a layer's activations to a memory-mapped file, batch by batch."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gate.models.base import Array, LoadedModel

BATCH = 256


@dataclass
class Streamed:
    activations: npt.NDArray[np.float32]  # a read-only np.memmap (N x D)
    predictions: npt.NDArray[np.int64]
    path: Path


def stream_activations(
    model: LoadedModel,
    x: Array,
    layer: str,
    directory: str | Path | None = None,
    pool: bool = False,
    batch_size: int = BATCH,
) -> Streamed:
    """Forward ``x`` in batches; each batch's activations go straight to an on-disk memmap.

    With ``pool``, 4-D conv maps (N, C, H, W) are global-average-pooled to (N, C). The
    caller owns ``path`` (put it in a temporary directory that it removes).
    """
    directory = (
        Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="gate-ac-"))
    )
    path = directory / f"activations-{abs(hash(layer))}.f32"
    n = len(x)
    preds = np.empty(n, dtype=np.int64)
    out: np.memmap | None = None
    for start in range(0, n, batch_size):
        res = model.forward(x[start : start + batch_size], [layer])
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
