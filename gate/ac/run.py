"""Running activation clustering on a candidate's training data."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import numpy as np

from gate._threads import thread_limit
from gate.ac.clustering import (
    EXRE_SEPARATION_THRESHOLD,
    N_INIT,
    SEPARATION_THRESHOLD,
    ACConfig,
    ClassClustering,
)
from gate.ac.config import EXRE_RULES
from gate.ac.early import EarlyPrepare
from gate.ac.extract import LayerRequest
from gate.ac.options import ACOptions
from gate.activations import ActivationCache
from gate.data import Dataset
from gate.errors import DataError, MismatchError, ModelLoadError, UsageError
from gate.fingerprint.compute import resolve_layer
from gate.models import LoadedModel
from gate.models.base import TextInput
from gate.policy.model import ActivationClusteringPolicy
from gate.report.schema import (
    ActivationClusteringReport,
    ClassReport,
    SpectralReport,
)


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

    from gate.ac.clustering import cluster_classes
    from gate.ac.extract import cached_activations, input_digest
    from gate.ac.options import clustering_threads
    from gate.ac.pictures import cluster_picture
    from gate.progress import Progress

    opts = options or ACOptions()
    labels = np.unique(data.y)
    if policy.rule in EXRE_RULES and len(labels) < 2:
        # Exclusionary reclassification asks which *other* class a cluster belongs to: with
        # one class nothing can be decided, and a check that decided nothing is no pass.
        raise DataError(
            f"{data.path}: activation clustering needs at least two classes in the data "
            f"(rule {policy.rule!r} compares each cluster with the other classes); "
            f"it holds only class {int(labels[0]) if len(labels) else 'none'}"
        )
    if policy.rule == "calibrated" and opts.classes is not None:
        # The calibrated null is every candidate of every class: a job that sees a third of
        # the classes would judge them against another null than the single run does.
        raise UsageError(
            f"--classes {opts.classes.spec}: rule 'calibrated' judges each class against "
            "the candidates of every class, so a class-split job cannot decide alone; "
            "run split jobs and ac-merge with --policy split (rule: exre) or a policy of "
            "yours with rule: exre, or run without --classes"
        )
    chosen = resolve_layer(model, layer)
    # Extract in label order, so each class is one run of rows on disk and reads back in one
    # go (bench_scale.py); results are mapped back to the data's rows below.
    order = class_order(data.y)
    in_order = data.y if order is None else data.y[order]
    tmp = tempfile.mkdtemp(prefix="gate-ac-")
    t0 = time.perf_counter()
    try:
        digest = input_digest(data.x)
        try:
            main_layer = LayerRequest(chosen, opts.pool)
            exre_layer = _exre_layer(model, chosen, policy, opts)
            wanted_layers = [main_layer]
            if exre_layer is not None and exre_layer != main_layer:
                wanted_layers.append(exre_layer)
            config = ac_config(policy, opts, seed)
            # The same BLAS thread count as the clustering stage: classes prepared early are
            # then bit-identical to those prepared late (a cache hit prepares them all late).
            with (
                thread_limit(clustering_threads(opts.threads)),
                _early(config, opts, in_order) as early,
            ):
                got = cached_activations(
                    model, data.x, wanted_layers, tmp, cache, digest, "activations", opts.quiet,
                    order, early,
                )  # fmt: skip
            ready = early.results() if early is not None else None
            streamed = got[0]
            exre_x = None if exre_layer is None else got[-1].activations
        except ModelLoadError as exc:
            raise MismatchError(f"{exc} (does --data match the model's input?)") from None
        t1 = time.perf_counter()
        segments = streamed.predictions if opts.segment_by == "predicted" else in_order
        present, wanted = _classes(segments, opts)
        with (
            thread_limit(clustering_threads(opts.threads)),
            Progress(len(wanted), "clustering", unit="classes", quiet=opts.quiet) as bar,
        ):
            classes = cluster_classes(
                streamed.activations,
                segments,
                config,
                classes=wanted,
                exre_x=exre_x,
                exre_hook=opts.exre_hook,
                on_class=lambda _: bar.update(),
                input_x=data.x if isinstance(data.x, np.ndarray) else None,
                input_order=order,
                input_tokens=isinstance(model, TextInput),
                early=ready,
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
    if order is not None:
        classes = [to_data_rows(c, order) for c in classes]
    if opts.relabels is not None:
        for c in classes:
            opts.relabels.update(c.relabels)
    if timings is not None:
        timings["extract"] = timings.get("extract", 0.0) + (t1 - t0)
        timings["cluster"] = timings.get("cluster", 0.0) + (time.perf_counter() - t1)
    return ActivationClusteringReport(
        layer=chosen,
        rule=policy.rule,
        exre_layer=None if exre_layer is None else exre_layer.name,
        data=data.path,
        n_samples=len(data),
        reduction=opts.reduction,
        segment_by=opts.segment_by,
        detector=opts.detector,
        exre="hook" if opts.exre_hook is not None else "linear",
        data_sha256=digest,
        labels=present,
        class_subset=opts.classes.spec if opts.classes is not None else None,
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
                exre_log_odds=c.exre_log_odds,
                suspected_source=c.suspected_source,
                found_in=c.found_in,
                p_value=c.p_value,
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


def _early(
    config: ACConfig, opts: ACOptions, in_order: np.ndarray
) -> AbstractContextManager[EarlyPrepare | None]:
    """Classes prepared while extraction runs (:mod:`gate.ac.early`), when the classes are
    the labels (known before extraction), else nothing."""
    if opts.segment_by == "predicted" or len(in_order) == 0:
        return nullcontext()
    wanted = _classes(in_order, opts)[1]
    return EarlyPrepare(np.asarray(in_order, dtype=np.int64), wanted, config)


def _classes(segments: np.ndarray, opts: ACOptions) -> tuple[list[int], list[int]]:
    """The classes present, and those to analyse (all, or the ones ``--classes`` picks)."""
    present = sorted(int(c) for c in np.unique(segments))
    return present, opts.classes.pick(present) if opts.classes is not None else present


def class_order(labels: np.ndarray) -> np.ndarray | None:
    """The rows sorted by label (stable), or None when they already are."""
    if len(labels) < 2 or bool((np.diff(labels) >= 0).all()):
        return None
    return np.argsort(labels, kind="stable").astype(np.int64)


def to_data_rows(c: ClassClustering, order: np.ndarray) -> ClassClustering:
    """``c`` with its row indices (positions in ``order``) turned into rows of the data."""

    def rows(positions: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(i) for i in np.sort(order[np.asarray(positions, dtype=np.int64)]))

    spectral = c.spectral
    if spectral is not None:
        spectral = replace(spectral, suspicious_indices=rows(spectral.suspicious_indices))
    relabels = tuple(sorted((int(order[i]), label) for i, label in c.relabels))
    return replace(
        c, suspicious_indices=rows(c.suspicious_indices), spectral=spectral, relabels=relabels
    )


def ac_config(policy: ActivationClusteringPolicy, opts: ACOptions, seed: int = 0) -> ACConfig:
    """The clustering configuration a policy and the `gate ac` options ask for."""
    exre = policy.rule in EXRE_RULES
    separation = policy.separation_threshold
    if separation is None:
        separation = EXRE_SEPARATION_THRESHOLD if exre else SEPARATION_THRESHOLD
    return ACConfig(
        n_components=policy.n_components,
        reduction=opts.reduction,
        rule="calibrated" if policy.rule == "calibrated" else "exre" if exre else "separation",
        alpha=policy.alpha,
        transfer_alpha=policy.transfer_alpha,
        # Rules other than "exre" judge the smaller side of a split only.
        max_poison_fraction=policy.max_poison_fraction
        if exre
        else min(policy.max_poison_fraction, 0.5),
        silhouette_threshold=policy.silhouette_threshold,
        use_silhouette=policy.rule == "silhouette",
        separation_threshold=separation,
        exre_log_odds=policy.exre_log_odds,
        isolated_separation=policy.isolated_separation,
        min_cluster_size=policy.min_cluster_size,
        detector=opts.detector,
        exre_threshold=opts.exre_threshold,
        max_clusters=4 if exre else 3,
        n_init=N_INIT if exre else 10,  # the other rules judge one split: more restarts
        seed=seed,
    )


# The default ExRe layer's conv maps are flattened up to this many values per sample (a
# digit CNN's 32x4x4 features: where the trigger sits is part of the evidence) and pooled
# above it, so a wide map stays cheap to cluster and classify.
EXRE_FLAT_MAX = 4096


def _exre_layer(
    model: LoadedModel, chosen: str, policy: ActivationClusteringPolicy, opts: ACOptions
) -> LayerRequest | None:
    """The ExRe layer: ``--exre-layer`` (pooled as ``--pool`` says), else with rule "exre"
    the input of the affine layer producing the clustered one (:mod:`gate.ac.layers`), conv
    maps pooled only when wider than :data:`EXRE_FLAT_MAX`."""
    from gate.ac.layers import default_exre_layer

    if opts.exre_layer:
        return LayerRequest(resolve_layer(model, opts.exre_layer), opts.pool)
    if policy.rule not in EXRE_RULES:
        return None
    name = default_exre_layer(model, chosen)
    return None if name is None else LayerRequest(name, pool_wider_than=EXRE_FLAT_MAX)
