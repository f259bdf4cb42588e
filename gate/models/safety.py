"""Static inspection of untrusted model files, done before any deserialisation.

Nothing here unpickles or executes anything: pickles are walked opcode by opcode with
:func:`pickletools.genops` (simulating the stack and memo, so that the globals a pickle
would import are named even when their names are built indirectly), and zip archives are
read through their central directory and checked against the real file size.
"""

from __future__ import annotations

import io
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import IO

from gate.errors import ModelLoadError, first_line

# A zip member may not claim to inflate beyond this many times the archive's size.
MAX_COMPRESSION_RATIO = 200
MAX_TOTAL_UNCOMPRESSED = 16 << 30
MAX_MEMBERS = 100_000
# Raw files up to this size are parsed in full to recognise protocol 0/1 pickles.
MAX_PICKLE_SNIFF_BYTES = 64 << 20
UNRESOLVED_GLOBAL = "<dynamically named global>"

# Globals a plain tensor checkpoint legitimately references (torch.load's weights_only set).
_SAFE_GLOBALS = frozenset(
    {
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
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        "torch._tensor._rebuild_from_type_v2",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "collections.OrderedDict",
        "torch.Size",
        "torch.device",
        "torch.dtype",
        "torch.float32",
        "torch.float64",
        "torch.float16",
        "torch.bfloat16",
        "torch.int64",
        "torch.int32",
        "torch.int16",
        "torch.int8",
        "torch.uint8",
        "torch.bool",
        "torch.float",
        "torch.double",
        "torch.half",
        "torch.int",
        "torch.long",
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.complex",
        "__builtin__.set",
        "__builtin__.frozenset",
        "__builtin__.slice",
        "__builtin__.complex",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.dtype",
        "numpy.ndarray",
    }
)
# Not ``_rebuild_*`` wholesale: the sparse, nested, quantized and meta rebuilders build
# tensors from indices or layouts, and ``torch.storage._load_from_bytes`` (long allowed
# here) calls torch.load(weights_only=False), i.e. unpickles anything.
_SAFE_GLOBALS = _SAFE_GLOBALS | {
    f"torch._utils.{name}"
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    )
}
_SAFE_PREFIXES: tuple[str, ...] = ()
# What TorchScript's own (C++, restricted) unpickler resolves in an archive's pickles.
TORCHSCRIPT_SAFE_PREFIXES = ("__torch__.", "torch.jit._pickle.")

_DANGEROUS_MODULES = (
    "os",
    "posix",
    "nt",
    "subprocess",
    "builtins",
    "__builtin__",
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

_STRING_OPCODES = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    }
)
_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})
_OPCODE_CHARS = frozenset(op.code for op in pickletools.opcodes)
_MARK = object()
_UNKNOWN = object()


def pickle_globals(data: bytes | IO[bytes]) -> list[str]:
    """Return the ``module.name`` globals a pickle would import, without unpickling it.

    ``GLOBAL``/``INST`` name them inline; ``STACK_GLOBAL`` takes them from the stack, so
    the stack and memo are simulated. A ``STACK_GLOBAL`` whose operands are not plain
    strings is reported as :data:`UNRESOLVED_GLOBAL` (and is never considered safe).
    """
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    found: list[str] = []
    stack: list[object] = []
    memo: dict[object, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # genops warns on bad escapes in protocol 0 strings
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                name = opcode.name
                if name in {"GLOBAL", "INST"}:
                    found.append(str(arg).replace(" ", ".", 1))
                elif name == "STACK_GLOBAL":
                    mod, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
                    if isinstance(mod, str) and isinstance(attr, str):
                        found.append(f"{mod}.{attr}")
                    else:
                        found.append(UNRESOLVED_GLOBAL)
                if name in _PUT_OPCODES:
                    memo[arg] = stack[-1] if stack else _UNKNOWN
                    continue
                if name == "MEMOIZE":
                    memo[len(memo)] = stack[-1] if stack else _UNKNOWN
                    continue
                if name in _GET_OPCODES:
                    stack.append(memo.get(arg, _UNKNOWN))
                    continue
                _simulate(stack, opcode, arg)
        except Exception as exc:  # genops raises ValueError and friends on garbage
            raise ModelLoadError(f"corrupt pickle stream ({first_line(exc)})") from None
    return found


def _simulate(stack: list[object], opcode: pickletools.OpcodeInfo, arg: object) -> None:
    """Apply ``opcode``'s documented stack effect, keeping string values, marking the rest."""
    before = opcode.stack_before
    if pickletools.markobject in before:
        while stack and stack[-1] is not _MARK:
            stack.pop()
        if stack:
            stack.pop()
        before = before[: before.index(pickletools.markobject)]
    for _ in before:
        if stack:
            stack.pop()
    for item in opcode.stack_after:
        if item is pickletools.markobject:
            stack.append(_MARK)
        elif opcode.name in _STRING_OPCODES:
            stack.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
        else:
            stack.append(_UNKNOWN)


def dangerous_globals(names: list[str], extra_safe_prefixes: tuple[str, ...] = ()) -> list[str]:
    """The subset of ``names`` that can run code (anything outside plain tensor rebuilding)."""
    bad = []
    safe_prefixes = _SAFE_PREFIXES + extra_safe_prefixes
    for name in names:
        if name in _SAFE_GLOBALS or name.startswith(safe_prefixes):
            continue
        bad.append(name)
    # Put the blatant ones (os.system, subprocess.*) first so the message leads with them.
    bad.sort(key=lambda n: (not is_blatant(n), n))
    return list(dict.fromkeys(bad))


def is_blatant(name: str) -> bool:
    """Whether a global comes from a module that runs commands, code or I/O (os, builtins...)."""
    return name == UNRESOLVED_GLOBAL or name.split(".", 1)[0] in _DANGEROUS_MODULES


def looks_like_pickle(head: bytes) -> bool:
    """Protocol 2+ pickles start with PROTO (0x80) and the protocol number."""
    return len(head) >= 2 and (head[0] == 0x80 and head[1] <= 5)


def is_old_protocol_pickle(path: Path) -> bool:
    """Whether ``path`` parses, start to STOP, as a protocol 0/1 pickle (which has no magic)."""
    size = path.stat().st_size
    if size > MAX_PICKLE_SNIFF_BYTES:
        return False
    with open(path, "rb") as fh:
        first = fh.read(1).decode("latin-1")
        if first not in _OPCODE_CHARS or first == "\x80":
            return False
        fh.seek(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # bad escapes in protocol 0 strings
                for _ in pickletools.genops(fh):
                    pass
        except Exception:
            return False
        return fh.tell() == size or not fh.read(1).strip()


def check_zip_bounds(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse archives whose declared sizes are implausible (zip bombs, lying headers)."""
    size = max(path.stat().st_size, 1)
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ModelLoadError(f"{path}: archive has {len(infos)} members; refusing")
    total = 0
    for info in infos:
        total += info.file_size
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ModelLoadError(
                f"{path}: archive member {info.filename!r} uses unsupported compression "
                f"method {info.compress_type}; refusing"
            )
        if info.header_offset + info.compress_size > size:
            raise ModelLoadError(
                f"{path}: archive member {info.filename!r} declares {info.compress_size} bytes "
                f"at offset {info.header_offset}, beyond the end of the {size} byte file "
                "(truncated or forged archive); refusing"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise ModelLoadError(
                f"{path}: stored archive member {info.filename!r} declares {info.file_size} "
                f"bytes but holds {info.compress_size} (forged header); refusing"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > MAX_COMPRESSION_RATIO and info.file_size > 64 << 20:
            raise ModelLoadError(
                f"{path}: archive member {info.filename!r} claims a {info.file_size} byte "
                f"payload from {info.compress_size} bytes (zip bomb?); refusing to load"
            )
    if total > MAX_TOTAL_UNCOMPRESSED or total > size * MAX_COMPRESSION_RATIO + (64 << 20):
        raise ModelLoadError(
            f"{path}: archive declares {total} bytes of content in a {size} byte file "
            "(zip bomb?); refusing"
        )


def check_zip_integrity(path: Path, zf: zipfile.ZipFile) -> None:
    """Read every member once, streaming, and verify its CRC and size before any parser runs.

    Run after :func:`check_zip_bounds`, so the amount inflated is bounded; memory stays at
    one chunk. Catches bit flips and headers whose sizes lie about the data.
    """
    try:
        bad = zf.testzip()
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        raise ModelLoadError(f"{path}: corrupt zip archive ({first_line(exc)}); refusing") from None
    except Exception as exc:  # zlib.error and other decoder failures
        raise ModelLoadError(
            f"{path}: corrupt zip archive ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    if bad is not None:
        raise ModelLoadError(f"{path}: archive member {bad!r} fails its CRC check (corrupt)")


def torch_record(path: Path, zf: zipfile.ZipFile, record: str) -> zipfile.ZipInfo | None:
    """The member torch reads as ``record`` (``"data.pkl"``), or None when there is none.

    torch's archive reader (caffe2's ``PyTorchFileReader``) takes the folder of the
    *first* central-directory entry as the archive's root and looks records up under it
    through miniz, which compares names case-insensitively and, among duplicates, may
    return any. So names that collide ignoring case are refused outright, and the record
    is matched exactly as torch matches it, whatever other ``*/data.pkl`` members exist.
    """
    infos = zf.infolist()
    seen: dict[str, str] = {}
    for info in infos:
        key = info.filename.lower()
        if key in seen:
            raise ModelLoadError(
                f"{path}: archive has duplicate members {seen[key]!r} and {info.filename!r} "
                "(torch could read either); refusing"
            )
        seen[key] = info.filename
    if not infos or "/" not in infos[0].filename:
        return None
    root = infos[0].filename.split("/", 1)[0]
    want = f"{root}/{record}".lower()
    return next((i for i in infos if i.filename.lower() == want), None)


def zip_member_names(path: Path, head: bytes) -> list[str] | None:
    """Member names of a zip archive, or None when ``path`` is not a readable zip."""
    if not head.startswith(b"PK"):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except Exception:  # BadZipFile, OSError, EOFError, ... on damaged archives
        return None
