"""`stepconv inspect`: a conversion run through dry-run writers, so it reports what the conversion writes.

`inspect_path(path, tp=, pp=, ep=)` accepts
  * a Hugging Face folder: config.json plus safetensors, or config.json alone (no weights);
  * a bare config.json file;
  * a Megatron legacy checkpoint (its root, or an iteration folder): TP/PP/EP, spec and config come from it.

HF input runs `convert.plan_import`'s plan through `LegacyWriter` fed meta tensors (torch's own zip writer lays
out every record of every rank file, skipping the bytes), Megatron input runs `convert.plan_export`'s plan
through `HFWriter(dry=True)` fed meta tensors of the rank files' own shapes. Names, shapes, bytes and the
validation are therefore the conversion's own; the peak-memory line is the `WorkerPlan` the conversion sizes
its workers with. Errors are collected (every invalid option, every tensor problem), not raised.
`render(report)` formats the report as plain text; `report.to_dict()` is JSON-ready.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .config import DTYPE_NAMES, Step35Config, StepconvError, compress
from .convert import (DTYPE_CHOICES, ExportPlan, ImportOptions, ImportPlan, config_dtypes, export_notes,
                      import_notes, layout_options, plan_export, plan_import)
from .engine import WorkerPlan, execute
from .hf_io import INDEX_NAME, WEIGHT_SUFFIXES, HFCheckpoint, HFReader, HFWriter, hf_tensor_problems, parse_size
from .mapping import Entry, hf_shapes
from .megatron_io import MTP_HEADS, RANK_FILE, SIDECAR, TRACKER, load_rank_file, model_keys


# --- report ---------------------------------------------------------------------------------
@dataclass
class RankFile:
    name: str  # release/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
    tp: int
    pp: int
    ep: int
    bytes: int  # file size: written by the dry run (HF input), on disk (Megatron input)
    data_bytes: int  # tensor data alone
    tensors: int  # tensors (Megatron `_extra_state` entries are None and not counted)
    keys: int  # state-dict keys, `_extra_state` included


@dataclass
class OutputFile:
    name: str
    bytes: int
    tensors: int


@dataclass
class MappingLine:
    hf: str  # e.g. model.layers.{3..44}.moe.{gate,up}_proj.weight
    hf_shapes: list[list[int]]
    megatron: str  # e.g. decoder.layers.{i}.mlp.experts.linear_fc1.weight{e}
    rank_shape: list[int] | None  # per-rank Megatron shape (None for the sidecar)
    kind: str
    how: str  # e.g. "EP-split 36/rank, TP-split rows as [gate_r; up_r]"
    dtype: str
    count: int  # plan entries folded into this line


@dataclass
class TensorLine:
    hf: list[str]
    hf_shapes: list[list[int]]
    megatron: str
    stage: int
    ep: int | None  # None: every EP rank
    rank_shape: list[int] | None
    dtype: str
    bytes_per_rank: int  # the whole tensor for the sidecar
    expert: int | None = None  # global expert index


@dataclass
class PeakMemory:
    """The conversion's own `engine.WorkerPlan`: estimate = workers x (factor x largest + extra + writes) + fixed."""

    largest_name: str
    largest_bytes: int
    factor: int
    extra_bytes: int
    fixed_bytes: int
    workers: int
    estimate_bytes: int
    formula: str  # the same arithmetic, as printed
    write_bytes: int = 0  # per worker: what its unit's output files hold while written behind

    @classmethod
    def of(cls, w: WorkerPlan) -> "PeakMemory":
        return cls(w.largest_name, w.largest_bytes, w.factor, w.extra_bytes, w.fixed_bytes, w.workers, w.total,
                   w.formula(_size), w.write_bytes)


@dataclass
class InspectReport:
    source: str
    source_kind: str  # hf | hf-config-only | config | mcore
    direction: str  # hf-to-mcore | mcore-to-hf
    tp: int
    pp: int
    ep: int
    spec: str
    dtype: str
    etp: int = 0  # expert tensor-parallel size (= TP unless set)
    pp_first: int | None = None  # layers on the first / last PP stage when uneven
    pp_last: int | None = None
    vpp: int | None = None  # virtual pipeline stages per PP rank
    stages: list[str] = field(default_factory=list)  # where the layers sit (Layout.describe)
    model: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rank_files: list[RankFile] = field(default_factory=list)
    sidecar_files: list[OutputFile] = field(default_factory=list)
    dist_files: list[OutputFile] = field(default_factory=list)  # torch_dist: data files and index (written or read)
    format: str = "torch"
    hf_files: list[OutputFile] = field(default_factory=list)  # HF shards: hf-to-mcore's input, mcore-to-hf's output
    mapping: list[MappingLine] = field(default_factory=list)
    tensors: list[TensorLine] = field(default_factory=list)  # only with full=True
    peak_memory: PeakMemory | None = None
    planned: bool = False  # False when errors prevented a plan

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def total_rank_bytes(self) -> int:
        return sum(r.bytes for r in self.rank_files)

    @property
    def total_output_bytes(self) -> int:
        if self.direction == "hf-to-mcore":
            return self.total_rank_bytes + sum(f.bytes for f in self.sidecar_files + self.dist_files)
        return sum(f.bytes for f in self.hf_files)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["total_rank_bytes"] = self.total_rank_bytes
        d["total_output_bytes"] = self.total_output_bytes
        return d


# --- entry point ------------------------------------------------------------------------------
def inspect_path(path: str | os.PathLike, *, tp: int | None = None, pp: int | None = None, ep: int | None = None,
                 spec: str | None = "te", dtype: str = "keep", full: bool = False, iteration: str | int | None = None,
                 hf_config: str | os.PathLike | None = None, max_shard_size: str = "5GB",
                 jobs: int | None = None, max_memory: int | None = None, format: str = "torch",
                 etp: int | None = None, pp_first: int | None = None, pp_last: int | None = None,
                 vpp: int | None = None) -> InspectReport:
    """Plan a conversion of `path` without writing anything; every problem found lands in `report.errors`.

    HF input (folder or config.json): the hf-to-mcore plan for TP/PP/EP (default 1), ETP (default TP), uneven
    first/last stages and virtual stages (default none), `spec` (te|local) and `dtype` (keep|bf16|fp32). Megatron
    input: the mcore-to-hf plan; the layout and spec come from the checkpoint (values passed that disagree are
    reported as errors); `hf_config` overrides the config carried in args. `full` lists every tensor; `jobs` and
    `max_memory` are the conversion's (they size its workers).
    """
    p = Path(path)
    given = dict(tp=tp, pp=pp, ep=ep, etp=etp, pp_first=pp_first, pp_last=pp_last, vpp=vpp)
    if p.is_dir() and _is_megatron(p):
        return _inspect_mcore(p, given, spec=spec, full=full, iteration=iteration,
                              hf_config=hf_config, max_shard_size=max_shard_size, jobs=jobs)
    return _inspect_hf(p, ImportOptions(tp or 1, pp or 1, ep or 1, spec or "te", dtype, jobs=jobs,
                                        max_memory=max_memory, format=format, etp=etp, pp_first=pp_first,
                                        pp_last=pp_last, vpp=vpp), full=full)


def _is_megatron(p: Path) -> bool:
    return (p / TRACKER).exists() or any(p.glob("mp_rank_*")) or any(p.glob("*/mp_rank_*"))


# --- HF input ---------------------------------------------------------------------------------
def _inspect_hf(p: Path, opts: ImportOptions, *, full: bool) -> InspectReport:
    lay = opts.layout
    rep = InspectReport(str(p), "hf", "hf-to-mcore", opts.tp, opts.pp, opts.ep, opts.spec, opts.dtype,
                        format=opts.format, etp=lay.etp_size, pp_first=lay.pp_first, pp_last=lay.pp_last,
                        vpp=lay.vpp_size)
    if p.is_file() or (not p.exists() and p.suffix == ".json"):
        cfg_path, folder = p, None
        rep.source_kind = "config"
    elif p.is_dir():
        cfg_path, folder = p / "config.json", p
    else:
        rep.errors.append(f"{p}: not found; expected a HF folder, a config.json or a Megatron checkpoint folder")
        return rep
    try:
        cfg = Step35Config.from_file(cfg_path)
    except StepconvError as e:
        rep.errors.append(str(e))
        return rep
    want = hf_shapes(cfg)
    dtypes = config_dtypes(cfg)
    ckpt = None
    if folder is not None and (any(f.suffix in WEIGHT_SUFFIXES for f in folder.iterdir()) or (folder / INDEX_NAME).exists()):
        try:
            ckpt = HFCheckpoint(folder)
        except StepconvError as e:
            rep.errors.append(str(e))
    if ckpt is None:
        rep.source_kind = rep.source_kind if folder is None else "hf-config-only"
        rep.notes.append(f"no weights: dtypes from config torch_dtype ({DTYPE_NAMES[cfg.torch_dtype()]}), "
                         f"router_bias assumed F32")
    else:
        rep.errors += hf_tensor_problems(ckpt.tensors, want, folder)
        dtypes.update((n, i.dtype) for n, i in ckpt.tensors.items() if n in dtypes)
        files: dict[str, int] = defaultdict(int)
        for i in ckpt.tensors.values():
            files[i.file] += 1
        rep.hf_files = [OutputFile(f, (folder / f).stat().st_size, n) for f, n in sorted(files.items())]
    rep.model = _model_summary(cfg, want, dtypes)

    problems = opts.problems(cfg)
    rep.errors += problems
    if problems:  # the mapping is still shown, at TP=PP=EP=1 with valid options
        shown = ImportOptions(spec=opts.spec if opts.spec in ("te", "local") else "te",
                              dtype=opts.dtype if opts.dtype in DTYPE_CHOICES else "keep")
        rep.mapping = _mapping(plan_import(cfg, dtypes, shown))
        rep.notes.append("layout invalid: mapping shown for TP=1 PP=1 EP=1; no rank files planned")
        return rep
    pl = plan_import(cfg, dtypes, opts)
    rep.stages = lay.describe(cfg.num_layers) if lay.pp_size > 1 else []
    rep.mapping = _mapping(pl)
    reader = HFReader(dtypes, meta=True)
    # the dry run's sparse files hold only zip headers; on tmpfs, deleting them is instant (on a disk
    # filesystem each one's thousands of extents took ~0.9 s to free for a 8 GB rank file)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="stepconv-inspect-", dir=shm) as scratch:
        writer = pl.writer(Path(scratch), dry=True)
        units = writer.units(pl.entries)
        try:
            workers = pl.workers(units, reader, cuttable=pl.cuttable(writer))
        except StepconvError as e:
            rep.errors.append(str(e))
            workers = None
        _, results = execute(units, reader, writer, pl.step)
        finished = writer.finish() if hasattr(writer, "finish") else {}
    rep.planned = True
    for res in results:
        for name, f in res.files.items():
            if name.endswith(RANK_FILE):
                t, s, e = _rank_of(pl, name)
                rep.rank_files.append(RankFile(name, t, s, e, f.bytes, f.data_bytes, f.tensors, f.keys))
            elif name.startswith(SIDECAR):
                rep.sidecar_files.append(OutputFile(name, f.bytes, f.tensors))
            else:
                rep.dist_files.append(OutputFile(name, f.bytes, f.tensors))
    rep.dist_files += [OutputFile(name, f.bytes, f.keys) for name, f in finished.items()]
    rep.rank_files.sort(key=lambda r: (r.pp, r.ep, r.tp))
    rep.notes += import_notes(pl)
    if opts.ep > 1:
        rep.notes.append(f"non-expert tensors are replicated on each of the {opts.ep} EP ranks")
    rep.peak_memory = PeakMemory.of(workers) if workers else None
    if full:
        rep.tensors = _tensor_lines(pl)
    return rep


def _rank_of(pl: ImportPlan, name: str) -> tuple[int, int, int]:
    from .megatron_io import rank_file

    for t, s, e in pl.layout.ranks():
        if rank_file(pl.layout, t, s, e) == name:
            return t, s, e
    raise StepconvError(f"internal: {name} is no rank file of {pl.layout}")


# --- Megatron input ---------------------------------------------------------------------------
def _inspect_mcore(root: Path, given: dict, *, spec, full, iteration, hf_config, max_shard_size,
                   jobs) -> InspectReport:
    rep = InspectReport(str(root), "mcore", "mcore-to-hf", given["tp"] or 0, given["pp"] or 0, given["ep"] or 0,
                        spec or "", "keep")
    try:
        pl = plan_export(root, iteration=iteration, hf_config=hf_config)
    except StepconvError as e:
        rep.errors.append(str(e))
        return rep
    lay = pl.layout
    rep.tp, rep.pp, rep.ep, rep.etp = lay.tp_size, lay.pp_size, lay.ep_size, lay.etp_size
    rep.pp_first, rep.pp_last, rep.vpp = lay.pp_first, lay.pp_last, lay.vpp_size
    rep.stages = lay.describe(pl.cfg.num_layers) if lay.pp_size > 1 else []
    for key, have in layout_options(lay).items():
        if given[key] is not None and given[key] != have:
            name = "--" + key.replace("_", "-")
            label = {"pp_first": "PP-first", "pp_last": "PP-last"}.get(key, key.upper())
            rep.errors.append(f"{name} {given[key]} does not match the checkpoint ({label}={have} in its args); "
                              f"mcore-to-hf takes the layout from the checkpoint")
    if spec not in (None, "te") and spec != pl.spec:  # "te" is the default, not a claim about this folder
        rep.errors.append(f"--spec {spec} does not match the checkpoint (its keys are the {pl.spec} spec)")
    rep.spec = pl.spec
    rep.dtype = str((getattr(pl.args, "stepconv", None) or {}).get("dtype", "keep"))
    rep.errors += pl.problems
    rep.model = _model_summary(pl.cfg, hf_shapes(pl.cfg, pl.entries), {i.name: i.dtype for i in pl.infos})
    rep.mapping = _mapping(pl)
    rep.format = pl.format
    if pl.format == "torch_dist":
        rep.dist_files = [OutputFile(f"{pl.source.path.name}/{f.name}", f.stat().st_size, 0)
                          for f in sorted(pl.source.path.iterdir()) if f.is_file()]
    files = pl.reader(meta=True)
    for t, s, e in (lay.ranks() if pl.format == "torch" else ()):
        f = files.path(t, s, e)
        if f.exists():
            obj = load_rank_file(f)  # mmap: keys and shapes, no tensor data
            values = [v for k in model_keys(obj) for v in obj[k].values()]
            ts = [v for v in values if isinstance(v, torch.Tensor)]
            rep.rank_files.append(RankFile(f"{pl.source.path.name}/{f.parent.name}/{RANK_FILE}", t, s, e,
                                           f.stat().st_size, sum(v.numel() * v.element_size() for v in ts), len(ts),
                                           len(values)))
    try:
        max_bytes = parse_size(max_shard_size)
    except StepconvError as e:
        rep.errors.append(str(e))
        max_bytes = 5 * 10**9
    rep.notes += export_notes(pl)
    if pl.problems:
        return rep
    reader = pl.reader(meta=True)
    units = reader.units(pl.entries)
    writer = HFWriter(Path("."), pl.infos, max_bytes, dry=True)
    try:  # every rank file's keys and every tensor's shape, as mcore-to-hf checks them
        execute(units, reader, writer, pl.step)
        incomplete = writer.finish()
        if incomplete:
            rep.errors.append(f"HF tensor(s) not fully covered by the rank files: {', '.join(incomplete[:8])}")
    except StepconvError as e:
        rep.errors.append(str(e))
        return rep
    rep.planned = True
    rep.hf_files = [OutputFile(w.path.name, w.bytes_written, len(w.infos)) for w in writer.files]
    rep.peak_memory = PeakMemory.of(pl.workers(units, jobs))
    if full:
        rep.tensors = _tensor_lines(pl)
    return rep


# --- name mapping -----------------------------------------------------------------------------
def _mc_pattern(key: str) -> str:
    key = re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.{i}.", key)
    key = re.sub(r"^mtp\.layers\.\d+\.", "mtp.layers.{k}.", key)
    key = re.sub(r"local_experts\.\d+\.", "local_experts.{e}.", key)
    return re.sub(r"weight\d+$", "weight{e}", key)


def _hf_pattern(names: Sequence[str]) -> str:
    names = [re.sub(r"^model\.layers\.\d+\.", "model.layers.{L}.", n) for n in names]
    if len(names) == 1:
        return names[0]
    pre = os.path.commonprefix(names)
    pre = pre[:pre.rfind(".") + 1] if "." in pre else ""
    suf = os.path.commonprefix([n[::-1] for n in names])[::-1]
    suf = suf[suf.find("_"):] if "_" in suf else suf[suf.find("."):] if "." in suf else ""
    mids = [n[len(pre):len(n) - len(suf)] for n in names]
    return f"{pre}{{{','.join(mids)}}}{suf}"


def _how(e: Entry, pl: ImportPlan | ExportPlan) -> str:
    bits = []
    if e.expert is not None:
        ep = pl.layout.ep_size
        bits.append(f"EP-split {pl.cfg.num_experts // ep}/rank" if ep > 1 else "experts")
    how = e.kind.how
    if e.routed and pl.layout.etp_size != pl.layout.tp_size:  # routed experts are split over ETP ranks
        how = how.replace("TP-split", f"ETP-split ({pl.layout.etp_size})")
    if e.kind.name == "vocab":
        how = f"vocab-padded to {pl.cfg.padded_vocab(pl.layout.tp_size)}, TP-split rows"
    elif not e.kind.megatron:
        how = f"no Megatron slot: kept in {SIDECAR}/{MTP_HEADS}"
    bits.append(how)
    if e.replica:
        bits.append("copy on the MTP stage")
    return ", ".join(bits)


def _dtype(e: Entry, pl: ImportPlan | ExportPlan) -> torch.dtype:
    """The entry's Megatron dtype (import: the conversion's own rule; export: what mcore-to-hf writes)."""
    if isinstance(pl, ImportPlan):
        return e.kind.out_dtype([pl.source_dtypes[h] for h in e.hf], pl.target)
    return {i.name: i.dtype for i in pl.infos}[e.hf[0]]


def _mapping(pl: ImportPlan | ExportPlan) -> list[MappingLine]:
    groups: dict[tuple, dict] = {}
    for e in pl.entries:
        if not e.kind.sources:
            continue
        mc = _mc_pattern(e.key) if e.key else f"{SIDECAR}/{MTP_HEADS}"
        rshape = e.rank_shape() if e.kind.megatron else None
        g = (_hf_pattern(e.hf), mc, e.kind.name, e.hf_shapes, rshape, e.replica)
        d = groups.setdefault(g, {"layers": set(), "count": 0, "e": e})
        if e.layer is not None:
            d["layers"].add(e.layer)
        d["count"] += 1
    out = []
    for (hf_pat, mc, kind, shapes, rshape, _), d in groups.items():
        hf = hf_pat.replace("{L}", "{" + compress(d["layers"]) + "}") if d["layers"] else hf_pat
        out.append(MappingLine(hf, [list(s) for s in shapes], mc, list(rshape) if rshape else None, kind,
                               _how(d["e"], pl), DTYPE_NAMES[_dtype(d["e"], pl)], d["count"]))
    return out


def _tensor_lines(pl: ImportPlan | ExportPlan) -> list[TensorLine]:
    out = []
    for e in pl.entries:
        if not e.kind.sources:
            continue
        shape = e.rank_shape() if e.kind.megatron else None
        dt = _dtype(e, pl)
        nbytes = math.prod(shape if shape is not None else e.hf_shapes[0]) * dt.itemsize
        out.append(TensorLine(list(e.hf), [list(s) for s in e.hf_shapes], e.key or f"{SIDECAR}/{MTP_HEADS}", e.stage,
                              e.ep_rank, list(shape) if shape else None, DTYPE_NAMES[dt], nbytes, e.expert))
    return out


def _model_summary(cfg: Step35Config, want: dict, dtypes: dict) -> dict:
    params = sum(math.prod(s) for s in want.values())
    nbytes = sum(math.prod(s) * dtypes[n].itemsize for n, s in want.items())
    experts = sum(math.prod(s) for n, s in want.items() if ".moe." in n and n.endswith("_proj.weight"))
    return {"layers": cfg.num_layers, "mtp_layers": cfg.num_mtp, "hidden": cfg.hidden, "vocab": cfg.vocab,
            "experts": cfg.num_experts, "top_k": cfg.top_k if cfg.num_experts else 0,
            "moe_layers": len([i for i in range(cfg.num_layers) if cfg.is_moe(i)]), "hf_tensors": len(want),
            "params": params, "expert_params": experts, "hf_bytes": nbytes}


# --- rendering --------------------------------------------------------------------------------
def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, m in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= m:
            return f"{n / m:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, m in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= m:
            return f"{n / m:.2f}{unit}"
    return str(n)


def _shape(s: Sequence[int] | None) -> str:
    return "[" + ",".join(map(str, s)) + "]" if s is not None else "-"


def _group_ranks(files: Sequence[RankFile]) -> list[tuple[str, list[RankFile]]]:
    by: dict[tuple, list[RankFile]] = defaultdict(list)
    for f in files:
        by[(f.pp, f.ep, f.bytes, f.tensors, f.keys)].append(f)
    out = []
    for fs in by.values():
        fs.sort(key=lambda f: f.tp)
        if len(fs) == 1:
            out.append((fs[0].name, fs))
            continue
        head, _, tail = fs[0].name.partition("mp_rank_")
        tps = [f.tp for f in fs]
        tp_txt = f"{{{tps[0]:02d}..{tps[-1]:02d}}}" if tps == list(range(tps[0], tps[-1] + 1)) else \
            "{" + ",".join(f"{t:02d}" for t in tps) + "}"
        out.append((f"{head}mp_rank_{tp_txt}{tail[2:]}", fs))
    return out


def render(report: InspectReport, *, max_rank_lines: int = 64) -> str:
    """Plain text: a one-screen summary, then errors, rank files, mapping (and every tensor with full=True)."""
    r = report
    kinds = {"hf": "Hugging Face folder", "hf-config-only": "Hugging Face folder, config.json only (no weights)",
             "config": "bare config.json, no weights", "mcore": "Megatron checkpoint"}
    lines = [f"stepconv inspect: {r.source} ({kinds.get(r.source_kind, r.source_kind)})"]
    m = r.model
    if m:
        lines.append(f"  model      {m['layers']} layers + {m['mtp_layers']} MTP, hidden {m['hidden']}, "
                     f"vocab {m['vocab']}, "
                     f"{m['experts']} experts (top-{m['top_k']}) on {m['moe_layers']} MoE layers")
        lines.append(f"  params     {_count(m['params'])} ({_count(m['expert_params'])} in routed experts), "
                     f"{m['hf_tensors']} HF tensors, {_size(m['hf_bytes'])} as HF safetensors")
    lay = ""
    if r.etp and r.etp != r.tp:
        lay += f" ETP={r.etp}"
    lay += "".join(f" {n}={v}" for n, v in (("PP-first", r.pp_first), ("PP-last", r.pp_last), ("VPP", r.vpp))
                   if v is not None)
    lines.append(f"  plan       {r.direction}, TP={r.tp} PP={r.pp} EP={r.ep}{lay}, spec {r.spec}, dtype {r.dtype}, "
                 f"format {r.format}")
    if r.rank_files:
        sizes = [f.bytes for f in r.rank_files]
        counts = sorted({f.tensors for f in r.rank_files})
        lines.append(f"  rank files {len(r.rank_files)} x {RANK_FILE}: {_size(sum(sizes))} total, "
                     f"{_size(min(sizes))} .. {_size(max(sizes))} each, "
                     f"{counts[0]}{'..' + str(counts[-1]) if len(counts) > 1 else ''} tensors each")
    if r.dist_files:
        lines.append(f"  torch_dist {len(r.dist_files)} files: {_size(sum(f.bytes for f in r.dist_files))} "
                     f"(global keys; loads at any TP/PP/EP)")
    for f in r.sidecar_files:
        lines.append(f"  sidecar    {f.name}: {_size(f.bytes)}, {f.tensors} tensor(s)")
    if r.hf_files:
        what = "HF output" if r.direction == "mcore-to-hf" else "HF input"
        lines.append(f"  {what:<10} {len(r.hf_files)} safetensors file(s), {_size(sum(f.bytes for f in r.hf_files))}")
    if r.planned:
        lines.append(f"  writes     {_size(r.total_output_bytes)} in total")
    pm = r.peak_memory
    if pm:
        lines.append(f"  peak mem   ~{pm.formula} (largest: {pm.largest_name})")
    lines.append("  status     " + ("OK" if r.ok else f"{len(r.errors)} error(s)"))
    for n in r.notes:
        lines.append(f"  note       {n}")
    if r.errors:
        lines += ["", "Errors"] + [f"  - {e}" for e in r.errors]
    if r.rank_files:
        lines += ["", "Rank files" + (" (on disk)" if r.direction == "mcore-to-hf" else " (what the conversion writes)")
                  + ": TP ranks of one PP stage and EP rank hold the same keys and shapes"
                  + (f"; one folder per distinct (TP, PP, EP) rank of megatron-core's grid (ETP={r.etp})"
                     if r.etp and r.etp != r.tp else "")]
        groups = _group_ranks(r.rank_files)
        for i, (name, fs) in enumerate(groups):
            if i == max_rank_lines:
                lines.append(f"  ... {len(groups) - i} more lines (to_dict() lists every file)")
                break
            f = fs[0]
            lines.append(f"  {name}  {len(fs)} x {_size(f.bytes)} ({f.bytes} B), {f.tensors} tensors ({f.keys} keys)")
    if r.hf_files and r.direction == "mcore-to-hf":
        lines += ["", "HF output files"] + [f"  {f.name}  {_size(f.bytes):>10}  {f.tensors:>5} tensors"
                                             for f in r.hf_files]
    if r.mapping:
        lines += ["", "Name mapping (HF -> Megatron; {i} = layer index within its PP stage, {k} = MTP index, "
                      "{e} = local expert index)"]
        if r.stages and r.planned:
            last = f"model{r.vpp - 1} of " if r.vpp else ""
            lines.append(f"  PP={r.pp}: i counts from 0 in each " + ("model chunk" if r.vpp else "stage")
                         + f"; MTP layers in {last}stage {r.pp - 1}" + (", the embedding in model0 of stage 0"
                                                                          if r.vpp else ""))
            lines += [f"    {line}" for line in r.stages]
        for ml in r.mapping:
            hs = ml.hf_shapes
            shp = _shape(hs[0]) + (f"x{len(hs)}" if all(h == hs[0] for h in hs) and len(hs) > 1 else "") \
                if all(h == hs[0] for h in hs) else "+".join(_shape(h) for h in hs)
            rank = f" {_shape(ml.rank_shape)}/rank" if ml.rank_shape else ""
            lines.append(f"  {ml.hf} {shp} -> {ml.megatron}{rank} {ml.dtype} ({ml.kind}, {ml.how})")
    if r.tensors:
        lines += ["", f"Every tensor ({len(r.tensors)})"]
        for t in r.tensors:
            if t.rank_shape is None:
                lines.append(f"  {' + '.join(t.hf)} {'+'.join(_shape(s) for s in t.hf_shapes)} -> {t.megatron} "
                             f"{t.dtype} {_size(t.bytes_per_rank)} (whole tensor, beside the rank files)")
                continue
            where = f"stage {t.stage}, " + ("all EP ranks" if t.ep is None else f"EP rank {t.ep}, expert {t.expert}")
            lines.append(f"  {' + '.join(t.hf)} {'+'.join(_shape(s) for s in t.hf_shapes)} -> {t.megatron} "
                         f"{_shape(t.rank_shape)} {t.dtype} {_size(t.bytes_per_rank)}/rank ({where})")
    return "\n".join(lines) + "\n"
