"""Megatron's `torch_dist` format (`--ckpt-format torch_dist`), written and read without a model, a process group
or a GPU, one chunk at a time.

A torch_dist iteration folder is a PyTorch distributed checkpoint (`.metadata` index + `*.distcp` data files,
each tensor chunk one `torch.save` blob) plus Megatron's `common.pt` (args) and `metadata.json` (written last:
its presence is how Megatron recognises the format). Keys are global and layout-independent: the tensor a key
holds is what the tensor kinds call the global tensor (`Kind.fragments`), e.g. `linear_qkv.weight._qkv` (the TP=1
per-group [q…, k, v] rows) and `linear_qkv.weight._gate` (g_proj), experts stacked along a leading axis. So the
plan is the TP=1 plan: `TorchDistWriter` takes each entry's TP=1 tensor and stores its fragments; `TorchDistReader`
assembles an entry's TP=1 tensor from whatever chunks cover it (any saving layout), and `kind.merge` at TP=1
gives the HF tensors.

Safety: `.metadata` is a pickle; it is read by an unpickler that admits only torch.distributed.checkpoint's own
metadata classes. Chunks are read with `fast_load.load_bytes` (accepts less than weights_only) or else
`torch.load(weights_only=True)`; `_extra_state` blobs are never unpickled.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import math
import os
import pickle
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from . import buffers, fast_load
from .config import StepconvError, names_text
from .engine import ByteCount, FileStat, ReadCount, ReaderBase, Unit, UnitResult, runs
from .hf_io import FileRows, GatherFile, TensorInfo
from .kinds import EXTRA, QKVG_, SplitContext
from .mapping import Entry
from .megatron_io import HEADS_UNIT, close_heads, heads_units, load_rank_file, open_heads, read_head
from .safety import check_zip_sizes, regular_file

METADATA_JSON = "metadata.json"
COMMON = "common.pt"
DCP_INDEX = ".metadata"
CHUNK_BYTES = 256 << 20  # largest chunk written: the 1 GB vocab matrices go in row blocks, so reads stay bounded
# a data file holds a layer's tensors up to about this many elements (2 GiB of bf16), then the next part begins:
# each file is written by one thread (`hf_io.GatherFile`), and one real-width MoE layer is ~9 GB, so with a file per
# layer that thread bounded a run (2-core machine, real width, 2 layers: one file's thread busy 31 of the run's
# 33 s, copy_file_range 63% of it, while the other threads waited)
PART_ELEMENTS = 1 << 30
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                     "common_backend_version": 1}
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}

# local spec: megatron maps these module names in sharded keys (get_gpt_layer_local_spec's sharded_state_dict_keys_map)
_LOCAL_KEYS_MAP = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                   ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
_EXPERT = re.compile(r"mlp\.experts\.(?:local_experts\.\d+\.(linear_fc[12])\.(weight|_extra_state)"
                     r"|(linear_fc[12])\.(weight)\d+|(linear_fc[12])\.(_extra_state))$")
_DROPPED = ("self_attention.core_attention._extra_state", "output_layer._extra_state")  # not in sharded_state_dict


def dist_key(entry: Entry, spec: str, num_experts: int) -> str | None:
    """The torch_dist key of a TP=1, PP=1 plan entry (global layer index), without the kind's suffix; None for
    entries megatron's sharded_state_dict does not hold. `_extra_state` keys carry their ShardedObject suffix."""
    key = entry.key
    if not key or key.endswith(_DROPPED):
        return None
    m = _EXPERT.search(key)
    if m:
        module = m.group(1) or m.group(3) or m.group(5)
        leaf = m.group(2) or m.group(4) or m.group(6)
        key = key[:m.start()] + f"mlp.experts.experts.{module}.{leaf}"
        if entry.kind is EXTRA:
            return f"{key}/shard_{entry.expert}_{num_experts}" if entry.expert is not None else key
        return key
    if spec == "local":
        for a, b in _LOCAL_KEYS_MAP:
            key = key.replace("." + a, "." + b)
    return f"{key}/shard_0_1" if entry.kind is EXTRA else key


def _object_keys(entries: list[Entry], spec: str, num_experts: int) -> list[str]:
    """The ShardedObject key of every `_extra_state` the spec requests; TE's grouped experts hold one per expert."""
    out = []
    for e in entries:
        k = dist_key(e, spec, num_experts) if e.kind is EXTRA else None
        if k is not None and "/shard_" not in k:  # a grouped-experts module: megatron shards its state per expert
            out += [f"{k}/shard_{x}_{num_experts}" for x in range(num_experts)]
        elif k is not None:
            out.append(k)
    return out


@dataclass(frozen=True)
class _Piece:
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    rows: slice  # rows of the entry's TP=1 tensor


def pieces(entry: Entry, spec: str, num_experts: int) -> list[_Piece]:
    """Where an entry's TP=1 tensor lives in the global tensors (experts: at their index of the stacked axis)."""
    base = dist_key(entry, spec, num_experts)
    if base is None or entry.kind is EXTRA or not entry.kind.megatron:
        return []
    out: list[_Piece] = []
    axis = 1 if entry.expert is not None else 0
    for f in entry.kind.fragments(entry.source_shapes, entry.ctx, 0):
        shape, offsets = f.global_shape, f.offsets
        if entry.expert is not None:
            shape, offsets = (num_experts, *shape), (entry.expert, *offsets)
        prev = out[-1] if out else None
        if (prev is not None and prev.key == base + f.suffix and prev.rows.stop == f.rows.start
                and offsets[axis] == prev.offsets[axis] + (prev.rows.stop - prev.rows.start)
                and all(a == b for i, (a, b) in enumerate(zip(offsets, prev.offsets)) if i != axis)):
            out[-1] = _Piece(prev.key, prev.global_shape, prev.offsets, slice(prev.rows.start, f.rows.stop))
        else:  # (at TP=1 a SwiGLU's gate and up halves are one contiguous piece: one chunk per expert)
            out.append(_Piece(base + f.suffix, tuple(shape), tuple(offsets), f.rows))
    return out


# --- writing --------------------------------------------------------------------------------------------
class TorchDistWriter:
    """engine.Writer for torch_dist: each ordered unit appends its chunks (`torch.save` blobs, as DCP's
    FileSystemWriter writes them) to its own `.distcp` file; `finish` writes the DCP index, `common.pt` and,
    last, `metadata.json`. A dry run writes nothing and counts the same blobs' sizes."""

    def __init__(self, root: Path, entries: list[Entry], spec: str, num_experts: int, args: argparse.Namespace,
                 heads: list[TensorInfo], *, dry: bool = False):
        self.root, self.spec, self.num_experts, self.args, self.heads, self.dry = root, spec, num_experts, args, heads, dry
        self.itdir = root / "release"
        self._open: dict[str, Any] = {}
        self._lock = threading.Lock()
        # each unit's chunks, (key, global shape, dtype, offsets, shape, file, offset, length), appended by the
        # unit's own thread; `finish` builds the DCP index from them in unit order. (Recorded under one shared
        # lock, building the index objects as they came, this took 25% of the on-CPU samples at 1/8 scale, most
        # of it threads contending for the lock: py-spy, 16-core device, 6.8 GB, 16 units at once.)
        self._chunks: dict[str, list[tuple]] = {}
        self._order: list[str] = []
        self.tensors: dict[str, dcp_md.TensorStorageMetadata] = {}
        self.objects: list[str] = _object_keys(entries, spec, num_experts)
        self.storage: dict[dcp_md.MetadataIndex, _StorageInfo] = {}

    def units(self, entries: list[Entry]) -> list[Unit]:
        """One unit, and one data file, per decoder layer (and one for the embedding and the head), a layer's cut
        in parts of about PART_ELEMENTS elements (`__<layer>_<part>.distcp`), in plan order."""
        groups: dict[Any, list[Entry]] = {}
        for e in entries:
            if e.kind.megatron and not e.replica and e.kind is not EXTRA:
                groups.setdefault(e.layer if e.layer is not None else -1, []).append(e)
        units = []
        for n, es in enumerate(groups.values()):
            parts = runs(es, lambda e: sum(math.prod(s) for s in e.source_shapes), PART_ELEMENTS)
            units += [Unit(f"chunks {n}" + (f".{k}" if k else ""), part, [f"release/__{n}_{k}.distcp"])
                      for k, part in enumerate(parts)]
        self._order = [u.name for u in units]
        return units + heads_units(entries)

    def begin(self) -> None:
        if not self.dry:
            self.itdir.mkdir(parents=True, exist_ok=True)

    def start(self, unit: Unit) -> None:
        if unit.name == HEADS_UNIT:
            self._open[unit.name] = open_heads(self.root, self.heads, self.dry)
        else:
            with self._lock:
                self._chunks[unit.name] = []
            self._open[unit.name] = _Sink(None if self.dry else self.root / unit.outputs[0])

    def put(self, unit: Unit, entry: Entry, tensors) -> None:
        if unit.name == HEADS_UNIT:
            self._open[unit.name].write(entry.hf[0], 0, tensors[0])
            return
        sink: _Sink = self._open[unit.name]
        record, name = self._chunks[unit.name].append, Path(unit.outputs[0]).name
        t = tensors[0]  # the TP=1 tensor
        axis = 1 if entry.expert is not None else 0  # the row axis of the global tensor
        for p in pieces(entry, self.spec, self.num_experts):
            part = t[p.rows]
            step = max(1, CHUNK_BYTES // (math.prod(part.shape[1:]) * part.element_size()))  # rows per chunk
            for lo in range(0, len(part), step):
                chunk = part[lo:lo + step]
                if entry.expert is not None:
                    chunk = chunk.unsqueeze(0)
                offsets = list(p.offsets)
                offsets[axis] += lo
                offset, length = sink.save(chunk)
                record((p.key, p.global_shape, chunk.dtype, tuple(offsets), tuple(chunk.shape), name, offset, length))

    def _index(self) -> None:
        """`tensors` and `storage` (the DCP index) from the units' chunks, in unit order: the same index whatever
        order the units ran in."""
        tensors, storage, Size = self.tensors, self.storage, torch.Size
        for name in self._order + sorted(set(self._chunks) - set(self._order)):
            for key, global_shape, dtype, offsets, size, file, offset, length in self._chunks.get(name, ()):
                md = tensors.get(key)
                if md is None:
                    md = tensors[key] = dcp_md.TensorStorageMetadata(dcp_md.TensorProperties(dtype=dtype),
                                                                     Size(global_shape), [])
                elif md.properties.dtype != dtype or tuple(md.size) != tuple(global_shape):
                    raise StepconvError(f"internal: {key} written as two different tensors")
                md.chunks.append(dcp_md.ChunkStorageMetadata(Size(offsets), Size(size)))
                storage[dcp_md.MetadataIndex(key, Size(offsets))] = _StorageInfo(file, offset, length)

    def end(self, unit: Unit) -> UnitResult:
        f = self._open.pop(unit.name)
        if unit.name == HEADS_UNIT:
            return close_heads(self.root, f)
        return UnitResult({unit.outputs[0]: f.close()})

    def handover(self, unit: Unit | None) -> list[tuple] | None:
        """(engine, worker processes) The chunks `unit` wrote, for the parent's index."""
        return self._chunks.pop(unit.name, None) if unit is not None else None

    def take_over(self, unit: Unit, chunks: list[tuple]) -> None:
        with self._lock:
            self._chunks[unit.name] = chunks

    def finish(self) -> dict[str, FileStat]:
        """Audit (every global tensor covered exactly once), then write the objects' blob, `common.pt`, the DCP
        index and, last, `metadata.json`. Returns what those files hold."""
        self._index()
        problems = []
        for key, md in self.tensors.items():
            covered = sum(math.prod(c.sizes) for c in md.chunks)
            if covered != math.prod(md.size) or len({tuple(c.offsets) for c in md.chunks}) != len(md.chunks):
                problems.append(f"{key} ({covered}/{math.prod(md.size)} elements)")
        if problems:
            raise StepconvError(f"audit failed, not publishing: global tensors not covered exactly once: "
                                f"{names_text(sorted(problems))}")
        blob = io.BytesIO()
        torch.save([None], blob)  # what megatron stores for a local linear's `_extra_state` ShardedObject
        objects = blob.getvalue()
        state: dict[str, Any] = dict(self.tensors)
        storage = dict(self.storage)
        for k in self.objects:  # every object is the same blob: one copy, indexed under each key
            state[k] = dcp_md.BytesStorageMetadata()
            storage[dcp_md.MetadataIndex(k)] = _StorageInfo(OBJECTS, 0, len(objects))
        index = pickle.dumps(dcp_md.Metadata(state_dict_metadata=state, planner_data=None, storage_data=storage))
        common = io.BytesIO()
        torch.save({"args": self.args, "checkpoint_version": 3.0, "iteration": 0,
                    "num_floating_point_operations_so_far": 0, "content_metadata": dict(CONTENT_METADATA)}, common)
        meta_json = json.dumps(MEGATRON_METADATA).encode()
        files = {OBJECTS: objects, COMMON: common.getvalue(), DCP_INDEX: index, METADATA_JSON: meta_json}
        if not self.dry:
            for name, data in files.items():  # metadata.json last: only then is this a torch_dist checkpoint
                with open(self.itdir / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        n_objects = len(self.objects)
        return {f"release/{name}": FileStat(len(data), 0, 0, n_objects if name == DCP_INDEX else 0)
                for name, data in files.items()}


OBJECTS = "__objects_0.distcp"


class _Sink:
    """One `.distcp` file: chunks appended as `torch.save` blobs, through a `GatherFile` (small blobs gathered in one
    reused buffer: at 1/64 of the real widths a layer's ~1.2k chunks are a few KB each, and the head, the data and the
    tail of each went by a write, a copy_file_range and an lseek or two). Dry (no path): the file only counts, so
    lengths and offsets are the real ones and no byte is held."""

    def __init__(self, path: Path | None):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp") if path else None
        self.f = GatherFile(self.tmp, path)
        self.chunks = self.data = 0

    def save(self, chunk: torch.Tensor | FileRows) -> tuple[int, int]:
        start = self.f.pos
        nbytes = chunk.numel() * chunk.element_size()
        template = _blob_template(tuple(chunk.shape), chunk.dtype)
        if template is not None:
            # the blob torch.save writes, from its template: the same bytes around the chunk's own data, which go
            # file to file (FileRows: copy_file_range), from the tensor's memory, or (dry) nowhere
            head, tail = template
            self.f.put(head)
            self.f.put_data(chunk, nbytes)
            self.f.put(tail)
        else:  # another torch, whose blob could not be laid out ahead: torch.save's own bytes
            blob = io.BytesIO()
            if chunk.is_meta:  # (the data range is left zeros: no tensor memory touched)
                with torch.serialization.skip_data():
                    torch.save(torch.empty(chunk.shape, dtype=chunk.dtype), blob)
            else:
                if isinstance(chunk, FileRows):
                    chunk = chunk.materialise()
                # a view of a larger tensor would save that tensor's whole storage: store exactly this chunk
                _save(chunk if _owns_storage(chunk) else buffers.empty(chunk.shape, chunk.dtype).copy_(chunk), blob)
            self.f.put(blob.getbuffer())
        self.chunks += 1
        self.data += nbytes
        return start, self.f.pos - start

    def close(self) -> FileStat:
        """Flushed and renamed, not fsynced here: the staging folder is fsynced whole (`publish.staging`) before the
        checkpoint appears under its final name, and a torch_dist run has no resume that could trust a data file
        before then. Each unit waiting for its own file's fsync took 19.8 s of the worker threads' time in a 38.7 s
        torch_dist run (2-core machine, 1/8 scale, 47 data files, 167 fsyncs in all)."""
        size = self.f.pos
        self.f.close(sync=False)
        if self.path is not None:
            os.replace(self.tmp, self.path)
        return FileStat(size, self.data, self.chunks, self.chunks)


def _save(obj: Any, f) -> None:
    """`torch.save(obj, f)` without CRC32: what torch.save does with a file object (`_open_zipfile_writer_buffer`),
    the writer made with compute_crc32=False, so the blob is torch.save's byte for byte but for the zip records'
    CRC fields (0) and the `.data/serialization_id` torch derives from them. torch's CRC32 ran at ~300 MB/s, slower
    than writing the bytes; DCP's reader (torch.load of each blob) does not check it."""
    ser = torch.serialization
    try:
        writer = torch._C.PyTorchFileWriter(f, False, ser._get_storage_alignment())
        save = ser._save
    except (AttributeError, TypeError):  # another torch: its own torch.save
        torch.save(obj, f)
        return
    save(obj, writer, pickle, ser.DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()
    f.flush()


@lru_cache(maxsize=None)
def _blob_bytes_fixed() -> bool:
    """Are a `_save` blob's bytes outside its data independent of the data? (Without CRC32 they are: checked on two
    fills of one small tensor, once per process.)"""
    try:
        parts = [_split_blob(_blob(torch.full((4, 8), fill, dtype=torch.bfloat16)), 64) for fill in (0, 1)]
    except (RuntimeError, AttributeError, TypeError):
        return False
    return parts[0] == parts[1]


@lru_cache(maxsize=4096)
def _blob_template(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[bytes, bytes] | None:
    """The `_save` blob of a tensor of `shape` and `dtype`, split around its data: (bytes before, bytes after).

    A chunk is then written as these two pieces around its own bytes: per chunk no pickling and no zip writer (at
    1/8 of the real widths torch_dist wrote 24.7k expert chunks, each a whole `torch.save` in Python), and its bytes
    can go file to file. None when this torch's blobs cannot be laid out so (the caller saves each chunk itself)."""
    if not _blob_bytes_fixed():
        return None
    try:
        with torch.serialization.skip_data():  # (the data range is left a hole: no tensor memory touched)
            raw = _blob(torch.empty(shape, dtype=dtype))
        return _split_blob(raw, math.prod(shape) * dtype.itemsize)
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return None


def _blob(t: torch.Tensor) -> bytes:
    f = io.BytesIO()
    _save(t, f)
    return f.getvalue()


def _split_blob(raw: bytes, n: int) -> tuple[bytes, bytes]:
    start = torch._C.PyTorchFileReader(io.BytesIO(raw)).get_record_offset("data/0")
    if start + n > len(raw):
        raise ValueError("blob shorter than its data")
    return raw[:start], raw[start + n:]


def _owns_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


# --- reading --------------------------------------------------------------------------------------------
_DCP_CLASSES = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")} | {  # StorageMeta.checkpoint_id of torch's own writer
    ("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")}
_DTYPES = {str(getattr(torch, n)).removeprefix("torch.") for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}


class _IndexUnpickler(pickle.Unpickler):
    """Admits only torch.distributed.checkpoint's metadata classes (and torch dtypes/sizes): a `.metadata` that
    names anything else is refused before any of it runs."""

    def __init__(self, f, where: Path):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_CLASSES or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise StepconvError(f"{self.where}: refers to {module}.{name}, which a distributed-checkpoint index never "
                            f"holds; refusing to unpickle it")


def read_index(itdir: Path) -> dcp_md.Metadata:
    path = itdir / DCP_INDEX
    try:
        if path.exists():
            regular_file(path, "distributed-checkpoint index")
        with open(path, "rb") as f:
            md = _IndexUnpickler(f, path).load()
    except FileNotFoundError:
        raise StepconvError(f"{path}: missing; a torch_dist iteration folder holds .metadata beside metadata.json") \
            from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise StepconvError(f"{path}: corrupt distributed-checkpoint index ({str(e).splitlines()[0]})") from None
    if not isinstance(md, dcp_md.Metadata):
        raise StepconvError(f"{path}: holds a {type(md).__name__}, expected a distributed-checkpoint Metadata")
    sizes: dict[str, int] = {}
    for idx, info in md.storage_data.items():
        if not isinstance(info, _StorageInfo) or "/" in info.relative_path or info.relative_path.startswith("."):
            raise StepconvError(f"{path}: storage entry for {idx.fqn} names {getattr(info, 'relative_path', info)!r}; "
                                f"expected a data file in {itdir}")
        if info.relative_path not in sizes:
            f = itdir / info.relative_path
            sizes[info.relative_path] = regular_file(f, "distributed-checkpoint data file").st_size \
                if f.exists() else -1
        if sizes[info.relative_path] < 0:
            raise StepconvError(f"{itdir / info.relative_path}: missing (.metadata places {idx.fqn} in it)")
        if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[info.relative_path]:
            raise StepconvError(f"{itdir / info.relative_path}: truncated: {idx.fqn} spans bytes {info.offset}.."
                                f"{info.offset + info.length}, the file has {sizes[info.relative_path]}")
    return md


def read_common(itdir: Path) -> dict:
    """`common.pt` (args, iteration, ...) under megatron-core's safe globals, never with plain pickle."""
    return load_rank_file(itdir / COMMON, need_model=False)


class TorchDistReader(ReaderBase, ReadCount):
    """engine.Reader over a torch_dist iteration: `read(entry)` assembles the entry's TP=1 tensor from whatever
    chunks cover it, reading only those chunks (one expert, a row block of the vocab, one saving rank's rows).
    `meta=True` checks every needed key and shape and returns meta tensors. `saved_tp`: the TP size the
    checkpoint was saved at, for a gate fused into `linear_qkv.weight` per rank (no `._qkv`/`._gate` keys)."""

    def __init__(self, itdir: Path, index: dcp_md.Metadata, spec: str, num_experts: int, *, saved_tp: int = 1,
                 meta: bool = False, heads: Path | None = None):
        self.itdir, self.index, self.spec, self.num_experts = itdir, index, spec, num_experts
        self.saved_tp, self.meta, self.heads = saved_tp, meta, heads
        # per key, chunks sorted by their offset along axis 0, so a box finds its chunks by bisection (an expert
        # among 288: scanning every chunk for every expert made the export quadratic in the expert count)
        self.chunks: dict[str, list[tuple[tuple, tuple, _StorageInfo]]] = {}
        sizes = {(k, tuple(c.offsets)): tuple(c.sizes) for k, md in index.state_dict_metadata.items()
                 if isinstance(md, dcp_md.TensorStorageMetadata) for c in md.chunks}
        for idx, info in index.storage_data.items():
            size = sizes.get((idx.fqn, tuple(idx.offset))) if idx.offset is not None else None
            if size is not None:
                self.chunks.setdefault(idx.fqn, []).append((tuple(idx.offset), size, info))
        self._starts: dict[str, tuple[list[int], int]] = {}
        for key, cs in self.chunks.items():
            cs.sort(key=lambda c: c[0])
            self._starts[key] = ([c[0][0] if c[0] else 0 for c in cs], max((c[1][0] if c[1] else 1) for c in cs))
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._read = ByteCount()

    def units(self, entries: list[Entry]) -> list[Unit]:
        units = [Unit("tensors", [e for e in entries if e.kind.megatron and e.kind.sources and not e.replica],
                      ordered=False)]
        return units + (heads_units(entries, ordered=False) if self.heads is not None else [])

    def _meta(self, key: str, want: tuple[int, ...], vocab_rows: bool) -> dcp_md.TensorStorageMetadata:
        md = self.index.state_dict_metadata.get(key)
        if not isinstance(md, dcp_md.TensorStorageMetadata):
            raise StepconvError(f"{self.itdir}: {key} is missing from the checkpoint (.metadata has no such tensor)")
        have = tuple(md.size)
        if len(have) != len(want) or any(h != w for i, (h, w) in enumerate(zip(have, want))
                                         if not (vocab_rows and i == 0 and h >= w)):
            raise StepconvError(f"{self.itdir}: {key} has global shape {list(have)}, expected {list(want)}")
        if not md.properties.dtype.is_floating_point:
            raise StepconvError(f"{self.itdir}: {key} is {md.properties.dtype}; expected floating-point weights")
        return md

    def read(self, entry: Entry) -> list[torch.Tensor]:
        if not entry.kind.megatron:
            return [read_head(self.heads, entry, self.meta)]
        ps = pieces(entry, self.spec, self.num_experts)
        if entry.kind is QKVG_ and ps[0].key not in self.index.state_dict_metadata:
            return [self._fused_qkvg(entry, ps[0].key.removesuffix("._qkv"))]
        shape = entry.kind.rank_shape(entry.source_shapes, entry.ctx, 0)
        mds = [self._meta(p.key, p.global_shape, entry.kind.name == "vocab") for p in ps]
        dtype = mds[0].properties.dtype
        if self.meta:
            return [torch.empty(shape, dtype=dtype, device="meta")]
        covered = sum(p.rows.stop - p.rows.start for p in ps)
        t = (torch.empty if covered == shape[0] else torch.zeros)(shape, dtype=dtype)  # (zeros: vocab pad rows)
        for p in ps:
            into = t[p.rows]
            self.region(p.key, p.offsets, out=into.unsqueeze(0) if entry.expert is not None else into)
        return [t]

    def _fused_qkvg(self, entry: Entry, key: str) -> torch.Tensor:
        """A gate fused into `linear_qkv.weight` per saving TP rank (stepconv's model on released megatron-core):
        the global tensor is the saving ranks' [qkv_r; gate_r] one after another."""
        tp = self.saved_tp
        rows = entry.kind.rank_shape(entry.source_shapes, SplitContext(tp, entry.ctx.attn), 0)[0]
        cols = entry.source_shapes[0][1]
        md = self._meta(key, (tp * rows, cols), False)
        if self.meta:
            return torch.empty(entry.kind.rank_shape(entry.source_shapes, entry.ctx, 0), dtype=md.properties.dtype,
                               device="meta")
        whole = self.region(key, (0, 0), out=torch.empty(tp * rows, cols, dtype=md.properties.dtype))
        qkvg = QKVG_.merge(list(whole.chunk(tp)), SplitContext(tp, entry.ctx.attn))
        return QKVG_.split(list(qkvg), entry.ctx, 0)

    def region(self, key: str, offsets: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
        """Fill `out` with the box of global tensor `key` at `offsets` (of `out`'s shape) from the chunks that
        overlap it; `out` may be a view of the caller's tensor, so nothing is copied twice."""
        sizes = tuple(out.shape)
        covered = 0
        chunks = self.chunks.get(key, [])
        starts, longest = self._starts.get(key, ([], 1))
        first = bisect.bisect_left(starts, (offsets[0] if offsets else 0) - longest + 1)
        end = (offsets[0] + sizes[0]) if offsets else 1
        for c_off, c_size, info in chunks[first:bisect.bisect_left(starts, end)]:
            lo = [max(a, b) for a, b in zip(offsets, c_off)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, c_off, c_size)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            chunk = self._load(key, info, c_size)
            src = chunk[tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, c_off))]
            out[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offsets))] = src
            covered += src.numel()
            del chunk
        if covered != out.numel():
            raise StepconvError(f"{self.itdir}: {key}: the chunks in .metadata cover {covered} of the {out.numel()} "
                                f"elements at offsets {list(offsets)} (overlapping or missing chunks)")
        return out

    def _load(self, key: str, info: _StorageInfo, size: tuple) -> torch.Tensor:
        with self._lock:
            fd = self._fds.get(info.relative_path)
            if fd is None:
                fd = self._fds[info.relative_path] = os.open(self.itdir / info.relative_path, os.O_RDONLY)
        self._read.add(info.length)
        blob = os.pread(fd, info.length, info.offset)
        check_zip_sizes(self.itdir / info.relative_path, len(blob), io.BytesIO(blob))
        try:
            try:  # (the same tensor as torch.load's, ~3x faster; anything unusual: torch.load, as before)
                t = fast_load.load_bytes(blob)
            except fast_load.GiveUp:
                t = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read a blob is a corrupt file, reported as one line
            raise StepconvError(f"{self.itdir / info.relative_path}: {key}: corrupt chunk at byte {info.offset} "
                                f"({str(e).splitlines()[0]})") from None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(size):
            raise StepconvError(f"{self.itdir / info.relative_path}: {key}: chunk at byte {info.offset} holds "
                                f"{getattr(t, 'shape', type(t).__name__)}, .metadata says {list(size)}")
        return t


def detect_spec(index: dcp_md.Metadata) -> str:
    """TE keeps MoE layers' pre-MLP norm as `pre_mlp_layernorm`; the local spec maps it to linear_fc1's."""
    return "te" if any(k.endswith(".pre_mlp_layernorm.weight") for k in index.state_dict_metadata) else "local"
