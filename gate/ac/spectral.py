"""Spectral signatures (Tran et al., 2018): outlier scores along a class's top direction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gate.ac.candidates import separation
from gate.ac.config import ACConfig
from gate.ac.reduction import TopDirection, fit_rows, kmeans


@dataclass(frozen=True)
class SpectralResult:
    separation: float
    top_ratio: float  # top singular value^2 over the second: share of the leading direction
    suspicious_indices: tuple[int, ...]
    flagged: bool



def spectral_signature(
    x: npt.NDArray[np.float32],
    idx: npt.NDArray[np.int64],
    cfg: ACConfig,
    top: TopDirection | None = None,
) -> SpectralResult:
    """Tran et al.: scores along the top singular vector of the centred class activations
    (``top``, from the PCA of :func:`gate.ac.reduction.reduce_with_top`, or computed here
    on :func:`fit_rows`)."""

    mu = x.mean(axis=0, dtype=np.float64)
    if top is None:
        fit = fit_rows(x, cfg.seed) - mu
        vals, vecs = np.linalg.eigh(fit.T @ fit)
        del fit
        ratio = float(vals[-1] / max(vals[-2], 1e-12)) if len(vals) > 1 else 0.0
        top = TopDirection(vecs[:, -1], ratio)
    v, ratio = top.vector, top.ratio
    # x @ v in float32 (no float64 copy of the class), centred afterwards.
    proj = (x @ v.astype(np.float32)).astype(np.float64) - float(mu @ v)
    assign = kmeans(proj[:, None], 2, cfg.seed, cfg.n_init)
    sep = separation(proj[:, None], assign)
    sizes = np.bincount(assign, minlength=2)
    small = int(np.argmin(sizes))
    frac = sizes[small] / len(x)
    # Tran et al. remove the 1.5 * eps highest scores; eps = the policy's poison bound.
    scores = proj**2
    eps = min(cfg.max_poison_fraction, 0.5)
    n_out = min(len(x) - 1, int(np.ceil(1.5 * eps * len(x))))
    highest = np.sort(idx[np.argsort(-scores, kind="stable")[:n_out]])
    flagged = bool(
        sep > cfg.spectral_threshold
        and frac <= cfg.max_poison_fraction
        and sizes[small] >= cfg.min_cluster_size
    )
    members = np.sort(idx[assign == small]) if flagged else highest
    return SpectralResult(round(sep, 4), round(ratio, 4), tuple(int(i) for i in members), flagged)
