"""``gate demo``: the whole job on an embedded default, cached under a work directory.

Each candidate is scanned with its own training set, as a fine-tuning pipeline would: the
fingerprint against the baseline, and activation clustering on that data.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gate.demo.zoo import ZooSpec, evaluate, materialise, save_digits_npz, training_set

# Clean references vary in seed and data subset; one clean and one backdoored candidate
# are held out. The backdoor is BadNets: a 3x3 corner patch relabelled to class 0.
REFERENCES = tuple(ZooSpec(seed=s, subset=0.8 + 0.02 * (s % 5)) for s in range(1, 11))
HELD_OUT_CLEAN = ZooSpec(seed=101, subset=0.85)
BACKDOORED = ZooSpec(seed=202, attack="badnets", poison_rate=0.1, target=0, subset=0.85)


def run_demo(workdir: Path) -> int:
    import torch

    from gate._io import write_text_atomic
    from gate.ac.options import ACOptions
    from gate.cli.commands import write_ac_files
    from gate.fingerprint.build import build_baseline
    from gate.policy import load_policy
    from gate.report.formats import FORMATS
    from gate.scan import scan

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    models_dir = workdir / "models"
    data_path = workdir / "digits-train.npz"
    if not data_path.is_file():
        save_digits_npz(data_path, "train")
    print(
        f"[1/4] training or reusing {len(REFERENCES) + 2} digit classifiers in {models_dir}",
        file=sys.stderr,
    )
    refs = [str(materialise(spec, models_dir)) for spec in REFERENCES]
    clean = str(materialise(HELD_OUT_CLEAN, models_dir))
    bad = str(materialise(BACKDOORED, models_dir))

    from gate.data import load_npz

    data = load_npz(data_path)
    print(f"[2/4] building a baseline from {len(refs)} clean references", file=sys.stderr)
    baseline_dir = workdir / "baseline"
    built = build_baseline(refs, data=data, seed=0)
    built.save(baseline_dir)

    from gate.fingerprint.baseline import load_baseline

    baseline = load_baseline(baseline_dir)
    policy = load_policy("default")
    verdicts = {}
    for step, (label, path, spec) in enumerate(
        [("held-out clean", clean, HELD_OUT_CLEAN), ("backdoored (BadNets)", bad, BACKDOORED)],
        start=3,
    ):
        print(
            f"[{step}/4] scanning the {label} candidate (fingerprint, and activation "
            "clustering on its training set)",
            file=sys.stderr,
        )
        train_path = workdir / f"train-{spec.key}.npz"
        x, y, poisoned = training_set(spec)
        if not train_path.is_file():
            np.savez(train_path, x=x, y=y)
        train = load_npz(train_path)
        pictures: dict[int, bytes] = {}
        options = ACOptions(quiet=True, pictures=pictures)
        report = scan(path, baseline, train, policy, ac_options=options)
        report_dir = workdir / ("report-clean" if spec.attack == "none" else "report-backdoored")
        for fmt in FORMATS.values():
            write_text_atomic(report_dir / fmt.filename, fmt.render(report))
        write_ac_files(report, report_dir, train, pictures)
        net = _load_eager(spec, models_dir)
        stats = ", ".join(f"{k} {v:.1%}" for k, v in evaluate(net, spec).items())
        print(f"\n# Candidate: {label} ({stats})\n")
        print(FORMATS["markdown"].render(report))
        print(_ac_against_truth(report, poisoned))
        print(f"reports: {report_dir}/report.json, {report_dir}/summary.md")
        print(f"training set: {train_path} (gate ac {path} --data {train_path})")
        verdicts[label] = report.verdict
    print("\nverdicts: " + ", ".join(f"{k} -> {v}" for k, v in verdicts.items()))
    return 0


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
