"""Fuzz gate's loaders: any damaged or random model, baseline or data file is a GateError.

Mutations of a valid small TorchScript file (bit flips, truncation, insertion, overwritten
runs) and random byte strings go through the loaders in-process (``load_in_process``, what
the sandbox's child runs); the only exceptions
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

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gate.errors import GateError

# The loaders as they run inside the sandbox's child: one child per example would cost a
# torch import each; the CLI examples below go through the sandbox.
from gate.models import load_in_process as load_model

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


# --- baselines and data files --------------------------------------------------------------
#
# The same property for the other untrusted inputs a CI job reads: a mutated baseline
# (manifest text or arrays) and mutated data files (.npz, JSONL) load or give a GateError,
# and through the CLI exit 0/1/2 with at most one line on stderr, never a traceback.

_BASELINE: dict[str, bytes] | None = None


def _baseline_files() -> dict[str, bytes]:
    """A real three-reference baseline of tiny MLPs, built once by the CLI in a subprocess."""
    global _BASELINE
    if _BASELINE is None:
        script = (
            "import sys, torch\nfor s in range(3):\n    torch.manual_seed(s)\n"
            "    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), "
            "torch.nn.Linear(5, 3))\n"
            "    torch.jit.save(torch.jit.script(m), f'{sys.argv[1]}/r{s}.pt')\n"
        )
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-c", script, tmp], check=True, timeout=300)
            refs = [f"{tmp}/r{s}.pt" for s in range(3)]
            out = Path(tmp) / "baseline"
            subprocess.run(
                [sys.executable, "-m", "gate", "baseline", "build", *refs, "--out", str(out),
                 "--input-shape", "6", "--quiet"],
                check=True, timeout=600, cwd=tmp, capture_output=True,
            )  # fmt: skip
            _BASELINE = {f.name: f.read_bytes() for f in out.iterdir()}
    return _BASELINE


# Tokens an attacker would splice into JSON: non-finite and huge numbers, deep nesting.
_JSON_TOKENS = [
    b"NaN",
    b"-Infinity",
    b"1e308",
    b"9" * 5000,
    b"[" * 5000,
    b"{",
    b'"',
    b"-1",
    b"null",
]


@st.composite
def _mutated_text(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["token", "flip", "delete"]))
        if kind == "token":
            end = pos + draw(st.integers(0, 12))
            data[pos:end] = draw(st.sampled_from(_JSON_TOKENS))
        elif kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        else:
            del data[pos : pos + draw(st.integers(1, 32))]
    return bytes(data)


@st.composite
def _mutated_npz(draw: st.DrawFn, seed: bytes) -> bytes:
    """An npz whose members' bytes (headers included) are damaged, with valid CRCs."""
    with zipfile.ZipFile(io.BytesIO(seed)) as zin:
        infos = zin.infolist()
        members = {i.filename: bytearray(zin.read(i)) for i in infos}
    victim = draw(st.sampled_from(sorted(members)))
    content = members[victim]
    for _ in range(draw(st.integers(1, 3))):
        if not content:
            break
        # Mostly the .npy header (first ~128 bytes): shapes, dtypes, lengths.
        pos = draw(st.integers(0, min(len(content), 160) - 1))
        kind = draw(st.sampled_from(["flip", "digits", "truncate", "float"]))
        if kind == "flip":
            content[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "digits":
            content[pos : pos + 1] = draw(st.sampled_from([b"9" * 13, b"4398046511104", b"-"]))
        elif kind == "truncate":
            del content[draw(st.integers(0, len(content) - 1)) :]
        elif len(content) >= 4:  # a NaN, inf or 1e38 float32 somewhere in the data
            at = draw(st.integers(0, len(content) - 4))
            content[at : at + 4] = draw(st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f",
                                                         b"\x99\x76\x96\x7e"]))  # fmt: skip
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info in infos:
            zout.writestr(info, bytes(members[info.filename]))
    return out.getvalue()


def _baseline_with(name: str, data: bytes) -> None:
    """Load (and restore the detectors of) the seed baseline with one file replaced."""
    from gate.fingerprint.baseline import load_baseline
    from gate.scan import baseline_ensemble

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for fname, content in _baseline_files().items():
            (d / fname).write_bytes(data if fname == name else content)
        with contextlib.suppress(GateError):
            baseline_ensemble(load_baseline(d))


def test_seed_baseline_loads() -> None:
    _baseline_with("", b"")


@FUZZ
@given(st.data())
def test_mutated_baseline_manifest_is_loaded_or_refused(data: st.DataObject) -> None:
    _baseline_with("baseline.json", data.draw(_mutated_text(_baseline_files()["baseline.json"])))


@FUZZ
@given(st.data())
def test_mutated_baseline_arrays_are_loaded_or_refused(data: st.DataObject) -> None:
    seed = _baseline_files()["fingerprints.npz"]
    _baseline_with("fingerprints.npz", data.draw(_mutated_npz(seed)))


def _seed_npz() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, x=rng.normal(size=(8, 6)).astype(np.float32), y=np.arange(8) % 2)
    return buf.getvalue()


_SEED_JSONL = b'{"text": "a good film", "label": 1}\n{"text": "dull", "label": 0}\n'


def _data_with(content: bytes, suffix: str) -> None:
    from gate.data import load_data

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        with contextlib.suppress(GateError):
            load_data(path)


@FUZZ
@given(st.data())
def test_mutated_npz_data_is_loaded_or_refused(data: st.DataObject) -> None:
    _data_with(data.draw(_mutated_npz(_seed_npz())), ".npz")


@FUZZ
@given(st.data())
def test_mutated_jsonl_data_is_loaded_or_refused(data: st.DataObject) -> None:
    _data_with(data.draw(_mutated_text(_SEED_JSONL)), ".jsonl")


@pytest.mark.slow
@settings(max_examples=min(EXAMPLES, 8), deadline=None, derandomize=True)
@given(st.data())
def test_mutated_inputs_through_the_cli(data: st.DataObject) -> None:
    """A few mutants end to end: exit 0/1/2, one stderr line for errors, never a signal."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "b").mkdir()
        for fname, content in _baseline_files().items():
            (d / "b" / fname).write_bytes(content)
        target = data.draw(st.sampled_from(["baseline.json", "fingerprints.npz"]))
        seed = _baseline_files()[target]
        mutant = _mutated_text(seed) if target.endswith(".json") else _mutated_npz(seed)
        (d / "b" / target).write_bytes(data.draw(mutant))
        proc = subprocess.run(
            [sys.executable, "-m", "gate", "baseline", "show", str(d / "b")],
            capture_output=True, text=True, timeout=300, cwd=d,
        )  # fmt: skip
        assert proc.returncode in (0, 1, 2), (proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
        if proc.returncode == 2:
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
