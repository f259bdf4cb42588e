"""Red team for the sandbox: a model that runs is confined to its child process.

Each model here gets past every static check on purpose (an ``--arch`` class is the
user's own trusted code, and a TorchScript loop is an allowed op), so what stops it is the
child's confinement: scrubbed environment, empty working directory, no file writes, no
sockets or processes, captured output, memory and wall-clock limits, crash reporting.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_gate

torch = pytest.importorskip("torch")

# The user's --arch module: a tiny classifier whose forward tries to escape, then reports
# what worked through the one channel gate relays, a one-line error message.
ESCAPES = textwrap.dedent(
    '''
    import os, socket, subprocess, sys
    import torch

    def _attempt(fn):
        try:
            fn()
            return "ok"
        except Exception:
            return "denied"

    class Escape(torch.nn.Module):
        def __init__(self, target="", mode="report"):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)
            self.target = target
            self.mode = mode

        def forward(self, x):
            if self.mode == "segv":
                import ctypes
                ctypes.string_at(0)
            if self.mode == "hog":
                torch.ones(64 * 2**30, dtype=torch.uint8).sum()
            if self.mode == "spin":
                while True:
                    pass
            print("::set-output name=verdict::pass")
            print("::add-mask::x", file=sys.stderr)
            os.write(1, b"\\n::error::injected by the model\\n")
            def write():
                with open(self.target, "w") as fh:
                    fh.write("owned")
            def from_file():
                torch.from_file(self.target + ".mm", shared=True, size=16)
            def sock():
                s = socket.socket()
                s.connect(("127.0.0.1", 9))
            def run():
                subprocess.run(["true"], check=True)
            secrets = [k for k in os.environ if k.endswith("_TOKEN") or k.startswith("AWS")]
            raise RuntimeError(
                f"REPORT write={_attempt(write)} from_file={_attempt(from_file)} "
                f"socket={_attempt(sock)} exec={_attempt(run)} "
                f"secrets={','.join(secrets) or 'none'} "
                f"home={os.path.dirname(os.environ['HOME']) == os.path.dirname(os.getcwd())} "
                f"cwd_files={len(os.listdir('.'))}"
            )
    '''
)


@pytest.fixture()
def escape_model(tmp_path: Path) -> tuple[Path, Path]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "redteam_escape.py").write_text(ESCAPES)
    weights = tmp_path / "escape.pt"
    torch.save({"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}, weights)
    return weights, code


def _arch_run(
    weights: Path, code: Path, target: Path, mode: str, *extra: str, spawn: bool = False
) -> tuple[object, float]:
    env = {
        **({"GATE_NO_ZYGOTE": "1"} if spawn else {}),
        "PYTHONPATH": str(code),
        "GITHUB_TOKEN": "ghp_secret",
        "CI_JOB_TOKEN": "glcbt-secret",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
    }
    kwargs = f'{{"target": "{target}", "mode": "{mode}"}}'
    started = time.monotonic()
    proc = run_gate(
        "inspect",
        str(weights),
        "--arch",
        "redteam_escape:Escape",
        "--arch-kwargs",
        kwargs,
        "--input-shape",
        "1,8,8",
        *extra,
        env=env,
        cwd=code,
    )
    return proc, time.monotonic() - started


@pytest.mark.parametrize("start", ["forked", "spawned"])
def test_model_cannot_write_connect_exec_or_see_secrets(
    escape_model: tuple[Path, Path], tmp_path: Path, start: str
) -> None:
    """The same confinement whether the zygote forked the child or it was spawned."""
    weights, code = escape_model
    target = tmp_path / "outside" / "owned.txt"
    target.parent.mkdir()
    before = sorted(p.name for p in code.iterdir())
    proc, _ = _arch_run(weights, code, target, "report", spawn=start == "spawned")
    assert_one_line_error(proc, "REPORT")
    err = proc.stderr
    assert "write=denied" in err and "from_file=denied" in err, err
    assert "socket=denied" in err and "exec=denied" in err, err
    assert "secrets=none" in err and "home=True" in err and "cwd_files=0" in err, err
    assert not target.exists() and not Path(str(target) + ".mm").exists()
    assert not list(target.parent.iterdir())
    assert sorted(p.name for p in code.iterdir() if p.name != "__pycache__") == [
        n for n in before if n != "__pycache__"
    ]
    # What the model printed never reaches gate's output (the CI log).
    for stream in (proc.stdout, proc.stderr):
        assert not [line for line in stream.splitlines() if line.lstrip().startswith("::")]
        assert "injected by the model" not in stream


@pytest.mark.parametrize("start", ["forked", "spawned"])
def test_crash_by_signal_is_one_line_exit_2(
    escape_model: tuple[Path, Path], tmp_path: Path, start: str
) -> None:
    weights, code = escape_model
    proc, _ = _arch_run(weights, code, tmp_path / "x", "segv", spawn=start == "spawned")
    assert_one_line_error(proc, "model crashed during forward (signal 11")


def test_memory_hog_hits_the_address_space_cap(
    escape_model: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, code = escape_model
    proc, _ = _arch_run(weights, code, tmp_path / "x", "hog", "--memory-limit", "2048")
    assert_one_line_error(proc, "out of memory", "2048 MiB")


def test_endless_python_loop_ends_at_timeout(
    escape_model: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, code = escape_model
    proc, took = _arch_run(weights, code, tmp_path / "x", "spin", "--timeout", "8")
    assert_one_line_error(proc, "exceeded 8 s")
    assert took < 30, took


def test_endless_torchscript_loop_ends_at_timeout(tmp_path: Path) -> None:
    class Spin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.flatten(1)
            while bool(h.sum() > -1.0):  # inf stays > -1: never ends
                h = h + 1.0
            return self.fc(h)

    path = tmp_path / "spin.pt"
    torch.jit.save(torch.jit.script(Spin()), str(path))
    started = time.monotonic()
    proc = run_gate("inspect", str(path), "--input-shape", "1,8,8", "--timeout", "6")
    assert_one_line_error(proc, "exceeded 6 s")
    assert time.monotonic() - started < 30


def test_policy_timeout_applies_without_the_option(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("timeout_seconds: 0\n")
    proc = run_gate("policy", "validate", str(policy))
    assert proc.returncode == 2 and "timeout_seconds" in proc.stderr


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_bad_timeout_is_a_usage_error(value: str, tmp_path: Path) -> None:
    proc = run_gate("inspect", str(tmp_path / "m.pt"), "--timeout", value)
    assert proc.returncode == 2 and "--timeout" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_child_gets_only_allow_listed_environment() -> None:
    from gate.sandbox.limits import child_env

    env = child_env(
        "/w", ["/p"], {"GITHUB_TOKEN": "x", "OMP_NUM_THREADS": "2", "PATH": "/bin", "HOME": "/r"}
    )
    assert "GITHUB_TOKEN" not in env and "PATH" not in env
    assert env["OMP_NUM_THREADS"] == "2" and env["HOME"] == "/w" and env["PYTHONPATH"] == "/p"


def test_protocol_refuses_hostile_headers() -> None:
    from gate.sandbox import protocol

    r, w = os.pipe()
    try:
        header = b'{"body": {}, "arrays": [{"dtype": "object", "shape": [1]}]}'
        os.write(w, len(header).to_bytes(8, "little") + header)
        with pytest.raises(protocol.ProtocolError):
            protocol.receive(r, time.monotonic() + 5)
        huge = b'{"body": {}, "arrays": [{"dtype": "float64", "shape": [1099511627775, 1000]}]}'
        os.write(w, len(huge).to_bytes(8, "little") + huge)
        with pytest.raises(protocol.ProtocolError):
            protocol.receive(r, time.monotonic() + 5)
    finally:
        os.close(r)
        os.close(w)


def test_onnx_loop_with_huge_trip_count_ends_at_timeout(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    # Loop body: carry + 1, 2^62 times; then the graph returns the carried value.
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["carry_in", "one"], ["carry_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carry_in", TensorProto.FLOAT, ["n", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carry_out", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [
            helper.make_tensor("trips", TensorProto.INT64, [], [2**62]),
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "loop.onnx"
    path.write_bytes(model.SerializeToString())
    started = time.monotonic()
    proc = run_gate("inspect", str(path), "--input-shape", "4", "--timeout", "6")
    assert_one_line_error(proc, "exceeded 6 s")
    assert time.monotonic() - started < 40


def test_spare_child_sees_arch_code_added_to_the_path_after_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child started ahead (prestart, baseline build's next model) must still import
    --arch code the caller made importable later: CI once failed on exactly this order."""
    import sys

    import torch

    from gate import sandbox
    from gate.models import load_model
    from gate.models.arch import use_arch

    sandbox.prestart()
    code = tmp_path / "code"
    code.mkdir()
    (code / "gate_late_arch.py").write_text(
        "import torch\n\n\nclass Net(torch.nn.Module):\n"
        "    def __init__(self) -> None:\n"
        "        super().__init__()\n"
        "        self.head = torch.nn.Linear(4, 3)\n\n"
        "    def forward(self, x):\n"
        "        return self.head(x.flatten(1))\n"
    )
    monkeypatch.syspath_prepend(str(code))
    sys.modules.pop("gate_late_arch", None)
    import gate_late_arch

    torch.save(gate_late_arch.Net().state_dict(), tmp_path / "w.pt")
    with use_arch("gate_late_arch:Net", "{}"):
        model = load_model(tmp_path / "w.pt")
    try:
        assert "head" in model.layer_names()
    finally:
        getattr(model, "close", lambda: None)()
        sys.modules.pop("gate_late_arch", None)


def test_model_file_name_with_undecodable_bytes_loads(tmp_path: Path) -> None:
    """A file name that is not UTF-8 (Python's surrogate escapes) still loads and runs: torch
    gets an open file, not a name it would re-encode strictly."""
    import subprocess
    import sys

    script = (
        "import os, sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))\n"
        "torch.jit.save(torch.jit.script(m), sys.argv[1] + '/m.pt')\n"
        "os.rename(sys.argv[1] + '/m.pt', os.fsencode(sys.argv[1]) + b'/m\\xff.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=300)
    name = os.fsencode(tmp_path) + b"/m\xff.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "gate", "inspect", os.fsdecode(name), "--input-shape", "16"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\\udcff" in proc.stdout and "\udcff" not in proc.stdout  # shown escaped


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rpartition(")")[2].split()[1])


def _tiny_model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU())
    net.append(torch.nn.Linear(8, 3))
    torch.jit.save(torch.jit.script(net), str(path))
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote is Linux-only")
def test_children_are_forked_by_one_confined_zygote(tmp_path: Path) -> None:
    """Two models, two children, one zygote (torch imported once): each child is still its
    own confined process, and the zygote is neither gate nor readable by gate's user."""
    import numpy as np

    from gate.models import load_model

    x = np.random.default_rng(0).random((4, 16), dtype=np.float32)
    models = [load_model(_tiny_model(tmp_path / f"m{i}.pt", i)) for i in range(2)]
    try:
        pids = [m._proc._proc.pid for m in models]  # type: ignore[attr-defined]
        zygotes = {_parent_of(pid) for pid in pids}
        assert len(set(pids)) == 2 and len(zygotes) == 1 and os.getpid() not in zygotes
        zygote = zygotes.pop()
        assert _parent_of(zygote) == os.getpid()
        cmdline = Path(f"/proc/{zygote}/cmdline").read_bytes().split(b"\0")
        assert b"gate.sandbox.zygote" in cmdline
        outs = [m.forward(x).outputs for m in models]
        assert not np.allclose(outs[0], outs[1])  # each child serves its own model
        if os.geteuid() != 0:  # not dumpable: same-user processes cannot read or trace it
            with pytest.raises(PermissionError):
                Path(f"/proc/{zygote}/environ").read_bytes()
    finally:
        for m in models:
            m.close()  # type: ignore[attr-defined]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote is Linux-only")
def test_a_dead_zygote_takes_its_children_and_gate_spawns_instead(tmp_path: Path) -> None:
    import signal

    import numpy as np

    from gate.errors import SandboxError
    from gate.models import load_model
    from gate.sandbox import forkserver

    x = np.zeros((2, 16), dtype=np.float32)
    first = load_model(_tiny_model(tmp_path / "a.pt", 0))
    before = dict(forkserver._ZYGOTES)
    try:
        zygote = _parent_of(first._proc._proc.pid)  # type: ignore[attr-defined]
        assert zygote != os.getpid()
        os.kill(zygote, signal.SIGKILL)
        with pytest.raises(SandboxError, match="signal 9"):
            for _ in range(50):  # the child dies with its zygote (PDEATHSIG)
                first.forward(x)
                time.sleep(0.1)
        second = load_model(_tiny_model(tmp_path / "b.pt", 1))
        try:
            assert _parent_of(second._proc._proc.pid) == os.getpid()  # type: ignore[attr-defined]
            assert second.forward(x).outputs.shape == (2, 3)
        finally:
            second.close()  # type: ignore[attr-defined]
    finally:
        first.close()  # type: ignore[attr-defined]
        # The next tests in this worker get a fresh zygote rather than spawned children.
        for key in before:
            if forkserver._ZYGOTES.get(key) is None:
                forkserver._ZYGOTES.pop(key, None)


def _vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return kib / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and pipe sizes")
def test_child_memory_does_not_grow_with_the_number_of_batches(tmp_path: Path) -> None:
    """A 200k-row extraction is ~200 forward batches of a few MiB each. While the wire
    encoder was a recursive closure (a reference cycle holding each reply's arrays until the
    cyclic collector ran), the child grew ~1.6 MiB per batch: 430 MiB at 200k rows, more
    than the activation matrix the parent streams to disk. The pipes are widened too."""
    import fcntl

    import numpy as np

    from gate.models import load_model
    from gate.sandbox import protocol

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256), torch.nn.ReLU()
    )
    net.append(torch.nn.Linear(256, 10))
    path = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    model = load_model(path)
    try:
        proc = model._proc  # type: ignore[attr-defined]
        with open("/proc/sys/fs/pipe-max-size") as fh:
            if int(fh.read()) >= protocol.PIPE_BYTES:  # widened: fewer wake-ups per batch
                assert fcntl.fcntl(proc._req_w, fcntl.F_GETPIPE_SZ) == protocol.PIPE_BYTES
                assert fcntl.fcntl(proc._resp_r, fcntl.F_GETPIPE_SZ) == protocol.PIPE_BYTES
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1024, 64), dtype=np.float32)

        def batch(i: int) -> None:
            res = model.forward(x[::-1] if i % 2 else x, ("1", "3"))
            assert res.activations["1"].shape == (1024, 512)

        for i in range(10):
            batch(i)
        before = _vm_hwm_mib(proc._proc.pid)
        for i in range(150):
            batch(i)
        grown = _vm_hwm_mib(proc._proc.pid) - before
        assert grown < 64, f"the model child grew by {grown:.0f} MiB over 150 batches"
    finally:
        model.close()  # type: ignore[attr-defined]


def test_encoded_arrays_are_freed_without_the_cycle_collector() -> None:
    """The encoder keeps no reference cycle: a sent batch's arrays go as soon as the caller
    drops them, even with the cyclic garbage collector off."""
    import gc
    import weakref

    import numpy as np

    from gate.sandbox import protocol

    gc.collect()
    gc.disable()
    try:
        arr = np.ones((256, 512), dtype=np.float32)
        ref = weakref.ref(arr)
        header, arrays = protocol.encode({"ok": {"activations": {"1": arr}, "n": [1, 2.5]}})
        assert arrays[0] is arr and b'"__array__": 0' in header
        del arr, arrays
        assert ref() is None
    finally:
        gc.enable()
