"""gate's end of the zygote (gate.sandbox.zygote): start it once, have it fork model children.

:func:`fork` returns a handle that looks like the ``subprocess.Popen`` of a spawned child
(``pid``, ``stdout``, ``poll``, ``wait``) or None where the zygote cannot serve (not Linux,
a device other than the CPU, the zygote failed to start or found threads after its imports);
gate.sandbox.process then spawns the child as before. The zygote is started with the same
scrubbed environment as a child, so no secret of gate's ever reaches it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from typing import IO, Any

from gate.sandbox import limits

_READY_TIMEOUT = 120.0  # seconds for the zygote's imports; after that, children are spawned
_LOCK = threading.Lock()
_ZYGOTES: dict[tuple[tuple[str, str], ...], _Zygote | None] = {}


class Forked:
    """A child the zygote forked: the parts of ``Popen`` that gate.sandbox.process uses."""

    def __init__(self, zygote: _Zygote, pid: int, stdout: IO[bytes]) -> None:
        self._zygote = zygote
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout

    def poll(self) -> int | None:
        return self._zygote.exit_code(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        code = self._zygote.wait(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"model child {self.pid}", timeout or 0.0)
        return code


def fork(
    env: dict[str, str], cwd: str, cpu_s: int, memory: int, req_r: int, resp_w: int
) -> Forked | None:
    """A confined child forked by the zygote for ``env`` (see gate.sandbox.child), or None."""
    with _LOCK:
        key, zygote = _zygote_for(env)
        if zygote is None:
            return None
        forked = zygote.fork(env, cwd, cpu_s, memory, req_r, resp_w)
        if forked is None:
            _ZYGOTES[key] = None  # broken: spawn from now on
        return forked


def prestart(env: dict[str, str]) -> bool:
    """Start the zygote for ``env`` now, so that its imports overlap gate's own set-up."""
    with _LOCK:
        return _zygote_for(env)[1] is not None


def _zygote_for(env: dict[str, str]) -> tuple[tuple[tuple[str, str], ...], _Zygote | None]:
    key = tuple(sorted((k, v) for k, v in env.items() if k not in _PER_CHILD))
    if not sys.platform.startswith("linux") or os.environ.get("GATE_NO_ZYGOTE"):
        return key, None
    if key not in _ZYGOTES:
        _ZYGOTES[key] = _Zygote.start(env)
    return key, _ZYGOTES[key]


# Each child's own paths; the rest of the environment (thread counts, PYTHONPATH) is fixed
# when the zygote imports torch, so a different value needs a different zygote.
_PER_CHILD = frozenset(limits.home_env(""))


class _Zygote:
    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, home: str) -> None:
        self._proc = proc
        self._sock = sock
        self._home = home
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._exits: dict[int, int] = {}
        self._children: set[int] = set()
        self._ended = threading.Condition()
        self._dead = False
        self._ready: bool | None = None
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()

    @classmethod
    def start(cls, env: dict[str, str]) -> _Zygote | None:
        home = tempfile.mkdtemp(prefix="gate-zygote-")
        os.chmod(home, 0o700)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        zygote_env = {**env, **limits.home_env(home)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gate.sandbox.zygote", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=home,
                env=zygote_env,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except OSError:
            ours.close()
            shutil.rmtree(home, ignore_errors=True)
            return None
        finally:
            theirs.close()
        zygote = cls(proc, ours, home)
        _STARTED.append(zygote)
        return zygote

    def fork(
        self, env: dict[str, str], cwd: str, cpu_s: int, memory: int, req_r: int, resp_w: int
    ) -> Forked | None:
        if not self._wait_ready():
            return None
        out_r, out_w = os.pipe()
        try:
            message = json.dumps({"env": env, "cwd": cwd, "cpu_s": cpu_s, "memory": memory})
            socket.send_fds(self._sock, [message.encode()], [req_r, resp_w, out_w])
        except OSError:
            os.close(out_r)
            return None
        finally:
            os.close(out_w)
        reply = self._next_reply(_READY_TIMEOUT)
        pid = reply.get("pid") if reply else None
        if not isinstance(pid, int) or pid <= 1:
            os.close(out_r)
            return None
        with self._ended:
            self._children.add(pid)
        return Forked(self, pid, os.fdopen(out_r, "rb", buffering=0))

    def exit_code(self, pid: int) -> int | None:
        with self._ended:
            return self._exits.get(pid)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self._ended:
            self._ended.wait_for(lambda: pid in self._exits, timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        shutil.rmtree(self._home, ignore_errors=True)

    def _wait_ready(self) -> bool:
        if self._ready is None:
            first = self._next_reply(_READY_TIMEOUT)
            self._ready = bool(first and first.get("ready"))
        return self._ready and not self._dead

    def _next_reply(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            return None

    def _read(self) -> None:
        """Replies go to the queue in order; a child's end is recorded whenever it comes."""
        while True:
            try:
                data = self._sock.recv(65536)
                message = json.loads(data) if data else None
            except (OSError, ValueError):
                message = None
            if not isinstance(message, dict):
                break
            if isinstance(message.get("exit"), int) and isinstance(message.get("code"), int):
                with self._ended:
                    self._exits[message["exit"]] = message["code"]
                    self._ended.notify_all()
            else:
                self._replies.put(message)
        # The zygote is gone, and its children with it (their PDEATHSIG is SIGKILL).
        with self._ended:
            self._dead = True
            for pid in self._children:
                self._exits.setdefault(pid, -signal.SIGKILL)
            self._ended.notify_all()
        self._replies.put(None)


_STARTED: list[_Zygote] = []


@atexit.register
def _close_all() -> None:
    for zygote in _STARTED:
        zygote.close()
