"""HF <-> Megatron conversions: plan, run the plan through a reader and a writer (stepconv.engine), audit, publish.

`plan_import` / `plan_export` are the only places a conversion is planned; `stepconv inspect` runs the same
plans through dry-run writers, so what it reports is what these functions write.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .config import DTYPE_NAMES, DTYPES, SAFETENSORS_DTYPES, Step35Config, StepconvError, names_text
from .engine import (Progress, ReaderBase, Unit, WorkerPlan, default_max_memory, execute, gc_paused, in_processes,
                     plan_workers)
from .publish import Journal, audit_on_disk, staging
from .hf_io import (MAX_SIZE, GatherFile, HFCheckpoint, HFReader, HFWriter, TensorInfo, carried_files, copy_files,
                    hf_tensor_problems, parse_size)
from .mapping import SPECS, Entry, Layout, detect_mtp_block, detect_spec, hf_shapes, plan, rank_keys
from .memory import fixed_mmap_threshold
from .megatron_io import (HEADS_UNIT, MTP_HEADS, RANK_FILE, SIDECAR, IterationDir, LegacyReader, LegacyWriter,
                          load_rank_file, rank_dir_name, rank_dir_problems, rank_models, resolve_iteration,
                          write_tracker)

if TYPE_CHECKING:
    from .torch_dist import TorchDistReader, TorchDistWriter

WINDOW_CONVENTIONS = ("hf", "megatron")
FORMATS = ("torch", "torch_dist")
DTYPE_CHOICES = ("keep", *DTYPES)


@dataclass
class Summary:
    direction: str
    source: Path
    output: Path
    layout: Layout
    spec: str
    format: str = "torch"
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
            f"  layout   {self.layout}, spec {self.spec}, format {self.format}"
            + (f" ({len(self.layout.ranks())} rank files)" if self.format == "torch" else " (global keys)"),
            f"  wrote    {self.files} files, {self.tensors} tensors, {_gb(self.bytes_written)}"
            f" (read {_gb(self.bytes_read)}) in {self.seconds:.1f} s ({rate:.0f} MB/s)",
        ]
        out += [f"  note     {n}" for n in self.notes]
        return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _check_distinct(src: Path, out: Path) -> None:
    s, o = src.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        raise StepconvError(f"output {out} must not be the input folder {src} or inside it")


def _options(cls, options: dict[str, Any]):
    """`cls(**options)`, naming the valid options when one is unknown (a library caller's typo)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    return cls(**options)


# --- HF -> Megatron --------------------------------------------------------------------------
@dataclass(frozen=True)
class ImportOptions:
    """What `hf-to-mcore` writes (`stepconv hf-to-mcore --help` explains each) and how it runs."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    spec: str = "te"
    dtype: str = "keep"
    window_convention: str = "hf"
    overwrite: bool = False
    resume: bool = False
    max_memory: int | None = None  # bytes for parallel work (default half the RAM)
    jobs: int | None = None  # most units at once (default the CPU count)
    format: str = "torch"  # torch (legacy per-rank files) | torch_dist (global keys)
    etp: int | None = None  # expert_tensor_parallel_size (None: = tp)
    pp_first: int | None = None  # decoder_first_pipeline_num_layers (None: an even share)
    pp_last: int | None = None  # decoder_last_pipeline_num_layers
    vpp: int | None = None  # virtual pipeline stages per PP rank (None: none)
    processes: bool = True  # units in forked worker processes where fork exists (False: threads of this process)

    @classmethod
    def of(cls, options: dict[str, Any]) -> "ImportOptions":
        return _options(cls, options)

    @classmethod
    def for_layout(cls, layout: Layout, **options: Any) -> "ImportOptions":
        """Options that write `layout` (and `options`)."""
        return cls.of({**layout_options(layout), **options})

    @property
    def layout(self) -> Layout:
        return Layout(self.tp, self.pp, self.ep, self.etp, self.pp_first, self.pp_last, self.vpp)

    @property
    def resumable(self) -> bool:
        """Legacy rank files: each unit is journaled (its files digested as written) and `--resume` reuses it. A
        torch_dist run writes its index at the end: nothing to resume, so no journal is written and no digest kept."""
        return self.format != "torch_dist"

    def problems(self, cfg: Step35Config) -> list[str]:
        """Every invalid option, one line each with the valid values."""
        out = self.layout.problems(cfg, legacy=self.format == "torch")
        if self.spec not in SPECS:
            out.append(f"--spec must be one of {', '.join(SPECS)}; got {self.spec!r}")
        if self.dtype not in DTYPE_CHOICES:
            out.append(f"--dtype must be keep, bf16 or fp32; got {self.dtype!r}")
        if self.window_convention not in WINDOW_CONVENTIONS:
            out.append(f"window convention must be hf or megatron; got {self.window_convention!r}")
        if self.format not in FORMATS:
            out.append(f"--format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        elif self.resume and not self.resumable:
            out.append("--resume works with --format torch; a torch_dist run writes its index at the end, start it again")
        return out


def layout_options(layout: Layout) -> dict[str, int | None]:
    """`layout` as ImportOptions fields (also the manifest's "layout" record)."""
    return dict(tp=layout.tp_size, pp=layout.pp_size, ep=layout.ep_size, etp=layout.etp_size,
                pp_first=layout.pp_first, pp_last=layout.pp_last, vpp=layout.vpp_size)


def reshard_layout(src: Layout, options: dict[str, Any]) -> dict[str, int | None]:
    """The layout options a reshard keeps from its source when `options` do not name them. ETP follows a new --tp
    when the source's ETP followed its TP; the pipeline's shape (--pp-first, --pp-last, --vpp) is the source's only
    while --pp is."""
    out = layout_options(src)
    if src.etp_size == src.tp_size:
        out["etp"] = None
    if "pp" in options:
        out.update(pp_first=None, pp_last=None, vpp=None)
    return out


@dataclass
class ImportPlan:
    cfg: Step35Config
    options: ImportOptions
    source_dtypes: dict[str, torch.dtype]  # per HF tensor: the checkpoint's, or config torch_dtype without weights
    entries: list[Entry]
    args: Any  # argparse.Namespace written into every rank file

    @property
    def layout(self) -> Layout:
        """The layout the checkpoint is for (recorded in its args)."""
        return self.options.layout

    @property
    def target(self) -> torch.dtype | None:
        return DTYPES.get(self.options.dtype)

    def heads(self) -> list[TensorInfo]:
        """The MTP heads' sidecar file contents."""
        return [TensorInfo(h, MTP_HEADS, self.source_dtypes[h], s) for e in self.entries if not e.kind.megatron
                for h, s in zip(e.hf, e.hf_shapes)]

    def writer(self, root: Path, *, dry: bool = False) -> LegacyWriter | TorchDistWriter:
        if self.options.format == "torch_dist":
            from .torch_dist import TorchDistWriter  # (torch.distributed.checkpoint: +47 MB, only when used)

            return TorchDistWriter(root, self.entries, self.options.spec, self.cfg.num_experts, self.args, self.heads(),
                                   dry=dry)
        return LegacyWriter(root, self.layout, self.args, self.heads(), dry=dry)

    def step(self, entry: Entry, srcs: list[torch.Tensor]) -> list:
        """Sources -> one tensor per TP rank (ETP rank for a routed expert; or the sidecar tensor itself), in the
        entry's Megatron dtype."""
        if not entry.kind.megatron:
            return [srcs[0]]
        dt = entry.kind.out_dtype([s.dtype for s in srcs], self.target) if srcs else None
        if srcs and srcs[0].is_meta:  # dry run: the same split's shapes, computed once per signature
            return [_meta(entry.kind.rank_shape(entry.source_shapes, entry.ctx, r), dt)
                    for r in range(entry.ctx.tp_size)]
        # TP ranks (ETP ranks for a routed expert)
        return [t if t is None or t.dtype == dt else t.to(dt) for t in entry.kind.split_all(srcs, entry.ctx)]

    def cuttable(self, writer) -> bool:
        """Can the conversion cut rank-file groups in parts (`engine.cut_into`)? In worker processes, where the
        writer lays its files out ahead (`LegacyWriter.parts`), and the tensors average under PARTED_BELOW: at the
        real widths parts only added system CPU (16-core device, 11.85 GB, 16 parts at once: TP=2 9.16 -> 10.07 s,
        TP=4 9.47 -> 10.21 s, system CPU 9-10 -> 27-34 s)."""
        if not (self.options.processes and hasattr(writer, "parts")):
            return False
        es = [e for e in self.entries if e.kind.megatron and e.kind.sources]
        size = sum(math.prod(s) * self.source_dtypes[h].itemsize for e in es for h, s in zip(e.hf, e.source_shapes))
        return bool(es) and size < PARTED_BELOW * len(es)

    def workers(self, units: list[Unit], reader: HFReader, cuttable: bool = False) -> WorkerPlan:
        """One worker holds an entry's sources, its TP shards and the next such entry read ahead (3x the larger
        of sources and shards) plus two read-ahead batches. `cuttable`: units may run in parts (`engine.cut_into`),
        so the workers are not bounded by the units' count."""
        known: dict[tuple, int] = {}  # (HF names, one expert's slice?) -> bytes: the experts of a stack are alike

        def entry_bytes(e: Entry) -> int:
            n = known.get((e.hf, e.expert is None))
            if n is None:
                n = known[(e.hf, e.expert is None)] = bytes_of(e)
            return n

        def bytes_of(e: Entry) -> int:
            shape = e.rank_shape()
            if shape is None or not e.kind.megatron:
                return reader.source_bytes(e)
            dt = e.kind.out_dtype([self.source_dtypes[h] for h in e.hf], self.target)
            return max(reader.source_bytes(e), e.ctx.tp_size * math.prod(shape) * dt.itemsize)

        per_file = GatherFile.most_held(digest=self.options.resumable)  # (the resume digest holds gather buffers)

        def write_bytes(u: Unit) -> int:  # (the MTP-head sidecar is a safetensors file, not written behind)
            return 0 if u.name == HEADS_UNIT else len(u.outputs) * per_file

        return plan_workers(units, entry_bytes, factor=3, read_ahead=True, jobs=self.options.jobs,
                            budget=self.options.max_memory, write_bytes=write_bytes, cuttable=cuttable)


@lru_cache(maxsize=4096)
def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")  # shared: nobody writes to a meta tensor


def plan_import(cfg: Step35Config, source_dtypes: dict[str, torch.dtype], options: ImportOptions) -> ImportPlan:
    """The hf-to-mcore plan for `cfg` whose tensors have `source_dtypes`; raises the first invalid option."""
    problems = options.problems(cfg)
    if problems:
        raise StepconvError(problems[0])
    params_dtype = DTYPES.get(options.dtype) or cfg.torch_dtype()
    meta = {"version": __version__, "spec": options.spec, "dtype": options.dtype,
            "source_dtypes": {n: DTYPE_NAMES[d] for n, d in source_dtypes.items()}, "iteration": "release",
            "mtp_heads": MTP_HEADS if cfg.num_mtp else None, "sliding_window_convention": options.window_convention}
    extra: dict[str, Any] = {"stepconv": meta}
    if options.format == "torch_dist":
        extra.update(ckpt_format="torch_dist", use_dist_ckpt=True)
    args = cfg.megatron_args(tp=options.tp, pp=options.pp, ep=options.ep, params_dtype=params_dtype, spec=options.spec,
                             window_convention=options.window_convention, extra=extra, etp=options.etp,
                             pp_first=options.pp_first, pp_last=options.pp_last, vpp=options.vpp)
    write = options.layout if options.format == "torch" else Layout()
    return ImportPlan(cfg, options, source_dtypes, plan(cfg, write, options.spec), args)


def config_dtypes(cfg: Step35Config) -> dict[str, torch.dtype]:
    """Source dtypes when there are no weights to look at: config torch_dtype, a kind's own dtype (fp32 bias)."""
    return {h: e.kind.dtype or cfg.torch_dtype() for e in plan(cfg, Layout(), "local") for h in e.hf}


def _fingerprint(ckpt: HFCheckpoint, **options) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for f in sorted({i.file for i in ckpt.tensors.values()}):
        st = (ckpt.path / f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((ckpt.path / "config.json").read_bytes())
    return h.hexdigest()


@gc_paused()  # (plan, execute and finish: engine.gc_paused)
def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                progress: Progress | None = None, **options: Any) -> Summary:
    """Convert a HF folder to Megatron legacy rank files.

    `options` are `ImportOptions` fields (tp, pp, ep, etp, pp_first, pp_last, vpp, spec, dtype, window_convention,
    overwrite, resume, max_memory, jobs, format); `stepconv hf-to-mcore --help` explains each. Example:
    `hf_to_mcore("Step-3.5-Flash", "step35-tp4", tp=4, spec="local")`.
    """
    t0 = time.time()
    fixed_mmap_threshold()
    opts = ImportOptions.of(options)
    ckpt = HFCheckpoint(hf_dir)
    cfg = ckpt.config
    pl = plan_import(cfg, {n: i.dtype for n, i in ckpt.tensors.items()}, opts)  # (raises on a bad option)
    problems = hf_tensor_problems(ckpt.tensors, hf_shapes(cfg, pl.entries), ckpt.path)
    if problems:
        raise StepconvError(problems[0])
    out = Path(out_dir) if out_dir else ckpt.path.with_name(ckpt.path.name + "-mcore")
    _check_distinct(ckpt.path, out)
    # file_rows: sources that only move stay in their files, copied into the rank files (or the .distcp chunks)
    # by copy_file_range. Its peak RSS once grew with depth in tests/test_streaming.py
    # (4 -> 16 layers, TP=2 x EP=2): not per-record state but the read-ahead window, which a 4-layer unit never
    # filled; HFReader.read_ahead_bytes says what changed
    reader = HFReader(pl.source_dtypes, ckpt, file_rows=True)
    summary = Summary("hf-to-mcore", ckpt.path, out, pl.layout, opts.spec, opts.format)
    fingerprint = _fingerprint(ckpt, **layout_options(opts.layout), spec=opts.spec, dtype=opts.dtype,
                               window=opts.window_convention, version=__version__)

    with staging(out, opts.overwrite, resume=opts.resume) as tmp:
        writer = pl.writer(tmp)
        units = writer.units(pl.entries)
        cuttable = pl.cuttable(writer)
        workers = pl.workers(units, reader, cuttable=cuttable)
        journal = Journal(tmp, fingerprint, persist=opts.resumable)
        if opts.resume:
            journal.load()
        consumed, todo = _resumed(units, journal, tmp)
        got, results = execute(todo, reader, writer, pl.step, workers=workers.workers, progress=progress,
                               largest_bytes=workers.largest_bytes, unit_done=journal.complete,
                               processes=opts.processes,
                               meta=HFReader(pl.source_dtypes, meta=True) if cuttable else None)
        consumed.update(got)
        audit_on_disk(tmp, journal.sizes())  # what is on disk, not what was counted
        # every element of every source tensor consumed exactly once, judged against the files, not the plan
        _publish(tmp, pl, writer, units, results, consumed, {n: math.prod(i.shape) for n, i in ckpt.tensors.items()},
                 ckpt.extra_files(), summary)
        journal.remove()
    summary.bytes_read = ckpt.bytes_read
    summary.seconds = time.time() - t0
    summary.notes += import_notes(pl)
    kind = "process(es)" if in_processes(todo, workers.workers, opts.processes, cuttable) else "thread(s)"
    summary.notes.append(f"{workers.workers} worker {kind} within --max-memory "
                         f"{(opts.max_memory if opts.max_memory is not None else default_max_memory()) / 2**30:.1f} GiB "
                         f"(largest working set {workers.per_worker / 2**20:.0f} MiB)"
                         + (f"; resumed, {len(units) - len(todo)} of {len(units)} unit(s) already complete"
                            if opts.resume else ""))
    return summary


def _resumed(units: list[Unit], journal: Journal, root: Path) -> tuple[Counter, list[Unit]]:
    """Units a previous run completed (their consumption, for the audit) and the units still to do."""
    consumed, todo = Counter(), []
    for u in units:
        done = journal.reusable(u)  # (every output still exactly what the journal recorded, CRCs checked)
        if done:
            consumed.update(done["consumed"])
        else:
            journal.done.pop(u.name, None)
            todo.append(u)
    return consumed, todo


def import_notes(pl: ImportPlan) -> list[str]:
    cfg, notes = pl.cfg, []
    if cfg.num_mtp:
        notes.append(f"{cfg.num_mtp} MTP shared_head.output tensor(s) have no Megatron slot (MTP shares "
                     f"output_layer); kept bit-exact in {SIDECAR}/{MTP_HEADS} for mcore-to-hf")
    padded = cfg.padded_vocab(pl.layout.tp_size)
    if padded != cfg.vocab:
        notes.append(f"vocab {cfg.vocab} padded to {padded} (make_vocab_size_divisible_by 128 x TP {pl.layout.tp_size})")
    return notes


def _publish(root: Path, pl: ImportPlan, writer, units: list[Unit], results: list, consumed: Counter,
             elements: dict[str, int], extra_files: list[Path], summary: Summary) -> None:
    """After `execute`: the audit (each source element consumed exactly once), the writer's last files
    (torch_dist: index and metadata.json), the tracker and stepconv's sidecar; the summary's counts."""
    wrong = sorted(f"{n} ({consumed[n]}/{k} elements)" for n, k in elements.items() if consumed[n] != k)
    if wrong or set(consumed) - set(elements):
        raise StepconvError(f"audit failed, not publishing: source tensors not consumed exactly once: "
                            f"{names_text(wrong)}")
    finished = writer.finish() if hasattr(writer, "finish") else {}  # torch_dist: index and metadata last
    _write_sidecar(root, pl, extra_files)
    summary.files = sum(len(u.outputs) for u in units) + len(finished)
    summary.tensors = (sum(f.tensors for r in results for name, f in r.files.items() if name.endswith(RANK_FILE))
                       if not finished else len(writer.tensors))
    summary.bytes_written = sum(r.bytes_written for r in results) + sum(f.bytes for f in finished.values())


def _write_sidecar(root: Path, pl: ImportPlan, extra_files: list[Path]) -> None:
    lay = pl.layout
    write_tracker(root, "release")
    copy_files(extra_files, root / SIDECAR / "hf_files")
    (root / SIDECAR / "config.json").write_text(json.dumps(pl.cfg.raw, indent=2) + "\n")
    manifest = {"stepconv": __version__, "format": pl.options.format, "layout": layout_options(lay),
                "spec": pl.options.spec, "padded_vocab_size": pl.cfg.padded_vocab(lay.tp_size)}
    if pl.options.format == "torch":
        expected = rank_keys(pl.entries, lay)
        manifest["rank_files"] = {rank_dir_name(t, p, e, lay.pp_size, lay.ep_size):
                                  sum(map(len, expected[(t, p, e)].values())) for (t, p, e) in lay.ranks()}
    (root / SIDECAR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


# --- Megatron -> HF --------------------------------------------------------------------------
@dataclass
class ExportPlan:
    source: IterationDir
    cfg: Step35Config
    layout: Layout
    spec: str
    args: Any
    first: dict  # rank (0, 0, 0)'s file, loaded (mmap)
    entries: list[Entry]
    infos: list[TensorInfo]  # HF output tensors, in plan order, with their dtypes
    use_sidecar: bool  # MTP heads restored from stepconv's sidecar (same iteration) or copied from output_layer
    problems: list[str]  # rank folders missing or unexpected
    index: Any = None  # torch_dist: the DCP index (None: legacy rank files)

    @property
    def format(self) -> str:
        return "torch" if self.index is None else "torch_dist"

    @property
    def head_names(self) -> list[str]:
        return [e.hf[0] for e in self.entries if not e.kind.megatron]

    def reader(self, *, meta: bool = False, file_rows: bool = False) -> LegacyReader | TorchDistReader:
        """`file_rows`: rows that only move leave the rank files as `hf_io.FileRows` (for `HFWriter`)."""
        heads = self.source.root / SIDECAR / MTP_HEADS if self.use_sidecar else None
        if self.index is not None:
            from .torch_dist import TorchDistReader

            return TorchDistReader(self.source.path, self.index, self.spec, self.cfg.num_experts,
                                   saved_tp=self.layout.tp_size, meta=meta, heads=heads)
        return LegacyReader(self.source.path, self.layout, rank_keys(self.entries, self.layout), self.spec,
                            first=self.first, meta=meta, heads=heads, entries=self.entries, file_rows=file_rows)

    def step(self, entry: Entry, shards: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """TP shards -> (HF name, tensor) pairs; output_layer also fills the MTP heads when there is no sidecar."""
        merged = entry.kind.merge(shards, entry.ctx)
        pairs = list(zip(entry.hf, merged))
        if entry.key == "output_layer.weight" and not self.use_sidecar:
            pairs += [(n, merged[0]) for n in self.head_names]
        return pairs

    def workers(self, units: list[Unit], jobs: int | None) -> WorkerPlan:
        """One worker holds one entry's TP shards and the merged tensor (2x the larger of the two)."""
        itemsize = {i.name: i.dtype.itemsize for i in self.infos}

        def entry_bytes(e: Entry) -> int:
            shards = e.ctx.tp_size * math.prod(e.rank_shape() or ())
            return max(shards, sum(math.prod(s) for s in e.source_shapes)) * itemsize[e.hf[0]]

        return plan_workers(units, entry_bytes, factor=2, read_ahead=False,
                            jobs=jobs or min(os.cpu_count() or 1, EXPORT_JOBS), budget=None)

    def parted(self, units: list[Unit]) -> bool:
        """Are the entries small enough (PARTED_BELOW on average) for worker processes to pay?"""
        n = sum(len(u.entries) for u in units)
        return bool(n) and sum(i.nbytes for i in self.infos) < PARTED_BELOW * n


# Default most tensors merged at once (--jobs): past a few threads the merge and write work (Python per entry,
# holding the GIL; one HF file's writer shared) only contends. 16-core device, mcore-to-hf of TP=2, --jobs 16 / 8 /
# 4 / 2: 1/8 scale (6.8 GB) 13.3 / 12.9 / 12.3 / 11.5 s and, another instance, 19.0 / 17.0 / 13.0 / 14.1 s; real
# width (11.85 GB) 10.5 / - / 9.7 / 11.8 s with system CPU 25.2 / - / 10.0 / 7.6 s. Worker processes (where the
# entries are small, below) did no better past 4 either: --jobs 2 / 4 / 6 / 8 / 16 ran 9.41 / 7.64-9.61 / 9.13 /
# 9.31 / 8.68-10.07 s at 1/8, with system CPU rising from 4.9 to 12 s (each process faults in its own buffers).
EXPORT_JOBS = 4
# Entries merged in worker processes (in parts, `engine.parted`) only where they average below this: entries of a
# few hundred KB (1/8 width: 276 KB) are Python per entry, which processes run in parallel: the merge phase took
# 6.0 s in 4 threads, 3.9 s in 4 processes (16-core device, TP=2). Entries of MBs (real width: ~10 MB) are copies,
# where processes only add page faults: 9.35 s in threads vs 10.45 s in processes (means of 4 runs; system CPU
# ~12 vs 13-23 s), both under cp -r's 11-12 s.
PARTED_BELOW = 1 << 20


def plan_export(mcore_dir: str | os.PathLike, *, iteration: str | int | None = None,
                hf_config: str | os.PathLike | None = None) -> ExportPlan:
    """The mcore-to-hf plan: layout, spec and config from the checkpoint (its args, keys, stepconv metadata)."""
    src = resolve_iteration(mcore_dir, iteration)
    if (src.path / "metadata.json").is_file():  # how Megatron itself recognises torch_dist
        return _plan_export_dist(src, hf_config)
    rank_dirs = sorted(p.name for p in src.path.iterdir() if p.name.startswith("mp_rank_"))
    if not rank_dirs:
        raise StepconvError(f"{src.path}: no mp_rank_* folders; expected a legacy (--ckpt-format torch) checkpoint")
    first_path = src.path / rank_dirs[0] / RANK_FILE
    first = load_rank_file(first_path)
    args = first.get("args")
    lay = Layout.from_args(args, str(first_path))
    cfg = Step35Config.from_megatron_args(args, str(src.path), hf_config)
    invalid = lay.problems(cfg)
    if invalid:
        raise StepconvError(f"{first_path}: args record {lay}, invalid for this model: {invalid[0]}")
    problems = rank_dir_problems(src.path, lay)
    meta = recorded_meta(args, src.path)
    chunks = rank_models(first, lay, first_path)
    spec = detect_spec(chunks[0])
    last = src.path / rank_dir_name(0, lay.pp_size - 1, 0, lay.pp_size, lay.ep_size) / RANK_FILE
    last_keys = (list(chunks[-1]) if lay.pp_size == 1 or not last.exists()
                 else list(rank_models(load_rank_file(last), lay, last)[-1]))
    entries = plan(cfg, lay, spec, detect_mtp_block(last_keys))
    return ExportPlan(src, cfg, lay, spec, args, first, entries, _hf_infos(cfg, entries, meta),
                      _use_sidecar(src, entries, meta), problems)


def _plan_export_dist(src: IterationDir, hf_config) -> ExportPlan:
    """A torch_dist iteration: global keys, read as the TP=1 plan whatever layout saved it."""
    from .torch_dist import detect_spec as dist_spec, read_common, read_index

    common = read_common(src.path)
    args = common.get("args")
    lay = Layout.from_args(args, str(src.path / "common.pt"))
    cfg = Step35Config.from_megatron_args(args, str(src.path), hf_config)
    cfg.validate_parallel(lay.tp_size, lay.pp_size, lay.ep_size)
    index = read_index(src.path)
    meta = recorded_meta(args, src.path)
    spec = dist_spec(index)
    entries = plan(cfg, Layout(), spec)
    return ExportPlan(src, cfg, lay, spec, args, {}, entries, _hf_infos(cfg, entries, meta),
                      _use_sidecar(src, entries, meta), [], index)


def _hf_infos(cfg: Step35Config, entries: list[Entry], meta: dict) -> list[TensorInfo]:
    """The HF output tensors with their original dtypes (stepconv's record, else config torch_dtype / the kind's)."""
    src_dtypes = meta.get("source_dtypes") or {}
    if not isinstance(src_dtypes, dict):
        raise StepconvError(f"checkpoint args record source_dtypes as a {type(src_dtypes).__name__}; expected an "
                            f"object of tensor name -> BF16/F16/F32")
    kinds = {h: e.kind for e in entries for h in e.hf}
    return [TensorInfo(name, "", _recorded_dtype(None, name, src_dtypes[name]) if name in src_dtypes
                       else kinds[name].dtype or cfg.torch_dtype(), shape)
            for name, shape in hf_shapes(cfg, entries).items()]


def recorded_meta(args: Any, where: Path) -> dict:
    """stepconv's record in a checkpoint's args (empty for a Megatron training run's checkpoint), type-checked."""
    meta = getattr(args, "stepconv", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise StepconvError(f"{where}: args.stepconv is a {type(meta).__name__}; expected stepconv's record (an "
                            f"object), or none")
    return meta


RECORDED_DTYPES = ("BF16", "F16", "F32")  # the allow-list for dtypes a checkpoint's own metadata records


def _recorded_dtype(src, name: str, dtype: Any) -> torch.dtype:
    """A dtype stepconv recorded in a checkpoint's args: only a floating-point safetensors dtype is accepted."""
    dt = SAFETENSORS_DTYPES.get(dtype) if dtype in RECORDED_DTYPES else None
    if dt is None:
        raise StepconvError(f"checkpoint args record dtype {dtype!r} for {name}; expected one of BF16, F16, F32")
    return dt


def _use_sidecar(src: IterationDir, entries: list[Entry], meta: dict) -> bool:
    heads = any(not e.kind.megatron for e in entries)
    return heads and (src.root / SIDECAR / MTP_HEADS).exists() and str(meta.get("iteration")) == src.iteration


def check_hf(hf_dir: str | os.PathLike) -> HFCheckpoint:
    """A HF folder validated as hf-to-mcore validates it (headers, index, config, every tensor's name and shape);
    what `verify` runs on its reference folder."""
    ckpt = HFCheckpoint(hf_dir)
    problems = hf_tensor_problems(ckpt.tensors, hf_shapes(ckpt.config), ckpt.path)
    if problems:
        raise StepconvError(problems[0])
    return ckpt


def check_export(pl: ExportPlan) -> None:
    """The export run dry: every rank file's keys, every tensor's shape and dtype per rank (torch_dist: every chunk
    needed), checked exactly as mcore-to-hf checks them, no tensor byte read; raises the first problem. `verify`
    runs it before starting any rank, `inspect` runs the same reader and writer."""
    if pl.problems:
        raise StepconvError(pl.problems[0])
    reader = pl.reader(meta=True)
    writer = HFWriter(Path("."), pl.infos, MAX_SIZE, dry=True)
    execute(reader.units(pl.entries), reader, writer, pl.step)
    incomplete = writer.finish()
    if incomplete:
        raise StepconvError(f"{pl.source.path}: HF tensor(s) not covered by the checkpoint: {names_text(incomplete)}")


@dataclass(frozen=True)
class ExportOptions:
    """What `mcore-to-hf` reads and writes (`stepconv mcore-to-hf --help` explains each)."""

    iteration: str | int | None = None
    hf_config: str | os.PathLike | None = None
    max_shard_size: str = "5GB"
    overwrite: bool = False
    jobs: int | None = None  # tensors merged at once (default the CPU count, at most EXPORT_JOBS)
    dtype: str = "source"
    processes: bool = True  # small entries (PARTED_BELOW) in forked worker processes where fork exists

    @classmethod
    def of(cls, options: dict[str, Any]) -> "ExportOptions":
        opts = _options(cls, options)
        if opts.dtype not in EXPORT_DTYPES:
            raise StepconvError(f"--dtype must be {', '.join(EXPORT_DTYPES)}; got {opts.dtype!r}")
        return opts


# `source`: each HF tensor's own dtype as hf-to-mcore recorded it, else config.json's torch_dtype (a Megatron
# training run records none). After training in fp32 that rounds the trained weights to bf16 (seen on 2 x H100:
# verify then failed its fp32 gate, max|d| 2.1), so an export can ask for one dtype for every tensor instead.
EXPORT_DTYPES = ("source", *DTYPES)


def retyped(pl: "ExportPlan", dtype: str) -> "ExportPlan":
    """`pl` writing every HF tensor as `dtype` (a kind with a dtype of its own, the fp32 router bias, keeps it) and
    config.json saying so; `source` leaves `pl` as it is."""
    if dtype == "source":
        return pl
    target, kinds = DTYPES[dtype], {h: e.kind for e in pl.entries for h in e.hf}
    raw = dict(pl.cfg.raw, torch_dtype={"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype])
    return replace(pl, cfg=Step35Config.of(raw),
                   infos=[replace(i, dtype=kinds[i.name].dtype or target) for i in pl.infos])


def narrowing_note(pl: "ExportPlan") -> list[str]:
    """A note when the checkpoint stores wider floats than the export writes (fp32 training exported as bf16)."""
    stored = getattr(pl.args, "params_dtype", None)
    if not isinstance(stored, torch.dtype) or not stored.is_floating_point:
        return []
    narrower = sorted({DTYPE_NAMES[i.dtype] for i in pl.infos if i.dtype.itemsize < stored.itemsize})
    if not narrower:
        return []
    return [f"the checkpoint's weights are {DTYPE_NAMES[stored]} (args.params_dtype); written as "
            f"{'/'.join(narrower)} as the source recorded or config.json says, which rounds them unless they were "
            f"{'/'.join(narrower)} values; --dtype fp32 keeps them exact"]


@gc_paused()  # (plan, execute and finish: engine.gc_paused)
def mcore_to_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                progress: Progress | None = None, **options: Any) -> Summary:
    """Convert a Megatron legacy checkpoint back to a HF folder; TP/PP/EP and spec come from the checkpoint.

    `options` are `ExportOptions` fields (iteration, hf_config, max_shard_size, overwrite, jobs, dtype). Example:
    `mcore_to_hf("step35-tp4", "step35-hf", iteration=2000, hf_config="Step-3.5-Flash/config.json")`.
    """
    t0 = time.time()
    fixed_mmap_threshold()
    opts = ExportOptions.of(options)
    pl = retyped(plan_export(mcore_dir, iteration=opts.iteration, hf_config=opts.hf_config), opts.dtype)
    if pl.problems:
        raise StepconvError(pl.problems[0])
    root = pl.source.root
    out = Path(out_dir) if out_dir else root.with_name(root.name + "-hf")
    _check_distinct(root, out)
    max_bytes = parse_size(opts.max_shard_size)
    summary = Summary("mcore-to-hf", root, out, pl.layout, pl.spec, pl.format)
    reader = pl.reader(file_rows=True)
    units = reader.units(pl.entries)
    workers = pl.workers(units, opts.jobs)
    processes = opts.processes and pl.parted(units)
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(sum(i.nbytes for i in pl.infos))

    with staging(out, opts.overwrite) as tmp:
        writer = HFWriter(tmp, pl.infos, max_bytes)
        itemsize = {i.name: i.dtype.itemsize for i in pl.infos}  # progress: HF bytes written (the total set above)
        execute(units, reader, writer, pl.step, workers=workers.workers, progress=progress,
                largest_bytes=workers.largest_bytes, processes=processes,
                measure=lambda e, srcs, pairs: sum(t.numel() * itemsize[n] for n, t in pairs))
        summary.bytes_read = reader.bytes_read
        summary.notes += export_notes(pl) + narrowing_note(pl) + [
            f"{workers.workers} worker {'process(es)' if in_processes(units, workers.workers, processes) else 'thread(s)'}"]
        incomplete = writer.finish()
        if incomplete:
            raise StepconvError(f"audit failed, not publishing: HF tensor(s) not fully written: "
                                f"{names_text(incomplete)}")
        audit_on_disk(tmp, writer.file_sizes)
        summary.bytes_written = writer.bytes_written
        (tmp / "config.json").write_text(json.dumps(pl.cfg.raw, indent=2) + "\n")
        if (root / SIDECAR / "hf_files").is_dir():
            copy_files(carried_files(root / SIDECAR / "hf_files"), tmp)
        summary.files = len(writer.shards)
        summary.tensors = len(pl.infos)
    summary.seconds = time.time() - t0
    return summary


def export_notes(pl: ExportPlan) -> list[str]:
    n = len(pl.head_names)
    if not n:
        return []
    if pl.use_sidecar:
        return [f"{n} MTP shared_head.output tensor(s) restored bit-exact from {SIDECAR}/{MTP_HEADS}"]
    return [f"{n} MTP shared_head.output tensor(s) set to output_layer (Megatron's MTP shares it; no stepconv "
            f"sidecar for iteration {pl.source.iteration})"]


# --- Megatron -> Megatron --------------------------------------------------------------------------------
class MegatronSource(ReaderBase):
    """engine.Reader: a destination entry's HF tensors, merged from a Megatron checkpoint of any format and
    layout (the source plan's reader and `step`), so Megatron converts to Megatron without HF files between.
    Source and destination plans come from the same table, so an HF tensor (or one expert of it) is produced
    by exactly one source entry."""

    prefetch = True

    def __init__(self, src: ExportPlan, *, meta: bool = False):
        self.src, self.reader = src, src.reader(meta=meta)
        self.by_name: dict[tuple[str, int | None], Entry] = {}
        for e in src.entries:
            if not e.kind.sources or e.replica or (not e.kind.megatron and not src.use_sidecar):
                continue
            names = list(e.hf) + (src.head_names if e.key == "output_layer.weight" and not src.use_sidecar else [])
            for n in names:
                self.by_name[(n, e.expert)] = e
        self._lock = threading.Lock()
        self._last: tuple[Entry | None, dict] = (None, {})

    def read(self, entry: Entry) -> list[torch.Tensor]:
        out = []
        for name in entry.hf:
            src = self.by_name.get((name, entry.expert))
            if src is None:
                raise StepconvError(f"{self.src.source.path}: no tensor provides {name}"
                                    + (f" expert {entry.expert}" if entry.expert is not None else ""))
            with self._lock:
                last, merged = self._last
            if last is not src:  # q, k, v and g come from one linear_qkv: merge it once
                try:
                    merged = dict(self.src.step(src, self.reader.read(src)))
                except (ValueError, RuntimeError) as e:
                    raise StepconvError(f"{src.key} ({', '.join(src.hf)}): {str(e).splitlines()[0]}") from None
                with self._lock:
                    self._last = (src, merged)
            out.append(merged[name])
        return out

    def finish(self) -> None:
        if isinstance(self.reader, LegacyReader):
            self.reader.close()


@gc_paused()  # (plan, execute and finish: engine.gc_paused)
def reshard(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, *, iteration: str | int | None = None,
            hf_config: str | os.PathLike | None = None, progress: Progress | None = None, **options: Any) -> Summary:
    """Megatron -> Megatron: another format and/or layout, streamed entry by entry, audited like hf-to-mcore.

    `options` are `ImportOptions` fields; the source's format, layout and spec are the defaults. Example:
    `reshard("step35-tp4", "step35-dist", format="torch_dist")`.
    """
    t0 = time.time()
    fixed_mmap_threshold()
    src = plan_export(mcore_dir, iteration=iteration, hf_config=hf_config)
    if src.problems:
        raise StepconvError(src.problems[0])
    meta = recorded_meta(src.args, src.source.path)
    defaults = dict(reshard_layout(src.layout, options), spec=src.spec, format=src.format,
                    dtype=meta.get("dtype", "keep"), window_convention=meta.get("sliding_window_convention", "hf"))
    opts = ImportOptions.of({**defaults, **options})
    recorded = meta.get("source_dtypes") or {}  # (in the order the HF checkpoint listed them, as hf-to-mcore wrote)
    dtypes = {n: _recorded_dtype(src, n, d) for n, d in recorded.items()} or {i.name: i.dtype for i in src.infos}
    pl = plan_import(src.cfg, dtypes, opts)
    root = src.source.root
    out = Path(out_dir)
    _check_distinct(root, out)
    source = MegatronSource(src)
    summary = Summary("reshard", root, out, pl.layout, opts.spec, opts.format)
    with staging(out, opts.overwrite) as tmp:
        writer = pl.writer(tmp)
        units = writer.units(pl.entries)
        workers = pl.workers(units, HFReader(dtypes, meta=True))
        consumed, results = execute(units, source, writer, pl.step, workers=workers.workers, progress=progress,
                                    largest_bytes=workers.largest_bytes)
        source.finish()
        audit_on_disk(tmp, {rel: st.bytes for r in results for rel, st in r.files.items()})
        hf_files = root / SIDECAR / "hf_files"
        _publish(tmp, pl, writer, units, results, consumed, {i.name: math.prod(i.shape) for i in src.infos},
                 carried_files(hf_files) if hf_files.is_dir() else [], summary)
    summary.bytes_read = getattr(source.reader, "bytes_read", 0)
    summary.seconds = time.time() - t0
    return summary
