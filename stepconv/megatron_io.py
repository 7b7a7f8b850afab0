"""Megatron legacy (`--ckpt-format torch`) checkpoint I/O, streamed one tensor at a time.

A rank file is what `torch.save({"model": ..., "args": ...})` writes: a zip with `data.pkl`
and one record per storage. `RankFileWriter` produces the same archive incrementally (each
tensor is written as soon as it is built, the pickle last), so a 100 GB rank file never sits
in memory. Reading uses `torch.load(mmap=True, weights_only=True)` and hands pages back to
the kernel after each tensor is consumed.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import os
import pathlib
import pickle
import re
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import StepconvError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    name = f"mp_rank_{tp:02d}"
    if pp_size > 1:
        name += f"_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return name


# --- writing ---------------------------------------------------------------------------------
@dataclass
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass
class _TensorRef:
    storage: _StorageRef
    shape: tuple[int, ...]


def _storage_class(dtype: torch.dtype):
    name = torch.storage._dtype_to_storage_type_map()[dtype]  # e.g. "BFloat16Storage", as torch.save pickles it
    return getattr(torch, name)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _storage_class(obj.dtype), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _TensorRef):
            stride, acc = [], 1
            for d in reversed(obj.shape):
                stride.append(acc)
                acc *= d
            return (torch._utils._rebuild_tensor_v2,
                    (obj.storage, 0, tuple(obj.shape), tuple(reversed(stride)), False, OrderedDict()))
        return NotImplemented


class RankFileWriter:
    """Writes one `model_optim_rng.pt` incrementally; `torch.load` reads it like any torch.save file."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(path.name + ".tmp")  # renamed to `path` only once complete
        self._zip = torch._C.PyTorchFileWriter(str(self._tmp))
        self.model: OrderedDict[str, Any] = OrderedDict()
        self.bytes_written = 0

    def add(self, key: str, tensor: torch.Tensor | None) -> None:
        if key in self.model:
            raise StepconvError(f"internal: {key} written twice to {self.path}")
        if tensor is None:  # megatron's `_extra_state` entries
            self.model[key] = None
            return
        t = tensor.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        ref = _StorageRef(str(len(self.model)), t.dtype, t.numel())
        # the record holds exactly this tensor's bytes: a storage view of its own range, no copy
        off = t.storage_offset() * t.element_size()
        data = t.untyped_storage()[off:off + nbytes] if nbytes else b""
        self._zip.write_record(f"data/{ref.key}", data, nbytes)
        self.bytes_written += nbytes
        self.model[key] = _TensorRef(ref, tuple(t.shape))

    def finish(self, args: argparse.Namespace, iteration: int = 0) -> None:
        obj = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": self.model}
        data = _dumps(obj)
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(".storage_alignment", "64", 2)
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._zip.write_end_of_file()
        del self._zip
        os.replace(self._tmp, self.path)


def _dumps(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_tracker(root: Path, iteration: int | str = "release") -> None:
    (root / TRACKER).write_text(f"{iteration}\n" if iteration == "release" else f"{int(iteration)}\n")


# --- reading ---------------------------------------------------------------------------------
_SAFE = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath]


def _megatron_safe_globals() -> list:
    try:
        from megatron.core import safe_globals as sg  # heavy import: only when the light list is not enough
    except Exception:
        return []
    return list(getattr(sg, "SAFE_GLOBALS", []))


def load_rank_file(path: Path) -> dict:
    """torch.load(weights_only=True, mmap=True) under megatron-core's safe globals; nothing else is unpickled."""
    if not path.exists():
        raise StepconvError(f"{path}: missing rank file")
    for allow in (_SAFE, None):
        try:
            with torch.serialization.safe_globals(allow if allow is not None else _SAFE + _megatron_safe_globals()):
                obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            break
        except pickle.UnpicklingError as e:
            if allow is None:
                raise StepconvError(f"{path}: not loadable with weights_only=True under megatron-core's safe "
                                    f"globals ({str(e).splitlines()[0]})") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise StepconvError(f"{path}: corrupt or truncated rank file ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise StepconvError(f"{path}: no 'model' state dict (found {keys}); expected a Megatron legacy checkpoint")
    return obj


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def mapped_range(model: dict) -> tuple[int, int]:
    """The address range a mmap-loaded rank file's tensors occupy (one file mapping)."""
    lo, hi = None, 0
    for v in model.values():
        if isinstance(v, torch.Tensor) and v.numel():
            st = v.untyped_storage()
            p = st.data_ptr()
            lo = p if lo is None else min(lo, p)
            hi = max(hi, p + st.nbytes())
    return (lo or 0, hi)


def release_range(lo: int, hi: int) -> None:
    """Drop a read-only file mapping's resident pages from our RSS (re-read from cache if touched again).

    Releasing each tensor alone is not enough: the kernel's fault-around maps neighbouring pages
    (already in the page cache) whenever a tensor is touched, so released neighbours creep back in
    (measured: 47 MB of each 77 MB rank file resident by the end of an export). Releasing the whole
    file's range now and then keeps what stays mapped bounded.
    """
    if _libc is None or hi <= lo:
        return
    start = lo - lo % _PAGE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(hi - start), _MADV_DONTNEED)


def rank_dir_problems(itdir: Path, tp: int, pp: int, ep: int) -> list[str]:
    """Missing rank files and unexpected rank folders for a TP x PP x EP layout, as error lines."""
    want = [rank_dir_name(t, p, e, pp, ep) for p in range(pp) for e in range(ep) for t in range(tp)]
    have = sorted(p.name for p in itdir.iterdir() if p.name.startswith("mp_rank_"))
    lay = f"TP={tp} PP={pp} EP={ep}"
    out = []
    missing = [d for d in want if not (itdir / d / RANK_FILE).exists()]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
        out.append(f"{itdir}: {len(missing)} rank file(s) missing for {lay}: {shown}")
    extra = sorted(set(have) - set(want))
    if extra:
        out.append(f"{itdir}: unexpected rank folder(s) for {lay} (from args): {', '.join(extra[:8])}")
    return out


def read_tracker(root: Path) -> str:
    f = root / TRACKER
    if not f.exists():
        raise StepconvError(f"{root}: no {TRACKER}; expected a Megatron checkpoint folder "
                            f"(with release/ or iter_*/ and mp_rank_* subfolders)")
    text = f.read_text().strip()
    if text != "release" and not text.isdigit():
        raise StepconvError(f"{f}: holds {text!r}; expected an iteration number or 'release'")
    return text


_ITERATION_DIR = re.compile(r"release|iter_\d{7}")


@dataclass(frozen=True)
class IterationDir:
    """One saved iteration of a Megatron checkpoint: `root/<release|iter_NNNNNNN>`."""

    root: Path  # the checkpoint root (holds the tracker, and stepconv's sidecar folder)
    iteration: str  # "release" or the iteration number as digits
    path: Path  # the iteration folder


def resolve_iteration(path: str | os.PathLike, iteration: str | int | None = None) -> IterationDir:
    """The one way a user's Megatron path becomes an iteration folder (every command goes through here).

    `path` is a checkpoint root (the iteration is `iteration`, else the tracker's) or an iteration folder
    itself (`release` or `iter_NNNNNNN`; `iteration`, if given, must name it).
    """
    p = Path(path)
    if not p.is_dir():
        raise StepconvError(f"{p}: not a directory; expected a Megatron checkpoint folder")
    if _ITERATION_DIR.fullmatch(p.name) and not (p / TRACKER).exists():
        it = "release" if p.name == "release" else str(int(p.name[len("iter_"):]))
        if iteration is not None and str(iteration).lstrip("0") != it.lstrip("0") and str(iteration) != it:
            raise StepconvError(f"{p}: is iteration {it}, but --iteration {iteration} was given")
        return IterationDir(p.parent, it, p)
    it = str(iteration).strip() if iteration is not None else read_tracker(p)
    if it != "release" and not it.isdigit():
        raise StepconvError(f"--iteration {it!r}: expected an iteration number or 'release'")
    itdir = p / iteration_dir_name(it if it == "release" else int(it))
    if not itdir.is_dir():
        have = sorted(d.name for d in p.iterdir() if d.is_dir() and _ITERATION_DIR.fullmatch(d.name))
        raise StepconvError(f"{itdir}: iteration folder not found (available: {', '.join(have) or 'none'})")
    return IterationDir(p, it if it == "release" else str(int(it)), itdir)
