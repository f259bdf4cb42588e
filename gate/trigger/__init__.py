"""Model-adaptive trigger search (issue 14): the entry point the scan uses.

:func:`run_search` runs the search where the model lives: a sandbox proxy provides
``trigger_search`` (run in the child, which holds the model and its gradients); an
in-process model is searched here. Statistics are turned into p-values in the parent
(:mod:`gate.trigger.stats`). Imports stay lazy so that ``gate --help`` does not load torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def run_search(
    model: Any,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64] | None,
    options: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """The trigger search's raw result for ``model`` (see :func:`gate.trigger.search.run`)."""
    from gate.trigger.search import options_checked

    options = options_checked(options)  # bad budgets fail here, before any child work
    remote = getattr(model, "trigger_search", None)
    if callable(remote):
        result: dict[str, Any] = remote(x, y, options, seed)
        return result
    from gate.trigger.search import run

    return run(model, x, y, options, seed)
