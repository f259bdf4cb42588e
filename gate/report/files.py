"""What goes into a report directory, as ``{file name: bytes}``: the chosen formats, the
activation-clustering files and pictures, the trigger-search pictures, repaired data.

Nothing here writes: the CLI (gate.cli.publish) and ``gate demo`` write what these return,
so both produce the same directory from the same scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gate.report.formats import Format
    from gate.report.schema import Report


def format_files(report: Report, formats: Sequence[Format]) -> dict[str, bytes]:
    return {fmt.filename: fmt.render(report).encode("utf-8") for fmt in formats}


def ac_files(
    report: Report, data: object = None, pictures: Mapping[int, bytes] | None = None
) -> dict[str, bytes]:
    """suspicious.csv, clean_indices.npy and per flagged class a cluster picture and (image
    inputs) a mosaic of its suspicious samples, or (text data) a list of its suspicious texts."""
    ac = report.activation_clustering
    if ac is None:
        return {}
    import numpy as np

    from gate.ac.outputs import clean_indices_npy, suspicious_csv, suspicious_texts
    from gate.ac.pictures import suspicious_mosaic
    from gate.data import TextData

    files = {
        "suspicious.csv": suspicious_csv(ac).encode("utf-8"),
        "clean_indices.npy": clean_indices_npy(ac),
    }
    x = getattr(data, "x", None)
    for c in ac.classes:
        if not c.flagged:
            continue
        if isinstance(data, TextData):
            text = suspicious_texts(data.texts, c.suspicious_indices, c.label)
            files[f"ac-class-{c.label}-suspicious.txt"] = text.encode("utf-8")
        if pictures and c.label in pictures:
            files[f"ac-class-{c.label}-clusters.png"] = pictures[c.label]
        png = suspicious_mosaic(x, c.suspicious_indices) if isinstance(x, np.ndarray) else None
        if png is not None:
            files[f"ac-class-{c.label}-suspicious.png"] = png
    return files


def repaired_files(
    report: Report, data: object, relabels: Mapping[int, int], mode: str
) -> dict[str, bytes]:
    """repaired.npz (or repaired.jsonl for text data): the training set with the suspicious
    rows relabelled as ExRe decides, or dropped (``--repair``)."""
    from gate.ac.outputs import repaired_jsonl, repaired_npz
    from gate.data import Dataset, TextData

    ac = report.activation_clustering
    if ac is None or mode == "none":
        return {}
    if isinstance(data, Dataset):
        return {"repaired.npz": repaired_npz(data.x, data.y, ac, dict(relabels), mode)}
    if isinstance(data, TextData):
        text = repaired_jsonl(data.texts, data.y, ac, dict(relabels), mode)
        return {"repaired.jsonl": text.encode("utf-8")}
    return {}


def report_files(
    report: Report,
    formats: Sequence[Format],
    data: object = None,
    ac_pictures: Mapping[int, bytes] | None = None,
    trigger_pictures: Mapping[str, bytes] | None = None,
) -> dict[str, bytes]:
    """Everything a scan leaves in its report directory, in a fixed order."""
    return {
        **format_files(report, formats),
        **ac_files(report, data, ac_pictures),
        **dict(sorted((trigger_pictures or {}).items())),
    }
