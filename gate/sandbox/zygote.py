"""The zygote: ``python -m gate.sandbox.zygote SOCKET_FD``, one per gate run (Linux, CPU).

Importing torch costs a model child about two seconds, and ``baseline build`` starts one
child per reference. The zygote pays it once: it confines itself like a child (no file may
grow, no core, few descriptors, not dumpable, dies with gate), imports exactly what a child
imports before its syscall filter (numpy, torch, gate's loaders), and then only forks. It
never opens a model, data or any file a user named, and it runs no torch operation, so it
stays single-threaded (it checks, and refuses to serve otherwise: forking a process with
threads could copy a held lock; OpenBLAS's pool, started by numpy's import, stops in its
fork handler). Each forked child drops everything of the zygote's (its
socket, its signal set-up, its environment and working directory), takes the descriptors
and environment gate sent, and runs :func:`gate.sandbox.child.main` exactly as a spawned
child would: rlimits first, then the seccomp filter, then the model. The zygote reaps its
children and tells gate how each ended, so gate can explain a crash or a limit.

Messages are JSON, one per SOCK_SEQPACKET datagram (gate.sandbox.forkserver is the other
end); a fork request carries the child's three pipe ends as SCM_RIGHTS descriptors.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
from typing import Any

MAX_MESSAGE = 1 << 20  # a fork request: an environment, a directory and four numbers
_PR_SET_DUMPABLE = 4


def main(argv: list[str]) -> int:
    from gate.sandbox import limits

    sock = socket.socket(fileno=int(argv[0]))
    # The zygote's own limits, inherited by every child, which then adds its CPU and memory
    # caps: nothing here writes a file, and nothing of the same user may trace or read it.
    limits.apply_rlimits(None, None)
    _not_dumpable()

    import numpy  # noqa: F401
    import torch  # noqa: F401

    import gate.models
    import gate.sandbox.child  # noqa: F401

    threads = _thread_count()
    if threads > 1:
        # OpenBLAS starts its thread pool when numpy loads, and stops it in a fork handler:
        # one throw-away fork lets every library that registered such a handler stop.
        _throw_away_fork()
        threads = _thread_count()
    if threads != 1:  # a thread nothing stops at fork: forking could copy a held lock
        _send(sock, {"unavailable": f"{threads} threads after importing torch"})
        return 0
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select() through wake_w
    _send(sock, {"ready": True})
    while True:
        readable, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        _reap(sock)
        if sock.fileno() in readable:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 3)
            except OSError:
                return 0
            if not data:  # gate closed its end: children die with us (PDEATHSIG)
                return 0
            _fork(sock, (wake_r, wake_w), data, fds)


def _fork(sock: socket.socket, wake: tuple[int, int], data: bytes, fds: list[int]) -> None:
    try:
        request = json.loads(data)
        env = {str(k): str(v) for k, v in request["env"].items()}
        cwd, cpu_s, memory = str(request["cwd"]), int(request["cpu_s"]), int(request["memory"])
        if len(fds) != 3:
            raise ValueError(f"expected 3 descriptors, got {len(fds)}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        for fd in fds:
            os.close(fd)
        _send(sock, {"error": f"malformed fork request ({type(exc).__name__})"})
        return
    pid = os.fork()
    if pid == 0:  # the child: never returns into this loop, never runs the zygote's exit
        code = 70
        try:
            code = _become_child(sock, wake, fds, env, cwd, cpu_s, memory)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    _send(sock, {"pid": pid})


def _become_child(
    sock: socket.socket,
    wake: tuple[int, int],
    fds: list[int],
    env: dict[str, str],
    cwd: str,
    cpu_s: int,
    memory: int,
) -> int:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock.close()
    for fd in wake:
        os.close(fd)
    os.setsid()  # its own group, as a spawned child's start_new_session gives it
    req_r, resp_w, out_w = fds
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    keep = {0, 1, 2, req_r, resp_w}
    for fd in _open_fds():
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    from gate.sandbox import child

    return child.main([str(req_r), str(resp_w), str(cpu_s), str(memory), "cpu"])


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # gate went away: the next recv ends the loop
        sock.send(json.dumps(message).encode())


def _throw_away_fork() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # without /proc: the descriptors a child may have had at most
        from gate.sandbox.limits import MAX_OPEN_FILES

        return list(range(3, MAX_OPEN_FILES))


def _not_dumpable() -> None:
    """No process of the same user may attach to the zygote or read its memory (and so
    to none of its children, which inherit the flag): a model child without seccomp cannot
    reach the zygote to plant code in the children that come after it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
