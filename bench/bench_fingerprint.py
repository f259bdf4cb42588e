# ruff: noqa: E402
"""Fingerprint benchmark (issue 3): AUROC / TPR / FPR of gate's fingerprint check on a digits zoo.

Run with ``make bench-fingerprint``. The first run trains the zoo (cached under
``bench/.zoo/``); results are printed as markdown and written to
``bench/results/fingerprint.md``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # shared 2-core machines: BLAS oversubscription is slow

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import ZOO_DIR, Member, build_scenario, distance_from_base, training_seconds

from gate.data import Dataset, load_npz
from gate.demo.zoo import save_digits_npz
from gate.detectors import DEFAULT_DETECTORS
from gate.detectors.calibration import cauchy_combine, p_value
from gate.detectors.ensemble import CalibratedEnsemble
from gate.fingerprint.build import DEFAULT_REPRESENTATION
from gate.fingerprint.compute import fingerprint, resolve_layer
from gate.fingerprint.probes import PROBE_KINDS, ProbeSet, make_probes, probe_hash
from gate.fingerprint.representations import parse_representation
from gate.models import load_model

RESULTS = Path(__file__).resolve().parent / "results" / "fingerprint.md"
DEFAULT_REP = DEFAULT_REPRESENTATION  # what `gate baseline build` uses
ALL_REPS = ("raw", "logits", "gram", "gram+logits", "raw+logits")
WIDTH_INVARIANT_REPS = ("logits", "gram", "gram+logits")
SEED = 0
HIGH_ASR = 0.8
# The issue's targets, checked in the summary.
TARGET_AUROC, TARGET_FPR, TARGET_TPR = 0.97, 0.05, 0.90

Vec = npt.NDArray[np.float64]


@dataclass(frozen=True)
class RepResult:
    rep: str
    auroc: dict[str, float]  # per detector and "ensemble"
    tpr: float
    fpr: float
    tpr_high: float
    fpr_loo: float  # references scored leave-one-out against the other references' scores
    p_values: list[float]  # per test model, clean then backdoored
    median_p_clean: float
    median_p_backdoor: float


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))


Blocks = tuple[tuple[int, int], ...]


def fingerprints(
    members: Sequence[Member], probes: ProbeSet, reps: Sequence[str]
) -> tuple[dict[str, Vec], dict[str, Blocks]]:
    """Fingerprint matrix per representation, rows in ``members`` order."""
    rows: dict[str, list[npt.NDArray[np.float32]]] = {r: [] for r in reps}
    blocks: dict[str, Blocks] = {}
    for m in members:
        model = load_model(m.path)
        layer = resolve_layer(model, None)
        for r in reps:
            fp = fingerprint(model, probes, layer, parse_representation(r))
            rows[r].append(fp.vector)
            blocks[r] = fp.blocks
    return {r: np.stack(v).astype(np.float32) for r, v in rows.items()}, blocks


def evaluate_rep(
    rep: str,
    matrix: Vec,
    blocks: tuple[tuple[int, int], ...],
    members: Sequence[Member],
    alpha: float,
    calibration: dict[str, list[float]] | None = None,
) -> RepResult:
    """Fit the calibrated ensemble on the references, as build_baseline does; score the rest.

    ``calibration`` (a built baseline's stored scores) skips the leave-one-out refits, as
    ``fingerprint_candidate`` does.
    """
    ref = np.array([m.role == "reference" for m in members])
    tests = [m for m in members if m.role != "reference"]
    ens = CalibratedEnsemble(DEFAULT_DETECTORS, blocks, seed=SEED)
    ens.fit(matrix[ref], calibration=calibration)
    verdicts = [ens.evaluate(x) for x in matrix[~ref]]
    labels = [int(m.role == "backdoor") for m in tests]
    scores = {
        d: [next(s.score for s in v.detectors if s.name == d) for v in verdicts]
        for d in DEFAULT_DETECTORS
    }
    p = [v.p_value for v in verdicts]
    scores["ensemble"] = [-np.log(max(x, 1e-300)) for x in p]
    flagged = [x < alpha for x in p]
    bad = [f for f, lab in zip(flagged, labels, strict=True) if lab]
    clean = [f for f, lab in zip(flagged, labels, strict=True) if not lab]
    high = [
        f for f, m in zip(flagged, tests, strict=True) if m.asr is not None and m.asr >= HIGH_ASR
    ]
    return RepResult(
        rep=rep,
        auroc={k: auroc(labels, v) for k, v in scores.items()},
        tpr=float(np.mean(bad)),
        fpr=float(np.mean(clean)),
        tpr_high=float(np.mean(high)) if high else float("nan"),
        fpr_loo=loo_fpr(ens.calibration_, alpha),
        p_values=p,
        median_p_clean=statistics.median(x for x, lab in zip(p, labels, strict=True) if not lab),
        median_p_backdoor=statistics.median(x for x, lab in zip(p, labels, strict=True) if lab),
    )


def peer_auroc(raw: Vec, members: Sequence[Member]) -> float:
    """The fingerprint tutorial's recipe: raw activations, LOF/IF/OCSVM fitted on the
    references (sklearn defaults), each detector's scores min-max normalised over the
    test set, then averaged."""
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.svm import OneClassSVM

    ref = np.array([m.role == "reference" for m in members])
    x_ref, x_test = raw[ref].astype(np.float64), raw[~ref].astype(np.float64)
    labels = [int(m.role == "backdoor") for m in members if m.role != "reference"]
    dets = [
        LocalOutlierFactor(n_neighbors=min(20, len(x_ref) - 1), novelty=True).fit(x_ref),
        IsolationForest(random_state=SEED).fit(x_ref),
        OneClassSVM(kernel="rbf", gamma="scale", nu=0.1).fit(x_ref),
    ]
    total = np.zeros(len(x_test))
    for det in dets:
        s = -det.score_samples(x_test)
        total += (s - s.min()) / max(float(s.max() - s.min()), 1e-12)
    return auroc(labels, list(total / len(dets)))


def loo_fpr(calibration: dict[str, list[float]], alpha: float) -> float:
    """Extra clean draws for the FPR: each reference's leave-one-out score (detectors fit
    on the other references) turned into a p-value against the other references'
    leave-one-out scores, combined as gate does. (Approximate: those other scores came
    from detectors whose training set included this reference.)"""
    n = len(next(iter(calibration.values())))
    flags = []
    for i in range(n):
        ps = [
            p_value(cal[i], [c for j, c in enumerate(cal) if j != i])
            for cal in calibration.values()
        ]
        flags.append(cauchy_combine(ps) < alpha)
    return float(np.mean(flags))


def probe_subset(probes: ProbeSet, keep: npt.NDArray[np.bool_]) -> ProbeSet:
    x = probes.x[keep]
    kinds = tuple(k for k, m in zip(probes.kinds, keep, strict=True) if m)
    return ProbeSet(x=x, kinds=kinds, sha256=probe_hash(x))


def scan_times(
    members: Sequence[Member], data: Dataset, workdir: Path
) -> tuple[float, float, list[float], dict[str, list[float]]]:
    """Median wall time of ``gate scan`` (load + fingerprint + evaluate) on the test models."""
    from gate.fingerprint.baseline import load_baseline
    from gate.fingerprint.build import build_baseline
    from gate.policy import load_policy
    from gate.scan import scan

    refs = [str(m.path) for m in members if m.role == "reference"]
    t0 = time.perf_counter()
    built = build_baseline(refs, data=data, seed=SEED)
    built.save(workdir)
    build_s = time.perf_counter() - t0
    baseline = load_baseline(workdir)
    policy = load_policy("default")
    times, p = [], []
    for m in members:
        if m.role == "reference":
            continue
        t0 = time.perf_counter()
        report = scan(str(m.path), baseline, None, policy)
        times.append(time.perf_counter() - t0)
        assert report.fingerprint is not None
        p.append(report.fingerprint.p_value)
    return statistics.median(times), build_s, p, baseline.calibration


def fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}%"


def pval(x: float) -> str:
    return "n/a" if x != x else f"{x:.2g}"


@dataclass(frozen=True)
class Summary:
    """One scenario's headline numbers at the default representation and policy."""

    title: str
    result: RepResult
    peer: float  # the tutorial recipe's AUROC (nan where raw is not comparable)
    scan_ms: float
    n_high: int


def scenario_report(
    name: str, title: str, data: Dataset, probes: ProbeSet, reps: Sequence[str], alpha: float
) -> tuple[list[str], Summary]:
    t0 = time.perf_counter()
    members = build_scenario(name)
    train_s = time.perf_counter() - t0
    tests = [m for m in members if m.role != "reference"]
    n_ref = sum(m.role == "reference" for m in members)
    n_clean = sum(m.role == "clean" for m in members)
    bad = [m for m in members if m.role == "backdoor"]
    n_high = sum(m.asr is not None and m.asr >= HIGH_ASR for m in bad)
    t0 = time.perf_counter()
    mats, blocks = fingerprints(members, probes, reps)
    fp_s = time.perf_counter() - t0
    # The `gate scan` path first: its baseline's calibration is reused for the default rep.
    med, build_s, scan_p, calibration = scan_times(members, data, ZOO_DIR / f"baseline-{name}")
    t0 = time.perf_counter()
    results = {
        r: evaluate_rep(
            r, mats[r], blocks[r], members, alpha, calibration if r == DEFAULT_REP else None
        )
        for r in reps
    }
    eval_s = time.perf_counter() - t0
    peer = peer_auroc(mats["raw"], members) if "raw" in reps else float("nan")
    out = [f"## {title}", ""]
    accs = [m.accuracy for m in members]
    out.append(
        f"{n_ref} clean references, {n_clean} held-out clean, {len(bad)} backdoored "
        f"({n_high} with ASR >= {HIGH_ASR:.0%}); clean test accuracy "
        f"{min(accs):.1%}..{max(accs):.1%}; {len(probes.x)} probes. "
        f"Zoo ready in {train_s:.0f} s, fingerprints in {fp_s:.0f} s, "
        f"detector fits (leave-one-out calibration, all representations) in {eval_s:.0f} s."
    )
    if name == "transfer":
        dist = {m.name: distance_from_base(m.path) for m in members}
        by_role = {
            role: statistics.median(dist[m.name] for m in members if m.role == role)
            for role in ("reference", "clean", "backdoor")
        }
        d_auroc = auroc([int(m.role == "backdoor") for m in tests], [dist[m.name] for m in tests])
        out += [
            "",
            "Fairness check: median L2 distance of the weights (output layer excluded) from "
            f"the base: references {by_role['reference']:.2f}, held-out clean "
            f"{by_role['clean']:.2f}, backdoored {by_role['backdoor']:.2f}; that distance "
            f"alone, as a score, has AUROC {d_auroc:.3f} (what a check that only notices "
            "'moved further from the base' would get).",
        ]
    out += [
        "",
        "| representation | AUROC lof | AUROC iforest | AUROC ocsvm | AUROC ensemble | "
        f"TPR (p<{alpha:g}) | TPR ASR>=80% | FPR held-out | FPR LOO refs | "
        "median p backdoored | median p held-out clean |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, res in results.items():
        a = res.auroc
        mark = " (default)" if r == DEFAULT_REP else ""
        out.append(
            f"| {r}{mark} | {fmt(a['lof'])} | {fmt(a['iforest'])} | {fmt(a['ocsvm'])} | "
            f"**{fmt(a['ensemble'])}** | {pct(res.tpr)} | {pct(res.tpr_high)} | "
            f"{pct(res.fpr)} | {pct(res.fpr_loo)} | {pval(res.median_p_backdoor)} | "
            f"{pval(res.median_p_clean)} |"
        )
    if "raw" in reps:
        out.append(
            "| peer: tutorial recipe (raw, min-max over test, mean) | | | | "
            f"**{fmt(peer)}** | n/a | n/a | n/a | n/a | n/a | n/a |"
        )
    out.append("")
    ours = results[DEFAULT_REP].p_values
    agree = max(
        abs(np.log10(max(a, 1e-300)) - np.log10(max(b, 1e-300)))
        for a, b in zip(scan_p, ours, strict=True)
    )
    out.append(
        f"`gate scan` path (load + fingerprint + evaluate, {DEFAULT_REP}): median "
        f"{med * 1000:.0f} ms per candidate over {len(tests)} scans; baseline build "
        f"{build_s:.1f} s; max |log10 p| difference vs. this bench: {agree:.2g}. "
        f"FPR LOO refs: each reference's leave-one-out score against the other "
        f"references' (approximate; {n_ref} extra clean draws)."
    )
    # Per attack and poison rate, default representation.
    res = results[DEFAULT_REP]
    by_member = dict(zip([m.name for m in tests], res.p_values, strict=True))
    out += ["", f"Per attack and poison rate ({DEFAULT_REP}, default policy):", ""]
    out += [
        "| attack | poison | n | ASR (each model) | detected (p<alpha) | median p |",
        "|---|---|---|---|---|---|",
    ]
    for attack in sorted({m.attack for m in bad}):
        for rate in sorted({m.poison_rate for m in bad if m.attack == attack}):
            group = [m for m in bad if m.attack == attack and m.poison_rate == rate]
            ps = [by_member[m.name] for m in group]
            asrs = ", ".join(f"{m.asr or 0.0:.0%}" for m in group)
            det = sum(p < alpha for p in ps)
            out.append(
                f"| {attack} | {rate:.0%} | {len(group)} | {asrs} | {det}/{len(group)} | "
                f"{statistics.median(ps):.2g} |"
            )
    missed = [m for m in bad if by_member[m.name] >= alpha]
    if missed:
        out += ["", "Missed backdoors (default representation):", ""]
        out += [f"* {m.name}: ASR {m.asr:.0%}, p = {by_member[m.name]:.3g}" for m in missed]
    flagged_clean = [m for m in tests if m.role == "clean" and by_member[m.name] < alpha]
    if flagged_clean:
        out += ["", "Flagged held-out clean models (default representation):", ""]
        out += [
            f"* {m.name}: acc {m.accuracy:.1%}, p = {by_member[m.name]:.3g}" for m in flagged_clean
        ]
    out.append("")
    # Probe kinds driving detection.
    kinds = np.array(probes.kinds)
    out += [
        f"Probe kinds ({DEFAULT_REP}): ensemble AUROC / TPR / FPR with only that kind of probe, "
        "and with that kind left out:",
        "",
        "| probe kind | n | only: AUROC | only: TPR | only: TPR ASR>=80% | only: FPR | "
        "without: AUROC | without: TPR ASR>=80% | without: FPR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in PROBE_KINDS:
        only, without = (
            evaluate_rep(DEFAULT_REP, m2[DEFAULT_REP], b2[DEFAULT_REP], members, alpha)
            for m2, b2 in (
                fingerprints(members, probe_subset(probes, keep), [DEFAULT_REP])
                for keep in (kinds == kind, kinds != kind)
            )
        )
        cells = [kind, str(int((kinds == kind).sum()))]
        cells += [fmt(only.auroc["ensemble"]), pct(only.tpr), pct(only.tpr_high), pct(only.fpr)]
        cells += [fmt(without.auroc["ensemble"]), pct(without.tpr_high), pct(without.fpr)]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out, Summary(title, res, peer, med * 1000, n_high)


def summary_table(summaries: Sequence[Summary], alpha: float) -> list[str]:
    def mark(ok: bool) -> str:
        return "" if ok else " (miss)"

    out = [
        f"## Summary: default representation ({DEFAULT_REP}), default policy (p < {alpha:g})",
        "",
        f"Targets: ensemble AUROC >= {TARGET_AUROC}, FPR <= {TARGET_FPR:.0%} on held-out clean, "
        f"TPR >= {TARGET_TPR:.0%} on backdoors with ASR >= {HIGH_ASR:.0%}.",
        "",
        "| scenario | AUROC ensemble | TPR all backdoors | TPR ASR>=80% (n) | FPR held-out | "
        "FPR LOO refs | median p backdoored | median p held-out clean | median scan | "
        "peer AUROC (tutorial) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        r = s.result
        a = r.auroc["ensemble"]
        out.append(
            f"| {s.title} | {fmt(a)}{mark(a >= TARGET_AUROC)} | {pct(r.tpr)} | "
            f"{pct(r.tpr_high)} ({s.n_high}){mark(not r.tpr_high < TARGET_TPR)} | "
            f"{pct(r.fpr)}{mark(r.fpr <= TARGET_FPR)} | {pct(r.fpr_loo)} | "
            f"{pval(r.median_p_backdoor)} | {pval(r.median_p_clean)} | {s.scan_ms:.0f} ms | "
            f"{fmt(s.peer)} |"
        )
    out.append("")
    return out


SCENARIOS = (
    ("fixed", "Independently trained CNNs, fixed width (hidden 64)", ALL_REPS),
    ("mixed", "Independently trained CNNs, mixed widths (32..128)", WIDTH_INVARIANT_REPS),
    ("transfer", "Transfer: CNNs fine-tuned from one shared base model", ALL_REPS),
    ("mlp", "Second architecture: independently trained MLPs (hidden 64)", ALL_REPS),
)


def main() -> int:
    import torch

    from gate.policy import load_policy

    torch.set_num_threads(1)
    started = time.perf_counter()
    alpha = load_policy("default").fingerprint.fail_alpha
    data_path = ZOO_DIR / "digits-train.npz"
    if not data_path.is_file():
        save_digits_npz(data_path, "train")
    data = load_npz(data_path)
    probes = make_probes(data.input_shape, data, seed=SEED)
    header = [
        "# Fingerprint benchmark (digits zoo)",
        "",
        f"Default representation: {DEFAULT_REP}. Default policy: fail when the combined "
        f"p-value < {alpha:g}. Detectors: {', '.join(DEFAULT_DETECTORS)}; ensemble = "
        "Cauchy-combined conformal p-values (gate.detectors.ensemble.CalibratedEnsemble). "
        "AUROC: positives are backdoored models, negatives held-out clean models. Probes "
        "from the digits train split, seed 0. One run, all scenarios.",
        "",
    ]
    lines: list[str] = []
    only = [s for s in os.environ.get("BENCH_SCENARIOS", "").split(",") if s]
    summaries: list[Summary] = []
    for name, title, reps in SCENARIOS:
        if only and name not in only:
            continue
        part, summary = scenario_report(name, title, data, probes, reps, alpha)
        summaries.append(summary)
        lines += part
        print("\n".join(part), flush=True)
    total = time.perf_counter() - started
    summary = summary_table(summaries, alpha)
    timing = [
        f"Total bench wall time this run: {total:.0f} s (zoo training recorded in the cache: "
        f"{training_seconds():.0f} s; torch threads: 1; BLAS threads: "
        f"{os.environ['OMP_NUM_THREADS']}).",
        "",
    ]
    print("\n".join(summary + timing))
    out = RESULTS if not only else RESULTS.with_name(f"fingerprint-{'-'.join(only)}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    # In the file the summary comes first, after the header.
    out.write_text("\n".join(header + summary + lines + timing))
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
