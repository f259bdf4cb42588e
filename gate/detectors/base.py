"""The detector interface, in scikit-learn's shape.

``__init__`` only stores parameters, ``fit`` learns from reference fingerprints and
returns ``self``, learned attributes end in ``_``, and ``score`` follows one direction:
**higher means more suspicious**.

Fitting may use scikit-learn; scoring is plain numpy over the learned arrays, so a scan
restores a fitted detector from its baseline (:meth:`Detector.restore`) without importing
scikit-learn or refitting anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from gate.errors import BaselineError

Matrix = npt.NDArray[np.float64]
State = dict[str, npt.NDArray[Any]]
MAX_STATE_VALUE = 1e30


class Detector(ABC):
    name: ClassVar[str]
    # Learned arrays that, with the reference matrix, make up a fitted detector.
    state_keys: ClassVar[tuple[str, ...]]

    @abstractmethod
    def fit(self, X: Matrix) -> Self:
        """Learn what clean reference fingerprints look like."""

    @abstractmethod
    def score(self, X: Matrix) -> Matrix:
        """One score per row; higher = more suspicious."""

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def state(self) -> State:
        """The learned arrays, for storing in a baseline (see :meth:`restore`)."""
        return {key: np.asarray(getattr(self, f"{key}_")) for key in self.state_keys}

    def restore(self, X: Matrix, state: Mapping[str, npt.NDArray[Any]]) -> Self:
        """Become the detector that ``fit(X)`` produced, from its :meth:`state`.

        The arrays come from a file, so they are checked before use: a tampered baseline
        must give a :class:`BaselineError`, not an index error or an endless loop.
        """
        missing = [k for k in self.state_keys if k not in state]
        if missing:
            raise BaselineError(f"detector {self.name!r}: stored state lacks {', '.join(missing)}")
        for key in self.state_keys:
            arr = np.asarray(state[key])
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise BaselineError(f"detector {self.name!r}: stored {key} is not finite")
            # An absurd magnitude (1e308) is as corrupting as inf: scores overflow to it.
            if arr.dtype.kind in "fiu" and arr.size and np.max(np.abs(arr)) > MAX_STATE_VALUE:
                raise BaselineError(f"detector {self.name!r}: stored {key} is out of range")
            setattr(self, f"{key}_", arr)
        self._restore(np.asarray(X, dtype=np.float64))
        return self

    @abstractmethod
    def _restore(self, X: Matrix) -> None:
        """Derive what ``score`` needs from ``X`` and the restored arrays; check their shapes."""


def _bad_state(detector: str, what: str) -> BaselineError:
    return BaselineError(f"detector {detector!r}: stored state is inconsistent ({what})")
