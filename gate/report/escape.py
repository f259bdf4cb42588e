"""Untrusted text (model paths, layer names, data paths) in gate's output, made inert.

A file name or an ONNX value name is attacker-controlled. Printed raw, a newline in it
starts a new log line, and a line starting with ``::`` is a GitHub Actions workflow command
(``::set-output``, ``::add-mask::``); a C0 character also makes XML 1.0 malformed. So:

* :func:`human` is applied to every name gate prints or renders for people (the markdown
  summary, error messages, ``inspect``/``ac``/``baseline`` lines): control, format
  (bidi overrides), separator and surrogate characters become visible ``\\xNN``/``\\uNNNN``
  escapes, so a name can never start a line.
* :func:`xml_text` replaces what XML 1.0 forbids, for junit.xml.
* gate.ci.github's ``StopCommands`` wraps a whole run's output in GitHub's own
  ``::stop-commands::TOKEN`` ... ``::TOKEN::`` (a random token per run) under
  ``GITHUB_ACTIONS=true``, as a second layer; gate's own annotations are queued with
  ``gate.ci.emit_commands`` and printed after the wrap ends, so they still work.
"""

from __future__ import annotations

import unicodedata

# Cc: C0/DEL/C1 controls; Cf: format characters (bidi overrides that reorder a line, zero
# width); Zl/Zp: U+2028/U+2029, which some viewers break lines on; Cs: lone surrogates (a
# non-UTF-8 file name under surrogateescape), which cannot even be encoded for output.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _code(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _unsafe(ch: str) -> bool:
    # Fast path: printable ASCII is the common case.
    if " " <= ch <= "~":
        return False
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES


def human(text: object) -> str:
    """``text`` as one line of human-readable output: unsafe characters escaped."""
    s = str(text)
    if s.isascii() and s.isprintable():
        return s
    return "".join(_code(ch) if _unsafe(ch) else ch for ch in s)


def _xml_allowed(ch: str) -> bool:
    n = ord(ch)
    return (
        n in (0x9, 0xA, 0xD)
        or 0x20 <= n <= 0xD7FF
        or 0xE000 <= n <= 0xFFFD
        or 0x10000 <= n <= 0x10FFFF
    )


def xml_text(text: object) -> str:
    """:func:`human`, then every character XML 1.0 still forbids (U+FFFE, U+FFFF) escaped
    too, so any file name or layer name gives a well-formed junit.xml."""
    return "".join(ch if _xml_allowed(ch) else _code(ch) for ch in human(text))


def md_code(text: object) -> str:
    """A markdown code span holding ``text`` (escaped by :func:`human`): a fence longer than
    any run of backticks inside, and ``|`` escaped so a table cell is not split."""
    s = human(text).replace("|", "\\|")
    longest = run = 0
    for ch in s:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"
