"""Running inputs through a model in bounded batches and collecting layer activations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gate.models.base import Array, ForwardResult, LoadedModel

DEFAULT_BATCH = 256


def extract(
    model: LoadedModel, x: Array, layers: Sequence[str] = (), batch_size: int = DEFAULT_BATCH
) -> ForwardResult:
    """Forward ``x`` in batches; returns outputs and each layer flattened per sample."""
    outputs: list[Array] = []
    acts: dict[str, list[Array]] = {name: [] for name in layers}
    for start in range(0, len(x), batch_size):
        res = model.forward(x[start : start + batch_size], layers)
        outputs.append(res.outputs)
        for name in layers:
            acts[name].append(res.activations[name].reshape(len(res.outputs), -1))
    return ForwardResult(
        outputs=np.concatenate(outputs),
        activations={name: np.concatenate(parts) for name, parts in acts.items()},
    )
