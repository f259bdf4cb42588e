"""Static inspection of untrusted model files, done before any deserialisation.

Nothing here unpickles or executes anything: pickles are walked opcode by opcode with
:func:`pickletools.genops`, and zip archives are read through their central directory.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

from gate.errors import ModelLoadError

# A zip member may not claim to inflate beyond this many times the archive's size.
MAX_COMPRESSION_RATIO = 200
MAX_TOTAL_UNCOMPRESSED = 16 << 30

# Globals a plain tensor checkpoint legitimately references (torch.load's weights_only set).
_SAFE_GLOBAL_PREFIXES = (
    "torch._utils._rebuild",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "torch.storage",
    "torch._tensor",
    "collections.OrderedDict",
    "torch.Size",
    "torch.device",
    "torch.dtype",
    "torch.float",
    "torch.int",
    "torch.bfloat16",
    "torch.half",
    "torch.long",
    "torch.bool",
    "builtins.set",
    "builtins.frozenset",
    "builtins.slice",
    "builtins.complex",
    "numpy.core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
)
_DANGEROUS_MODULES = (
    "os",
    "posix",
    "nt",
    "subprocess",
    "builtins",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "pty",
    "commands",
    "webbrowser",
    "ctypes",
    "pickle",
    "marshal",
    "types",
    "code",
    "codeop",
    "multiprocessing",
    "asyncio",
    "pathlib",
    "io",
    "tempfile",
)


def pickle_globals(data: bytes) -> list[str]:
    """Return the ``module.name`` globals a pickle would import, without unpickling it."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if opcode.name in {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"}:
                strings.append(str(arg))
            elif opcode.name == "GLOBAL":
                found.append(str(arg).replace(" ", ".", 1))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception as exc:  # genops raises ValueError and friends on garbage
        raise ModelLoadError(f"corrupt pickle stream ({exc})") from None
    return found


def dangerous_globals(names: list[str]) -> list[str]:
    """The subset of ``names`` that can run code (anything outside plain tensor rebuilding)."""
    bad = []
    for name in names:
        if name.startswith(_SAFE_GLOBAL_PREFIXES):
            continue
        bad.append(name)
    # Put the blatant ones (os.system, subprocess.*) first so the message leads with them.
    bad.sort(key=lambda n: (n.split(".", 1)[0] not in _DANGEROUS_MODULES, n))
    return list(dict.fromkeys(bad))


def looks_like_pickle(head: bytes) -> bool:
    # Protocol 2+ starts with PROTO (0x80); older protocols start with an opcode like '(' or 'c'.
    return len(head) >= 2 and (head[0] == 0x80 and head[1] <= 5)


def check_zip_bounds(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse archives whose declared sizes are implausible (zip bombs, lying headers)."""
    size = max(path.stat().st_size, 1)
    total = 0
    for info in zf.infolist():
        total += info.file_size
        ratio = info.file_size / info.compress_size if info.compress_size else 0.0
        if ratio > MAX_COMPRESSION_RATIO and info.file_size > 64 << 20:
            raise ModelLoadError(
                f"{path}: archive member {info.filename!r} claims a {info.file_size} byte "
                f"payload from {info.compress_size} bytes (zip bomb?); refusing to load"
            )
    if total > MAX_TOTAL_UNCOMPRESSED or total > size * MAX_COMPRESSION_RATIO + (64 << 20):
        raise ModelLoadError(
            f"{path}: archive declares {total} bytes of content in a {size} byte file; refusing"
        )
