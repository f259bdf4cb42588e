"""The fixed, seeded probe set every model of a family is fingerprinted on.

Besides real samples, probes include inputs that backdoors tend to react to: patches
stamped on real samples (BadNets-like triggers are small, saturated squares), blends of
real samples with noise (blended triggers), pure noise and edge cases. A backdoored model
sends many of these to its target class; clean models of the family do not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gate.data import Dataset
from gate.models.base import Array

PROBE_KINDS: tuple[str, ...] = ("real", "patch", "blend", "noise", "edge")


@dataclass(frozen=True)
class ProbeSet:
    x: Array
    kinds: tuple[str, ...]
    sha256: str
    # Text models: the probe texts that ``x`` tokenises (gate/fingerprint/text_probes.py).
    texts: tuple[str, ...] | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {k: self.kinds.count(k) for k in PROBE_KINDS if k in self.kinds}


def probe_hash(x: Array) -> str:
    h = hashlib.sha256()
    h.update(repr((x.dtype.str, x.shape)).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def make_probes(
    input_shape: Sequence[int],
    data: Dataset | None = None,
    seed: int = 0,
    n_real: int = 48,
    n_patch: int = 64,
    n_blend: int = 16,
    n_noise: int = 16,
) -> ProbeSet:
    """Build the probe set. Same arguments, same bytes: the hash is checked at scan time."""
    shape = tuple(int(d) for d in input_shape)
    rng = np.random.default_rng(seed)
    if data is not None:
        lo, hi = float(data.x.min()), float(data.x.max())
        base = data.x[_stratified(data.y, max(n_real, 1), rng)]
    else:
        lo, hi = 0.0, 1.0
        base = _smooth_noise(rng, max(n_real, 1), shape, lo, hi)
    if hi <= lo:
        hi = lo + 1.0
    parts: list[tuple[str, npt.NDArray[Any]]] = [
        ("real", base[:n_real]),
        ("patch", _patched(rng, base, n_patch, shape, lo, hi)),
        ("blend", _blended(rng, base, n_blend, lo, hi)),
        ("noise", rng.uniform(lo, hi, size=(n_noise, *shape))),
        ("edge", _edge_cases(shape, lo, hi)),
    ]
    x = np.concatenate([p.astype(np.float32).reshape(-1, *shape) for _, p in parts])
    kinds = tuple(kind for kind, p in parts for _ in range(len(p)))
    return ProbeSet(x=x, kinds=kinds, sha256=probe_hash(x))


def _stratified(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Round-robin over classes so every class is represented, seeded."""
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(ix) for ix in per_class):
        picked.extend(int(ix[depth]) for ix in per_class if depth < len(ix))
        depth += 1
    return np.array(picked[:n], dtype=np.int64)


def _spatial(shape: tuple[int, ...]) -> tuple[int, int] | None:
    return (shape[-2], shape[-1]) if len(shape) >= 2 else None


def _patched(
    rng: np.random.Generator, base: Array, n: int, shape: tuple[int, ...], lo: float, hi: float
) -> npt.NDArray[Any]:
    out = base[rng.integers(0, len(base), size=n)].copy()
    hw = _spatial(shape)
    for i in range(n):
        value = hi if i % 3 else lo
        if hw is None:
            k = max(1, shape[-1] // 8)
            idx = rng.choice(shape[-1], size=k, replace=False)
            out[i, ..., idx] = value
            continue
        h, w = hw
        size = int(rng.integers(max(1, min(h, w) // 8), max(2, min(h, w) // 3) + 1))
        # Half the patches sit in a corner, where stamped triggers usually go.
        if i % 2:
            top = (h - size) * int(rng.integers(0, 2))
            left = (w - size) * int(rng.integers(0, 2))
        else:
            top = int(rng.integers(0, h - size + 1))
            left = int(rng.integers(0, w - size + 1))
        if i % 4 == 3:  # checkerboard patch
            yy, xx = np.indices((size, size))
            out[i, ..., top : top + size, left : left + size] = np.where((yy + xx) % 2, hi, lo)
        else:
            out[i, ..., top : top + size, left : left + size] = value
    return out


def _blended(
    rng: np.random.Generator, base: Array, n: int, lo: float, hi: float
) -> npt.NDArray[Any]:
    picks = base[rng.integers(0, len(base), size=n)]
    pattern = rng.uniform(lo, hi, size=picks.shape[1:])
    alpha = rng.uniform(0.1, 0.3, size=(n,) + (1,) * (picks.ndim - 1))
    return (1 - alpha) * picks + alpha * pattern


def _smooth_noise(
    rng: np.random.Generator, n: int, shape: tuple[int, ...], lo: float, hi: float
) -> npt.NDArray[Any]:
    noise = rng.uniform(lo, hi, size=(n, *shape))
    if _spatial(shape) is None:
        return noise
    # Average neighbours so the base images have structure, not white noise.
    smooth = noise.copy()
    for axis in (-1, -2):
        smooth += np.roll(noise, 1, axis=axis) + np.roll(noise, -1, axis=axis)
    return smooth / 5


def _edge_cases(shape: tuple[int, ...], lo: float, hi: float) -> npt.NDArray[Any]:
    cases = [
        np.full(shape, lo),
        np.full(shape, hi),
        np.full(shape, (lo + hi) / 2),
        np.full(shape, hi * 4.0),
        np.full(shape, lo - (hi - lo)),
    ]
    hw = _spatial(shape)
    if hw is not None:
        h, w = hw
        ramp_x = np.broadcast_to(np.linspace(lo, hi, w), shape)
        ramp_y = np.broadcast_to(np.linspace(lo, hi, h)[:, None], shape)
        yy, xx = np.indices((h, w))
        checker = np.broadcast_to(np.where((yy + xx) % 2, hi, lo), shape)
        cases += [ramp_x, ramp_y, checker]
    else:
        cases.append(np.broadcast_to(np.linspace(lo, hi, shape[-1]), shape))
    return np.stack([np.asarray(c, dtype=np.float64) for c in cases])
