"""The main jobs, independent of the CLI: build a baseline, scan a candidate, run AC."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from gate._version import __version__
from gate.ac.options import ACOptions
from gate.activations import ActivationCache
from gate.data import Dataset
from gate.detectors import DEFAULT_DETECTORS, make_detector
from gate.detectors.ensemble import CalibratedEnsemble
from gate.errors import BaselineError, MismatchError, ModelLoadError, UsageError
from gate.fingerprint.baseline import (
    MIN_REFERENCES,
    Baseline,
    BaselineManifest,
    BaselineShard,
    DetectorCalibration,
    ProbeInfo,
    ReferenceInfo,
    ShardManifest,
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
    SpectralReport,
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
    cache: ActivationCache | None = None,
    quiet: bool = True,
) -> BaselineBuild:
    """Fingerprint every reference and calibrate the ensemble (leave-one-out)."""
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
    data: Dataset | None = None,
    input_shape: Sequence[int] | None = None,
    layer: str | None = None,
    seed: int = 0,
    representation: str = DEFAULT_REPRESENTATION,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    cache: ActivationCache | None = None,
    quiet: bool = True,
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
    shape = _input_shape(data, input_shape)
    probes = make_probes(shape, data, seed=seed)
    names = reference_names(list(model_paths))
    prints: list[Fingerprint] = []
    shas: list[str] = []
    layer_used: str | None = None
    with Progress(len(positions), "fingerprinting references", unit="models", quiet=quiet) as bar:
        for pos in positions:
            path = model_paths[pos]
            model = load_model(path)
            chosen = resolve_layer(model, layer)
            fp = _fingerprint_checked(
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
            source="synthetic" if data is None else f"data:{data_digest(data.x)}",
        ),
        references=[
            ReferenceInfo(name=names[pos], sha256=sha)
            for pos, sha in zip(positions, shas, strict=True)
        ],
        detectors=list(detectors),
        seed=seed,
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
    )
    return BaselineBuild(manifest, matrix, ordered[0].probes)


def fingerprint_candidate(
    model: LoadedModel,
    baseline: Baseline,
    policy: Policy,
    cache: ActivationCache | None = None,
    timings: dict[str, float] | None = None,
    ensemble: Future[CalibratedEnsemble] | None = None,
) -> FingerprintReport:
    """Score ``model`` against ``baseline``.

    ``ensemble`` is the baseline's fitted ensemble when the caller started fitting it
    already (:func:`start_ensemble_fit`); it depends only on the baseline, so :func:`scan`
    fits it on a worker thread while the candidate loads and runs. ``timings`` receives
    ``extract`` and ``detect`` seconds.
    """
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
    fp = _fingerprint_checked(
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
    fitted = (ensemble or start_ensemble_fit(baseline, threaded=False)).result()
    with _one_thread():  # scoring one row: starting OpenMP pools costs more than it saves
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


def _one_thread() -> AbstractContextManager[object]:
    return _thread_limit(1)


def _thread_limit(n: int) -> AbstractContextManager[object]:
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - installed with scikit-learn
        return nullcontext()
    limits: AbstractContextManager[object] = threadpool_limits(limits=n)
    return limits


def check_min_references(baseline: Baseline, policy: Policy) -> None:
    m = baseline.manifest
    if len(m.references) < policy.fingerprint.min_references:
        raise BaselineError(
            f"{baseline.path}: {len(m.references)} references, policy {policy.name!r} "
            f"needs at least {policy.fingerprint.min_references}"
        )


def start_ensemble_fit(baseline: Baseline, threaded: bool = True) -> Future[CalibratedEnsemble]:
    """Fit the baseline's ensemble (deterministic: same result on any thread)."""
    m = baseline.manifest
    blocks = tuple((int(r), int(c)) for r, c in m.blocks)

    def fit() -> CalibratedEnsemble:
        ens = CalibratedEnsemble([d.name for d in m.detectors], blocks, seed=m.seed)
        return ens.fit(baseline.fingerprints, calibration=baseline.calibration)

    future: Future[CalibratedEnsemble] = Future()
    if not threaded:
        future.set_result(fit())
        return future

    def work() -> None:
        try:
            future.set_result(fit())
        except BaseException as exc:  # handed to whoever waits on the result
            future.set_exception(exc)

    threading.Thread(target=work, name="gate-ensemble-fit", daemon=True).start()
    return future


def activation_clustering(
    model: LoadedModel,
    data: Dataset,
    policy: ActivationClusteringPolicy,
    layer: str | None = None,
    seed: int = 0,
    options: ACOptions | None = None,
    cache: ActivationCache | None = None,
    timings: dict[str, float] | None = None,
) -> ActivationClusteringReport:
    """Per-class activation clustering; activations are streamed to a temporary memmap.

    With ``cache``, activations are read from / written to the activation cache (keyed by
    model sha256, data hash, layer and pooling). ``timings`` receives ``extract`` and
    ``cluster`` seconds. Clustering runs under an OpenMP/BLAS thread limit
    (:func:`gate.ac.options.clustering_threads`).
    """
    import shutil
    import tempfile

    from gate.ac.clustering import ACConfig, cluster_classes
    from gate.ac.extract import cached_activations, input_digest
    from gate.ac.options import clustering_threads
    from gate.ac.pictures import cluster_picture

    opts = options or ACOptions()
    chosen = resolve_layer(model, layer)
    tmp = tempfile.mkdtemp(prefix="gate-ac-")
    t0 = time.perf_counter()
    try:
        digest = input_digest(data.x) if cache is not None else None
        try:
            streamed = cached_activations(
                model, data.x, chosen, tmp, cache, digest, opts.pool, "activations", opts.quiet
            )
            exre_x = None
            if opts.exre_layer:
                exre_x = cached_activations(
                    model,
                    data.x,
                    resolve_layer(model, opts.exre_layer),
                    tmp,
                    cache,
                    digest,
                    opts.pool,
                    "ExRe activations",
                    opts.quiet,
                ).activations
        except ModelLoadError as exc:
            raise MismatchError(f"{exc} (does --data match the model's input?)") from None
        t1 = time.perf_counter()
        segments = streamed.predictions if opts.segment_by == "predicted" else data.y
        config = ACConfig(
            n_components=policy.n_components,
            reduction=opts.reduction,
            max_poison_fraction=policy.max_poison_fraction,
            silhouette_threshold=policy.silhouette_threshold,
            use_silhouette=policy.rule == "silhouette",
            separation_threshold=policy.separation_threshold,
            min_cluster_size=policy.min_cluster_size,
            detector=opts.detector,
            exre_threshold=opts.exre_threshold,
            seed=seed,
        )
        with _thread_limit(clustering_threads(opts.threads)):
            classes = cluster_classes(
                streamed.activations, segments, config, exre_x=exre_x, exre_hook=opts.exre_hook
            )
        del streamed, exre_x
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if opts.pictures is not None:
        for c in classes:
            if c.flagged and c.plane is not None and c.cluster_of is not None:
                rows = np.flatnonzero(segments == c.label)
                bad = np.isin(rows, np.asarray(c.suspicious_indices, dtype=np.int64))
                opts.pictures[c.label] = cluster_picture(c.plane, c.cluster_of, bad)
    if timings is not None:
        timings["extract"] = timings.get("extract", 0.0) + (t1 - t0)
        timings["cluster"] = timings.get("cluster", 0.0) + (time.perf_counter() - t1)
    return ActivationClusteringReport(
        layer=chosen,
        data=data.path,
        n_samples=len(data),
        reduction=opts.reduction,
        segment_by=opts.segment_by,
        detector=opts.detector,
        exre="hook" if opts.exre_hook is not None else "linear",
        classes=[
            ClassReport(
                label=c.label,
                size=c.size,
                silhouette=c.silhouette,
                flagged=c.flagged,
                suspicious_indices=list(c.suspicious_indices),
                cluster_sizes=list(c.cluster_sizes),
                skipped=c.skipped,
                separation=c.separation,
                small_fraction=c.small_fraction,
                exre_score=c.exre_score,
                suspected_source=c.suspected_source,
                spectral=None
                if c.spectral is None
                else SpectralReport(
                    separation=c.spectral.separation,
                    top_ratio=c.spectral.top_ratio,
                    flagged=c.spectral.flagged,
                    n_suspicious=len(c.spectral.suspicious_indices),
                ),
                reasons=list(c.reasons),
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
    cache: ActivationCache | None = None,
    timings: dict[str, float] | None = None,
    ac_options: ACOptions | None = None,
) -> Report:
    """Scan one candidate. ``timings`` (if given) receives load/extract/detect/ac seconds
    (and ac_extract/ac_cluster, the two parts of ac)."""
    ensemble = None
    if baseline is not None:
        check_min_references(baseline, policy)
        ensemble = start_ensemble_fit(baseline)  # overlaps model load and forward passes
    t0 = time.perf_counter()
    model = load_model(model_path)
    if timings is not None:
        timings["load"] = timings.get("load", 0.0) + time.perf_counter() - t0
    fp = (
        fingerprint_candidate(model, baseline, policy, cache, timings, ensemble)
        if baseline is not None
        else None
    )
    t_ac = time.perf_counter()
    ac = None
    if data is not None:
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
    model: LoadedModel,
    probes: ProbeSet,
    layer: str,
    rep: tuple[str, ...],
    what: str,
    cache: ActivationCache | None = None,
) -> Fingerprint:
    try:
        return fingerprint(model, probes, layer, rep, cache=cache)
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
