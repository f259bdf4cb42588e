"""Limiting BLAS/OpenMP thread pools around short numeric steps."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext


def thread_limit(n: int) -> AbstractContextManager[object]:
    """At most ``n`` threads in the BLAS/OpenMP pools while the context is open."""
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - installed with scikit-learn
        return nullcontext()
    limits: AbstractContextManager[object] = threadpool_limits(limits=n)
    return limits
