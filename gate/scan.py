"""The main jobs, independent of the CLI: build a baseline, scan a candidate, run AC."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gate._version import __version__
from gate.activations import extract
from gate.data import Dataset
from gate.detectors import DEFAULT_DETECTORS, make_detector
from gate.detectors.ensemble import CalibratedEnsemble
from gate.errors import BaselineError, MismatchError, ModelLoadError, UsageError
from gate.fingerprint.baseline import (
    MIN_REFERENCES,
    Baseline,
    BaselineManifest,
    DetectorCalibration,
    ProbeInfo,
    ReferenceInfo,
    data_digest,
    reference_names,
)
from gate.fingerprint.compute import Fingerprint, fingerprint, resolve_layer
from gate.fingerprint.probes import ProbeSet, make_probes
from gate.fingerprint.representations import parse_representation
from gate.models import LoadedModel, load_model
from gate.policy.evaluate import decide
from gate.policy.model import ActivationClusteringPolicy, Policy
from gate.report.schema import (
    ActivationClusteringReport,
    ClassReport,
    DetectorReport,
    FingerprintReport,
    ModelInfo,
    NearestReference,
    ProbeDeviation,
    Report,
)

DEFAULT_REPRESENTATION = "logits"
TOP_PROBES = 5


@dataclass(frozen=True)
class BaselineBuild:
    manifest: BaselineManifest
    fingerprints: np.ndarray
    probes: ProbeSet


def build_baseline(
    model_paths: Sequence[str],
    data: Dataset | None = None,
    input_shape: Sequence[int] | None = None,
    layer: str | None = None,
    seed: int = 0,
    representation: str = DEFAULT_REPRESENTATION,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
) -> BaselineBuild:
    if len(model_paths) < MIN_REFERENCES:
        raise UsageError(
            f"a baseline needs at least {MIN_REFERENCES} known-clean models, got {len(model_paths)}"
        )
    rep = parse_representation(representation)
    shape = _input_shape(data, input_shape)
    probes = make_probes(shape, data, seed=seed)
    prints: list[Fingerprint] = []
    shas: list[str] = []
    layer_used: str | None = None
    for path in model_paths:
        model = load_model(path)
        chosen = resolve_layer(model, layer)
        fp = _fingerprint_checked(model, probes, chosen, rep, what="reference model")
        if prints and (fp.blocks != prints[0].blocks or fp.output_size != prints[0].output_size):
            raise MismatchError(
                f"{path}: reference does not match the others (layer {chosen!r} gives "
                f"{fp.blocks}, outputs {fp.output_size}; first reference gave "
                f"{prints[0].blocks}, outputs {prints[0].output_size})"
            )
        prints.append(fp)
        shas.append(model.sha256)
        layer_used = layer_used or chosen
    matrix = np.stack([fp.vector for fp in prints]).astype(np.float32)
    ensemble = CalibratedEnsemble(detectors, prints[0].blocks, seed=seed).fit(matrix)
    manifest = BaselineManifest(
        gate_version=__version__,
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
            source="synthetic" if data is None else f"data:{data_digest(data.x)}",
        ),
        references=[
            ReferenceInfo(name=name, sha256=sha)
            for name, sha in zip(reference_names(list(model_paths)), shas, strict=True)
        ],
        detectors=[
            DetectorCalibration(
                name=name,
                params=make_detector(name, seed).get_params(),
                calibration_scores=[round(s, 12) for s in ensemble.calibration_[name]],
            )
            for name in detectors
        ],
        seed=seed,
    )
    return BaselineBuild(manifest, matrix, probes)


def fingerprint_candidate(
    model: LoadedModel, baseline: Baseline, policy: Policy
) -> FingerprintReport:
    m = baseline.manifest
    if len(m.references) < policy.fingerprint.min_references:
        raise BaselineError(
            f"{baseline.path}: {len(m.references)} references, policy {policy.name!r} "
            f"needs at least {policy.fingerprint.min_references}"
        )
    if m.layer_rule == "explicit":
        if m.layer not in model.layer_names():
            raise MismatchError(
                f"{model.path}: candidate has no layer {m.layer!r}, which the baseline was "
                "built on; is it from another model family?"
            )
        layer = m.layer
    else:
        layer = resolve_layer(model, None)
    fp = _fingerprint_checked(
        model, baseline.probes, layer, baseline.representation, what="candidate"
    )
    if fp.output_size != m.output_size:
        raise MismatchError(
            f"{model.path}: candidate has {fp.output_size} outputs, the baseline's family has "
            f"{m.output_size}; wrong baseline for this model?"
        )
    if list(fp.blocks) != [tuple(b) for b in m.blocks]:
        raise MismatchError(
            f"{model.path}: candidate's fingerprint shape {list(fp.blocks)} differs from the "
            f"baseline's {m.blocks} (layer {layer!r}); wrong baseline for this model?"
        )
    ensemble = CalibratedEnsemble([d.name for d in m.detectors], fp.blocks, seed=m.seed)
    ensemble.fit(baseline.fingerprints, calibration=baseline.calibration)
    verdict = ensemble.evaluate(fp.vector)
    nearest = m.references[verdict.nearest_reference]
    ref_top = _reference_top_classes(baseline, fp.blocks)
    order = np.argsort(-verdict.row_deviation, kind="stable")[:TOP_PROBES]
    top_cls = fp.outputs.argmax(axis=1)
    return FingerprintReport(
        anomaly_score=_round(verdict.anomaly_score),
        p_value=_round(verdict.p_value),
        detectors=[
            DetectorReport(
                name=d.name,
                score=_round(d.score),
                p_value=_round(d.p_value),
                p_conformal=_round(d.p_conformal),
            )
            for d in verdict.detectors
        ],
        nearest_reference=NearestReference(
            name=nearest.name, sha256=nearest.sha256, distance=_round(verdict.nearest_distance)
        ),
        top_probes=[
            ProbeDeviation(
                index=int(i),
                kind=baseline.probes.kinds[int(i)],
                deviation=_round(float(verdict.row_deviation[i])),
                top_class=int(top_cls[i]),
                reference_top_class=int(ref_top[i]) if ref_top is not None else -1,
            )
            for i in order
        ],
        layer=layer,
        representation=m.representation,
        baseline=baseline.path,
        n_references=len(m.references),
    )


def activation_clustering(
    model: LoadedModel,
    data: Dataset,
    policy: ActivationClusteringPolicy,
    layer: str | None = None,
    seed: int = 0,
) -> ActivationClusteringReport:
    from gate.ac.clustering import cluster_classes

    chosen = resolve_layer(model, layer)
    try:
        acts = extract(model, data.x, [chosen]).activations[chosen]
    except ModelLoadError as exc:
        raise MismatchError(f"{exc} (does --data match the model's input?)") from None
    classes = cluster_classes(acts, data.y, policy, seed=seed)
    return ActivationClusteringReport(
        layer=chosen,
        data=data.path,
        n_samples=len(data),
        classes=[
            ClassReport(
                label=c.label,
                size=c.size,
                silhouette=c.silhouette,
                flagged=c.flagged,
                suspicious_indices=list(c.suspicious_indices),
                cluster_sizes=list(c.cluster_sizes),
                skipped=c.skipped,
            )
            for c in classes
        ],
    )


def scan(
    model_path: str,
    baseline: Baseline | None,
    data: Dataset | None,
    policy: Policy,
    layer: str | None = None,
    seed: int = 0,
) -> Report:
    model = load_model(model_path)
    fp = fingerprint_candidate(model, baseline, policy) if baseline is not None else None
    ac = None
    if data is not None:
        if baseline is not None and list(data.input_shape) != baseline.manifest.input_shape:
            raise MismatchError(
                f"{data.path}: inputs have shape {list(data.input_shape)}, the baseline's family "
                f"takes {baseline.manifest.input_shape}"
            )
        ac = activation_clustering(model, data, policy.activation_clustering, layer, seed)
    decision = decide(policy, fp, ac)
    return Report(
        gate_version=__version__,
        verdict=decision.verdict,
        policy=policy.name,
        model=ModelInfo(path=model_path, sha256=model.sha256, format=model.format),
        checks=decision.checks,
        fingerprint=fp,
        activation_clustering=ac,
        reasons=decision.reasons,
    )


def _fingerprint_checked(
    model: LoadedModel, probes: ProbeSet, layer: str, rep: tuple[str, ...], what: str
) -> Fingerprint:
    try:
        return fingerprint(model, probes, layer, rep)
    except ModelLoadError as exc:
        raise MismatchError(
            f"{exc}; the {what} does not accept the probes' input shape "
            f"{list(probes.x.shape[1:])} (another model family?)"
        ) from None


def _reference_top_classes(
    baseline: Baseline, blocks: tuple[tuple[int, int], ...]
) -> np.ndarray | None:
    """Majority top class of the references per probe, when logits are in the fingerprint."""
    rep = baseline.representation
    if "logits" not in rep:
        return None
    start = sum(
        r * c
        for (r, c), name in zip(blocks, rep, strict=True)
        if rep.index(name) < rep.index("logits")
    )
    r, c = blocks[rep.index("logits")]
    logp = baseline.fingerprints[:, start : start + r * c].reshape(-1, r, c)
    votes = logp.argmax(axis=2)
    return np.array([np.bincount(votes[:, i], minlength=c).argmax() for i in range(r)])


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


def _round(x: float) -> float:
    # Round so that report.json is stable across BLAS thread counts and platforms.
    return float(f"{x:.10g}")
