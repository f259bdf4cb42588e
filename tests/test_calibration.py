"""Calibration: at the policy's alpha, clean models of the family are rarely blocked.

A family of small MLPs is trained in the test (seconds each); held-out clean models are
scanned against a baseline of the others and the observed false-block rate is compared
with alpha, allowing binomial noise. Backdoored members of the same family must fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gate.data import Dataset
from gate.demo.zoo import ZooSpec, digits, materialise
from gate.fingerprint.baseline import load_baseline
from gate.fingerprint.build import build_baseline
from gate.policy import load_policy
from gate.scan import scan

REFERENCES = [
    ZooSpec(seed=s, arch="mlp", epochs=15, subset=0.7 + 0.02 * (s % 8)) for s in range(1, 13)
]
HELD_OUT = [
    ZooSpec(seed=s, arch="mlp", epochs=15, subset=0.7 + 0.02 * (s % 8)) for s in range(100, 124)
]
BACKDOORED = [
    ZooSpec(seed=200 + i, arch="mlp", epochs=15, attack=attack, poison_rate=rate, subset=0.8)
    for i, (attack, rate) in enumerate([("blend", 0.1), ("blend", 0.15), ("all2all", 0.1)])
]
# Known gap, measured: BadNets-patched members of this MLP family (ASR ~100%) get p ~ 0.1-0.4
# with the logits fingerprint; the CNN family of the demo and benchmark is caught. See README.


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Path]]]:
    import torch

    torch.set_num_threads(1)
    models = tmp_path_factory.mktemp("mlp-family")
    paths = {
        "refs": [materialise(s, models) for s in REFERENCES],
        "clean": [materialise(s, models) for s in HELD_OUT],
        "backdoored": [materialise(s, models) for s in BACKDOORED],
    }
    x, y = digits("train")
    built = build_baseline([str(p) for p in paths["refs"]], data=Dataset(x, y, "digits"), seed=0)
    built.save(models / "baseline")
    return models / "baseline", paths


def test_false_block_rate_is_within_alpha(family: tuple[Path, dict[str, list[Path]]]) -> None:
    baseline_dir, paths = family
    baseline = load_baseline(baseline_dir)
    policy = load_policy("default")
    p_values = np.array(
        [scan(str(p), baseline, None, policy).fingerprint.p_value for p in paths["clean"]]  # type: ignore[union-attr]
    )
    n = len(p_values)
    # Binomial tolerance: with 24 clean models, P(>= 3 blocks | alpha = 0.01) is 0.02%,
    # P(>= 5 warnings | alpha = 0.05) is 0.7%. A miscalibrated detector blows through both.
    assert np.sum(p_values < policy.fingerprint.fail_alpha) <= 2, p_values
    assert np.sum(p_values < policy.fingerprint.warn_alpha) <= 4, p_values
    # Conformal p-values of exchangeable clean models are roughly uniform, not all near 1.
    assert np.median(p_values) < 0.9 and n == len(HELD_OUT)


def test_backdoored_family_members_fail(family: tuple[Path, dict[str, list[Path]]]) -> None:
    baseline_dir, paths = family
    baseline = load_baseline(baseline_dir)
    policy = load_policy("default")
    verdicts = [scan(str(p), baseline, None, policy).verdict for p in paths["backdoored"]]
    assert verdicts == ["fail"] * len(verdicts), verdicts
