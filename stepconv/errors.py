"""Errors and the one boundary every command goes through: any failure becomes one line and an exit code.

Exit codes (the CLI's contract):
    0  success (verify: PASS)
    1  verify FAIL (the checkpoints compute different functions) or compare: not identical
    2  bad input: a file, tensor, option or config value that is wrong (the line says what would be valid)
    3  environment: disk full, file too large, read-only file system, permission, out of memory, a lock held

A failure inside one of verify's rank processes arrives as `mcore.run.RankError` (a StepconvError): one line.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

BAD_INPUT = 2
ENVIRONMENT = 3


class StepconvError(Exception):
    """A user-facing error: one line, names what is wrong and what would be valid (exit 2)."""

    exit_code = BAD_INPUT


class EnvironmentFailure(StepconvError):
    """The machine, not the input: no space, a file-size limit, read-only, permission, a lock held (exit 3)."""

    exit_code = ENVIRONMENT


# errnos that say the input path is wrong rather than the machine
_INPUT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL}
_HINTS = {
    errno.ENOSPC: "free space on that file system or write the output elsewhere with -o",
    errno.EDQUOT: "the disk quota is exhausted; free space or write elsewhere with -o",
    errno.EFBIG: "a file-size limit (ulimit -f) or the file system's largest file; lift the limit or use -o elsewhere",
    errno.EROFS: "read-only file system; write the output elsewhere with -o",
    errno.EACCES: "permission denied; choose a folder you can write with -o, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a folder you can write with -o",
    errno.EIO: "input/output error from the device",
    errno.EMFILE: "too many open files; raise `ulimit -n`",
}


def os_error_line(e: OSError) -> str:
    where = e.filename if e.filename is not None else None
    text = e.strerror or str(e)
    hint = _HINTS.get(e.errno or 0)
    return f"{where + ': ' if where else ''}{text}" + (f" ({hint})" if hint else "")


def classify(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for any exception raised by a command."""
    if isinstance(e, StepconvError):
        return e.exit_code, _one_line(str(e))
    if isinstance(e, MemoryError):
        return ENVIRONMENT, "out of memory; lower --jobs or --max-memory, or use a machine with more RAM"
    if isinstance(e, OSError):
        code = BAD_INPUT if e.errno in _INPUT_ERRNOS else ENVIRONMENT
        return code, _one_line(os_error_line(e))
    if isinstance(e, RecursionError):
        return BAD_INPUT, "input nested too deeply to parse (recursion limit); the file is not what it claims"
    if isinstance(e, UnicodeError):
        return BAD_INPUT, f"a file holds bytes that are not valid UTF-8 text ({_one_line(str(e))})"
    # anything else escaped validation: still one line, and the traceback is one flag away
    return BAD_INPUT, (f"unexpected {type(e).__name__}: {_one_line(str(e)) or 'no message'} (input stepconv does not "
                       f"validate, or a bug; rerun with --debug for the traceback)")


def _one_line(text: str, limit: int = 2000) -> str:
    line = " ".join(text.split()) if "\n" in text else text
    return line if len(line) <= limit else line[:limit] + " ..."


def debug_enabled() -> bool:
    return os.environ.get("STEPCONV_DEBUG", "") not in ("", "0")


def report(e: BaseException) -> int:
    """Print `e` as the one `error:` line on stderr (the traceback first under --debug); the exit code."""
    code, line = classify(e)
    if debug_enabled():
        traceback.print_exception(e, file=sys.stderr)
        remote = getattr(e, "traceback", None)  # (a rank process's own, carried by mcore.run.RankError)
        if isinstance(remote, str) and remote:
            sys.stderr.write(remote)
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    return code
