"""Per-sample outputs of activation clustering; formatters return text/bytes, the CLI writes."""

from __future__ import annotations

import io

import numpy as np

from gate.report.schema import ActivationClusteringReport


def suspicious_csv(ac: ActivationClusteringReport) -> str:
    """``index,label,suspected_source,separation,exre_score,spectral_separation`` per sample."""
    lines = ["index,label,suspected_source,separation,exre_score,spectral_separation"]
    rows: list[tuple[int, str]] = []
    for c in ac.classes:
        if not c.flagged:
            continue
        src = "" if c.suspected_source is None else str(c.suspected_source)
        sep = "" if c.separation is None else f"{c.separation:g}"
        exre = "" if c.exre_score is None else f"{c.exre_score:g}"
        spec = "" if c.spectral is None else f"{c.spectral.separation:g}"
        rows += [(i, f"{i},{c.label},{src},{sep},{exre},{spec}") for i in c.suspicious_indices]
    lines += [line for _, line in sorted(rows)]
    return "\n".join(lines) + "\n"


def clean_indices(ac: ActivationClusteringReport) -> np.ndarray:
    suspicious = {i for c in ac.classes for i in c.suspicious_indices}
    keep = [i for i in range(ac.n_samples) if i not in suspicious]
    return np.asarray(keep, dtype=np.int64)


def clean_indices_npy(ac: ActivationClusteringReport) -> bytes:
    buf = io.BytesIO()
    np.save(buf, clean_indices(ac), allow_pickle=False)
    return buf.getvalue()
