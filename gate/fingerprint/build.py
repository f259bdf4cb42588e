"""Building baselines from known-clean models: whole, or as shards merged later."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gate._version import __version__
from gate.activations import ActivationCache
from gate.data import Dataset, TextData
from gate.detectors import DEFAULT_DETECTORS, make_detector
from gate.detectors.ensemble import CalibratedEnsemble
from gate.errors import BaselineError, MismatchError, UsageError
from gate.fingerprint.baseline import (
    MIN_REFERENCES,
    BaselineManifest,
    BaselineShard,
    DetectorCalibration,
    ProbeInfo,
    ReferenceInfo,
    ShardManifest,
    TriggerCalibration,
    data_digest,
    reference_names,
    save_baseline,
)
from gate.fingerprint.compute import Fingerprint, fingerprint_checked, resolve_layer
from gate.fingerprint.probes import ProbeSet, make_probes
from gate.fingerprint.representations import parse_representation
from gate.fingerprint.text_probes import make_text_probes
from gate.models import LoadedModel, hf, load_model

DEFAULT_REPRESENTATION = "logits"


@dataclass(frozen=True)
class BaselineBuild:
    manifest: BaselineManifest
    fingerprints: np.ndarray
    probes: ProbeSet
    detector_state: dict[str, np.ndarray]

    def save(self, out: Path) -> None:
        save_baseline(out, self.manifest, self.fingerprints, self.probes, self.detector_state)


def build_baseline(
    model_paths: Sequence[str],
    data: Dataset | TextData | None = None,
    input_shape: Sequence[int] | None = None,
    layer: str | None = None,
    seed: int = 0,
    representation: str = DEFAULT_REPRESENTATION,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    cache: ActivationCache | None = None,
    quiet: bool = True,
    trigger_options: dict[str, Any] | None = None,
) -> BaselineBuild:
    """Fingerprint every reference and calibrate the ensemble (leave-one-out).

    With ``trigger_options`` (``--trigger-search``) every reference is also searched for
    triggers and its model-level scores stored, to calibrate candidates' searches."""
    shard = build_baseline_shard(
        model_paths,
        (1, 1),
        data,
        input_shape,
        layer,
        seed,
        representation,
        detectors,
        cache=cache,
        quiet=quiet,
        trigger_options=trigger_options,
    )
    return merge_baseline_shards([shard])


def shard_slice(n_models: int, index: int, count: int) -> range:
    """0-based positions of shard ``index`` (1-based) of ``count``: contiguous, in order."""
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"--shard {index}/{count}: expected I/N with 1 <= I <= N")
    if count > n_models:
        raise UsageError(f"--shard {index}/{count}: more shards than the {n_models} models")
    return range((index - 1) * n_models // count, index * n_models // count)


def build_baseline_shard(
    model_paths: Sequence[str],
    shard: tuple[int, int],
    data: Dataset | TextData | None = None,
    input_shape: Sequence[int] | None = None,
    layer: str | None = None,
    seed: int = 0,
    representation: str = DEFAULT_REPRESENTATION,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    cache: ActivationCache | None = None,
    quiet: bool = True,
    trigger_options: dict[str, Any] | None = None,
) -> BaselineShard:
    """Fingerprint slice ``shard`` = (I, N) of ``model_paths`` (see :func:`shard_slice`).

    Every shard is given the full, ordered model list, so names and positions agree.
    """
    from gate.progress import Progress

    if len(model_paths) < MIN_REFERENCES:
        raise UsageError(
            f"a baseline needs at least {MIN_REFERENCES} known-clean models, got {len(model_paths)}"
        )
    positions = shard_slice(len(model_paths), *shard)
    rep = parse_representation(representation)
    probes, source, first = _probe_set(model_paths, data, input_shape, seed)
    shape = tuple(int(d) for d in probes.x.shape[1:])
    names = reference_names(list(model_paths))
    prints: list[Fingerprint] = []
    shas: list[str] = []
    layer_used: str | None = None
    trigger_classes: list[dict[str, list[float]]] = []
    trigger_cal = None
    if trigger_options is not None:
        trigger_cal = _trigger_setup(data, shape, trigger_options, seed)
    with Progress(len(positions), "fingerprinting references", unit="models", quiet=quiet) as bar:
        for pos in positions:
            path = model_paths[pos]
            more = pos != positions[-1]
            model = first if pos == 0 and first is not None else load_model(path, more=more)
            chosen = resolve_layer(model, layer)
            fp = fingerprint_checked(
                model, probes, chosen, rep, what="reference model", cache=cache
            )
            if prints and (
                fp.blocks != prints[0].blocks or fp.output_size != prints[0].output_size
            ):
                raise MismatchError(
                    f"{path}: reference does not match the others (layer {chosen!r} gives "
                    f"{fp.blocks}, outputs {fp.output_size}; first reference gave "
                    f"{prints[0].blocks}, outputs {prints[0].output_size})"
                )
            prints.append(fp)
            shas.append(model.sha256)
            layer_used = layer_used or chosen
            if trigger_cal is not None:
                trigger_classes.append(_trigger_profile(model, path, trigger_cal, seed))
            bar.update()
    manifest = ShardManifest(
        gate_version=__version__,
        shard=shard[0],
        shard_count=shard[1],
        total_references=len(model_paths),
        indices=list(positions),
        input_shape=list(shape),
        output_size=prints[0].output_size,
        layer=str(layer_used),
        layer_rule="explicit" if layer else "default",
        representation="+".join(rep),
        blocks=list(prints[0].blocks),
        probes=ProbeInfo(
            sha256=probes.sha256,
            count=len(probes.x),
            kinds=probes.counts,
            seed=seed,
            source=source,
        ),
        references=[
            ReferenceInfo(name=names[pos], sha256=sha)
            for pos, sha in zip(positions, shas, strict=True)
        ],
        detectors=list(detectors),
        seed=seed,
        trigger_search=None
        if trigger_cal is None
        else TriggerCalibration(
            options=trigger_cal[0], inputs=trigger_cal[3], reference_classes=trigger_classes
        ),
    )
    matrix = np.stack([fp.vector for fp in prints]).astype(np.float32)
    return BaselineShard(manifest, matrix, probes, "")


_SHARD_KEYS = (
    "gate_version",
    "shard_count",
    "total_references",
    "input_shape",
    "output_size",
    "layer",
    "layer_rule",
    "representation",
    "blocks",
    "probes",
    "detectors",
    "seed",
)


def merge_baseline_shards(shards: Sequence[BaselineShard]) -> BaselineBuild:
    """Combine shards into the baseline an unsharded build gives, byte for byte.

    Refuses shards built with other probes, layer, representation, seed or version, and
    missing or duplicate slices. Calibration (leave-one-out) is computed here.
    """
    if not shards:
        raise UsageError("give at least one shard directory to merge")
    first = shards[0].manifest
    for s in shards[1:]:
        for key in _SHARD_KEYS:
            if getattr(s.manifest, key) != getattr(first, key):
                raise BaselineError(
                    f"{s.path or 'shard'}: {key} differs from {shards[0].path or 'the first shard'}"
                    f" ({getattr(s.manifest, key)!r} vs {getattr(first, key)!r}); shards must "
                    "come from one `gate baseline build` command"
                )
        if not np.array_equal(s.probes.x, shards[0].probes.x):
            raise BaselineError(f"{s.path}: probes differ from {shards[0].path}")
    seen: dict[int, str] = {}
    for s in shards:
        if s.manifest.shard in seen:
            raise BaselineError(
                f"shard {s.manifest.shard}/{first.shard_count} given twice "
                f"({seen[s.manifest.shard]} and {s.path})"
            )
        seen[s.manifest.shard] = s.path
    missing = [i for i in range(1, first.shard_count + 1) if i not in seen]
    if missing:
        raise BaselineError(
            f"missing shard(s) {', '.join(map(str, missing))} of {first.shard_count}"
        )
    ordered = sorted(shards, key=lambda s: s.manifest.shard)
    positions = [i for s in ordered for i in s.manifest.indices]
    if positions != list(range(first.total_references)):
        raise BaselineError(
            f"shards cover references {positions}, expected 0..{first.total_references - 1}"
        )
    trigger = _merge_trigger(ordered)
    matrix = np.concatenate([s.fingerprints for s in ordered]).astype(np.float32)
    blocks = tuple((int(r), int(c)) for r, c in first.blocks)
    ensemble = CalibratedEnsemble(first.detectors, blocks, seed=first.seed).fit(matrix)
    manifest = BaselineManifest(
        gate_version=first.gate_version,
        input_shape=first.input_shape,
        output_size=first.output_size,
        layer=first.layer,
        layer_rule=first.layer_rule,
        representation=first.representation,
        blocks=list(blocks),
        probes=first.probes,
        references=[ref for s in ordered for ref in s.manifest.references],
        detectors=[
            DetectorCalibration(
                name=name,
                params=make_detector(name, first.seed).get_params(),
                calibration_scores=[round(s, 12) for s in ensemble.calibration_[name]],
            )
            for name in first.detectors
        ],
        seed=first.seed,
        trigger_search=trigger,
    )
    return BaselineBuild(manifest, matrix, ordered[0].probes, ensemble.state())


TriggerSetup = tuple[dict[str, Any], np.ndarray, "np.ndarray | None", str]


def _trigger_setup(
    data: Dataset | TextData | None,
    shape: tuple[int, ...],
    options: dict[str, Any],
    seed: int,
) -> TriggerSetup:
    """The search's options and inputs, the same for every reference (and, via the stored
    options, for every candidate scanned against the baseline)."""
    from gate.trigger.report import input_range, search_inputs
    from gate.trigger.search import options_checked

    if isinstance(data, TextData):
        raise UsageError(
            "--trigger-search: text models are not supported by the trigger search yet"
        )
    opts = options_checked(options)
    if data is not None:
        x, y, inputs = search_inputs(data.x, data.y, None, seed)
    else:
        x, y, inputs = search_inputs(None, None, shape, seed)
    opts["input_range"] = input_range(data.x if data is not None else None)
    return opts, x, y, inputs


def _trigger_profile(
    model: LoadedModel, path: str, setup: TriggerSetup, seed: int
) -> dict[str, list[float]]:
    from gate.trigger import run_search
    from gate.trigger.stats import profile

    opts, x, y, _inputs = setup
    result = run_search(model, x, y, opts, seed)
    if result.get("status") != "ok":
        raise UsageError(f"{path}: --trigger-search did not run: {result.get('reason')}")
    return profile(result)


def _merge_trigger(ordered: Sequence[BaselineShard]) -> TriggerCalibration | None:
    cals = [s.manifest.trigger_search for s in ordered]
    if all(c is None for c in cals):
        return None
    first = cals[0]
    if first is None or any(
        c is None or c.options != first.options or c.inputs != first.inputs for c in cals
    ):
        raise BaselineError(
            "shards disagree on --trigger-search (some have it, or with other options); "
            "build every shard with the same options"
        )
    classes = [r for c in cals if c is not None for r in c.reference_classes]
    return TriggerCalibration(
        options=first.options, inputs=first.inputs, reference_classes=classes
    )


def _probe_set(
    model_paths: Sequence[str],
    data: Dataset | TextData | None,
    input_shape: Sequence[int] | None,
    seed: int,
) -> tuple[ProbeSet, str, LoadedModel | None]:
    """The probes, their source for the manifest, and the first model if loading it was needed.

    Text models (Hugging Face checkpoints) get text probes made with the first model's
    tokenizer (every reference must tokenise them alike); others get tensor probes from
    ``--data`` or ``--input-shape``.
    """
    if isinstance(data, TextData) or (
        data is None and input_shape is None and hf.sniff(Path(model_paths[0]), b"")
    ):
        text_data = data if isinstance(data, TextData) else None
        if input_shape is not None:
            raise UsageError(
                "--input-shape does not apply to text models: their tokenizer makes the inputs"
            )
        first = load_model(model_paths[0])
        probes = make_text_probes(first, text_data, seed=seed)
        source = "synthetic-text" if text_data is None else f"text-data:{text_data.digest}"
        return probes, source, first
    shape = _input_shape(data, input_shape)
    source = "synthetic" if data is None else f"data:{data_digest(data.x)}"
    return make_probes(shape, data, seed=seed), source, None


def _input_shape(data: Dataset | None, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if data is not None:
        if input_shape is not None and tuple(input_shape) != data.input_shape:
            raise UsageError(
                f"--input-shape {','.join(map(str, input_shape))} contradicts --data's shape "
                f"{','.join(map(str, data.input_shape))}"
            )
        return data.input_shape
    if input_shape is None:
        raise UsageError("give --data DATA.npz or --input-shape C,H,W so probes can be built")
    return tuple(input_shape)
