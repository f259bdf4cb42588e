"""Per-sample outputs of activation clustering; formatters return text/bytes, the CLI writes."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence

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


RepairMode = str  # "relabel" or "drop"


def repaired_rows(
    y: np.ndarray, ac: ActivationClusteringReport, relabels: Mapping[int, int], mode: RepairMode
) -> tuple[np.ndarray, np.ndarray]:
    """(rows kept, their labels) of the training set after repair, the paper's last step.

    ``relabel``: a suspicious row gets the class exclusionary reclassification put it in
    (``relabels``: row -> class, from the classifier trained without its cluster); a
    suspicious row ExRe still puts in its own class, or one without an ExRe verdict (a
    class flagged by spectral signatures alone), cannot be repaired by a new label and is
    dropped. ``drop``: every suspicious row is dropped.
    """
    labels = np.asarray(y, dtype=np.int64).copy()
    suspicious = np.zeros(len(labels), dtype=bool)
    for c in ac.classes:
        suspicious[np.asarray(c.suspicious_indices, dtype=np.int64)] = True
    keep = ~suspicious
    if mode == "relabel":
        for row in np.flatnonzero(suspicious):
            new = relabels.get(int(row))
            if new is not None and new != labels[row]:
                labels[row] = new
                keep[row] = True
    rows = np.flatnonzero(keep).astype(np.int64)
    return rows, labels[rows]


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed .npz of ``arrays`` with fixed zip timestamps: byte-identical for the
    same arrays (``np.savez`` stamps the current time into every member)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def repaired_npz(
    x: np.ndarray,
    y: np.ndarray,
    ac: ActivationClusteringReport,
    relabels: Mapping[int, int],
    mode: RepairMode = "relabel",
) -> bytes:
    """``repaired.npz``: ``x`` and ``y`` of the repaired training set (see
    :func:`repaired_rows`) and ``index``, each kept row's row in the original data."""
    rows, labels = repaired_rows(y, ac, relabels, mode)
    return npz_bytes({"x": np.asarray(x)[rows], "y": labels, "index": rows})


def repaired_jsonl(
    texts: Sequence[str],
    y: np.ndarray,
    ac: ActivationClusteringReport,
    relabels: Mapping[int, int],
    mode: RepairMode = "relabel",
) -> str:
    """``repaired.jsonl`` for text data: one ``{"text", "label", "index"}`` per kept line."""
    import json

    rows, labels = repaired_rows(y, ac, relabels, mode)
    lines = [
        json.dumps({"text": texts[r], "label": int(lab), "index": int(r)}, ensure_ascii=False)
        for r, lab in zip(rows.tolist(), labels.tolist(), strict=True)
    ]
    return "".join(line + "\n" for line in lines)
