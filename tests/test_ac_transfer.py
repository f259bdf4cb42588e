"""gate.ac.transfer: the trigger of the flagged classes, followed into the others."""

from __future__ import annotations

import numpy as np

from gate.ac import transfer


def _planted() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three classes in 10 dimensions; 30 rows of each class l carry a trigger (+4 on
    dimension 9) and the features of class l - 1 (all-to-all poisoning)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 10))
    centres[:, 9] = 0.0
    y = np.repeat(np.arange(3), 200)
    x = centres[y] + rng.normal(0, 1, (600, 10))
    poison = np.concatenate([np.arange(c * 200, c * 200 + 30) for c in range(3)])
    x[poison] = centres[(y[poison] - 1) % 3] + rng.normal(0, 1, (90, 10))
    x[poison, 9] += 4.0
    return x.astype(np.float32), y, poison


def test_direction_and_shift_recover_the_planted_trigger() -> None:
    x, y, poison = _planted()
    # Class 0 was flagged: its poison moved back to class 2, where it came from.
    moved = [(int(i), 2) for i in poison if y[i] == 0]
    t = transfer.direction(x, y, moved, min_rows=5)
    assert t is not None
    # The trigger's dimension dominates; the class offset is left in only by the poison
    # still inside class 2 (its own 30 rows of class 1), which the mean cannot leave out.
    assert int(np.argmax(np.abs(t))) == 9 and t[9] > 0.7
    proj = transfer.projection(x, t)
    assert 3.0 < transfer.shift(proj, y, moved) < 5.0
    # Class 1's rows beyond half the shift are exactly its poison.
    idx = np.flatnonzero(y == 1)
    found = idx[transfer.beyond(proj, idx, transfer.shift(proj, y, moved) / 2)]
    truth = {int(i) for i in poison if y[i] == 1}
    assert len(truth & set(found.tolist())) >= 28 and len(set(found.tolist()) - truth) <= 5
    assert transfer.min_share(y, moved) == 30 / 200 / 2


def test_too_few_moved_rows_give_no_direction() -> None:
    x, y, poison = _planted()
    assert transfer.direction(x, y, [(int(poison[0]), 2)], min_rows=5) is None
    assert transfer.direction(x, y, [], min_rows=1) is None
