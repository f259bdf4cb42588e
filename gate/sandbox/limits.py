"""What confines the model child: a scrubbed environment, resource limits and a syscall filter.

The parent builds the environment (:func:`child_env`); the child applies the limits to
itself first thing (:func:`apply_rlimits`), before anything but the standard library is
imported, and installs the seccomp filter (:func:`install_seccomp`) after its own imports
and before it opens the model file. What is active where is in the README's threat model.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys
from collections.abc import Mapping

# Variables the child may see. Everything else (GITHUB_TOKEN, CI_JOB_TOKEN, cloud keys,
# ...) stays in the parent: an allow-list, because secrets have no common naming scheme.
_PASS_THROUGH = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "GATE_BATCH_MEMORY_MB",
    "CUDA_VISIBLE_DEVICES",
    "LANG",
    "LC_ALL",
    "SYSTEMROOT",
)
# Open descriptors at most: torch, onnxruntime and transformers need a few dozen at import.
MAX_OPEN_FILES = 256
_PR_SET_PDEATHSIG = 1


def child_env(home: str, python_path: list[str], parent: Mapping[str, str]) -> dict[str, str]:
    """The child's whole environment: an allow-list from ``parent``, plus a private home."""
    env = {k: parent[k] for k in _PASS_THROUGH if k in parent}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(python_path),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
            "PYTHONHASHSEED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TOKENIZERS_PARALLELISM": "false",
            "ORT_LOGGING_LEVEL": "3",
            "GATE_IN_SANDBOX": "1",
            # CUDA's kernel cache would write under HOME, which the limits forbid anyway.
            "CUDA_CACHE_DISABLE": "1",
        }
    )
    env.update(home_env(home))
    return env


def home_env(home: str) -> dict[str, str]:
    """The variables that point into one process's private ``home``: HOME, TMPDIR and the
    caches libraries create on import (torch's inductor/triton through transformers, the
    hub's), private directories the child makes before its filter goes on."""
    return {
        "HOME": home,
        "TMPDIR": home,
        **{var: os.path.join(home, sub) for var, sub in CACHE_DIRS.items()},
    }


# Hyphenated, should they ever sit on sys.path: a directory named like a package
# ("triton") would shadow it.
CACHE_DIRS = {
    "TORCHINDUCTOR_CACHE_DIR": "torch-inductor",
    "TRITON_CACHE_DIR": "triton-cache",
    "HF_HOME": "hf-home",
    "XDG_CACHE_HOME": "xdg-cache",
}


def apply_rlimits(cpu_seconds: int | None, memory_bytes: int | None) -> None:
    """Limits the child sets on itself before it touches the model.

    No file may grow (``RLIMIT_FSIZE`` 0: writes to regular files fail with EFBIG, while
    the pipes to the parent still work), no core dump, a bounded number of descriptors, a
    CPU-time backstop behind the parent's wall-clock limit, and an address-space cap
    (skipped for GPUs, whose drivers reserve huge virtual ranges). The zygote
    (gate.sandbox.zygote) sets all but the last two, which each child it forks sets.
    """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
    _set(resource.RLIMIT_FSIZE, 0)
    _set(resource.RLIMIT_CORE, 0)
    _set(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    if cpu_seconds is not None:
        _set(resource.RLIMIT_CPU, max(1, cpu_seconds))
    if memory_bytes is not None:
        _set(resource.RLIMIT_AS, memory_bytes)
    if sys.platform.startswith("linux"):  # the child never outlives gate
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def cap_memory(memory_bytes: int) -> None:
    """The address-space cap, set late: once ``--device auto`` turned out to be the CPU."""
    _set(resource.RLIMIT_AS, memory_bytes)


def _set(which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value if which != resource.RLIMIT_CPU else hard))


# Syscalls the child never needs once torch is imported: process creation, networking,
# changes to the file system, and tracing. Writes through already-open pipes stay allowed.
_DENIED = (
    "execve",
    "execveat",
    "fork",
    "vfork",
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "ptrace",
    "process_vm_writev",
    "process_vm_readv",
    "kill",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "rmdir",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "mknod",
    "mknodat",
    "chmod",
    "fchmod",
    "fchmodat",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "truncate",
    "ftruncate",
    "creat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "utimensat",
    "io_uring_setup",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "unshare",
    "setns",
    "memfd_create",
)
_CLONE_THREAD = 0x00010000


def install_seccomp() -> str | None:
    """Install the filter; returns why not where it cannot be (then the rlimits still hold).

    ``open``/``openat`` may only read, ``clone`` may only make threads (``clone3`` answers
    ENOSYS so that glibc falls back to ``clone``, whose flags a filter can see), and the
    syscalls in :data:`_DENIED` fail with EPERM.
    """
    if not sys.platform.startswith("linux"):
        return "seccomp needs Linux"
    try:
        import pyseccomp as seccomp  # type: ignore[import-untyped]  # ctypes, libseccomp API
    except Exception as exc:  # ImportError, or OSError when libseccomp.so.2 is absent
        return f"pyseccomp/libseccomp unavailable ({type(exc).__name__})"
    try:
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        deny = seccomp.ERRNO(errno.EPERM)
        for name in _DENIED:
            try:
                f.add_rule(deny, name)
            except Exception:  # a syscall this architecture does not have (e.g. fork on arm64)
                continue
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        f.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
        for flag in (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND):
            f.add_rule(deny, "open", seccomp.Arg(1, seccomp.MASKED_EQ, flag, flag))
            f.add_rule(deny, "openat", seccomp.Arg(2, seccomp.MASKED_EQ, flag, flag))
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "openat2")  # its flags sit behind a pointer
        f.load()
    except Exception as exc:  # a kernel without seccomp filters, or a container that denies it
        return f"seccomp filter not installed ({type(exc).__name__}: {exc})"
    return None
