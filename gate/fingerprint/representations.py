"""How a model's response to the probes becomes one fingerprint vector.

To add a representation: one function ``(activations, outputs) -> (P, m) matrix`` and one
line in :data:`REPRESENTATIONS`. The fingerprint is the row-major flattening of that
matrix, so every row stays attributable to one probe.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gate.errors import UsageError
from gate.models.base import Array

PerProbe = Callable[[Array, Array], Array]


def raw(activations: Array, outputs: Array) -> Array:
    """The layer's activations as they are (the fingerprint tutorial's choice)."""
    return activations.reshape(len(activations), -1)


def logits(activations: Array, outputs: Array) -> Array:
    """Log-softmax outputs: aligned across models because classes are."""
    z = outputs.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return np.asarray(z - np.log(np.exp(z).sum(axis=1, keepdims=True)), dtype=np.float32)


def gram(activations: Array, outputs: Array) -> Array:
    """Probe-by-probe cosine similarities of the layer's activations.

    Invariant to permutations and rotations of hidden units, which independently
    trained models do not share.
    """
    a = activations.reshape(len(activations), -1).astype(np.float64)
    a = a - a.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    a = a / np.where(norms > 1e-12, norms, 1.0)
    return np.asarray(a @ a.T, dtype=np.float32)


REPRESENTATIONS: dict[str, PerProbe] = {
    "raw": raw,
    "logits": logits,
    "gram": gram,
}


def parse_representation(spec: str) -> tuple[str, ...]:
    """``"gram+logits"`` -> ("gram", "logits"); unknown names are a usage error."""
    names = tuple(part.strip() for part in spec.split("+") if part.strip())
    unknown = [n for n in names if n not in REPRESENTATIONS]
    if not names or unknown:
        raise UsageError(
            f"unknown representation {spec!r}; choose from {', '.join(REPRESENTATIONS)} "
            "or combine them with '+'"
        )
    return names


def fingerprint_blocks(names: tuple[str, ...], activations: Array, outputs: Array) -> list[Array]:
    """One (P, m) block per representation, in the order given."""
    return [REPRESENTATIONS[n](activations, outputs) for n in names]
