"""Publication that cannot lie: an output appears under its final name only whole, checked on disk, and durable.

`staging(out, ...)` holds an exclusive lock on the output name for the whole run (`<OUT>.lock`, naming the holder),
builds in `<OUT>.partial` (marked as stepconv's own), fsyncs every file and folder, renames into place and fsyncs
the parent. Only folders stepconv created are ever deleted: a `<OUT>.partial` without stepconv's marker, or a link
there, is refused. `Journal` records each completed unit with every output's size and digest, so `--resume` reuses
a file only when it is still what was written, and only for the same input and options.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import EnvironmentFailure, StepconvError
from .safety import file_digest, fsync_dir, fsync_tree

MARKER = ".stepconv-partial"  # in every <OUT>.partial stepconv creates


class OutputLock:
    """An exclusive flock on `<OUT>.lock` for the whole run; the file names the holder (pid, host, start time)."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise EnvironmentFailure(f"{self.path.with_suffix('')}: another stepconv run is writing this output "
                                         f"({holder}); wait for it to finish or choose another -o") from None
            try:  # the holder before us may have unlinked the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
                self.fd = fd
                return
            os.close(fd)
        raise EnvironmentFailure(f"{self.path}: could not take the output lock (it keeps changing)")

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # (still held: a run that opened the old file re-checks the inode)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def _is_ours(partial: Path) -> bool:
    return partial.is_dir() and not partial.is_symlink() and (partial / MARKER).is_file()


def _prepare_partial(tmp: Path, resume: bool) -> None:
    """A fresh `<OUT>.partial`, or the one to resume; refuses a link there or a folder stepconv did not create."""
    if tmp.is_symlink():
        raise StepconvError(f"{tmp}: is a symbolic link; stepconv builds its output in a folder of that name, "
                            f"remove the link or choose another -o")
    if tmp.exists() and not _is_ours(tmp):
        raise StepconvError(f"{tmp}: exists and was not created by stepconv (no {MARKER}); move it away or choose "
                            f"another -o (stepconv deletes only what it created)")
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / MARKER).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")


@contextmanager
def staging(out: Path, overwrite: bool, resume: bool = False) -> Iterator[Path]:
    """Build in `<out>.partial` under the output lock, rename into place only when complete.

    On an error the partial folder is removed, except with `resume`, where it is kept for the next
    `--resume` run (a kill -9 keeps it anyway; nothing in it carries a final name until complete).
    """
    out = Path(os.path.abspath(out))
    if not out.name:
        raise StepconvError(f"-o {out}: expected a folder to create, not the file-system root")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StepconvError(f"{out.parent}: not a folder; -o must name a folder to create") from None
    lock = OutputLock(out)
    lock.acquire()
    try:
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise StepconvError(f"{out}: already exists; pass --overwrite to replace it or -o to choose another folder")
        tmp = out.with_name(out.name + ".partial")
        _prepare_partial(tmp, resume)
        try:
            yield tmp
            (tmp / MARKER).unlink()
            fsync_tree(tmp)
        except BaseException:
            if not resume:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists() or out.is_symlink():  # (--overwrite) the old output goes to a name only this run uses
            old = out.with_name(f".{out.name}.stepconv-replaced-{uuid.uuid4().hex[:12]}")
            out.rename(old)
            tmp.rename(out)
            fsync_dir(out.parent)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            tmp.rename(out)
            fsync_dir(out.parent)
    finally:
        lock.release()


def audit_on_disk(root: Path, sizes: dict[str, int]) -> None:
    """Every file the run wrote is on disk under `root` with the size it was written with (not a count kept in
    memory: a file removed or truncated by anything else stops publication)."""
    for rel, size in sizes.items():
        try:
            have = os.stat(root / rel).st_size
        except FileNotFoundError:
            raise StepconvError(f"audit failed, not publishing: {root / rel} is missing (removed by another "
                                f"process?)") from None
        if have != size:
            raise StepconvError(f"audit failed, not publishing: {root / rel} is {have} bytes on disk, {size} were "
                                f"written")


class Journal:
    """`<out>.partial/.stepconv-journal.json`: which units are complete, what each consumed, and each output's
    size and digest (`safety.file_digest`), for `--resume` and the final on-disk audit.

    `persist=False` (a torch_dist run, which cannot be resumed: its index is written at the end) keeps the record in
    memory for the audit and writes nothing. Written, each unit's record is fsynced, and on ext4 that fsync waits
    for the other units' dirty data too: 50 of them took 10.6 s of the worker threads' time in a 37 s torch_dist run
    (2-core machine, 1/8 scale)."""

    NAME = ".stepconv-journal.json"

    def __init__(self, root: Path, fingerprint: str, *, persist: bool = True):
        self.path = root / self.NAME
        self.fingerprint = fingerprint
        self.persist = persist
        self.done: dict[str, dict] = {}
        self.lock = threading.Lock()

    def load(self) -> None:
        """Read a previous run's journal; refuses one written for another input or other options."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StepconvError(f"{self.path}: unreadable journal; rerun without --resume to start over") from None
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            raise StepconvError(f"{self.path.parent}: was started with another input or other options (tp/pp/ep, "
                                f"spec, dtype, window convention); rerun with the same ones, or without --resume to "
                                f"start over")
        done = data.get("done", {})
        self.done = done if isinstance(done, dict) else {}

    def complete(self, unit, consumed: Counter, result) -> None:
        files = {rel: {"bytes": st.bytes, "digest": file_digest(self.path.parent / rel, st.crcs)}
                 for rel, st in result.files.items()}
        with self.lock:
            self.done[unit.name] = {"outputs": unit.outputs, "consumed": dict(consumed), "files": files}
            if not self.persist:
                return
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                f.write(json.dumps({"fingerprint": self.fingerprint, "done": self.done}))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def reusable(self, unit) -> dict | None:
        """The unit's record when every output is still exactly what was written (size and digest: a rank file's
        CRC-32 over all its bytes); None when it must be redone."""
        done = self.done.get(unit.name)
        if not isinstance(done, dict) or not isinstance(done.get("files"), dict):
            return None
        root = self.path.parent
        for rel in unit.outputs:
            rec = done["files"].get(rel)
            p = root / rel
            try:
                if not rec or os.stat(p).st_size != rec["bytes"] or file_digest(p) != rec["digest"]:
                    return None
            except (OSError, KeyError, TypeError):
                return None
        return done

    def sizes(self) -> dict[str, int]:
        """Every recorded output's size (the on-disk audit's expectation)."""
        return {rel: rec["bytes"] for d in self.done.values() for rel, rec in d.get("files", {}).items()}

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
