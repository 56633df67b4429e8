"""Strings from outside, made safe to print or to use as a file name.

Labels, task names, file names and error messages may come from a signed-but-hostile pack or a
careless operator. :func:`printable` is the one place that turns any of them into a single line a
terminal shows as text (control characters, ANSI escapes and bidi overrides escaped, long values
cut); :func:`check_task_name` is the one rule for a task name, which becomes a file name
(``packs/NAME.kmp``, ``checkpoints/NAME.pt``).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["printable", "check_task_name", "TASK_NAME_MAX", "TASK_NAME_PATTERN", "TASK_NAME_RULE"]

PRINT_LIMIT = 200        # characters of one printed value (a label, a task, a file name)
MESSAGE_LIMIT = 1000     # characters of one printed error line
TASK_NAME_MAX = 64
# also a pack's ``task`` (device_runtime.pack.records): the name a device files the pack under
TASK_NAME_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{TASK_NAME_MAX - 1}}}"
TASK_NAME_RULE = (f"1 to {TASK_NAME_MAX} characters from A-Z a-z 0-9 . _ -, starting with a letter "
                  "or digit")


def _escape(char: str) -> str:
    # Cc: C0/C1 controls incl. ESC and newline; Cf: format chars such as bidi overrides; Zl/Zp:
    # line and paragraph separators; Cs: lone surrogates
    if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def printable(value, limit: int = PRINT_LIMIT) -> str:
    """``value`` as one line of visible text: controls escaped (``\\x1b``), cut to ``limit``
    characters with the number of characters left out."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    shown = "".join(_escape(c) for c in (text[:limit] if cut else text))
    if cut:
        shown += f"...[{len(text) - limit} more characters]"
    return shown


def exception_reason(exc: BaseException, limit: int = 160) -> str:
    """``TYPE: message`` of an exception from a library, on one bounded line: the reason a load
    failed, not only the kind (an UnpicklingError says which byte it choked on)."""
    message = " ".join(str(getattr(exc, "reason", None) or exc).split())
    if len(message) > limit:
        message = message[:limit - 3] + "..."
    return printable(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def check_task_name(name) -> str:
    """``name`` if it is a safe task name, else ValueError saying the rule (callers re-raise it as
    their own error). A safe name has no path separator, is not ``.``/``..`` and cannot start with
    ``-`` or ``.``."""
    if not isinstance(name, str) or not re.fullmatch(TASK_NAME_PATTERN, name):
        raise ValueError(f"task name '{printable(name, 80)}' is not allowed: use {TASK_NAME_RULE}")
    return name
