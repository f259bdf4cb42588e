"""Scanning a candidate: fingerprint against a baseline, optional AC, policy verdict."""

from __future__ import annotations

import time

import numpy as np

from gate._version import __version__
from gate.ac.config import EXRE_RULES
from gate.ac.options import ACOptions
from gate.ac.run import activation_clustering
from gate.activations import ActivationCache
from gate.data import Dataset, TextData, model_input
from gate.detectors.ensemble import CalibratedEnsemble
from gate.errors import BaselineError, MismatchError
from gate.fingerprint.baseline import (
    Baseline,
)
from gate.fingerprint.compute import fingerprint_checked, resolve_layer
from gate.models import LoadedModel, load_model
from gate.models.base import TextInput
from gate.policy.evaluate import decide
from gate.policy.model import Policy
from gate.report.schema import (
    DetectorReport,
    FingerprintReport,
    ModelInfo,
    NearestReference,
    ProbeDeviation,
    Report,
    TriggerSearchReport,
)
from gate.trigger.report import TriggerRequest

TOP_PROBES = 5


def fingerprint_candidate(
    model: LoadedModel,
    baseline: Baseline,
    policy: Policy,
    cache: ActivationCache | None = None,
    timings: dict[str, float] | None = None,
) -> FingerprintReport:
    """Score ``model`` against ``baseline``. ``timings`` receives ``extract`` and ``detect``
    seconds."""
    check_min_references(baseline, policy)
    m = baseline.manifest
    t0 = time.perf_counter()
    if m.layer_rule == "explicit":
        if m.layer not in model.layer_names():
            raise MismatchError(
                f"{model.path}: candidate has no layer {m.layer!r}, which the baseline was "
                "built on; is it from another model family?"
            )
        layer = m.layer
    else:
        layer = resolve_layer(model, None)
    fp = fingerprint_checked(
        model, baseline.probes, layer, baseline.representation, what="candidate", cache=cache
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
    t1 = time.perf_counter()
    fitted = baseline_ensemble(baseline)
    verdict = fitted.evaluate(fp.vector)
    nearest = m.references[verdict.nearest_reference]
    ref_top = _reference_top_classes(baseline, fp.blocks)
    order = np.argsort(-verdict.row_deviation, kind="stable")[:TOP_PROBES]
    top_cls = fp.outputs.argmax(axis=1)
    report = FingerprintReport(
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
    if timings is not None:
        timings["extract"] = timings.get("extract", 0.0) + (t1 - t0)
        timings["detect"] = timings.get("detect", 0.0) + (time.perf_counter() - t1)
    return report


def check_min_references(baseline: Baseline, policy: Policy) -> None:
    m = baseline.manifest
    if len(m.references) < policy.fingerprint.min_references:
        raise BaselineError(
            f"{baseline.path}: {len(m.references)} references, policy {policy.name!r} "
            f"needs at least {policy.fingerprint.min_references}"
        )


def baseline_ensemble(baseline: Baseline) -> CalibratedEnsemble:
    """The baseline's fitted ensemble: restored from its stored detector arrays, or refit
    (deterministically) for a baseline stored without them."""
    m = baseline.manifest
    blocks = tuple((int(r), int(c)) for r, c in m.blocks)
    ens = CalibratedEnsemble([d.name for d in m.detectors], blocks, seed=m.seed)
    if baseline.detector_state:
        return ens.restore(baseline.fingerprints, baseline.calibration, baseline.detector_state)
    return ens.fit(baseline.fingerprints, calibration=baseline.calibration)


def scan(
    model_path: str,
    baseline: Baseline | None,
    data: Dataset | TextData | None,
    policy: Policy,
    layer: str | None = None,
    seed: int = 0,
    cache: ActivationCache | None = None,
    timings: dict[str, float] | None = None,
    ac_options: ACOptions | None = None,
    trigger: TriggerRequest | None = None,
) -> Report:
    """Scan one candidate. ``timings`` (if given) receives load/extract/detect/ac seconds
    (and ac_extract/ac_cluster, the two parts of ac, and trigger_search)."""
    if baseline is not None:
        check_min_references(baseline, policy)
    prefetch = None
    if data is not None and policy.activation_clustering.rule in EXRE_RULES:
        from gate.ac.numeric import prefetch_solver

        prefetch = prefetch_solver()  # ExRe's classifier: imported while the sandbox starts
    t0 = time.perf_counter()
    try:
        model = load_model(model_path)
    finally:
        if prefetch is not None:
            # Before anything here imports scipy itself (the fingerprint's detectors): two
            # threads in one package's circular imports can raise a deadlock error.
            prefetch.join()
    if timings is not None:
        timings["load"] = timings.get("load", 0.0) + time.perf_counter() - t0
    fp = (
        fingerprint_candidate(model, baseline, policy, cache, timings)
        if baseline is not None
        else None
    )
    t_ac = time.perf_counter()
    ac = None
    if data is not None:
        data = model_input(model, data)  # texts: tokenised by the model's own tokenizer
        if baseline is not None and list(data.input_shape) != baseline.manifest.input_shape:
            raise MismatchError(
                f"{data.path}: inputs have shape {list(data.input_shape)}, the baseline's family "
                f"takes {baseline.manifest.input_shape}"
            )
        ac_t: dict[str, float] = {}
        ac = activation_clustering(
            model, data, policy.activation_clustering, layer, seed, ac_options, cache, ac_t
        )
        if timings is not None:
            for k, v in ac_t.items():
                timings[f"ac_{k}"] = timings.get(f"ac_{k}", 0.0) + v
    if timings is not None and data is not None:
        timings["ac"] = timings.get("ac", 0.0) + time.perf_counter() - t_ac
    t_ts = time.perf_counter()
    ts = trigger_stage(model, baseline, data, policy, seed, trigger)
    if timings is not None and ts is not None:
        timings["trigger_search"] = timings.get("trigger_search", 0.0) + time.perf_counter() - t_ts
    decision = decide(policy, fp, ac, ts)
    return Report(
        gate_version=__version__,
        verdict=decision.verdict,
        policy=policy.name,
        model=ModelInfo(
            path=model_path,
            sha256=model.sha256,
            format=model.format,
            device=str(getattr(model, "device", "cpu")),
        ),
        checks=decision.checks,
        fingerprint=fp,
        activation_clustering=ac,
        trigger_search=ts,
        reasons=decision.reasons,
    )


def trigger_stage(
    model: LoadedModel,
    baseline: Baseline | None,
    data: Dataset | TextData | None,
    policy: Policy,
    seed: int,
    request: TriggerRequest | None,
) -> TriggerSearchReport | None:
    """Run the trigger search when asked: always without a baseline ("auto"), with one only
    when it was built with the search (its references calibrate the candidate) or "on"."""
    from gate.trigger import run_search
    from gate.trigger.report import build_report, input_range, picture, search_inputs

    if request is None or request.mode == "off":
        return None
    calibration = baseline.manifest.trigger_search if baseline is not None else None
    if baseline is not None and calibration is None and request.mode != "on":
        return None
    if isinstance(data, TextData) or isinstance(model, TextInput):
        return build_report(
            {"status": "not_run", "reason": "text model: a trigger search over token "
             "embeddings is not implemented; the check did not run (this is not a pass)"},
            policy.trigger_search.warn_alpha, None, "none",
        )
    shape = request.input_shape
    if shape is None and data is None and baseline is not None:
        shape = tuple(baseline.manifest.input_shape)
    options = calibration.options if calibration is not None else request.options()
    x, y, inputs = search_inputs(
        data.x if isinstance(data, Dataset) else None,
        data.y if isinstance(data, Dataset) else None,
        shape,
        seed,
    )
    if calibration is not None and inputs != calibration.inputs:
        hint = "--data" if calibration.inputs == "data" else "--input-shape without --data"
        why = (
            f"the baseline's trigger searches ran on {calibration.inputs} inputs, this scan's "
            f"would run on {inputs} inputs; give {hint}, as the baseline was built"
        )
        if request.mode == "on":  # asked for explicitly: a usage error, not a quiet skip
            raise MismatchError(why)
        return build_report(
            {"status": "not_run", "reason": f"{why} (the check did not run; this is not a pass)"},
            policy.trigger_search.warn_alpha, None, inputs,
        )  # fmt: skip
    options = dict(options)
    if options.get("input_range") is None:  # a baseline's stored range wins: same box
        options["input_range"] = input_range(data.x if isinstance(data, Dataset) else None)
    result = run_search(model, x, y, options, seed)
    refs = calibration.reference_classes if calibration is not None else None
    report = build_report(result, policy.trigger_search.warn_alpha, refs, inputs)
    if report.status == "ok" and report.suspected_target is not None:
        png = picture(result, report.suspected_target, x)
        if png is not None:
            request.pictures[f"trigger-search-class-{report.suspected_target}.png"] = png
    return report


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


def _round(x: float) -> float:
    # Round so that report.json is stable across BLAS thread counts and platforms.
    return float(f"{x:.10g}")
