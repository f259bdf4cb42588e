"""The sandbox's limits for one command: set once by the CLI, read wherever a model loads."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

DEFAULT_TIMEOUT = 900.0
# CPU seconds per wall-clock second: a backstop behind the wall-clock limit, generous
# enough for every thread of a many-core runner.
_CPU_PER_SECOND = max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SandboxOptions:
    """``timeout``: wall-clock seconds for one model's child, from start to last answer.
    ``memory_mb``: its address-space cap (None: the machine's physical memory; 0: none;
    not applied on a GPU, whose driver reserves huge virtual ranges).
    ``device``: ``--device`` as given (gate.device), resolved by the child."""

    timeout: float = DEFAULT_TIMEOUT
    memory_mb: int | None = None
    device: str = "cpu"

    def cpu_seconds(self) -> int:
        return int(self.timeout * _CPU_PER_SECOND) + 30

    def memory_bytes(self) -> int | None:
        if self.memory_mb == 0:
            return None
        if self.memory_mb is not None:
            return self.memory_mb * 2**20
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None


_CURRENT: ContextVar[SandboxOptions | None] = ContextVar("gate_sandbox", default=None)


def current_options() -> SandboxOptions:
    return _CURRENT.get() or SandboxOptions()


@contextlib.contextmanager
def use_sandbox(options: SandboxOptions) -> Iterator[SandboxOptions]:
    """Make ``options`` the limits of every model loaded inside (the CLI sets them)."""
    token = _CURRENT.set(options)  # a frozen dataclass: safe to share
    try:
        yield options
    finally:
        _CURRENT.reset(token)
