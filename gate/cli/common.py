"""Small helpers every command module shares (argument values to library objects)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gate.activations import ActivationCache
    from gate.data import Dataset, TextData


def h(text: object) -> str:
    """Untrusted text (paths, layer names) for a printed line: see gate.report.escape."""
    from gate.report.escape import human

    return human(text)


def load_data_arg(path: str | None) -> Dataset | TextData | None:
    if not path:  # None, or an empty CI input
        return None
    from gate.data import load_data

    return load_data(path)


def cache_from_args(args: argparse.Namespace) -> ActivationCache | None:
    if getattr(args, "no_cache", False):
        return None
    from gate.activations import ActivationCache

    # The default lives in the user's cache directory, not the working directory; entries
    # are keyed and authenticated with a secret kept there (README, "Threat model").
    return ActivationCache.open(getattr(args, "cache_dir", None))


def threads_from_args(args: argparse.Namespace) -> int | None:
    value = getattr(args, "threads", None) or getattr(args, "global_threads", None)
    return int(value) if value else None
