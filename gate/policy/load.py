"""Finding and validating policy files (a shipped name or a path)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from gate.errors import PolicyError, first_line
from gate.policy.model import Policy

DEFAULT_POLICY = "default"


def _shipped_dir() -> Path:
    return Path(str(resources.files("gate") / "policies"))


def policy_names() -> list[str]:
    return sorted(p.stem for p in _shipped_dir().glob("*.yaml"))


def load_policy(name_or_path: str | None) -> Policy:
    spec = name_or_path or DEFAULT_POLICY
    path = Path(spec)
    if not path.is_file():
        shipped = _shipped_dir() / f"{spec}.yaml"
        if not shipped.is_file():
            raise PolicyError(
                f"policy {spec!r} is neither a file nor a shipped policy "
                f"({', '.join(policy_names())})"
            )
        path = shipped
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read policy ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{path}: invalid YAML{where}") from None
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit conversion limit
        if "digits" in str(exc):
            raise PolicyError(f"{path}: a number in the policy has too many digits") from None
        raise PolicyError(f"{path}: invalid value in the policy ({first_line(exc)})") from None
    except RecursionError:
        raise PolicyError(f"{path}: the policy is nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: a policy must be a mapping of keys to values")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            raise PolicyError(f"{path}: unknown policy key {key!r}") from None
        raise PolicyError(f"{path}: invalid value for {key!r}: {err['msg']}") from None
