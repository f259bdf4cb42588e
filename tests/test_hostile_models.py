"""Hostile and broken model files, through the real CLI: exit 2, one line, nothing runs.

Every case runs ``gate inspect`` in a subprocess whose address space is capped with
RLIMIT_AS (torch needs well under 1 GiB of it here), so a loader that tried to inflate a
zip bomb or allocate a forged size would die instead of passing.
"""

from __future__ import annotations

import builtins
import importlib
import os
import pickle
import random
import resource
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import assert_one_line_error

MEMORY_LIMIT = 3 << 30


def run_capped(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m gate ARGS`` with the address space capped at :data:`MEMORY_LIMIT`."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {k: v for k, v in os.environ.items() if k not in {"GITHUB_STEP_SUMMARY", "GATE_DEBUG"}}
    return subprocess.run(
        [sys.executable, "-m", "gate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
        preexec_fn=cap,
    )


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scripted in a fresh interpreter: in-process scripting may mangle the code/ names."""
    path = tmp_path_factory.mktemp("ts") / "small.pt"
    script = (
        "import sys, torch; torch.manual_seed(0); m = torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)); "
        "torch.jit.save(torch.jit.script(m), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=300)
    with zipfile.ZipFile(path) as zf:
        assert any(
            n.endswith("code/__torch__/torch/nn/modules/container.py") for n in zf.namelist()
        )
    return path


# --- malicious pickles --------------------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)``: what an attacker's ``__reduce__`` does."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.func, self.args)


def _handmade(module: str, name: str, arg: str, protocol: int) -> bytes:
    """``module.name(arg)`` for a module that need not exist (pickle.dumps would import it)."""
    if protocol < 4:
        head = b"\x80" + bytes([protocol]) if protocol >= 2 else b""
        return head + f"c{module}\n{name}\n(V{arg}\ntR.".encode()

    def short(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    return (
        b"\x80" + bytes([protocol]) + short(module) + short(name) + b"\x93" + short(arg) + b"\x85R."
    )


PAYLOADS: dict[str, tuple[Callable[[Path, int], bytes], str]] = {
    "os.system": (lambda m, p: pickle.dumps(_Reduce(os.system, f"touch {m}"), p), "system"),
    "subprocess.Popen": (
        lambda m, p: pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(m)]), p),
        "Popen",
    ),
    "subprocess.check_call": (
        lambda m, p: pickle.dumps(_Reduce(subprocess.check_call, ["touch", str(m)]), p),
        "check_call",
    ),
    "builtins.open": (lambda m, p: pickle.dumps(_Reduce(builtins.open, str(m), "w"), p), "open"),
    "builtins.exec": (
        lambda m, p: pickle.dumps(_Reduce(builtins.exec, f"open({str(m)!r}, 'w')"), p),
        "exec",
    ),
    "builtins.eval": (
        lambda m, p: pickle.dumps(_Reduce(builtins.eval, f"open({str(m)!r}, 'w')"), p),
        "eval",
    ),
    "importlib.import_module": (
        lambda m, p: pickle.dumps(_Reduce(importlib.import_module, "gate_evil_plugin"), p),
        "import_module",
    ),
    "unknown module": (
        lambda m, p: _handmade("gate_evil_plugin", "run", str(m), p),
        "gate_evil_plugin.run",
    ),
}


def _plant_plugin(tmp_path: Path, marker: Path) -> None:
    """A module that creates the marker when imported (cwd is on sys.path under ``-m``)."""
    (tmp_path / "gate_evil_plugin.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef run(*a):\n    open({str(marker)!r}, 'w')\n"
    )


def _torch_save_layout(path: Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/data/0", b"\0" * 64)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_malicious_raw_pickle(tmp_path: Path, payload: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    _plant_plugin(tmp_path, marker)
    make, needle = PAYLOADS[payload]
    model = tmp_path / "evil.pt"
    model.write_bytes(make(marker, protocol))
    proc = run_capped("inspect", str(model), cwd=tmp_path)
    assert_one_line_error(proc, needle, "code execution")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_malicious_pickle_in_torch_archive(tmp_path: Path, payload: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    _plant_plugin(tmp_path, marker)
    make, needle = PAYLOADS[payload]
    model = tmp_path / "evil.pt"
    _torch_save_layout(model, make(marker, protocol))
    proc = run_capped("inspect", str(model), cwd=tmp_path)
    assert_one_line_error(proc, needle, "code execution")
    assert not marker.exists()


def test_memo_indirection_still_names_the_global(tmp_path: Path) -> None:
    """STACK_GLOBAL operands fetched from the memo after a harmless global are still seen."""

    def short(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    data = (
        b"\x80\x04"
        + short("posix")
        + b"\x94"
        + short("system")
        + b"\x94"
        + b"0"
        + b"0"
        + short("torch._utils")
        + short("_rebuild_tensor_v2")
        + b"\x93"
        + b"0"
        + b"h\x00h\x01\x93"
        + short("true")
        + b"\x85R."
    )
    model = tmp_path / "sneaky.pt"
    model.write_bytes(data)
    proc = run_capped("inspect", str(model))
    assert_one_line_error(proc, "posix.system", "code execution")


def test_protocol0_inst_opcode(tmp_path: Path) -> None:
    """INST (``i``) imports and calls in one opcode; there is no PROTO header to sniff."""
    marker = tmp_path / "pwned"
    model = tmp_path / "old.pt"
    model.write_bytes(f"(S'touch {marker}'\nios\nsystem\n.".encode())
    assert_one_line_error(run_capped("inspect", str(model)), "os.system", "code execution")
    assert not marker.exists()


def test_checkpoint_dressed_as_torchscript(tmp_path: Path) -> None:
    """code/ and constants.pkl make it sniff as TorchScript; its data.pkl is still scanned."""
    import torch

    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(4, 2), whole)
    model = tmp_path / "dressed.pt"
    with zipfile.ZipFile(whole) as zin, zipfile.ZipFile(model, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        zout.writestr(f"{root}/code/__torch__.py", "")
        zout.writestr(f"{root}/constants.pkl", pickle.dumps((), 2))
    assert_one_line_error(run_capped("inspect", str(model)), "torch.nn.modules.linear.Linear")


def test_pickled_whole_module_explains_torchscript_export(tmp_path: Path) -> None:
    import torch

    model = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), model)
    proc = run_capped("inspect", str(model))
    assert_one_line_error(proc, "nn.Module", "torch.jit.save", "torch.nn.modules")


def test_state_dict_is_not_a_model(tmp_path: Path) -> None:
    import torch

    model = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), model)
    proc = run_capped("inspect", str(model))
    assert_one_line_error(proc, "no architecture", "torch.jit.save")


# --- tampered TorchScript -----------------------------------------------------------------


def _rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    changed = False
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            new = edit(info.filename, data)
            changed |= new != data
            zout.writestr(info, new)
    assert changed, "the tampering edit matched nothing"
    return dst


def _edit_forward(extra: str, ret: str | None = None) -> Callable[[str, bytes], bytes]:
    old = "    return (_3).forward(input2, )"

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("code/__torch__/torch/nn/modules/container.py"):
            return data
        text = data.decode()
        assert old in text
        return text.replace(old, extra + "\n" + (ret or old)).encode()

    return edit


TAMPERED = {
    "print": (_edit_forward('    print("PWNED")'), "prim::Print"),
    "from_file": (
        _edit_forward(
            '    _9 = torch.from_file("/etc/hostname", False, 4)',
            "    return torch.add((_3).forward(input2, ), torch.sum(_9))",
        ),
        "aten::from_file",
    ),
    "custom_op": (_edit_forward("    _9 = ops.gate_evil.run(input2)"), "gate_evil::run"),
}


# Each of these crashed torch.jit.load with SIGSEGV (C stack overflow) when unguarded.
TAMPERED.update(
    {
        "nested_parens": (
            _edit_forward("    _9 = " + "(" * 10000 + "input2" + ")" * 10000),
            "too deeply",
        ),
        "unary_chain": (_edit_forward("    _9 = " + "-" * 5000 + "input2"), "too deeply"),
        "long_sum": (_edit_forward("    _9 = " + " + ".join(["input2"] * 20000)), "too deeply"),
    }
)


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_torchscript_code(torchscript_file: Path, tmp_path: Path, case: str) -> None:
    edit, needle = TAMPERED[case]
    model = _rewrite(torchscript_file, tmp_path / "tampered.pt", edit)
    proc = run_capped("inspect", str(model))
    assert_one_line_error(proc, needle)
    assert "PWNED" not in proc.stdout


_HOOKED = """
import sys
import torch


class Hooked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    @torch.jit.export
    def __getstate__(self) -> tuple[bool, int]:
        return (self.training, 1)

    @torch.jit.export
    def __setstate__(self, state: tuple[bool, int]) -> None:
        print("PWNED AT LOAD")
        self.training = state[0]


torch.jit.save(torch.jit.script(Hooked()), sys.argv[1])
"""


def test_setstate_never_runs_at_load(tmp_path: Path) -> None:
    """TorchScript runs ``__setstate__`` inside torch.jit.load; gate refuses before that.

    Built in a fresh interpreter so that scripting it leaves this process's JIT alone.
    """
    model = tmp_path / "hooked.pt"
    (tmp_path / "hooked.py").write_text(_HOOKED)
    subprocess.run(
        [sys.executable, str(tmp_path / "hooked.py"), str(model)], check=True, timeout=300
    )
    proc = run_capped("inspect", str(model))
    assert_one_line_error(proc, "__setstate__")
    assert "PWNED" not in proc.stdout


def test_torchscript_with_malicious_data_pkl(torchscript_file: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Reduce(os.system, f"touch {marker}"), 2)
    model = _rewrite(
        torchscript_file,
        tmp_path / "evil.pt",
        lambda name, data: evil if name.endswith("/data.pkl") else data,
    )
    proc = run_capped("inspect", str(model))
    assert_one_line_error(proc, "system", "code execution")
    assert not marker.exists()


# --- broken files -------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 30, 100, 0.25, 0.5, 0.9, -22, -1])
def test_truncated_torchscript(torchscript_file: Path, tmp_path: Path, cut: float) -> None:
    data = torchscript_file.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else cut
    model = tmp_path / "truncated.pt"
    model.write_bytes(data[:end])
    assert_one_line_error(run_capped("inspect", str(model)))


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (random.Random(1).randbytes(1 << 16), "unrecognised model format"),
        (b"PK\x03\x04" + random.Random(2).randbytes(512), "zip"),
        (b"\x80\x05" + random.Random(3).randbytes(512), "pickle"),
    ],
)
def test_garbage(tmp_path: Path, content: bytes, needle: str) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(content)
    assert_one_line_error(run_capped("inspect", str(model)), needle)


def test_format_is_chosen_by_content_not_extension(torchscript_file: Path, tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(torchscript_file.read_bytes())
    proc = run_capped("inspect", str(onnx))
    assert proc.returncode == 0, proc.stderr
    assert "format=torchscript" in proc.stdout

    npz = tmp_path / "data.pt"
    with open(npz, "wb") as fh:
        np.savez(fh, x=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int64))
    assert_one_line_error(run_capped("inspect", str(npz)), "npz", "not a model")


def _patch_sizes(
    path: Path, member: str, *, compressed: int | None = None, uncompressed: int | None = None
) -> None:
    """Forge ``member``'s sizes in both its local header and its central directory entry."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for sig, comp_at, uncomp_at, name_at in (
        (b"PK\x03\x04", 18, 22, 30),
        (b"PK\x01\x02", 20, 24, 46),
    ):
        pos = data.find(sig)
        while pos >= 0:
            if data[pos + name_at : pos + name_at + len(name)] == name:
                if compressed is not None:
                    struct.pack_into("<I", data, pos + comp_at, compressed)
                if uncompressed is not None:
                    struct.pack_into("<I", data, pos + uncomp_at, uncompressed)
            pos = data.find(sig, pos + 1)
    path.write_bytes(bytes(data))


def test_zip_bomb_in_torchscript_archive(torchscript_file: Path, tmp_path: Path) -> None:
    """A real deflate bomb: 512 MiB of zeros in ~0.5 MiB, added to a valid archive."""
    model = tmp_path / "bomb.pt"
    model.write_bytes(torchscript_file.read_bytes())
    root = zipfile.ZipFile(torchscript_file).namelist()[0].split("/")[0]
    with (
        zipfile.ZipFile(model, "a", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open(f"{root}/data/99", "w", force_zip64=True) as member,
    ):
        chunk = bytes(1 << 20)
        for _ in range(512):
            member.write(chunk)
    assert model.stat().st_size < 4 << 20
    assert_one_line_error(run_capped("inspect", str(model)), "zip bomb")


def test_forged_uncompressed_size(torchscript_file: Path, tmp_path: Path) -> None:
    """A deflated member that claims to inflate to ~4 GiB."""
    model = tmp_path / "forged.pt"
    with zipfile.ZipFile(torchscript_file) as zin:
        code = next(n for n in zin.namelist() if n.endswith("container.py"))
    model.write_bytes(torchscript_file.read_bytes())
    _patch_sizes(model, code, uncompressed=0xFFFF_FFF0)
    assert_one_line_error(run_capped("inspect", str(model)), "refusing")


def test_member_size_beyond_end_of_file(torchscript_file: Path, tmp_path: Path) -> None:
    """A stored tensor record that declares 2 GiB in a 13 KB file."""
    model = tmp_path / "lying.pt"
    with zipfile.ZipFile(torchscript_file) as zin:
        tensor = next(n for n in zin.namelist() if n.endswith("/data/0"))
    model.write_bytes(torchscript_file.read_bytes())
    _patch_sizes(model, tensor, compressed=2 << 30, uncompressed=2 << 30)
    assert_one_line_error(run_capped("inspect", str(model)), "beyond the end")


def test_lying_small_size_fails_crc(torchscript_file: Path, tmp_path: Path) -> None:
    """Sizes that under-declare what a deflate stream inflates to are caught before torch."""
    model = tmp_path / "lying-small.pt"
    with zipfile.ZipFile(torchscript_file) as zin:
        code = next(n for n in zin.namelist() if n.endswith("container.py"))
    model.write_bytes(torchscript_file.read_bytes())
    _patch_sizes(model, code, uncompressed=10)
    assert_one_line_error(run_capped("inspect", str(model)))


def test_bit_flip_in_stored_tensor_is_caught_by_crc(torchscript_file: Path, tmp_path: Path) -> None:
    data = bytearray(torchscript_file.read_bytes())
    with zipfile.ZipFile(torchscript_file) as zin:
        info = next(i for i in zin.infolist() if i.filename.endswith("/data/0"))
    # the record's bytes start after the local header (30 bytes + name + extra field)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len + 7] ^= 0x10
    model = tmp_path / "flipped.pt"
    model.write_bytes(bytes(data))
    assert_one_line_error(run_capped("inspect", str(model)), "CRC")
