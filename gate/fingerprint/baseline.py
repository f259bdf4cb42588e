"""Baselines: reference fingerprints of known-clean models, plus a validated manifest.

A baseline directory holds ``baseline.json`` (pydantic-validated) and ``fingerprints.npz``
(read with ``allow_pickle=False``). Nothing in it is pickled: the fitted detectors are
stored as plain arrays (``detector.<name>.<array>``; trees as node tables, support vector
indices, neighbour densities) that a scan checks and scores with in numpy, and calibration
scores live in the manifest. A baseline without detector arrays is refit at scan time.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gate._io import check_npz, write_npz, write_text_atomic
from gate._version import __version__
from gate.data import json_value_problem
from gate.errors import BaselineError, first_line
from gate.fingerprint.probes import PROBE_KINDS, ProbeSet, probe_hash
from gate.models.base import Array

MANIFEST = "baseline.json"
SHARD_MANIFEST = "shard.json"
ARRAYS = "fingerprints.npz"
DETECTOR_PREFIX = "detector."
PROBE_TEXTS = "probe_texts"  # text models' probe texts (UTF-8 JSON list as uint8)
SCHEMA_VERSION = 1
MIN_REFERENCES = 3
MAX_ABS_VALUE = 1e30  # far beyond any log-probability, activation statistic or score
MAX_MANIFEST_BYTES = 64 << 20  # a real manifest is kilobytes; refuse before json reads it all


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_M = TypeVar("_M", bound=BaseModel)


class ProbeInfo(_Frozen):
    sha256: str
    count: int
    kinds: dict[str, int]
    seed: int
    source: str = Field(description="'synthetic' or 'data:<sha256 of x>'")


class ReferenceInfo(_Frozen):
    name: str
    sha256: str


class DetectorCalibration(_Frozen):
    name: str
    params: dict[str, Any]
    calibration_scores: list[float]


class TriggerCalibration(_Frozen):
    """Every reference's per-class trigger-search scores (``gate baseline build
    --trigger-search``; see gate.trigger.stats.profile)."""

    options: dict[str, Any]
    inputs: str = Field(description="'data' (from --data) or 'synthetic' (--input-shape)")
    reference_classes: list[dict[str, list[float]]]


class _FamilyManifest(_Frozen):
    """What identifies a model family's fingerprints; shared by baselines and their shards."""

    schema_version: Literal[1] = 1
    gate_version: str
    input_shape: list[int]
    output_size: int
    layer: str
    layer_rule: Literal["default", "explicit"]
    representation: str
    blocks: list[tuple[int, int]]
    probes: ProbeInfo
    references: list[ReferenceInfo]
    seed: int
    trigger_search: TriggerCalibration | None = None


class BaselineManifest(_FamilyManifest):
    kind: Literal["gate-baseline"] = "gate-baseline"
    detectors: list[DetectorCalibration]


class ShardManifest(_FamilyManifest):
    """One slice of a sharded baseline build (``gate baseline build --shard I/N``).

    ``shard`` is 1-based; ``indices`` are the 0-based positions of this shard's references
    in the full, ordered model list. Calibration is left to ``gate baseline merge``.
    """

    kind: Literal["gate-baseline-shard"] = "gate-baseline-shard"
    shard: int
    shard_count: int
    total_references: int
    indices: list[int]
    detectors: list[str]


@dataclass(frozen=True)
class BaselineShard:
    manifest: ShardManifest
    fingerprints: Array
    probes: ProbeSet
    path: str


@dataclass(frozen=True)
class Baseline:
    manifest: BaselineManifest
    fingerprints: Array
    probes: ProbeSet
    path: str
    # Fitted detectors' arrays, keyed "<detector>.<array>"; empty for a baseline to refit.
    detector_state: dict[str, Array] = field(default_factory=dict)

    @property
    def representation(self) -> tuple[str, ...]:
        return tuple(self.manifest.representation.split("+"))

    @property
    def calibration(self) -> dict[str, list[float]]:
        return {d.name: d.calibration_scores for d in self.manifest.detectors}


def data_digest(x: Array) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def save_baseline(
    out: Path,
    manifest: BaselineManifest,
    fingerprints: Array,
    probes: ProbeSet,
    detector_state: Mapping[str, Array] | None = None,
) -> None:
    check_output_dir(out)
    state = {f"{DETECTOR_PREFIX}{k}": v for k, v in (detector_state or {}).items()}
    _write_dir(out, MANIFEST, manifest, fingerprints, probes, state)


def check_output_dir(out: Path, shard: bool = False) -> None:
    """Refuse to write a baseline (or shard) over a file or a directory of something else."""
    name, what = (SHARD_MANIFEST, "baseline shard") if shard else (MANIFEST, "baseline")
    if out.exists() and not out.is_dir():
        raise BaselineError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / name).is_file():
        raise BaselineError(
            f"{out}: directory is not empty and is not a {what}; refusing to overwrite"
        )


def _write_dir(
    out: Path,
    manifest_name: str,
    manifest: BaseModel,
    fingerprints: Array,
    probes: ProbeSet,
    extra: Mapping[str, Array] | None = None,
) -> None:
    kind_codes = np.array([PROBE_KINDS.index(k) for k in probes.kinds], dtype=np.uint8)
    write_npz(
        out / ARRAYS,
        {
            "fingerprints": np.asarray(fingerprints, dtype=np.float32),
            "probes": probes.x,
            "probe_kinds": kind_codes,
            **_texts_array(probes),
            **(extra or {}),
        },
    )
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    write_text_atomic(out / manifest_name, text)


def save_shard(out: Path, manifest: ShardManifest, fingerprints: Array, probes: ProbeSet) -> None:
    check_output_dir(out, shard=True)
    _write_dir(out, SHARD_MANIFEST, manifest, fingerprints, probes)


def load_shard(path: str | Path) -> BaselineShard:
    d = Path(path)
    if not d.is_dir():
        raise BaselineError(f"baseline shard directory not found: {d}")
    mfile = d / SHARD_MANIFEST
    if not mfile.is_file():
        raise BaselineError(
            f"{d}: not a gate baseline shard (no {SHARD_MANIFEST}); build one with "
            "`gate baseline build --shard I/N`"
        )
    manifest = _read_manifest(mfile, ShardManifest, "shard")
    fps, probes, _ = _read_arrays(d, manifest.probes.sha256)
    expected = sum(r * c for r, c in manifest.blocks)
    n = len(manifest.references)
    if fps.shape != (n, expected) or len(manifest.indices) != n:
        raise BaselineError(
            f"{d}: fingerprints have shape {fps.shape}, shard manifest says {(n, expected)}"
        )
    return BaselineShard(manifest, fps, probes, str(d))


def _read_manifest(mfile: Path, cls: type[_M], what: str) -> _M:
    try:
        if mfile.stat().st_size > MAX_MANIFEST_BYTES:
            raise BaselineError(
                f"{mfile}: the {what} manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB"
            )
        raw = json.loads(mfile.read_text(encoding="utf-8"))
        return cls.model_validate(raw)
    except json.JSONDecodeError as exc:
        raise BaselineError(f"{mfile}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{mfile}: cannot read the {what} manifest ({exc})") from None
    except RecursionError:
        raise BaselineError(f"{mfile}: the {what} manifest is nested too deeply") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise BaselineError(f"{mfile}: invalid {what} manifest at {where}: {err['msg']}") from None
    except ValueError as exc:  # after ValidationError (a subclass): e.g. a 5000-digit integer
        raise BaselineError(
            f"{mfile}: invalid {what} manifest: {json_value_problem(exc)}"
        ) from None


def _read_arrays(d: Path, probes_sha256: str) -> tuple[Array, ProbeSet, dict[str, Array]]:
    try:
        check_npz(d / ARRAYS)  # headers against sizes, before numpy allocates what they declare
        with np.load(d / ARRAYS, allow_pickle=False) as npz:
            fps = np.asarray(npz["fingerprints"], dtype=np.float32)
            x = np.asarray(npz["probes"], dtype=np.float32)
            codes = np.asarray(npz["probe_kinds"])
            texts_raw = np.asarray(npz[PROBE_TEXTS]) if PROBE_TEXTS in npz.files else None
            state = {
                k[len(DETECTOR_PREFIX) :]: np.asarray(npz[k])
                for k in npz.files
                if k.startswith(DETECTOR_PREFIX)
            }
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BaselineError(
            f"{d / ARRAYS}: unreadable baseline arrays ({first_line(exc)})"
        ) from None
    except MemoryError:
        raise BaselineError(f"{d / ARRAYS}: baseline arrays too large to load") from None
    _check_values(d / ARRAYS, "fingerprints", fps)
    _check_values(d / ARRAYS, "probes", x)
    if probe_hash(x) != probes_sha256:
        raise BaselineError(
            f"{d}: stored probes do not match the manifest's probe hash (tampered or corrupt)"
        )
    if len(codes) != len(x) or (len(codes) and int(codes.max()) >= len(PROBE_KINDS)):
        raise BaselineError(f"{d}: probe kinds do not match the probes")
    kinds = tuple(PROBE_KINDS[int(c)] for c in codes)
    odd = [k for k, v in state.items() if v.dtype.kind not in "fiu"]
    if odd:
        raise BaselineError(f"{d / ARRAYS}: detector array {odd[0]!r} is not numeric")
    for key, value in sorted(state.items()):
        _check_values(d / ARRAYS, f"detector array {key!r}", value)
    texts = _read_texts(d, texts_raw, len(x))
    return fps, ProbeSet(x=x, kinds=kinds, sha256=probes_sha256, texts=texts), state


def _check_values(where: Path, what: str, values: Any) -> None:
    """Refuse NaN, infinities and magnitudes no real fingerprint reaches: NaN or 1e308 in
    a baseline made every p-value 1.0, so any candidate passed."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu" or arr.size == 0:
        return
    as_float = arr.astype(np.float64)
    if not np.all(np.isfinite(as_float)):
        raise BaselineError(f"{where}: {what} contain NaN or infinite values (corrupt or tampered)")
    if float(np.max(np.abs(as_float))) > MAX_ABS_VALUE:
        raise BaselineError(
            f"{where}: {what} hold values beyond +-{MAX_ABS_VALUE:g} (corrupt or tampered)"
        )


def _check_trigger(mfile: Path, manifest: BaselineManifest) -> None:
    """Every reference's trigger statistics: finite, sane, one value per class."""
    cal = manifest.trigger_search
    if cal is None:
        return
    if len(cal.reference_classes) != len(manifest.references):
        raise BaselineError(
            f"{mfile}: trigger search has {len(cal.reference_classes)} references' statistics "
            f"for {len(manifest.references)} references (corrupt or tampered)"
        )
    for i, ref in enumerate(cal.reference_classes):
        for name, values in sorted(ref.items()):
            if len(values) != manifest.output_size:
                raise BaselineError(
                    f"{mfile}: trigger statistic {name!r} of reference {i} has {len(values)} "
                    f"classes, the family {manifest.output_size} (corrupt or tampered)"
                )
            _check_values(mfile, f"trigger statistic {name!r} of reference {i}", values)


def _texts_array(probes: ProbeSet) -> dict[str, Array]:
    """Text probes' texts, as the UTF-8 bytes of a JSON list (no pickles, no object arrays)."""
    if probes.texts is None:
        return {}
    raw = json.dumps(list(probes.texts), ensure_ascii=False).encode("utf-8")
    return {PROBE_TEXTS: np.frombuffer(raw, dtype=np.uint8)}


def _read_texts(d: Path, raw: np.ndarray | None, n: int) -> tuple[str, ...] | None:
    if raw is None:
        return None
    try:
        texts = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        texts = None
    if not isinstance(texts, list) or len(texts) != n or not all(isinstance(t, str) for t in texts):
        raise BaselineError(f"{d / ARRAYS}: probe texts do not match the probes")
    return tuple(texts)


def load_baseline(path: str | Path) -> Baseline:
    d = Path(path)
    if not d.is_dir():
        raise BaselineError(f"baseline directory not found: {d}")
    mfile = d / MANIFEST
    if not mfile.is_file():
        raise BaselineError(
            f"{d}: not a gate baseline (no {MANIFEST}); build one with `gate baseline build`"
        )
    manifest = _read_manifest(mfile, BaselineManifest, "baseline")
    for det in manifest.detectors:
        _check_values(mfile, f"calibration scores of detector {det.name!r}", det.calibration_scores)
    _check_trigger(mfile, manifest)
    fps, probes, state = _read_arrays(d, manifest.probes.sha256)
    n_refs = len(manifest.references)
    expected = sum(r * c for r, c in manifest.blocks)
    if fps.shape != (n_refs, expected):
        raise BaselineError(
            f"{d}: fingerprints have shape {fps.shape}, manifest says {(n_refs, expected)}"
        )
    if n_refs < MIN_REFERENCES:
        raise BaselineError(
            f"{d}: baseline has {n_refs} references; at least {MIN_REFERENCES} are needed"
        )
    return Baseline(manifest, fps, probes, str(d), state)


def reference_names(paths: Sequence[str]) -> list[str]:
    """Short, unique display names for reference models (file names, disambiguated)."""
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


__all__ = [
    "ARRAYS",
    "MANIFEST",
    "MIN_REFERENCES",
    "Baseline",
    "BaselineManifest",
    "BaselineShard",
    "DetectorCalibration",
    "ProbeInfo",
    "ReferenceInfo",
    "ShardManifest",
    "__version__",
    "check_output_dir",
    "data_digest",
    "load_baseline",
    "load_shard",
    "reference_names",
    "save_baseline",
    "save_shard",
]
