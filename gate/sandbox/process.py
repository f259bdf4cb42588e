"""One model child, seen from gate: start it, ask it things, end it, explain how it died."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from typing import IO, Any

from gate.errors import GateError, ModelLoadError, SandboxError
from gate.sandbox import forkserver, limits, protocol
from gate.sandbox.options import SandboxOptions

_OUTPUT_KEPT = 64 * 1024  # bytes of the child's own output kept for GATE_DEBUG
_LIVE: weakref.WeakSet[ModelProcess] = weakref.WeakSet()


class ModelProcess:
    """A confined child (gate.sandbox.child) serving requests for one model until closed."""

    def __init__(self, options: SandboxOptions, what: str) -> None:
        self.options = options
        self.what = what  # the model as the user named it, for messages
        # Private to this child (0700): an empty working directory, and beside it the home
        # that holds HOME, TMPDIR and the library caches.
        self.workdir = tempfile.mkdtemp(prefix="gate-sandbox-")
        os.chmod(self.workdir, 0o700)
        cwd, home = os.path.join(self.workdir, "work"), os.path.join(self.workdir, "home")
        os.mkdir(cwd)
        os.mkdir(home)
        req_r, self._req_w = protocol.pipe()
        self._resp_r, resp_w = protocol.pipe()
        env = limits.child_env(home, python_path(), os.environ)
        memory = options.memory_bytes() or 0
        self.started = time.monotonic()
        self.deadline = self.started + options.timeout
        try:
            self._proc = _start(options, env, cwd, memory, req_r, resp_w)
        except OSError as exc:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise SandboxError(f"cannot start the model sandbox ({exc})") from None
        finally:
            os.close(req_r)
            os.close(resp_w)
        self._output: deque[bytes] = deque()
        self._drain = threading.Thread(target=_drain, args=(self._proc.stdout, self._output))
        self._drain.daemon = True
        self._drain.start()
        _LIVE.add(self)
        self.seccomp = False
        self.seccomp_why: str | None = None
        self.device = "cpu"
        self._ready = False
        self._closed = False

    def claim(self, what: str) -> None:
        """Put a spare child (started ahead, for the next model) to work: the deadline
        counts from now."""
        self.what = what
        self.deadline = time.monotonic() + self.options.timeout

    def call(self, op: str, **fields: Any) -> Any:
        """Send one request and return its result; the child's errors are raised here."""
        if not self._ready:  # the child's first message says it is confined and listening
            ready = self._receive()
            self.seccomp = bool(ready.get("seccomp"))
            why = ready.get("why")
            self.seccomp_why = why if isinstance(why, str) else None
            self._ready = True
            if "device_error" in ready:  # --device names a device this machine lacks
                raise _error_from(ready["device_error"], self)
            device = ready.get("device")
            self.device = device if isinstance(device, str) and len(device) < 32 else "cpu"
        try:
            protocol.send(self._req_w, {"op": op, **fields})
        except protocol.ProtocolError:
            raise self._death() from None
        reply = self._receive()
        if "error" in reply:
            raise _error_from(reply["error"], self)
        return reply.get("ok")

    def close(self) -> None:
        if self._closed:  # never close the descriptors twice: their numbers get reused
            return
        self._closed = True
        if self._proc.poll() is None:
            try:
                protocol.send(self._req_w, {"op": "close"})
                self._proc.wait(timeout=2)
            except (protocol.ProtocolError, subprocess.TimeoutExpired, OSError):
                self._kill()
        for fd in (self._req_w, self._resp_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._drain.join(timeout=1)
        shutil.rmtree(self.workdir, ignore_errors=True)
        _LIVE.discard(self)

    def output(self) -> str:
        return b"".join(self._output).decode("utf-8", "replace")

    def _receive(self) -> dict[str, Any]:
        try:
            return protocol.receive(self._resp_r, self.deadline)
        except protocol.Timeout:
            self._kill()
            raise SandboxError(
                f"{self.what}: forward pass exceeded {self.options.timeout:g} s (--timeout); "
                "the model was stopped"
            ) from None
        except protocol.ProtocolError:
            raise self._death() from None

    def _death(self) -> GateError:
        """Why the child stopped answering: a signal, a limit, or a broken protocol."""
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # alive but talking nonsense: a hostile child
            self._kill()
            return SandboxError(f"{self.what}: the model process broke the sandbox protocol")
        if code < 0:
            sig = -code
            if sig == signal.SIGXCPU:
                return SandboxError(
                    f"{self.what}: model exceeded the CPU-time limit of "
                    f"{self.options.cpu_seconds()} s and was stopped"
                )
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = "unknown"
            return SandboxError(f"{self.what}: model crashed during forward (signal {sig}, {name})")
        return SandboxError(f"{self.what}: model process exited unexpectedly (exit status {code})")

    def _kill(self) -> None:
        if self._proc.poll() is not None:  # reaped: its pid may already be someone else's
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        # A forked child killed before its setsid() is not yet its own group's leader.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)


def _start(
    options: SandboxOptions, env: dict[str, str], cwd: str, memory: int, req_r: int, resp_w: int
) -> subprocess.Popen[bytes] | forkserver.Forked:
    """The child, forked by the zygote where it serves (the CPU, on Linux), else spawned."""
    if options.device == "cpu":
        forked = forkserver.fork(env, cwd, options.cpu_seconds(), memory, req_r, resp_w)
        if forked is not None:
            return forked
    cmd = [
        sys.executable,
        "-m",
        "gate.sandbox.child",
        str(req_r),
        str(resp_w),
        str(options.cpu_seconds()),
        str(memory),
        options.device,
    ]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        pass_fds=(req_r, resp_w),
        start_new_session=True,  # a signal to gate's group does not hit the child twice
    )


def prestart_zygote(options: SandboxOptions) -> bool:
    """Start the zygote now where it will serve ``options``; False where children spawn."""
    if options.device != "cpu":
        return False
    return forkserver.prestart(limits.child_env("", python_path(), os.environ))


def _drain(stream: IO[bytes] | None, kept: deque[bytes]) -> None:
    """Read the child's stdout/stderr so it never blocks; keep only the tail."""
    if stream is None:
        return
    size = 0
    fd = stream.fileno()
    for chunk in iter(lambda: os.read(fd, 4096), b""):
        kept.append(chunk)
        size += len(chunk)
        while size > _OUTPUT_KEPT and len(kept) > 1:
            size -= len(kept.popleft())
    stream.close()


def python_path() -> list[str]:
    """The parent's import path, absolute: the child runs elsewhere but must import the same
    gate, and the same --arch code."""
    cwd = os.getcwd()
    return [os.path.abspath(p) if p else cwd for p in sys.path]


def _error_from(info: Any, proc: ModelProcess) -> GateError:
    """The child's error as the same GateError class, its text made safe for a terminal."""
    if not isinstance(info, dict):
        return SandboxError(f"{proc.what}: malformed error from the model process")
    name, message = str(info.get("type", "")), _clean(str(info.get("message", "")))
    if name == "MemoryError" or "can't allocate memory" in message:
        limit = proc.options.memory_bytes()
        cap = f" (limit {limit // 2**20} MiB, --memory-limit)" if limit else ""
        return SandboxError(f"{proc.what}: model ran out of memory{cap}: {message}")
    cls = _gate_errors().get(name)
    if cls is None:
        return ModelLoadError(f"{proc.what}: model failed in the sandbox: {message}")
    return cls(message)


def _gate_errors() -> dict[str, type[GateError]]:
    found: dict[str, type[GateError]] = {}
    todo: list[type[GateError]] = [GateError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == "gate.errors":
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _clean(text: str, limit: int = 1000) -> str:
    """One line of printable text: the child may have been taken over by the model."""
    from gate.report.escape import human

    return human(text[:limit])


@atexit.register
def _close_all() -> None:
    for proc in list(_LIVE):
        proc._kill()
