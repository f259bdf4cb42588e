"""``gate demo``: the whole job on an embedded default, cached under a work directory.

Each candidate is scanned with its own training set, as a fine-tuning pipeline would: the
fingerprint against the baseline, activation clustering on that data, and the trigger
search (model-adaptive probing), so that a verdict never rests on one check alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gate.demo.zoo import ZooSpec, evaluate, materialise, save_digits_npz, training_set
from gate.report.formats import FORMATS

# Clean references vary in seed and data subset; one clean and one backdoored candidate
# are held out. The backdoor is BadNets: a 3x3 corner patch relabelled to class 0.
REFERENCES = tuple(ZooSpec(seed=s, subset=0.8 + 0.02 * (s % 5)) for s in range(1, 11))
HELD_OUT_CLEAN = ZooSpec(seed=101, subset=0.85)
BACKDOORED = ZooSpec(seed=202, attack="badnets", poison_rate=0.1, target=0, subset=0.85)


def run_demo(workdir: Path) -> int:
    import torch

    from gate.fingerprint.baseline import load_baseline
    from gate.fingerprint.build import build_baseline
    from gate.policy import load_policy

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    models_dir = workdir / "models"
    data_path = workdir / "digits-train.npz"
    if not data_path.is_file():
        save_digits_npz(data_path, "train")
    stage = _Stages(total=4)
    specs = [*REFERENCES, HELD_OUT_CLEAN, BACKDOORED]
    stage.start(f"training or reusing {len(specs)} digit classifiers in {models_dir}")
    paths = [_materialise(spec, models_dir, i, len(specs)) for i, spec in enumerate(specs, 1)]
    refs, clean, bad = paths[: len(REFERENCES)], paths[-2], paths[-1]
    stage.done()

    from gate.data import load_npz

    data = load_npz(data_path)
    stage.start(
        f"building a baseline from {len(refs)} clean references (fingerprints and trigger "
        "searches)"
    )
    baseline_dir = workdir / "baseline"
    # With the references' own searches stored, each candidate class is compared with the
    # same class of the clean family (`baseline build --trigger-search`): the check that
    # fails the BadNets model by orders of magnitude, where the fixed-probe fingerprint only
    # clears fail_alpha by a factor of about 2.
    built = build_baseline(refs, data=data, seed=0, trigger_options={})
    built.save(baseline_dir)
    stage.done()

    baseline = load_baseline(baseline_dir)
    policy = load_policy("default")
    verdicts, evidence = {}, {}
    for label, path, spec in [
        ("held-out clean", clean, HELD_OUT_CLEAN),
        ("backdoored (BadNets)", bad, BACKDOORED),
    ]:
        stage.start(
            f"scanning the {label} candidate (fingerprint against the baseline, activation "
            "clustering on its training set, trigger search)"
        )
        report, report_dir, train_path, poisoned, timings = _scan_one(
            workdir, path, spec, baseline, policy
        )
        stage.done(timings)
        net = _load_eager(spec, models_dir)
        stats = ", ".join(f"{k} {v:.1%}" for k, v in evaluate(net, spec).items())
        print(f"\n# Candidate: {label} ({stats})\n")
        print(FORMATS["markdown"].render(report))
        print(_ac_against_truth(report, poisoned))
        print(f"reports: {report_dir}/report.json, {report_dir}/summary.md")
        print(f"training set: {train_path} (gate ac {path} --data {train_path})")
        verdicts[label] = report.verdict
        evidence[label] = _evidence(report)
    print("\nevidence:")
    for label, line in evidence.items():
        print(f"  {label}: {line}")
    print("verdicts: " + ", ".join(f"{k} -> {v}" for k, v in verdicts.items()))
    print(f"stage times: {stage.summary()}", file=sys.stderr)
    return 0


class _Stages:
    """``[i/n] what`` lines on stderr, each followed by how long the stage took."""

    def __init__(self, total: int) -> None:
        self.total, self.index = total, 0
        self.t0 = 0.0
        self.seconds: list[float] = []

    def start(self, what: str) -> None:
        self.index += 1
        self.t0 = time.perf_counter()
        print(f"[{self.index}/{self.total}] {what}", file=sys.stderr, flush=True)

    def done(self, parts: dict[str, float] | None = None) -> None:
        took = time.perf_counter() - self.t0
        self.seconds.append(took)
        detail = ""
        if parts:
            keys = ("load", "extract", "detect", "ac", "trigger_search")
            detail = " (" + ", ".join(f"{k} {parts[k]:.1f} s" for k in keys if k in parts) + ")"
        print(f"      done in {took:.1f} s{detail}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        return ", ".join(f"[{i}] {s:.1f} s" for i, s in enumerate(self.seconds, 1))


def _materialise(spec: ZooSpec, models_dir: Path, i: int, n: int) -> str:
    cached = (models_dir / f"{spec.key}.pt").is_file()
    t0 = time.perf_counter()
    path = materialise(spec, models_dir)
    what = "reused" if cached else f"trained in {time.perf_counter() - t0:.1f} s"
    print(f"      model {i}/{n} {spec.key}: {what}", file=sys.stderr, flush=True)
    return str(path)


def _scan_one(
    workdir: Path, path: str, spec: ZooSpec, baseline: Any, policy: Any
) -> tuple[Any, Path, Path, npt.NDArray[np.int64], dict[str, float]]:
    """One candidate through the same library calls `gate scan` makes (gate.scan, then the
    report directory gate.report.files describes), with the trigger search on: the
    demo's baseline holds the references' searches, so each class is compared with the
    same class of the clean family."""
    from gate._io import write_bytes_atomic
    from gate.ac.options import ACOptions
    from gate.data import load_npz
    from gate.report.files import report_files
    from gate.scan import scan
    from gate.trigger.report import TriggerRequest

    train_path = workdir / f"train-{spec.key}.npz"
    x, y, poisoned = training_set(spec)
    if not train_path.is_file():
        np.savez(train_path, x=x, y=y)
    train = load_npz(train_path)
    pictures: dict[int, bytes] = {}
    options = ACOptions(quiet=True, pictures=pictures)
    request = TriggerRequest(mode="on")
    timings: dict[str, float] = {}
    report = scan(
        path, baseline, train, policy, ac_options=options, trigger=request, timings=timings
    )
    report_dir = workdir / ("report-clean" if spec.attack == "none" else "report-backdoored")
    files = report_files(report, list(FORMATS.values()), train, pictures, request.pictures)
    for name, content in files.items():
        write_bytes_atomic(report_dir / name, content)
    return report, report_dir, train_path, poisoned, timings


def _evidence(report: Any) -> str:
    """Each check's p-value against its fail threshold, in one line."""
    parts = []
    for c in report.checks:
        if c.name == "activation_clustering":
            ac = report.activation_clustering
            flagged = [k.label for k in ac.classes if k.flagged] if ac else []
            parts.append(f"activation clustering {c.status} (flagged classes: {flagged or 'none'})")
        elif c.value is not None and c.threshold is not None and c.name != "baseline_size":
            parts.append(f"{c.name} {c.status} (p = {c.value:.3g}, threshold {c.threshold:g})")
        elif c.name != "baseline_size":
            parts.append(f"{c.name} {c.status}")
    return "; ".join(parts)


def _ac_against_truth(report: Any, poisoned: npt.NDArray[np.int64]) -> str:
    """What AC flagged, checked against the rows the demo really poisoned."""
    ac = report.activation_clustering
    flagged = {i for c in ac.classes for i in c.suspicious_indices} if ac else set()
    hit = len(flagged & {int(i) for i in poisoned})
    return (
        f"activation clustering flagged {len(flagged)} training samples; {hit} of them are "
        f"among the {len(poisoned)} the demo poisoned"
    )


def _load_eager(spec: ZooSpec, models_dir: Path):  # type: ignore[no-untyped-def]
    import torch

    return torch.jit.load(str(models_dir / f"{spec.key}.pt"))  # type: ignore[no-untyped-call]
