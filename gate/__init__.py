"""gate: block backdoored ML models in CI by inspecting their activations.

Heavy dependencies (torch, scikit-learn) are imported lazily by the submodules that
need them, so that importing :mod:`gate` and running ``gate --help`` stay instant.
"""

from gate._version import __version__

__all__ = ["__version__"]
