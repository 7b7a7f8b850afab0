"""Megatron legacy (`--ckpt-format torch`) checkpoint I/O, streamed one tensor at a time.

A rank file is what `torch.save({"model": ..., "args": ...})` writes: a zip with `data.pkl`
and one record per storage. `RankFileWriter` produces the same archive incrementally (each
tensor is written as soon as it is built, the pickle last), so a 100 GB rank file never sits
in memory. Reading uses `torch.load(mmap=True, weights_only=True)` (or `fast_load`, which gives the same
result faster and accepts less) and hands pages back to the kernel after each tensor is consumed.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import pathlib
import pickle
import re
import sys
import threading
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import buffers, fast_load
from .config import StepconvError, names_text
from .safety import LIBC, BlockCrcs, GuardedFile, bounded_text, check_zip_sizes, named_os_errors, regular_file
from .engine import ByteCount, FileStat, ReadCount, Unit, UnitResult
from .hf_io import FileRows, GatherFile, SafetensorsWriter, TensorInfo, read_safetensors_tensor
from .mapping import Entry, Layout
from .torch_pickle import StorageRef, TensorRef
from .torch_pickle import dumps as dumps_state
from .torch_zip import ZipLayout, layout_matches_torch

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
EXTRA_STATE = "._extra_state"
SIDECAR = "stepconv"  # stepconv's own folder beside the iteration folders
MTP_HEADS = "mtp_heads.safetensors"
RELEASE_EVERY = 64 << 20  # bytes read from mapped rank files between releases of their pages


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, ep_rank: int, pp_size: int, ep_size: int) -> str:
    """Megatron-LM's rank folder: mp_rank_TT[_PPP][_EEE] (the one place it is spelled)."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


# --- writing ---------------------------------------------------------------------------------
class _SlotFile(GuardedFile):
    """GuardedFile that remembers where torch skipped a record's bytes (`write_record_metadata` seeks past them)."""

    slot = -1

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            self.slot = self.tell()
        return super().seek(offset, whence)


class _TorchRecords:
    """A rank file's records laid out by torch's own zip writer (through `_SlotFile`): the fallback when this torch's
    layout is not the one `torch_zip.ZipLayout` writes (`torch_zip.layout_matches_torch`)."""

    crcs = None  # (torch's writer: the journal rereads the file for its digest)

    def __init__(self, path: Path, tmp: Path):
        self.path = path
        self._file = _SlotFile(tmp)
        self._zip = torch._C.PyTorchFileWriter(self._file, False)
        self._slots: dict[str, int] = {}  # record -> data offset, for records whose bytes we placed ourselves

    def record(self, name: str, tensor, nbytes: int) -> None:
        if tensor.is_meta:  # dry run: torch lays out the record and skips its bytes (a sparse file)
            self._zip.write_record_metadata(name, nbytes)
        elif type(tensor) is FileRows and nbytes:
            # torch lays out the record and seeks past its bytes (GuardedFile.seek); they are copied in from the
            # source file at that offset (pwrite / copy_file_range do not move the file position)
            self._zip.write_record_metadata(name, nbytes)
            self._file.check()
            start = self._file.slot  # (torch has written the record's data descriptor after it by now)
            with named_os_errors(self.path):
                tensor.write_to(self._file.f.fileno(), start)
            self._slots[name] = start
        else:
            if type(tensor) is FileRows:
                tensor = tensor.materialise()
            t = buffers.contiguous(tensor)
            # the record holds exactly this tensor's bytes: its storage, or a view of its own range (no copy)
            st = t.untyped_storage()
            if nbytes and (t.storage_offset() or st.nbytes() != nbytes):
                off = t.storage_offset() * t.element_size()
                st = st[off:off + nbytes]
            self._zip.write_record(name, st if nbytes else b"", nbytes)
        self._file.check()
        self._file.writeback()

    def small(self, name: str, data: bytes) -> None:
        self._zip.write_record(name, data, len(data))

    def close(self, tmp: Path) -> None:
        self._zip.write_end_of_file()
        del self._zip
        self._file.close()  # (flushed and fsynced: a rank file under its final name is on the disk)
        if self._slots:  # the offsets we wrote at are where torch's reader finds the records
            r = torch._C.PyTorchFileReader(str(tmp))
            bad = [k for k, off in self._slots.items() if r.get_record_offset(k) != off]
            if bad:
                raise StepconvError(f"internal: {self.path}: record(s) {names_text(bad)} not where they were written")


class _OwnRecords:
    """A rank file's records laid out by `torch_zip.ZipLayout`, torch's layout byte for byte, with no call into torch
    per record, written through a `GatherFile` (heads, tails and small records gathered in one reused buffer).
    (torch's writer laid out each record through Python file callbacks.)"""

    __slots__ = ("zip", "out")

    def __init__(self, path: Path, tmp: Path, digest: bool = False, zip: ZipLayout | None = None):
        """`zip`: go on from where that layout is (a part of the file, or its end): the file is written from its
        `pos` on, not truncated."""
        self.zip = zip or ZipLayout()
        self.out = GatherFile(tmp, path, digest=digest, at=self.zip.pos)

    def record(self, name: str, tensor, nbytes: int) -> None:
        head, tail = self.zip.record(name, nbytes)
        out = self.out
        out.put(head)
        out.put_data(tensor, nbytes)
        out.put(tail)

    @property
    def crcs(self):
        return self.out.crcs

    def small(self, name: str, data: bytes) -> None:
        head, tail = self.zip.record(name, len(data))
        for b in (head, data, tail):
            self.out.put(b)

    def close(self, tmp: Path) -> None:
        try:
            self.out.put(self.zip.end())
            self.out.close()
        finally:
            self.out.abandon()

    def close_part(self) -> None:
        """A part's records written (not synced: the file's last writer syncs it) and the descriptor closed."""
        try:
            self.out.close(sync=False)
        finally:
            self.out.abandon()


class _LaidOut:
    """A rank file's records laid out, nothing written (`LegacyWriter.parts`: where each part's records start)."""

    __slots__ = ("zip",)

    def __init__(self):
        self.zip = ZipLayout()

    def record(self, name: str, tensor, nbytes: int) -> None:
        self.zip.record(name, nbytes)


class RankFileWriter:
    """Writes one `model_optim_rng.pt` incrementally; `torch.load` reads it like any torch.save file. Its bytes are
    what torch's zip writer (CRC32 off) writes, laid out by `torch_zip.ZipLayout` (or, if this torch lays out
    otherwise, by torch's writer itself)."""

    def __init__(self, path: Path, digest: bool = False, *, laid_out: bool = False,
                 part: tuple[int, int] | None = None):
        """`digest`: fold the resume journal's block CRCs in while writing (`crcs` once finished; `_OwnRecords`
        only). `laid_out`: lay the records out, write nothing (`LegacyWriter.parts`; `write_on` then writes the
        file's end). `part`: (file offset, key number) where a part of the file, laid out ahead, starts: its records
        are written from there (`close_part` when done)."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(path.name + ".tmp")  # renamed to `path` only once complete
        # compute_crc32=False: torch's CRC32 ran at ~300 MB/s, 4x slower than writing the bytes (512 MB: 1.6-2.3 s
        # vs 0.3-0.45 s); the zip records' CRC fields are then 0, which torch.load (mmap or not) does not check
        self._nkeys = 0
        if laid_out:
            self._out = _LaidOut()
        elif part is not None:
            zip = ZipLayout()
            zip.pos, self._nkeys = part
            self._out = _OwnRecords(path, self._tmp, digest, zip)
        else:
            self._out = (_OwnRecords(path, self._tmp, digest) if layout_matches_torch()
                         else _TorchRecords(path, self._tmp))
        self.models: dict[str, OrderedDict[str, Any]] = {}  # "model", or "model0".. (one per VPP chunk)
        self.bytes_written = 0
        self.tensors = 0
        self._signature: list = []  # (key, dtype, shape) per entry: what data.pkl depends on besides args

    @property
    def cut(self) -> tuple[int, int]:
        """(file offset, key number) of the next record: where a part starting here begins."""
        return self._out.zip.pos, self._nkeys

    def write_on(self, digest: bool) -> None:
        """A laid-out file's parts are written: write its end (`finish`) from where they ended."""
        self._out = _OwnRecords(self.path, self._tmp, digest, self._out.zip)

    def close_part(self) -> None:
        self._out.close_part()

    @property
    def keys(self) -> int:
        return self._nkeys

    def add(self, key: str, tensor: torch.Tensor | None, model: str = "model") -> None:
        # (the per-record hot path: ~25k expert records a rank file at the real tensor count, so every Python call
        # here shows at small widths)
        sd = self.models.get(model)
        if sd is None:
            sd = self.models[model] = OrderedDict()
        if key in sd:
            raise StepconvError(f"internal: {model}.{key} written twice to {self.path}")
        name = str(self._nkeys)  # records are numbered by key, `_extra_state` entries included
        self._nkeys += 1
        if tensor is None:  # megatron's `_extra_state` entries
            sd[key] = None
            self._signature.append((model, key))
            return
        numel, dtype, shape = tensor.numel(), tensor.dtype, tuple(tensor.shape)
        nbytes = numel * dtype.itemsize
        self._out.record("data/" + name, tensor, nbytes)
        self.bytes_written += nbytes
        self.tensors += 1
        sd[key] = TensorRef(StorageRef(name, dtype, numel), shape)
        self._signature.append((model, key, dtype, shape))

    def finish(self, args: argparse.Namespace, iteration: int = 0, pickles: dict | None = None) -> None:
        """Write the pickled state dict and close. `pickles` caches data.pkl across files whose keys, dtypes and
        shapes are equal (the TP ranks of one stage and EP rank): pickling 4k refs costs ~0.25 s a file."""
        obj = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **self.models}
        sig = (id(args), iteration, tuple(self._signature)) if pickles is not None else None
        data = pickles.get(sig) if sig is not None else None
        if data is None:
            data = dumps_state(obj)
            if sig is not None:
                pickles[sig] = data
        for name, small in (("data.pkl", data), *_FIXED_RECORDS):
            self._out.small(name, small)
        self._out.close(self._tmp)
        os.replace(self._tmp, self.path)

    @property
    def crcs(self):
        """The finished file's `safety.BlockCrcs`, when they were folded in while writing; else None."""
        return self._out.crcs


# what torch.save writes after data.pkl (`torch.serialization._save`), before its writer's own closing records
_FIXED_RECORDS = ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", sys.byteorder.encode()))

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


def _allow(extra: list) -> None:
    """Register `extra` for weights_only loads, for the rest of the process (idempotent), never through torch's
    `safe_globals` context: on exit that context removes every global it named, process-wide. Loads run on several
    threads and megatron-core may be imported (registering Namespace & co. itself) while one is in flight, so a
    context exiting in one thread unregistered what megatron-core registered, and Megatron's own
    `load_common_state_dict` failed later in the same process (seen in the suite once readers ran concurrently).
    What is registered is benign: Namespace, SimpleNamespace, PosixPath, megatron-core's own list, which its
    import registers anyway, and inert stand-ins (`ForeignMegatronValue`)."""
    torch.serialization.add_safe_globals(list(extra))


class ForeignMegatronValue:
    """Stand-in for a pickled value of a class outside the installed megatron-core's allowlist, written by Megatron.

    Megatron-LM records its whole argparse Namespace in every checkpoint, and a newer Megatron-LM puts its own new
    enums there (Megatron-LM dev bd5c98f779: `args.inference_cuda_graph_scope` is a
    `megatron.core.transformer.enums.InferenceCudaGraphScope`, which megatron-core 0.16.1 lacks), so its checkpoints
    do not load under the installed megatron-core's allowlist. stepconv reads only the model tensors and the
    architecture fields of args; such a value becomes an instance of this class, which keeps what the pickle gave it
    (`args` of the call, `state`) and runs nothing. Only globals under `megatron.` get a stand-in, and
    `torch._C.Generator`, which newer megatron-core allowlists for its torch-format checkpoints."""

    qualname = "?"

    def __new__(cls, *args):
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        inner = ", ".join(map(repr, self.args)) if self.args else f"state={self.state!r}"
        return f"{self.qualname}({inner})"


_FOREIGN: dict[str, type] = {}


def _foreign_stand_ins(path: Path) -> list:
    """Stand-ins for the not-allowlisted megatron globals of `path`'s pickle (read without running it); refuses any
    other global with one line naming it."""
    names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    refused = [n for n in names if not n.startswith("megatron.") and n != "torch._C.Generator"]
    if refused:
        raise StepconvError(f"{path}: not loadable with weights_only=True: its pickle names {names_text(refused)}, "
                            f"which Megatron does not write; refusing to unpickle it")
    for n in names:
        if n not in _FOREIGN:
            _FOREIGN[n] = type(n.rsplit(".", 1)[-1], (ForeignMegatronValue,), {"qualname": n})
    return [(_FOREIGN[n], n) for n in names]


def load_rank_file(path: Path, need_model: bool = True) -> dict:
    """torch.load(weights_only=True, mmap=True) under megatron-core's safe globals; nothing else is unpickled, but
    values of megatron-core classes a newer Megatron-LM wrote load as inert stand-ins (`ForeignMegatronValue`).
    (Also reads a torch_dist `common.pt`, `need_model=False`: its args hold megatron enums.)
    `fast_load.load` is tried first: the same result for the files it handles (ours, torch.save's of a state dict),
    accepting strictly less than weights_only; anything else it leaves to torch.load, as before."""
    if not path.exists():
        raise StepconvError(f"{path}: missing " + ("rank file" if need_model else "file"))
    check_zip_sizes(path, regular_file(path, "rank file" if need_model else "torch.save file").st_size)
    _allow(_SAFE)
    try:
        obj = fast_load.load(path)
    except fast_load.GiveUp:
        obj = _torch_load_rank_file(path)
    if not isinstance(obj, dict) or (need_model and not model_keys(obj)):
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise StepconvError(f"{path}: no 'model' state dict (found {keys}); expected a Megatron legacy checkpoint")
    return obj


def _torch_load_rank_file(path: Path) -> Any:
    for attempt in range(3):
        try:
            _allow(_SAFE if attempt == 0 else _SAFE + _megatron_safe_globals())
            if attempt == 2:
                _allow(_foreign_stand_ins(path))
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            break
        except pickle.UnpicklingError as e:
            if attempt == 2:
                lines = str(e).splitlines()
                why = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
                raise StepconvError(f"{path}: not loadable with weights_only=True under megatron-core's safe "
                                    f"globals ({why.strip()})") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise StepconvError(f"{path}: corrupt or truncated rank file ({str(e).splitlines()[0]})") from None
    return obj


_MODEL_KEY = re.compile(r"model\d*")


def model_keys(obj: dict) -> list[str]:
    """A rank file's model state dicts: `model`, or `model0`, `model1`.. (one per virtual pipeline stage)."""
    return sorted((k for k in obj if isinstance(k, str) and _MODEL_KEY.fullmatch(k)), key=lambda k: (len(k), k))


def rank_models(obj: dict, layout: Layout, path: Path) -> list[dict]:
    """The model chunks of a loaded rank file, checked against the layout its args record (VPP or not)."""
    have, want = model_keys(obj), layout.model_keys()
    if have != want:
        raise StepconvError(f"{path}: holds {', '.join(have)}; {layout} (from args) has "
                            f"{', '.join(want)}")
    return [obj[k] for k in want]


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
    if LIBC is None or hi <= lo:
        return
    start = lo - lo % _PAGE
    LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(hi - start), _MADV_DONTNEED)


def _file_base(path: Path, model: dict) -> tuple[int, int] | None:
    """(a new descriptor of `path`, the address its offset 0 is mapped at) for a state dict `torch.load(mmap=True)`
    mapped whole from `path`, so a tensor's bytes are at file offset `data_ptr - address`; None when that cannot be
    established (no /proc, an unmapped tensor), and the caller reads through the mapping as before. The first and
    last tensors' leading bytes are compared with the file's to make sure."""
    ts = [v for v in model.values() if isinstance(v, torch.Tensor) and v.numel()]
    if not ts or LIBC is None:
        return None
    ptr, want = ts[0].data_ptr(), os.stat(path)
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return None
    base = None
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi and int(fields[2], 16) == 0 and int(fields[4]) == want.st_ino:
            base = lo
            break
    if base is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    for t in (ts[0], ts[-1]):
        n = min(64, t.numel() * t.element_size())
        if not t.is_contiguous() or os.pread(fd, n, t.data_ptr() - base) != bytes(t.reshape(-1).view(torch.uint8)[:n]):
            os.close(fd)
            return None
    return fd, base


def rank_dir_problems(itdir: Path, layout: Layout) -> list[str]:
    """Missing rank files and unexpected rank folders for a layout, as error lines."""
    want = [rank_dir_name(t, p, e, layout.pp_size, layout.ep_size) for t, p, e in layout.ranks()]
    have = sorted(p.name for p in itdir.iterdir() if p.name.startswith("mp_rank_"))
    lay = str(layout)
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
    text = bounded_text(f, "Megatron tracker file", limit=64).strip()
    if parse_iteration(text) is None:
        raise StepconvError(f"{f}: holds {text!r}; expected an iteration number or 'release'")
    return text


def parse_iteration(text: str) -> str | None:
    """'release', or an iteration number as canonical digits ('0002000' -> '2000'); None for anything else."""
    text = text.strip()
    if text == "release":
        return text
    return str(int(text)) if re.fullmatch(r"[0-9]{1,10}", text) else None


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
    given = None
    if iteration is not None:
        given = parse_iteration(str(iteration))
        if given is None:
            raise StepconvError(f"--iteration {str(iteration)[:64]!r}: expected an iteration number (digits) or "
                                f"'release'")
    if _ITERATION_DIR.fullmatch(p.name) and not (p / TRACKER).exists():
        it = "release" if p.name == "release" else str(int(p.name[len("iter_"):]))
        if given is not None and given != it:
            raise StepconvError(f"{p}: is iteration {it}, but --iteration {iteration} was given")
        return IterationDir(p.parent, it, p)
    it = given if given is not None else parse_iteration(read_tracker(p))
    itdir = p / iteration_dir_name(it)
    if not itdir.is_dir():
        have = sorted(d.name for d in p.iterdir() if d.is_dir() and _ITERATION_DIR.fullmatch(d.name))
        raise StepconvError(f"{itdir}: iteration folder not found (available: {', '.join(have) or 'none'})")
    return IterationDir(p, it, itdir)


# --- the legacy format as an engine writer and reader ----------------------------------------------------
def rank_file(layout: Layout, tp_rank: int, pp_rank: int, ep_rank: int, iteration: str = "release") -> str:
    """A rank file's path relative to the checkpoint root."""
    return (f"{iteration_dir_name(iteration)}/{rank_dir_name(tp_rank, pp_rank, ep_rank, layout.pp_size, layout.ep_size)}"
            f"/{RANK_FILE}")


HEADS_UNIT = "mtp-heads"


def heads_units(entries: list[Entry], *, ordered: bool = True) -> list[Unit]:
    """The unit of stepconv's MTP-head sidecar (`stepconv/mtp_heads.safetensors`), when the plan has heads: each MTP
    layer's own shared_head.output, which no Megatron format has a slot for (MTP shares output_layer)."""
    side = [e for e in entries if not e.kind.megatron]
    return [Unit(HEADS_UNIT, side, [f"{SIDECAR}/{MTP_HEADS}"], ordered=ordered)] if side else []


def open_heads(root: Path, infos: list[TensorInfo], dry: bool) -> SafetensorsWriter:
    final = root / SIDECAR / MTP_HEADS
    if not dry:
        final.parent.mkdir(parents=True, exist_ok=True)
    return SafetensorsWriter(final.with_name(final.name + ".tmp"), infos, dry=dry)


def close_heads(root: Path, w: SafetensorsWriter) -> UnitResult:
    """Check the sidecar is whole, rename it into place; what it holds."""
    incomplete = w.close()
    if incomplete:
        raise StepconvError(f"internal audit: MTP heads not fully written: {names_text(incomplete)}")
    if not w.dry:
        os.replace(w.path, root / SIDECAR / MTP_HEADS)
    n = len(w.infos)
    return UnitResult({f"{SIDECAR}/{MTP_HEADS}": FileStat(w.bytes_written, w.bytes_written - w.data_start, n, n)})


def read_head(path: Path | None, entry: Entry, meta: bool) -> torch.Tensor:
    """One MTP head from the sidecar (a meta tensor of its shape for a dry run)."""
    if meta:
        return torch.empty(entry.hf_shapes[0], dtype=torch.bfloat16, device="meta")
    t = read_safetensors_tensor(path, entry.hf[0])
    if tuple(t.shape) != tuple(entry.hf_shapes[0]) or t.dtype not in WEIGHT_DTYPES:
        raise StepconvError(f"{path}: {entry.hf[0]} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}; "
                            f"expected {list(entry.hf_shapes[0])} in bf16, fp16 or fp32")
    return t


WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rank_tensor_problem(path: Path, model: dict, want: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """The first tensor of a loaded rank file whose shape is not the plan's for this rank, or whose dtype is not a
    float weight dtype (a transposed shard, a short embedding shard, int8 weights): None when all agree.
    `want`: key -> (shape, the HF tensor(s) it comes from)."""
    for key, (shape, hf) in want.items():
        t = model.get(key)
        if not isinstance(t, torch.Tensor):
            return f"{path}: {key} ({hf}) is {type(t).__name__}, expected a tensor"
        if tuple(t.shape) != shape:
            return f"{path}: {key} ({hf}) has shape {list(t.shape)}; this rank's shard is {list(shape)}"
        if t.dtype not in WEIGHT_DTYPES:
            return (f"{path}: {key} ({hf}) is {str(t.dtype).removeprefix('torch.')}; expected bf16, fp16 or fp32 "
                    f"weights")
    return None


class LegacyWriter:
    """engine.Writer for Megatron's legacy format: one zip per TP rank of each (PP stage, EP rank) unit, written
    record by record in plan order; the MTP heads, which have no Megatron slot, go to `stepconv/mtp_heads`.

    `dry=True` is the same code fed meta tensors: torch's zip writer lays out every record and skips its bytes
    (sparse scratch files under `root`), so sizes are the conversion's own, exactly."""

    def __init__(self, root: Path, layout: Layout, args: argparse.Namespace, heads: list[TensorInfo], *,
                 dry: bool = False):
        self.root, self.layout, self.args, self.heads, self.dry = root, layout, args, heads, dry
        self._open: dict[str, list] = {}
        self._shards: dict[str, dict[bool, list[int]]] = {}
        self._model_names = layout.model_keys()
        self._pickles: dict = {}
        self._pickle_lock = threading.Lock()
        # a unit written in parts (`parts`): part name -> (its unit, index, its files' cuts: (offset, key) at its
        # start and end); unit name -> each part's files' folded CRCs, as the parts hand them over
        self._cuts: dict[str, tuple[Unit, int, list[tuple[int, int]], list[tuple[int, int]]]] = {}
        self._part_crcs: dict[str, list] = {}
        self._part_done: list | None = None  # (a worker process: the CRCs of the part it ended, for `handover`)

    def units(self, entries: list[Entry]) -> list[Unit]:
        """One unit per (PP stage, EP rank): its rank folders (the TP ranks `layout.ranks()` has there)."""
        lay = self.layout
        units = heads_units(entries)
        for stage in range(lay.pp_size):
            for p in range(lay.ep_size):
                tps = lay.tp_ranks(stage, p)
                if not tps:  # (ETP unlike TP: this EP rank's experts live beside other TP ranks)
                    continue
                es = [e for e in entries if e.stage == stage and e.kind.megatron and e.on(p)]
                outs = [rank_file(lay, t, stage, p) for t in tps]
                units.append(Unit(f"stage {stage} ep {p}", es, outs, stage, p, primary=p == 0))
        return units

    def begin(self) -> None:
        pass

    def start(self, unit: Unit) -> None:
        if unit.name == HEADS_UNIT:
            self._open[unit.name] = [open_heads(self.root, self.heads, self.dry)]
            return
        self._shard_map(unit)
        cut = self._cuts.get(unit.name)
        if cut is not None:  # a part, in a worker process: its records from where the layout put them
            self._open[unit.name] = [RankFileWriter(self.root / o, digest=not self.dry, part=at)
                                     for o, at in zip(unit.outputs, cut[2])]
        else:
            self._open[unit.name] = [RankFileWriter(self.root / o, digest=not self.dry) for o in unit.outputs]

    def _shard_map(self, unit: Unit) -> None:
        """Which of an entry's shards each of the unit's files takes: by TP rank, or by ETP rank for a routed
        expert."""
        lay = self.layout
        tps = lay.tp_ranks(unit.stage, unit.ep_rank)
        self._shards[unit.name] = {routed: [lay.shard_index(routed, t, unit.stage, unit.ep_rank) for t in tps]
                                   for routed in (False, True)}

    def parts(self, unit: Unit, n: int, targets: Callable[[Entry], Sequence]) -> list[Unit] | None:
        """`unit` cut into `n` parts of consecutive entries whose records several processes write at once, each
        into its own byte range of every rank file; None where it cannot be (the MTP-head sidecar, a dry run, a
        torch whose zip layout is not `torch_zip.ZipLayout`'s). Here, before the parts run: every record is laid
        out (`targets(entry)`: the step's target tensors on the meta device, whose dtypes and shapes are all a
        record's layout needs), the files are created, and each part gets its files' (offset, key number) cuts.
        A part checks that it wrote exactly the records laid out between its cuts (`end`); `end(unit)`, once every
        part is in, writes each file's data.pkl and directory after them and joins the parts' CRCs."""
        if unit.name == HEADS_UNIT or self.dry or n < 2 or len(unit.entries) < n or not layout_matches_torch():
            return None
        self._shard_map(unit)
        laid = self._open[unit.name] = [RankFileWriter(self.root / o, laid_out=True) for o in unit.outputs]
        parts = unit.split(n)
        for i, part in enumerate(parts):
            first = [w.cut for w in laid]
            for e in part.entries:
                self.put(unit, e, targets(e))
            self._cuts[part.name] = (unit, i, first, [w.cut for w in laid])
        for w in laid:
            with named_os_errors(w.path):
                os.close(os.open(w._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666))
        self._part_crcs[unit.name] = [None] * len(parts)
        return parts

    def put(self, unit: Unit, entry: Entry, tensors) -> None:
        writers = self._open[unit.name]
        if unit.name == HEADS_UNIT:
            writers[0].write(entry.hf[0], 0, tensors[0])
            return
        model = self._model_names[entry.chunk]
        for i, w in zip(self._shards[unit.name][entry.routed], writers):
            w.add(entry.key, tensors[i], model)

    def end(self, unit: Unit) -> UnitResult:
        writers = self._open.pop(unit.name)
        if unit.name == HEADS_UNIT:
            return close_heads(self.root, writers[0])
        self._shards.pop(unit.name)
        cut = self._cuts.pop(unit.name, None)
        if cut is not None:
            return self._end_part(unit, writers, cut)
        res = UnitResult()
        want: dict[str, list[str]] = {m: [] for m in self.layout.model_keys()}
        for e in unit.entries:
            want[self.layout.model_key(e.chunk)].append(e.key)
        part_crcs = self._part_crcs.pop(unit.name, None)  # (a unit written in parts: each file's parts' CRCs)
        for k, (out, w) in enumerate(zip(unit.outputs, writers)):
            have = {m: list(w.models.get(m, ())) for m in want}
            if have != want or set(w.models) - set(want):
                missing = [f"{m}.{k}" for m, ks in want.items() for k in ks if k not in have[m]]
                raise StepconvError(f"internal audit: {w.path} is missing {names_text(missing)}")
            with self._pickle_lock:
                pickles = self._pickles.setdefault(unit.name, {})
            if part_crcs is not None:
                w.write_on(digest=not self.dry)
            w.finish(self.args, pickles=pickles)
            crcs = w.crcs if part_crcs is None else BlockCrcs.joined([p[k] if p else None for p in part_crcs]
                                                                     + [w.crcs], w.path)
            res.files[out] = FileStat(w.path.stat().st_size, w.bytes_written, w.tensors, w.keys, crcs)
            if self.dry:
                w.path.unlink()  # a sparse scratch file: its size was the point
        with self._pickle_lock:
            self._pickles.pop(unit.name, None)
        return res

    def _end_part(self, part: Unit, writers: list[RankFileWriter], cut) -> UnitResult:
        """A part's records are all written where the layout put them, the same records (key, dtype, shape)."""
        unit, i, first, last = cut
        laid = self._open[unit.name]
        for w, a, b, lw in zip(writers, first, last, laid):
            w.close_part()
            want = lw._signature[a[1]:b[1]]
            if w.cut != b or w._signature != want:
                k = next((k for k, (x, y) in enumerate(zip(w._signature, want)) if x != y), min(len(want), w.keys))
                got = w._signature[k] if k < len(w._signature) else "nothing"
                raise StepconvError(f"internal: {w.path}: part {i + 1} of {unit.name} wrote records other than laid "
                                    f"out: {got} where {want[k] if k < len(want) else 'nothing'} was laid out")
        self._part_done = [w.crcs for w in writers]
        return UnitResult()

    def handover(self, unit: Unit | None):
        """(engine, worker processes) A part's files' folded CRCs, for the files' digests."""
        crcs, self._part_done = self._part_done, None
        return crcs if unit is not None else None

    def take_over(self, part: Unit, crcs: list) -> None:
        whole, i, _, _ = self._cuts.pop(part.name)
        self._part_crcs[whole.name][i] = crcs


class LegacyReader(ReadCount):
    """engine.Reader over a legacy checkpoint's rank files: a unit is one PP stage, whose rank files are
    loaded at once (mmap; nothing is unpickled but under megatron-core's safe globals) and checked against the
    plan's keys; `read(entry)` returns the entry's TP shards (ETP shards for a routed expert), each from a rank
    folder that holds it (`Layout.shard_sources`). `meta=True` returns meta tensors of the files' shapes and dtypes
    (for `inspect`: everything is checked, no tensor byte is read)."""

    def __init__(self, itdir: Path, layout: Layout, expected: dict[tuple[int, int, int], dict[str, list[str]]],
                 spec: str, *, first: dict | None = None, meta: bool = False, heads: Path | None = None,
                 entries: list[Entry] | None = None, file_rows: bool = False):
        self.itdir, self.layout, self.expected, self.spec, self.meta = itdir, layout, expected, spec, meta
        self.entries = entries  # the plan: every loaded tensor's shape and dtype is checked against it
        # `FileRows` for kinds whose merge only joins rows (the HF writer copies them file to file)
        self.file_rows = file_rows and not meta
        self._files: dict[tuple[int, int, int], tuple[int, int]] = {}  # rank -> (fd, address of file offset 0)
        self.heads = heads  # stepconv's MTP-head sidecar, when it belongs to this iteration
        self._first = first  # rank (0, 0, 0)'s already loaded file
        # (tp_rank, stage, ep_rank) -> the file's model chunks (mapped), `model` or `model0`..
        self._models: dict[tuple[int, int, int], dict[str, dict]] = {}
        self._model_names = layout.model_keys()
        self._shards: dict[tuple, list] = {}  # (stage, ep_rank, chunk) -> `_shard_models`, while the stage is mapped
        self._stages: set[int] = set()
        self._ranges: list[tuple[int, int]] = []
        self._touched = 0
        self._lock = threading.Lock()
        self._read = ByteCount()

    def path(self, tp_rank: int, pp_rank: int, ep_rank: int) -> Path:
        return self.itdir / rank_dir_name(tp_rank, pp_rank, ep_rank, self.layout.pp_size, self.layout.ep_size) / RANK_FILE

    def units(self, entries: list[Entry]) -> list[Unit]:
        """One unordered unit per PP stage: every weight entry (not the MTP stage's embedding copy)."""
        units = [Unit(f"stage {s}", [e for e in entries if e.stage == s and e.kind.megatron and e.kind.sources
                                     and not e.replica], stage=s, ordered=False)
                 for s in range(self.layout.pp_size)]
        return units + (heads_units(entries, ordered=False) if self.heads is not None else [])

    def open(self, unit: Unit) -> None:
        if unit.stage is not None:
            self._load_stage(unit.stage)

    def _load_stage(self, stage: int) -> None:
        """Map one PP stage's rank files (every rank folder of the stage) and check their keys against the plan."""
        lay = self.layout
        with self._lock:
            if stage in self._stages:
                return
            for rank in (r for r in lay.ranks() if r[1] == stage):
                path = self.path(*rank)
                obj = self._first if rank == (0, 0, 0) and self._first is not None else load_rank_file(path)
                models = dict(zip(lay.model_keys(), rank_models(obj, lay, path)))
                for name, m in models.items():
                    # weights must match exactly; `_extra_state` entries carry none, and which modules have
                    # one depends on the TE version that saved the file, so they are neither required nor refused
                    want = {k for k in self.expected[rank][name] if not k.endswith(EXTRA_STATE)}
                    have = {k for k in m if not k.endswith(EXTRA_STATE)}
                    if have != want:
                        miss, unexp = sorted(want - have), sorted(have - want)
                        where = f" ({name})" if lay.vpp_size else ""
                        raise StepconvError(f"{path}{where}: keys do not match {lay} spec {self.spec}: "
                                            + "; ".join(x for x in (f"missing {names_text(miss)}" if miss else "",
                                                                    f"unexpected {names_text(unexp)}" if unexp else "")
                                                        if x))
                    problem = rank_tensor_problem(path, m, self._shapes(rank, lay.model_keys().index(name)))
                    if problem:
                        raise StepconvError(problem)
                    self._ranges.append(mapped_range(m))
                self._models[rank] = models
                if self.file_rows:
                    where = _file_base(path, {k: v for m in models.values() for k, v in m.items()})
                    if where is not None:
                        self._files[rank] = where
            self._stages.add(stage)

    def _shapes(self, rank: tuple[int, int, int], chunk: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Each tensor's shape in one model chunk of a rank file, from the plan (replicas on other stages included):
        the folder's TP shard, or its ETP shard for a routed expert."""
        tp_rank, stage, ep_rank = rank
        shard = {routed: self.layout.shard_index(routed, *rank) for routed in (False, True)}
        return {e.key: (e.kind.rank_shape(e.source_shapes, e.ctx, shard[e.routed]), ", ".join(e.hf))
                for e in self.entries or ()
                if e.stage == stage and e.chunk == chunk and e.on(ep_rank) and e.kind.megatron
                and e.rank_shape() is not None}

    def nbytes(self, entry: Entry) -> int:
        return 0

    def read(self, entry: Entry) -> list[torch.Tensor]:
        if not entry.kind.megatron:
            t = read_head(self.heads, entry, self.meta)
            self._read.add(t.numel() * t.element_size())
            return [t]
        if entry.stage not in self._stages:  # (a reader used outside units maps stages as entries need them)
            self._load_stage(entry.stage)
        where = (entry.stage, entry.ep_rank, entry.chunk)
        shards = self._shards.get(where) or self._shard_models(where)
        parts = [m[entry.key] for _, m, _ in shards]
        for (r, _, _), s in zip(shards, parts):
            if not isinstance(s, torch.Tensor):
                raise StepconvError(f"{self.path(*r)}: {entry.key} is {type(s).__name__}, expected a tensor")
        if self.meta:
            return [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in parts]
        sizes = [s.numel() * s.element_size() for s in parts]
        nbytes = sum(sizes)
        self._read.add(nbytes)
        if entry.kind.row_slices and all(f for _, _, f in shards) and all(s.is_contiguous() for s in parts):
            return [FileRows(s.shape, s.dtype, [(f[0], s.data_ptr() - f[1], n)])
                    for s, (_, _, f), n in zip(parts, shards, sizes)]
        with self._lock:
            self._touched += nbytes
            if self._touched >= RELEASE_EVERY:
                for lo, hi in self._ranges:
                    release_range(lo, hi)
                self._touched = 0
        return parts

    def _shard_models(self, where: tuple[int, int | None, int]) -> list[tuple[tuple, dict, tuple | None]]:
        """(rank, its model chunk's state dict, its (fd, base) or None) of each TP shard of (stage, ep_rank, chunk)."""
        stage, ep_rank, chunk = where
        model = self._model_names[chunk]
        with self._lock:
            out = self._shards[where] = [(r, self._models[r][model], self._files.get(r))
                                         for r in self.layout.shard_sources(stage, ep_rank)]
        return out

    def close(self, unit: Unit | None = None) -> None:
        """Unmap the unit's stage (every stage when `unit` is None)."""
        with self._lock:
            self._shards.clear()
            for key in [k for k in self._models if unit is None or k[1] == unit.stage]:
                del self._models[key]
                if key in self._files:
                    os.close(self._files.pop(key)[0])
            self._stages = {s for s in self._stages if unit is not None and s != unit.stage}
            self._ranges = [mapped_range(m) for ms in self._models.values() for m in ms.values()]
            self._first = None
