"""HF <-> Megatron conversions: walk the plan, stream tensors, audit, publish atomically."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from . import __version__, layout as L
from .config import DTYPE_NAMES, DTYPES, SAFETENSORS_DTYPES, Step35Config, StepconvError
from .hf_io import (HFCheckpoint, SafetensorsWriter, TensorInfo, copy_files, parse_size, plan_shards,
                    read_safetensors_tensor, shard_name, write_index, _names)
from .mapping import Entry, Layout, detect_mtp_block, detect_spec, hf_shapes, plan, rank_keys
from .memory import fixed_mmap_threshold
from .megatron_io import (RANK_FILE, RankFileWriter, iteration_dir_name, load_rank_file, rank_dir_name, rank_dir_problems,
                          read_tracker,
                          mapped_range, release_range, write_tracker)

SIDECAR = "stepconv"
EXTRA_STATE = "._extra_state"
RELEASE_EVERY = 64 << 20  # bytes read from mapped rank files between releases of their pages
MTP_HEADS = "mtp_heads.safetensors"
Progress = Callable[[int, str], None]


@dataclass
class Summary:
    direction: str
    source: Path
    output: Path
    layout: Layout
    spec: str
    files: int = 0
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.bytes_written / self.seconds / 1e6 if self.seconds else 0.0
        out = [
            f"{self.direction}: {self.source} -> {self.output}",
            f"  layout   {self.layout} ({self.layout.tp * self.layout.pp * self.layout.ep} rank files), spec {self.spec}",
            f"  wrote    {self.files} files, {self.tensors} tensors, {_gb(self.bytes_written)}"
            f" (read {_gb(self.bytes_read)}) in {self.seconds:.1f} s ({rate:.0f} MB/s)",
        ]
        out += [f"  note     {n}" for n in self.notes]
        return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


@contextmanager
def staging(out: Path, overwrite: bool, resume: bool = False) -> Iterator[Path]:
    """Build in `<out>.partial`, rename into place only when complete.

    On an error the partial folder is removed, except with `resume`, where it is kept for the next
    `--resume` run (a kill -9 keeps it anyway; nothing in it carries a final name until complete).
    """
    if out.exists() and not overwrite:
        raise StepconvError(f"{out}: already exists; pass --overwrite to replace it or -o to choose another folder")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not resume:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _check_distinct(src: Path, out: Path) -> None:
    s, o = src.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        raise StepconvError(f"output {out} must not be the input folder {src} or inside it")


# --- HF -> Megatron --------------------------------------------------------------------------
def check_hf_tensors(ckpt: HFCheckpoint) -> None:
    """Every tensor the config implies, nothing else, each with the right shape and a float dtype."""
    want = hf_shapes(ckpt.config)
    have = ckpt.tensors
    missing = [n for n in want if n not in have]
    unexpected = sorted(n for n in have if n not in want)
    if missing:
        raise StepconvError(f"{ckpt.path}: {len(missing)} tensor(s) missing for this config: {_names(missing)}")
    if unexpected:
        raise StepconvError(f"{ckpt.path}: {len(unexpected)} unexpected tensor(s) not in the Step-3.5 layout for this "
                            f"config: {_names(unexpected)}")
    bad = [f"{n} {list(have[n].shape)} (expected {list(s)})" for n, s in want.items() if tuple(have[n].shape) != s]
    if bad:
        raise StepconvError(f"{ckpt.path}: {len(bad)} tensor(s) with wrong shape: {_names(bad, 4)}")
    nonfloat = [n for n in want if not have[n].dtype.is_floating_point]
    if nonfloat:
        raise StepconvError(f"{ckpt.path}: non-float tensor(s) {_names(nonfloat)}; expected bf16/fp16/fp32 weights")


def _replicate_merge(entry: Entry, shards: Sequence[torch.Tensor], vocab: int) -> tuple[torch.Tensor, ...]:
    for r, s in enumerate(shards[1:], 1):
        if not torch.equal(s, shards[0]):
            raise StepconvError(f"{entry.key}: replicated tensor differs between TP rank 0 and TP rank {r}")
    return (L.replicate_merge(shards),)


# kind -> (split(entry, sources, tp, rank, padded_vocab) -> rank tensor, merge(entry, shards, vocab) -> HF tensors)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "replicate": (lambda e, s, tp, r, pv: L.replicate_split(s[0], tp, r), _replicate_merge),
    "column": (lambda e, s, tp, r, pv: L.column_split(s[0], tp, r), lambda e, sh, v: (L.column_merge(sh),)),
    "row": (lambda e, s, tp, r, pv: L.row_split(s[0], tp, r), lambda e, sh, v: (L.row_merge(sh),)),
    "vocab": (lambda e, s, tp, r, pv: L.vocab_split(s[0], tp, r, pv), lambda e, sh, v: (L.vocab_merge(sh, v),)),
    "swiglu": (lambda e, s, tp, r, pv: L.swiglu_split(s[0], s[1], tp, r), lambda e, sh, v: L.swiglu_merge(sh)),
    "qkvg": (lambda e, s, tp, r, pv: L.qkvg_split(*s, e.attn, tp, r), lambda e, sh, v: L.qkvg_merge(sh, e.attn)),
}
TRANSFORMS["expert_fc1"] = TRANSFORMS["swiglu"]  # one expert's [gate; up], read as one slice of each stack
TRANSFORMS["expert_fc2"] = TRANSFORMS["row"]


def split_entry(entry: Entry, srcs: Sequence[L.Sliceable], tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
    return TRANSFORMS[entry.kind][0](entry, srcs, tp, rank, padded_vocab)


def merge_entry(entry: Entry, shards: Sequence[torch.Tensor], vocab: int) -> tuple[torch.Tensor, ...]:
    return TRANSFORMS[entry.kind][1](entry, shards, vocab)


def _read_sources(ckpt: HFCheckpoint, entry: Entry) -> list[torch.Tensor]:
    if entry.expert is not None:
        return [ckpt.lazy(h)[entry.expert] for h in entry.hf]
    return [ckpt.lazy(h)[:] for h in entry.hf]


def _entry_source_bytes(ckpt: HFCheckpoint, entry: Entry) -> int:
    n = 0
    for h in entry.hf:
        i = ckpt.tensors[h]
        n += i.nbytes // i.shape[0] if entry.expert is not None else i.nbytes
    return n


@dataclass
class Unit:
    """Rank files written together: one PP stage x one EP rank (all its TP ranks), or the MTP-head sidecar.

    Units are independent: each can run on its own thread, and each is journaled when complete so
    that `--resume` skips it. A non-expert tensor is consumed (for the audit) by the EP-rank-0 unit.
    """

    name: str
    stage: int
    ep: int | None  # None: the sidecar unit
    entries: list[Entry]
    outputs: list[str]  # paths relative to the output root
    peak_bytes: int = 0


def _units(ckpt: HFCheckpoint, entries: list[Entry], lay: Layout) -> list[Unit]:
    units = []
    side = [e for e in entries if e.kind == "sidecar"]
    if side:
        units.append(Unit("mtp-heads", lay.pp - 1, None, side, [f"{SIDECAR}/{MTP_HEADS}"]))
    for stage in range(lay.pp):
        for p in range(lay.ep):
            es = [e for e in entries if e.pp == stage and e.kind != "sidecar" and (e.ep is None or e.ep == p)]
            outs = [f"release/{rank_dir_name(t, stage, p, lay.pp, lay.ep)}/{RANK_FILE}" for t in range(lay.tp)]
            units.append(Unit(f"stage {stage} ep {p}", stage, p, es, outs))
    for u in units:  # the entry being split and its TP shards, plus the batch read ahead (at worst one such entry)
        u.peak_bytes = 3 * max((_entry_source_bytes(ckpt, e) for e in u.entries), default=0) + 2 * READ_AHEAD_BYTES
    return units


class Journal:
    """`<out>.partial/.stepconv-journal.json`: which units are complete, and what each consumed."""

    NAME = ".stepconv-journal.json"

    def __init__(self, root: Path, fingerprint: str):
        self.path = root / self.NAME
        self.fingerprint = fingerprint
        self.done: dict[str, dict] = {}
        self.lock = threading.Lock()

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        if data.get("fingerprint") == self.fingerprint:
            self.done = data.get("done", {})

    def complete(self, unit: Unit, consumed: Counter) -> None:
        with self.lock:
            self.done[unit.name] = {"outputs": unit.outputs, "consumed": dict(consumed)}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done}))
            os.replace(tmp, self.path)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The converter builds no reference cycles; the collector's passes over a large plan cost ~5% of the time."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def default_max_memory() -> int:
    """Half the machine's RAM."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


READ_AHEAD_BYTES = 32 << 20  # sources read per batch on the reader thread


def _read_ahead(ckpt: HFCheckpoint, entries: Sequence[Entry]) -> Iterator[tuple[Entry, list[torch.Tensor]]]:
    """Yield (entry, its source tensors) while a second thread reads the next batch of entries' sources,
    so disk reads overlap the splitting and writing. Batches (up to READ_AHEAD_BYTES, or one larger
    entry) keep the thread hand-off off the per-expert hot path; two batches are in memory at most."""
    batches: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = 0 if e.kind == "extra" else _entry_source_bytes(ckpt, e)
        if batches[-1] and size + n > READ_AHEAD_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(e)
        size += n

    def load(batch: list[Entry]) -> list[list[torch.Tensor]]:
        return [[] if e.kind == "extra" else _read_sources(ckpt, e) for e in batch]

    if not entries:
        return
    with ThreadPoolExecutor(max_workers=1) as reader:
        nxt = reader.submit(load, batches[0])
        for i, batch in enumerate(batches):
            loaded = nxt.result()
            if i + 1 < len(batches):
                nxt = reader.submit(load, batches[i + 1])
            for k, entry in enumerate(batch):
                srcs, loaded[k] = loaded[k], None
                yield entry, srcs
                del srcs


def _run_unit(unit: Unit, ckpt: HFCheckpoint, root: Path, lay: Layout, args, padded: int,
              target: torch.dtype | None, progress: Progress | None, lock: threading.Lock) -> tuple[Counter, int, int]:
    consumed: Counter = Counter()
    tp = lay.tp
    if unit.ep is None:
        infos = [TensorInfo(e.hf[0], MTP_HEADS, ckpt.tensors[e.hf[0]].dtype, ckpt.tensors[e.hf[0]].shape)
                 for e in unit.entries]
        final = root / unit.outputs[0]
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        heads = SafetensorsWriter(tmp, infos)
        for e in unit.entries:
            t = _read_sources(ckpt, e)[0]
            heads.write(e.hf[0], 0, t)
            consumed[e.hf[0]] += t.numel()
            if progress:
                with lock:
                    progress(t.numel() * t.element_size(), e.hf[0])
        incomplete = heads.close()
        if incomplete:
            raise StepconvError(f"internal audit: MTP heads not fully written: {_names(incomplete)}")
        os.replace(tmp, final)
        return consumed, heads.bytes_written, 0
    writers = [RankFileWriter(root / o) for o in unit.outputs]
    for entry, srcs in _read_ahead(ckpt, unit.entries):
        if entry.kind == "extra":
            for w in writers:
                w.add(entry.key, None)
            continue
        if not entry.replica and (entry.ep is not None or unit.ep == 0):
            for h, t in zip(entry.hf, srcs):
                consumed[h] += t.numel()
        for t, w in enumerate(writers):
            shard = split_entry(entry, srcs, tp, t, padded)
            if entry.key.endswith("expert_bias"):
                shard = shard.float()  # megatron keeps the router expert bias in fp32
            elif target is not None:
                shard = shard.to(target)
            w.add(entry.key, shard)
        if progress:
            with lock:
                progress(sum(x.numel() * x.element_size() for x in srcs), entry.key)
        del srcs
    want = [e.key for e in unit.entries]
    written, tensors = 0, 0
    for w in writers:
        if list(w.model) != want:
            missing = [k for k in want if k not in w.model]
            raise StepconvError(f"internal audit: {w.path} is missing {_names(missing)}")
        w.finish(args)
        written += w.bytes_written
        tensors += sum(v is not None for v in w.model.values())
    return consumed, written, tensors


def _fingerprint(ckpt: HFCheckpoint, **options) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for f in sorted({i.file for i in ckpt.tensors.values()}):
        st = (ckpt.path / f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((ckpt.path / "config.json").read_bytes())
    return h.hexdigest()


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, tp: int = 1, pp: int = 1,
                ep: int = 1, spec: str = "te", dtype: str = "keep", overwrite: bool = False,
                window_convention: str = "hf", resume: bool = False, max_memory: int | None = None,
                jobs: int | None = None, progress: Progress | None = None) -> Summary:
    """Convert a HF folder to Megatron legacy rank files; see `stepconv hf-to-mcore --help`."""
    t0 = time.time()
    fixed_mmap_threshold()
    ckpt = HFCheckpoint(hf_dir)
    cfg = ckpt.config
    if dtype != "keep" and dtype not in DTYPES:
        raise StepconvError(f"--dtype must be keep, bf16 or fp32; got {dtype!r}")
    if window_convention not in ("hf", "megatron"):
        raise StepconvError(f"window convention must be hf or megatron; got {window_convention!r}")
    cfg.validate_parallel(tp, pp, ep)
    check_hf_tensors(ckpt)
    lay = Layout(tp, pp, ep)
    entries = plan(cfg, lay, spec)
    out = Path(out_dir) if out_dir else ckpt.path.with_name(ckpt.path.name + "-mcore")
    _check_distinct(ckpt.path, out)

    target = DTYPES.get(dtype)
    params_dtype = target or cfg.torch_dtype()
    source_dtypes = {n: DTYPE_NAMES[i.dtype] for n, i in ckpt.tensors.items()}
    meta = {"version": __version__, "spec": spec, "dtype": dtype, "source_dtypes": source_dtypes,
            "iteration": "release", "mtp_heads": MTP_HEADS if cfg.num_mtp else None,
            "sliding_window_convention": window_convention}
    args = cfg.megatron_args(tp=tp, pp=pp, ep=ep, params_dtype=params_dtype, spec=spec,
                             window_convention=window_convention, extra={"stepconv": meta})
    padded = cfg.padded_vocab(tp)
    summary = Summary("hf-to-mcore", ckpt.path, out, lay, spec)
    units = _units(ckpt, entries, lay)
    budget = max_memory if max_memory is not None else default_max_memory()
    biggest = max(u.peak_bytes for u in units)
    if budget < biggest:
        raise StepconvError(f"--max-memory {budget / 2**30:.2f} GiB is below the largest tensor working set "
                            f"{biggest / 2**30:.2f} GiB; allow at least that much")
    workers = max(1, min(jobs or os.cpu_count() or 1, len(units), budget // max(biggest, 1)))
    fingerprint = _fingerprint(ckpt, tp=tp, pp=pp, ep=ep, spec=spec, dtype=dtype, window=window_convention,
                               version=__version__)

    with staging(out, overwrite, resume=resume) as tmp:
        journal = Journal(tmp, fingerprint)
        if resume:
            journal.load()
        todo, consumed, skipped = [], Counter(), 0
        for u in units:
            done = journal.done.get(u.name)
            if done and all((tmp / o).exists() for o in u.outputs):
                consumed.update(done["consumed"])
                skipped += 1
            else:
                todo.append(u)
        lock = threading.Lock()

        @gc_paused()
        def run(u: Unit):
            c, written, tensors = _run_unit(u, ckpt, tmp, lay, args, padded, target, progress, lock)
            journal.complete(u, c)
            return c, written, tensors

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for c, written, tensors in pool.map(run, todo):
                consumed.update(c)
                summary.bytes_written += written
                summary.tensors += tensors
        # every element of every source tensor consumed exactly once, judged against the files, not the plan
        wrong = sorted(f"{n} ({consumed[n]}/{i.nbytes // i.dtype.itemsize} elements)" for n, i in ckpt.tensors.items()
                       if consumed[n] != i.nbytes // i.dtype.itemsize)
        if wrong or set(consumed) - set(ckpt.tensors):
            raise StepconvError(f"audit failed, not publishing: source tensors not consumed exactly once: {_names(wrong)}")
        expected = rank_keys(entries, lay)
        write_tracker(tmp, "release")
        copy_files(ckpt.extra_files(), tmp / SIDECAR / "hf_files")
        (tmp / SIDECAR / "config.json").write_text(json.dumps(cfg.raw, indent=2) + "\n")
        manifest = {"stepconv": __version__, "layout": {"tp": tp, "pp": pp, "ep": ep}, "spec": spec,
                    "padded_vocab_size": padded, "rank_files": {rank_dir_name(t, p, e, pp, ep): len(expected[(t, p, e)])
                                                                for (t, p, e) in lay.ranks()}}
        (tmp / SIDECAR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / Journal.NAME).unlink(missing_ok=True)
        summary.files = sum(len(u.outputs) for u in units)
    summary.bytes_read = ckpt.bytes_read
    summary.seconds = time.time() - t0
    if cfg.num_mtp:
        summary.notes.append(f"{cfg.num_mtp} MTP shared_head.output tensor(s) have no Megatron slot (MTP shares "
                             f"output_layer); kept bit-exact in {SIDECAR}/{MTP_HEADS} for mcore-to-hf")
    if padded != cfg.vocab:
        summary.notes.append(f"vocab {cfg.vocab} padded to {padded} (make_vocab_size_divisible_by 128 x TP {tp})")
    summary.notes.append(f"{workers} worker thread(s) within --max-memory {budget / 2**30:.1f} GiB "
                         f"(largest working set {biggest / 2**20:.0f} MiB)"
                         + (f"; resumed, {skipped} of {len(units)} unit(s) already complete" if resume else ""))
    return summary


# --- Megatron -> HF --------------------------------------------------------------------------
def _args_layout(args, path: Path) -> Layout:
    try:
        return Layout(int(args.tensor_model_parallel_size), int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
                      int(getattr(args, "expert_model_parallel_size", 1) or 1))
    except (AttributeError, TypeError, ValueError):
        raise StepconvError(f"{path}: args lack tensor_model_parallel_size; not a Megatron checkpoint") from None


def mcore_to_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                iteration: str | int | None = None, hf_config: str | os.PathLike | None = None,
                max_shard_size: str = "5GB", overwrite: bool = False, jobs: int | None = None,
                progress: Progress | None = None) -> Summary:
    t0 = time.time()
    fixed_mmap_threshold()
    root = Path(mcore_dir)
    if not root.is_dir():
        raise StepconvError(f"{root}: not a directory; expected a Megatron checkpoint folder")
    it = str(iteration) if iteration is not None else read_tracker(root)
    itdir = root / iteration_dir_name(it if it == "release" else int(it))
    if not itdir.is_dir():
        raise StepconvError(f"{itdir}: iteration folder not found (available: "
                            f"{', '.join(p.name for p in root.iterdir() if p.is_dir()) or 'none'})")
    rank_dirs = sorted(p.name for p in itdir.iterdir() if p.name.startswith("mp_rank_"))
    if not rank_dirs:
        raise StepconvError(f"{itdir}: no mp_rank_* folders; expected a legacy (--ckpt-format torch) checkpoint")
    first = load_rank_file(itdir / rank_dirs[0] / RANK_FILE)
    args = first.get("args")
    lay = _args_layout(args, itdir / rank_dirs[0] / RANK_FILE)
    tp, pp, ep = lay.tp, lay.pp, lay.ep
    problems = rank_dir_problems(itdir, tp, pp, ep)
    if problems:
        raise StepconvError(problems[0])
    cfg = Step35Config.from_megatron_args(args, str(itdir), hf_config)
    meta = getattr(args, "stepconv", None) or {}
    cfg.validate_parallel(tp, pp, ep)
    keys0 = list(first["model"])
    spec = detect_spec(keys0)
    last_keys = keys0 if pp == 1 else list(load_rank_file(itdir / rank_dir_name(0, pp - 1, 0, pp, ep) / RANK_FILE)["model"])
    mtp_block = detect_mtp_block(last_keys)
    entries = plan(cfg, lay, spec, mtp_block)
    expected = rank_keys(entries, lay)
    out = Path(out_dir) if out_dir else root.with_name(root.name + "-hf")
    _check_distinct(root, out)
    max_bytes = parse_size(max_shard_size)

    # output tensors, in HF order, with their original dtypes
    src_dtypes = meta.get("source_dtypes") or {}
    default = cfg.torch_dtype()
    infos = []
    for name, shape in hf_shapes(cfg).items():
        if name in src_dtypes:
            dt = SAFETENSORS_DTYPES[src_dtypes[name]]
        else:
            dt = torch.float32 if name.endswith("router_bias") else default
        infos.append(TensorInfo(name, "", dt, shape))
    shards = plan_shards(infos, max_bytes)
    head_names = [e.hf[0] for e in entries if e.kind == "sidecar"]
    sidecar_file = root / SIDECAR / MTP_HEADS
    use_sidecar = bool(head_names) and sidecar_file.exists() and str(meta.get("iteration")) == it
    summary = Summary("mcore-to-hf", root, out, lay, spec)
    v = cfg.vocab
    workers = max(1, jobs or os.cpu_count() or 1)  # each holds one entry's TP shards and its merge
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(sum(i.nbytes for i in infos))

    with staging(out, overwrite) as tmp:
        writers: dict[str, SafetensorsWriter] = {}
        files = []
        for k, shard in enumerate(shards):
            w = SafetensorsWriter(tmp / shard_name(k, len(shards)), shard)
            files.append(w)
            for t in shard:
                writers[t.name] = w
        info = {i.name: i for i in infos}
        progress_lock = threading.Lock()

        def put(name: str, tensor: torch.Tensor, index: int | None = None) -> None:
            tensor = tensor.to(info[name].dtype)
            off = 0 if index is None else index * tensor.numel() * tensor.element_size()
            writers[name].write(name, off, tensor)
            if progress:
                with progress_lock:
                    progress(tensor.numel() * tensor.element_size(), name)

        for stage in range(pp):
            models = {}
            for p in range(ep):
                for t in range(tp):
                    path = itdir / rank_dir_name(t, stage, p, pp, ep) / RANK_FILE
                    m = first["model"] if (t, stage, p) == (0, 0, 0) else load_rank_file(path)["model"]
                    # weights must match exactly; `_extra_state` entries carry none, and which modules have
                    # one depends on the TE version that saved the file, so they are neither required nor refused
                    want = {k for k in expected[(t, stage, p)] if not k.endswith(EXTRA_STATE)}
                    have = {k for k in m if not k.endswith(EXTRA_STATE)}
                    if have != want:
                        miss = sorted(want - have)
                        unexp = sorted(have - want)
                        raise StepconvError(f"{path}: keys do not match {lay} spec {spec}: "
                                            + (f"missing {_names(miss)}" if miss else "")
                                            + ("; " if miss and unexp else "")
                                            + (f"unexpected {_names(unexp)}" if unexp else ""))
                    models[(t, p)] = m
            ranges = [mapped_range(m) for m in models.values()]
            touched = [0]
            lock = threading.Lock()

            def export(entry: Entry, models=models, ranges=ranges, touched=touched, lock=lock, stage=stage) -> int:
                p = entry.ep if entry.ep is not None else 0
                parts = [models[(t, p)][entry.key] for t in range(tp)]
                for t, s in enumerate(parts):
                    if not isinstance(s, torch.Tensor):
                        path = itdir / rank_dir_name(t, stage, p, pp, ep) / RANK_FILE
                        raise StepconvError(f"{path}: {entry.key} is {type(s).__name__}, expected a tensor")
                merged = merge_entry(entry, parts, v)
                for name, tensor in zip(entry.hf, merged):
                    put(name, tensor, entry.expert)
                if entry.key == "output_layer.weight" and head_names and not use_sidecar:
                    for name in head_names:
                        put(name, merged[0])
                nbytes = sum(s.numel() * s.element_size() for s in parts)
                with lock:
                    touched[0] += nbytes
                    if touched[0] >= RELEASE_EVERY:
                        for lo, hi in ranges:
                            release_range(lo, hi)
                        touched[0] = 0
                return nbytes

            todo = [e for e in entries if e.pp == stage and e.kind not in ("extra", "sidecar")
                    and not (e.key == "embedding.word_embeddings.weight" and stage != 0)]  # skip the MTP stage's copy
            with ThreadPoolExecutor(max_workers=workers) as pool:
                summary.bytes_read += sum(pool.map(export, todo))
            del models
        if head_names:
            if use_sidecar:
                for name in head_names:
                    put(name, read_safetensors_tensor(sidecar_file, name))
                summary.notes.append(f"{len(head_names)} MTP shared_head.output tensor(s) restored bit-exact from "
                                     f"{SIDECAR}/{MTP_HEADS}")
            else:
                summary.notes.append(f"{len(head_names)} MTP shared_head.output tensor(s) set to output_layer "
                                     f"(Megatron's MTP shares it; no stepconv sidecar for iteration {it})")
        incomplete = []
        for w in files:
            incomplete += w.close()
            summary.bytes_written += w.bytes_written
        if incomplete:
            raise StepconvError(f"audit failed, not publishing: HF tensor(s) not fully written: {_names(incomplete)}")
        write_index(tmp, shards)
        (tmp / "config.json").write_text(json.dumps(cfg.raw, indent=2) + "\n")
        if (root / SIDECAR / "hf_files").is_dir():
            copy_files(sorted((root / SIDECAR / "hf_files").iterdir()), tmp)
        summary.files = len(shards)
        summary.tensors = len(infos)
    summary.seconds = time.time() - t0
    return summary
