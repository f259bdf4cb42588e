"""``--arch package.module:ClassName`` and ``--arch-kwargs JSON``: the user's own, trusted code.

Weights-only formats (a ``torch.save(model.state_dict())`` checkpoint, safetensors) hold
no architecture. The user names one as an import path from their own code; gate imports
it, builds it with the keyword arguments given, and loads the weights into it. The model
file itself is never trusted: it only ever supplies tensors.

The option is set for the duration of one command with :func:`use_arch` (the CLI does
this), so that every ``load_model`` call in that command sees it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from gate.errors import UsageError, first_line

_ARCH_FORM = "package.module:ClassName"


@dataclass(frozen=True)
class ArchSpec:
    """An architecture named by import path, with the keyword arguments to build it."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.kwargs:
            return self.target
        return f"{self.target} {json.dumps(self.kwargs, sort_keys=True)}"


_CURRENT: ContextVar[ArchSpec | None] = ContextVar("gate_arch", default=None)


def parse_arch(target: str | None, kwargs_json: str | None) -> ArchSpec | None:
    """Check the options' form (the import itself happens when a weights file needs it)."""
    if target is None or not target.strip():
        if kwargs_json is not None and kwargs_json.strip():
            raise UsageError("--arch-kwargs needs --arch package.module:ClassName")
        return None
    target = target.strip()
    module, sep, name = target.partition(":")
    if (
        not sep
        or not module
        or not name
        or not all(part.isidentifier() for part in (*module.split("."), *name.split(".")))
    ):
        raise UsageError(f"--arch must be {_ARCH_FORM}, got {target!r}")
    kwargs: dict[str, Any] = {}
    if kwargs_json is not None and kwargs_json.strip():
        try:
            parsed = json.loads(kwargs_json)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--arch-kwargs is not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise UsageError(
                f"--arch-kwargs must be a JSON object like '{{\"width\": 64}}', got {kwargs_json!r}"
            )
        kwargs = parsed
    return ArchSpec(target, kwargs)


@contextlib.contextmanager
def use_arch(target: str | None, kwargs_json: str | None) -> Iterator[ArchSpec | None]:
    """Make ``--arch``/``--arch-kwargs`` the architecture for weights-only files loaded inside."""
    spec = parse_arch(target, kwargs_json)
    token = _CURRENT.set(spec)
    try:
        yield spec
    finally:
        _CURRENT.reset(token)


def current_arch() -> ArchSpec | None:
    return _CURRENT.get()


def code_identity(spec: ArchSpec, module: Any) -> str:
    """The architecture's name, kwargs and defining source file, hashed (for the cache)."""
    import hashlib
    import inspect

    h = hashlib.sha256(spec.describe().encode("utf-8"))
    try:
        source = inspect.getsourcefile(type(module))
        if source:
            with open(source, "rb") as fh:
                h.update(fh.read())
    except (OSError, TypeError):  # built-in or generated classes: name and kwargs only
        pass
    return h.hexdigest()


def build_module(spec: ArchSpec) -> Any:
    """Import the class and build it; any failure is a one-line usage error."""
    import torch

    module_name, _, attr = spec.target.partition(":")
    try:
        mod = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the user's module raises on import
        raise UsageError(
            f"--arch: cannot import {module_name!r} ({type(exc).__name__}: {first_line(exc)}); "
            "is it on PYTHONPATH?"
        ) from None
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError(f"--arch: {module_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise UsageError(f"--arch: {spec.target!r} is not a class")
    try:
        built = obj(**spec.kwargs)
    except Exception as exc:
        raise UsageError(
            f"--arch: building {spec.describe()} failed ({type(exc).__name__}: "
            f"{first_line(exc)}); check --arch-kwargs"
        ) from None
    if not isinstance(built, torch.nn.Module):
        raise UsageError(
            f"--arch: {spec.target!r} built a {type(built).__name__}, not a torch.nn.Module"
        )
    return built
