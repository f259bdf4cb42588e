"""Per-sample outputs of activation clustering; formatters return text/bytes, the CLI writes."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence

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


def suspicious_texts(
    texts: Sequence[str], rows: Sequence[int], label: int, top_words: int = 10, limit: int = 500
) -> str:
    """A flagged class's suspicious texts (text data), headed by the words most
    over-represented in them against every other text: inserted trigger words show up
    there, as a stamped patch shows up in the image mosaic's mean."""
    picked = set(rows)
    others = [t for i, t in enumerate(texts) if i not in picked]
    mine = [texts[i] for i in rows]

    def shares(group: Sequence[str]) -> Counter[str]:
        counts: Counter[str] = Counter()
        for text in group:
            counts.update(set(text.lower().split()))
        return counts

    in_mine, in_others = shares(mine), shares(others)
    n_mine, n_others = max(len(mine), 1), max(len(others), 1)
    lift = sorted(
        ((in_mine[w] / n_mine - in_others[w] / n_others, w) for w in in_mine),
        key=lambda t: (-t[0], t[1]),
    )[:top_words]
    lines = [
        f"# class {label}: {len(mine)} suspicious texts (of {len(texts)})",
        "# words over-represented in them (share of suspicious texts / of the others):",
        *(
            f"#   {w}  {in_mine[w] / n_mine:.2f} / {in_others[w] / n_others:.2f}"
            for d, w in lift
            if d > 0
        ),
        "# index<TAB>text",
    ]
    for i in list(rows)[:limit]:
        lines.append(f"{i}\t{texts[i]!r}"[:2000])
    if len(rows) > limit:
        lines.append(f"# ... {len(rows) - limit} more (see suspicious.csv)")
    return "\n".join(lines) + "\n"
