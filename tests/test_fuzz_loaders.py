"""Fuzz gate.models.load_model: any damaged or random file is a GateError, nothing else.

Mutations of a valid small TorchScript file (bit flips, truncation, insertion, overwritten
runs) and random byte strings go through ``load_model`` in-process; the only exceptions
allowed out are :class:`gate.errors.GateError` subclasses. A crash of the interpreter
(e.g. a segfault inside torch.jit.load) fails the whole run.

``make test`` runs a bounded number of examples per property (``GATE_FUZZ_EXAMPLES``,
default 60). For a longer run, set the variable, e.g.::

    GATE_FUZZ_EXAMPLES=5000 .venv/bin/pytest -q tests/test_fuzz_loaders.py
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gate.errors import GateError
from gate.models import load_model

EXAMPLES = int(os.environ.get("GATE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_SEED: bytes | None = None


def _seed() -> bytes:
    """A small TorchScript file, scripted in a fresh interpreter (keeps this one's JIT clean)."""
    global _SEED
    if _SEED is None:
        script = (
            "import sys, torch; m = torch.nn.Sequential(torch.nn.Flatten(), "
            "torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)); "
            "torch.jit.save(torch.jit.script(m), sys.argv[1])"
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "seed.pt"
            subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=300)
            _SEED = path.read_bytes()
    return _SEED


def _try_load(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        path.write_bytes(data)
        with contextlib.suppress(GateError):
            load_model(path)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(_seed())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "delete"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=64))
            data[pos : pos + len(chunk)] = chunk
        else:
            del data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def mutated_members(draw: st.DrawFn) -> bytes:
    """A well-formed zip (valid CRCs) whose members' contents are damaged: reaches torch."""
    with zipfile.ZipFile(io.BytesIO(_seed())) as zin:
        infos = zin.infolist()
        members = {i.filename: zin.read(i) for i in infos}
    victim = draw(st.sampled_from([i.filename for i in infos]))
    content = bytearray(members[victim])
    for _ in range(draw(st.integers(1, 3))):
        if not content:
            break
        pos = draw(st.integers(0, len(content) - 1))
        kind = draw(st.sampled_from(["flip", "truncate", "overwrite"]))
        if kind == "flip":
            content[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del content[pos:]
        else:
            chunk = draw(st.binary(min_size=1, max_size=16))
            content[pos : pos + len(chunk)] = chunk
    members[victim] = bytes(content)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info in infos:
            zout.writestr(info, members[info.filename])
    return out.getvalue()


def test_seed_model_loads(tmp_path: Path) -> None:
    path = tmp_path / "seed.pt"
    path.write_bytes(_seed())
    assert load_model(path).format == "torchscript"


@pytest.mark.slow
@FUZZ
@given(mutated())
def test_mutated_torchscript_is_loaded_or_refused(data: bytes) -> None:
    _try_load(data)


@pytest.mark.slow
@FUZZ
@given(mutated_members())
def test_damaged_members_are_loaded_or_refused(data: bytes) -> None:
    _try_load(data)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=4096),
        st.binary(max_size=512).map(lambda b: b"PK\x03\x04" + b),
        st.binary(max_size=512).map(lambda b: b"\x80\x04" + b),
        st.binary(max_size=512).map(lambda b: b"c" + b),
    )
)
def test_random_bytes_are_refused(data: bytes) -> None:
    _try_load(data)
