"""The detector interface, in scikit-learn's shape.

``__init__`` only stores parameters, ``fit`` learns from reference fingerprints and
returns ``self``, learned attributes end in ``_``, and ``score`` follows one direction:
**higher means more suspicious**.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float64]


class Detector(ABC):
    name: ClassVar[str]

    @abstractmethod
    def fit(self, X: Matrix) -> Self:
        """Learn what clean reference fingerprints look like."""

    @abstractmethod
    def score(self, X: Matrix) -> Matrix:
        """One score per row; higher = more suspicious."""

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}
