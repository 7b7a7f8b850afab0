"""`stepconv inspect`: what a conversion would write, computed from the plan alone (nothing is written).

`inspect_path(path, tp=, pp=, ep=)` accepts
  * a Hugging Face folder: config.json plus safetensors, or config.json alone (no weights);
  * a bare config.json file;
  * a Megatron legacy checkpoint folder (root with latest_checkpointed_iteration.txt, or an
    iteration folder holding mp_rank_*): TP/PP/EP and the Step-3.5 config come from the args of
    the first rank file, opened with mmap (its tensors are never read).

It returns an `InspectReport`: every rank file with its exact byte size and tensor count (from the
Megatron per-rank shapes of the plan, dtypes from the checkpoint or config, fp32 router expert
bias, padded vocab, zip/pickle overhead simulated), the HF <-> Megatron name mapping (one line per
rule and layer pattern, or every tensor with `full=True`), the estimated peak memory of the
conversion, and every validation error found (collected, not raised on the first).
`render(report)` formats it as plain text; `report.to_dict()` is JSON-ready.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from . import __version__
from .config import DTYPE_NAMES, DTYPES, SAFETENSORS_DTYPES, Step35Config, StepconvError
from .hf_io import INDEX_NAME, WEIGHT_SUFFIXES, HFCheckpoint, TensorInfo, _header_bytes, parse_size, \
    plan_shards, shard_name
from .mapping import Entry, Layout, detect_mtp_block, detect_spec, hf_shapes, plan
from .megatron_io import (RANK_FILE, TRACKER, iteration_dir_name, load_rank_file, rank_dir_name, rank_dir_problems,
                          read_tracker)

SIDECAR = "stepconv"
MTP_HEADS = "mtp_heads.safetensors"
FIXED_OVERHEAD = 300 * 10**6  # interpreter, torch, the plan, I/O buffers (the CLI on the tiny fixture peaks at 0.24 GB)
PEAK_FORMULA = "2 x largest tensor materialised at once + 0.3 GB"
PEAK_FORMULA_IMPORT = "3 x largest tensor materialised at once + 64 MB read-ahead + 0.3 GB"


# --- report ---------------------------------------------------------------------------------
@dataclass
class RankFile:
    name: str  # release/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
    tp: int
    pp: int
    ep: int
    bytes: int  # predicted file size (tensor data + zip records + pickle)
    data_bytes: int  # tensor data alone
    tensors: int  # tensors written (Megatron `_extra_state` entries are None and not counted)
    keys: int  # state-dict keys, `_extra_state` included
    on_disk: int | None = None  # actual size, Megatron input only


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
    how: str  # e.g. "EP-split 36/rank, TP-split"
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
    formula: str
    largest_name: str
    largest_bytes: int
    estimate_bytes: int
    workers: int  # hf-to-mcore worker threads the converter would start by default
    parallel_bound_bytes: int  # upper bound with that many workers each at its largest tensor


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
    model: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rank_files: list[RankFile] = field(default_factory=list)
    sidecar_files: list[OutputFile] = field(default_factory=list)
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
            return self.total_rank_bytes + sum(f.bytes for f in self.sidecar_files)
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
                 jobs: int | None = None) -> InspectReport:
    """Plan a conversion of `path` without writing anything; every problem found lands in `report.errors`.

    HF input (folder or config.json): the hf-to-mcore plan for TP/PP/EP (default 1), `spec` (te|local)
    and `dtype` (keep|bf16|fp32|fp16). Megatron input: the mcore-to-hf plan; TP/PP/EP and spec come
    from the checkpoint (values passed that disagree are reported as errors); `hf_config` overrides
    the config carried in args. `full` lists every tensor; `jobs` caps the worker count in the
    parallel peak-memory bound (default: CPU count).
    """
    p = Path(path)
    if p.is_dir() and _is_megatron(p):
        return _inspect_mcore(p, tp=tp, pp=pp, ep=ep, spec=spec, full=full, iteration=iteration,
                              hf_config=hf_config, max_shard_size=max_shard_size, jobs=jobs)
    return _inspect_hf(p, tp=tp, pp=pp, ep=ep, spec=spec or "te", dtype=dtype, full=full, jobs=jobs)


def _is_megatron(p: Path) -> bool:
    if (p / TRACKER).exists() or (p / "release").is_dir() or any(p.glob("iter_*/mp_rank_*")):
        return True
    return any(p.glob("mp_rank_*"))


# --- HF input ---------------------------------------------------------------------------------
def _inspect_hf(p: Path, *, tp, pp, ep, spec, dtype, full, jobs) -> InspectReport:
    tp, pp, ep = tp or 1, pp or 1, ep or 1
    rep = InspectReport(str(p), "hf", "hf-to-mcore", tp, pp, ep, spec, dtype)
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
    if dtype != "keep" and dtype not in DTYPES:
        rep.errors.append(f"--dtype must be keep, {', '.join(DTYPES)}; got {dtype!r}")
        dtype = rep.dtype = "keep"

    have: dict[str, TensorInfo] | None = None
    if folder is not None:
        weights = [f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES] + \
            [f for f in (folder / INDEX_NAME,) if f.exists()]
        if not weights:
            rep.source_kind = "hf-config-only"
        else:
            try:
                have = HFCheckpoint(folder).tensors
            except StepconvError as e:
                rep.errors.append(str(e))
                rep.source_kind = "hf-config-only"
    want = hf_shapes(cfg)
    default = cfg.torch_dtype()
    src_dtypes = {n: (torch.float32 if n.endswith("router_bias") else default) for n in want}
    if have is None:
        rep.notes.append(f"no weights: dtypes from config torch_dtype ({DTYPE_NAMES[default]}), "
                         f"router_bias assumed F32")
    else:
        rep.errors += _check_hf(have, want, folder)
        for n, i in have.items():
            if n in src_dtypes:
                src_dtypes[n] = i.dtype
        files: dict[str, list[TensorInfo]] = defaultdict(list)
        for i in have.values():
            files[i.file].append(i)
        rep.hf_files = [OutputFile(f, (folder / f).stat().st_size, len(v)) for f, v in sorted(files.items())]
    rep.model = _model_summary(cfg, want, src_dtypes)

    lay_ok = _validate(cfg, tp, pp, ep, rep.errors)
    if spec not in ("te", "local"):
        rep.errors.append(f"--spec must be one of te, local; got {spec!r}")
        lay_ok = False
    lay = Layout(tp, pp, ep) if lay_ok else Layout(1, 1, 1)
    entries = plan(cfg, lay, spec if spec in ("te", "local") else "te")
    target = DTYPES.get(dtype)

    def out_dtype(e: Entry) -> torch.dtype:
        if e.key.endswith("expert_bias"):
            return torch.float32
        if target is not None and e.kind != "sidecar":
            return target
        dt = src_dtypes[e.hf[0]]
        for h in e.hf[1:]:
            dt = torch.promote_types(dt, src_dtypes[h])
        return dt

    rep.mapping = _mapping(cfg, entries, lay, out_dtype, want)
    if not lay_ok:
        rep.notes.append("layout invalid: mapping shown for TP=1 PP=1 EP=1; no rank files planned")
        return rep
    rep.planned = True
    meta = {"version": __version__, "spec": spec, "dtype": dtype,
            "source_dtypes": {n: DTYPE_NAMES[d] for n, d in src_dtypes.items()}, "iteration": "release",
            "mtp_heads": MTP_HEADS if cfg.num_mtp else None, "sliding_window_convention": "hf"}
    args = cfg.megatron_args(tp=tp, pp=pp, ep=ep, params_dtype=target or default, spec=spec, extra={"stepconv": meta})
    rep.rank_files = _rank_files(cfg, entries, lay, out_dtype, args)
    side = [e for e in entries if e.kind == "sidecar"]
    if side:
        infos = [TensorInfo(e.hf[0], MTP_HEADS, src_dtypes[e.hf[0]], want[e.hf[0]]) for e in side]
        rep.sidecar_files.append(OutputFile(f"{SIDECAR}/{MTP_HEADS}", _safetensors_size(infos), len(infos)))
        rep.notes.append(f"{len(side)} MTP shared_head.output tensor(s) have no Megatron slot; "
                         f"kept in {SIDECAR}/{MTP_HEADS}")
    if cfg.padded_vocab(tp) != cfg.vocab:
        rep.notes.append(f"vocab {cfg.vocab} padded to {cfg.padded_vocab(tp)} (128 x TP {tp})")
    if ep > 1:
        rep.notes.append(f"non-expert tensors are replicated on each of the {ep} EP ranks")
    units = pp * ep + (1 if side else 0)
    rep.peak_memory = _peak(entries, want, src_dtypes, lay, cfg, out_dtype, units, jobs)
    if full:
        rep.tensors = _tensor_lines(cfg, entries, lay, out_dtype, want)
    return rep


def _check_hf(have: dict[str, TensorInfo], want: dict[str, tuple[int, ...]], folder: Path) -> list[str]:
    """convert.check_hf_tensors, collecting every problem instead of raising on the first."""
    errs = []
    missing = [n for n in want if n not in have]
    unexpected = sorted(n for n in have if n not in want)
    if missing:
        errs.append(f"{folder}: {len(missing)} tensor(s) missing for this config: {_names(missing)}")
    if unexpected:
        errs.append(f"{folder}: {len(unexpected)} unexpected tensor(s) not in the Step-3.5 layout for this config: "
                    f"{_names(unexpected)}")
    bad = [f"{n} {list(have[n].shape)} (expected {list(s)})" for n, s in want.items()
           if n in have and tuple(have[n].shape) != s]
    if bad:
        errs.append(f"{folder}: {len(bad)} tensor(s) with wrong shape: {_names(bad, 4)}")
    nonfloat = [n for n in want if n in have and not have[n].dtype.is_floating_point]
    if nonfloat:
        errs.append(f"{folder}: non-float tensor(s) {_names(nonfloat)}; expected bf16/fp16/fp32 weights")
    return errs


def _validate(cfg: Step35Config, tp: int, pp: int, ep: int, errors: list[str]) -> bool:
    """cfg.validate_parallel one dimension at a time, so that every bad value is reported."""
    ok = True
    for t, p, e in ((tp, 1, 1), (1, pp, 1), (1, 1, ep)):
        try:
            cfg.validate_parallel(t, p, e)
        except StepconvError as ex:
            errors.append(str(ex))
            ok = False
    return ok


# --- Megatron input ---------------------------------------------------------------------------
def _inspect_mcore(root: Path, *, tp, pp, ep, spec, full, iteration, hf_config, max_shard_size,
                   jobs) -> InspectReport:
    rep = InspectReport(str(root), "mcore", "mcore-to-hf", tp or 0, pp or 0, ep or 0, spec or "", "keep")
    if any(root.glob("mp_rank_*")) and not (root / TRACKER).exists():
        itdir, root = root, root.parent  # an iteration folder was given
        it = itdir.name
    else:
        try:
            it = str(iteration) if iteration is not None else read_tracker(root)
            itdir = root / iteration_dir_name(it if it == "release" else int(it))
        except (StepconvError, ValueError) as e:
            rep.errors.append(str(e))
            return rep
    if not itdir.is_dir():
        rep.errors.append(f"{itdir}: iteration folder not found (available: "
                          f"{', '.join(p.name for p in root.iterdir() if p.is_dir()) or 'none'})")
        return rep
    rank_dirs = sorted(p.name for p in itdir.iterdir() if p.name.startswith("mp_rank_"))
    if not rank_dirs:
        rep.errors.append(f"{itdir}: no mp_rank_* folders; expected a legacy (--ckpt-format torch) checkpoint")
        return rep
    first_path = itdir / rank_dirs[0] / RANK_FILE
    try:
        first = load_rank_file(first_path)  # mmap: keys, shapes and args only; no tensor data is read
    except StepconvError as e:
        rep.errors.append(str(e))
        return rep
    args = first.get("args")
    try:
        lay = Layout(int(args.tensor_model_parallel_size), int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
                     int(getattr(args, "expert_model_parallel_size", 1) or 1))
    except (AttributeError, TypeError, ValueError):
        rep.errors.append(f"{first_path}: args lack tensor_model_parallel_size; not a Megatron checkpoint")
        return rep
    rep.tp, rep.pp, rep.ep = lay.tp, lay.pp, lay.ep
    for name, given, have in (("--tp", tp, lay.tp), ("--pp", pp, lay.pp), ("--ep", ep, lay.ep)):
        if given is not None and given != have:
            rep.errors.append(f"{name} {given} does not match the checkpoint ({name[2:].upper()}={have} in its args); "
                              f"mcore-to-hf takes the layout from the checkpoint")
    rep.errors += rank_dir_problems(itdir, lay.tp, lay.pp, lay.ep)
    try:
        cfg = Step35Config.from_megatron_args(args, str(itdir), hf_config)
    except StepconvError as e:
        rep.errors.append(str(e))
        return rep
    model0 = first["model"]
    keys0 = list(model0)
    detected = detect_spec(keys0)
    if spec not in (None, "te") and spec != detected:  # "te" is the default, not a claim about this folder
        rep.errors.append(f"--spec {spec} does not match the checkpoint (its keys are the {detected} spec)")
    rep.spec = detected
    mtp_block = detect_mtp_block(keys0)
    meta = getattr(args, "stepconv", None) or {}
    rep.dtype = str(meta.get("dtype", "keep"))
    if not _validate(cfg, lay.tp, lay.pp, lay.ep, rep.errors):
        return rep
    entries = plan(cfg, lay, detected, mtp_block)

    # dtypes: what the first rank file holds for each key pattern, else params_dtype (expert bias fp32)
    params_dtype = getattr(args, "params_dtype", None)
    params_dtype = params_dtype if isinstance(params_dtype, torch.dtype) else torch.bfloat16
    seen = {_pattern(k): v.dtype for k, v in model0.items() if isinstance(v, torch.Tensor)}

    def out_dtype(e: Entry) -> torch.dtype:
        if e.kind == "sidecar":
            return params_dtype
        return seen.get(_pattern(e.key), torch.float32 if e.key.endswith("expert_bias") else params_dtype)

    want = hf_shapes(cfg)
    src_names = meta.get("source_dtypes") or {}
    default = cfg.torch_dtype()
    hf_dtypes = {n: SAFETENSORS_DTYPES[src_names[n]] if n in src_names else
                 (torch.float32 if n.endswith("router_bias") else default) for n in want}
    rep.model = _model_summary(cfg, want, hf_dtypes)
    rep.mapping = _mapping(cfg, entries, lay, out_dtype, want)
    rep.rank_files = _rank_files(cfg, entries, lay, out_dtype, args)
    rep.planned = True
    for r in rep.rank_files:
        f = itdir / r.name.split("/", 1)[1]
        r.name = f"{itdir.name}/{r.name.split('/', 1)[1]}"
        r.on_disk = f.stat().st_size if f.exists() else None
    # the first file's keys and shapes against the plan
    shapes0 = {}
    for e in entries:
        if e.pp == 0 and (e.ep in (None, 0)) and e.kind not in ("sidecar",):
            shapes0[e.key] = _rank_shape(cfg, e, lay.tp, want)
    t0, p0, e0 = _parse_rank_dir(rank_dirs[0], lay)
    if (t0, p0, e0) == (0, 0, 0):
        miss = [k for k in shapes0 if k not in model0]
        unexp = sorted(k for k in model0 if k not in shapes0)
        if miss or unexp:
            rep.errors.append(f"{first_path}: keys do not match {lay} spec {detected}: "
                              + "; ".join(x for x in (f"missing {_names(miss)}" if miss else "",
                                                      f"unexpected {_names(unexp)}" if unexp else "") if x))
        bad = [f"{k} {list(v.shape)} (expected {list(shapes0[k])})" for k, v in model0.items()
               if k in shapes0 and isinstance(v, torch.Tensor) and shapes0[k] is not None
               and tuple(v.shape) != tuple(shapes0[k])]
        if bad:
            rep.errors.append(f"{first_path}: {len(bad)} tensor(s) with wrong shape: {_names(bad, 4)}")
    off = [r for r in rep.rank_files if r.on_disk is not None and abs(r.on_disk - r.bytes) > 0.01 * r.bytes + 65536]
    if off:
        rep.notes.append(f"{len(off)} rank file(s) differ in size from the plan by more than 1% + 64 KiB (e.g. "
                         f"{off[0].name}: {_size(off[0].on_disk)} on disk, {_size(off[0].bytes)} planned); "
                         f"a training checkpoint also holds optimizer and RNG state")
    # what mcore-to-hf writes
    try:
        max_bytes = parse_size(max_shard_size)
    except StepconvError as e:
        rep.errors.append(str(e))
        max_bytes = 5 * 10**9
    infos = [TensorInfo(n, "", hf_dtypes[n], s) for n, s in want.items()]
    shards = plan_shards(infos, max_bytes)
    rep.hf_files = [OutputFile(shard_name(k, len(shards)), _safetensors_size(s), len(s)) for k, s in enumerate(shards)]
    heads = [e for e in entries if e.kind == "sidecar"]
    if heads:
        sidecar = root / SIDECAR / MTP_HEADS
        if sidecar.exists() and str(meta.get("iteration")) == it:
            rep.notes.append(f"{len(heads)} MTP shared_head.output tensor(s) restored from {SIDECAR}/{MTP_HEADS}")
        else:
            rep.notes.append(f"{len(heads)} MTP shared_head.output tensor(s) would be set to output_layer "
                             f"(no {SIDECAR}/{MTP_HEADS} for iteration {it})")
    rep.peak_memory = _peak(entries, want, hf_dtypes, lay, cfg, out_dtype, lay.pp, jobs, direction="mcore-to-hf")
    if full:
        rep.tensors = _tensor_lines(cfg, entries, lay, out_dtype, want)
    return rep


def _parse_rank_dir(name: str, lay: Layout) -> tuple[int, int, int]:
    nums = [int(x) for x in name[len("mp_rank_"):].split("_") if x.isdigit()]
    t = nums[0] if nums else -1
    p = nums[1] if lay.pp > 1 and len(nums) > 1 else 0
    e = nums[-1] if lay.ep > 1 and len(nums) > 1 else 0
    return t, p, e


def _pattern(key: str) -> str:
    return re.sub(r"\d+", "#", key)


# --- shapes and sizes -------------------------------------------------------------------------
def _rank_shape(cfg: Step35Config, e: Entry, tp: int, want: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The Megatron tensor one TP rank holds for this entry (None for `_extra_state` / sidecar)."""
    if e.kind in ("extra", "sidecar"):
        return None
    src = [want[h] for h in e.hf]
    if e.expert is not None:
        src = [s[1:] for s in src]
    s = src[0]
    k = e.kind
    if k == "replicate":
        return tuple(s)
    if k == "column":
        return (s[0] // tp, *s[1:])
    if k in ("row", "expert_fc2"):
        return (s[0], s[1] // tp)
    if k == "vocab":
        return (cfg.padded_vocab(tp) // tp, s[1])
    if k in ("swiglu", "expert_fc1"):
        return (2 * s[0] // tp, s[1])
    if k == "qkvg":
        return (sum(x[0] for x in src) // tp, s[1])
    raise StepconvError(f"internal: no shape rule for kind {k}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def _rank_files(cfg: Step35Config, entries: list[Entry], lay: Layout, out_dtype, args) -> list[RankFile]:
    """Every rank file's exact size: tensor records + pickled state dict + zip structure, as RankFileWriter writes."""
    from .megatron_io import _StorageRef, _TensorRef, _dumps  # the writer's own pickling, so sizes match

    want = hf_shapes(cfg)
    per_rank: dict[tuple[int, int], list[tuple[str, tuple[int, ...] | None, torch.dtype | None]]] = {
        (p, e): [] for p in range(lay.pp) for e in range(lay.ep)}
    for e in entries:
        if e.kind == "sidecar":
            continue
        shape = _rank_shape(cfg, e, lay.tp, want)
        dt = out_dtype(e) if shape is not None else None
        for p in (range(lay.ep) if e.ep is None else (e.ep,)):
            per_rank[(e.pp, p)].append((e.key, shape, dt))
    out = []
    pkl_cache: dict[tuple, int] = {}
    for (stage, p), items in per_rank.items():
        # all TP ranks of a (stage, EP rank) hold the same keys and shapes: one simulation serves them
        model: OrderedDict[str, Any] = OrderedDict()
        records: list[tuple[str, int]] = []
        data = 0
        for key, shape, dt in items:
            if shape is None:
                model[key] = None
                continue
            ref = _StorageRef(str(len(model)), dt, _numel(shape))
            n = _numel(shape) * _itemsize(dt)
            records.append((f"data/{ref.key}", n))
            data += n
            model[key] = _TensorRef(ref, tuple(shape))
        sig = tuple((k, s, str(d)) for k, s, d in items)
        if sig not in pkl_cache:
            pkl_cache[sig] = len(_dumps({"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model}))
        pkl = pkl_cache[sig]
        size = _zip_size(records + [("data.pkl", pkl)] + _TRAILER)
        tensors = len(records)
        for t in range(lay.tp):
            name = f"release/{rank_dir_name(t, stage, p, lay.pp, lay.ep)}/{RANK_FILE}"
            out.append(RankFile(name, t, stage, p, size, data, tensors, len(model)))
    out.sort(key=lambda r: (r.pp, r.ep, r.tp))
    return out


# records PyTorchFileWriter adds after data.pkl (torch >= 2.1): .format_version, .storage_alignment, byteorder,
# then version and .data/serialization_id at write_end_of_file
_TRAILER = [(".format_version", 1), (".storage_alignment", 2), ("byteorder", 6), ("version", 2),
            (".data/serialization_id", 40)]
_ARCHIVE = "model_optim_rng.pt/"  # record-name prefix torch derives from the file name
_U32 = 0xFFFFFFFF


def _zip_size(records: Iterable[tuple[str, int]]) -> int:
    """Size of the zip torch's PyTorchFileWriter writes (stored records, data 64-byte aligned, data descriptors)."""
    cur, central, n = 0, 0, 0
    for name, size in records:
        nlen = len(_ARCHIVE) + len(name)
        big = size >= _U32 or cur >= _U32
        start = cur + 30 + nlen + 4  # local header + name + the padding field's own header
        if big:
            start += 4 + (16 if size >= _U32 else 0) + (8 if cur >= _U32 else 0)
        start += -start % 64
        cur = start + size + (24 if size >= _U32 else 16)  # data + data descriptor
        central += 46 + nlen + ((4 + (16 if size >= _U32 else 0) + (8 if start >= _U32 else 0)) if big else 0)
        n += 1
    return cur + central + 56 + 20 + 22  # zip64 end record + locator (always written) + end record


def _safetensors_size(infos: Sequence[TensorInfo]) -> int:
    head, _ = _header_bytes(infos)
    return len(head) + sum(i.nbytes for i in infos)


# --- peak memory ------------------------------------------------------------------------------
def _peak(entries, want, src_dtypes, lay: Layout, cfg, out_dtype, units: int, jobs: int | None,
          direction: str = "hf-to-mcore") -> PeakMemory:
    """2 x the largest tensor set held at once + 0.3 GB.

    hf-to-mcore holds one entry's sources (all of q/k/v/g, gate+up; one expert's slice for expert
    entries) plus its TP shards; mcore-to-hf holds one entry's TP shards plus the merged tensor.
    Either way ~2x the larger of (sources, all TP shards together).
    """
    best, best_name = 0, ""
    for e in entries:
        if e.kind == "extra":
            continue
        src = 0
        for h in e.hf:
            s = want[h][1:] if e.expert is not None else want[h]
            src += _numel(s) * _itemsize(src_dtypes[h])
        shape = _rank_shape(cfg, e, lay.tp, want)
        shards = _numel(shape) * _itemsize(out_dtype(e)) * lay.tp if shape is not None else 0
        n = max(src, shards)
        if n > best:
            best = n
            best_name = " + ".join(e.hf) + (f" (expert {e.expert})" if e.expert is not None else "")
    if direction == "hf-to-mcore":
        # convert.hf_to_mcore runs one (PP stage, EP rank) unit per worker thread; each also reads the
        # next batch of sources ahead (convert.READ_AHEAD_BYTES, at worst one more such entry)
        from .convert import READ_AHEAD_BYTES

        workers = max(1, min(jobs or os.cpu_count() or 1, units))
        per_worker = 3 * best + 2 * READ_AHEAD_BYTES
        return PeakMemory(PEAK_FORMULA_IMPORT, best_name, best, per_worker + FIXED_OVERHEAD, workers,
                          workers * per_worker + FIXED_OVERHEAD)
    return PeakMemory(PEAK_FORMULA, best_name, best, 2 * best + FIXED_OVERHEAD, 1, 2 * best + FIXED_OVERHEAD)


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


def compress(nums: Iterable[int]) -> str:
    """{0..2}, {3..44}, {0..44 step 4}, {1..43 except 4..40 step 4}: the shortest of a direct and a complement form."""
    s = sorted(set(nums))
    if not s:
        return ""
    direct = _runs(s)
    span = set(range(s[0], s[-1] + 1))
    holes = sorted(span - set(s))
    if holes:
        alt = f"{s[0]}..{s[-1]} except {_runs(holes)}"
        if len(alt) < len(direct):
            return alt
    return direct


def _runs(s: list[int]) -> str:
    parts, i = [], 0
    while i < len(s):
        j = i
        if i + 1 < len(s):
            step = s[i + 1] - s[i]
            while j + 1 < len(s) and s[j + 1] - s[j] == step:
                j += 1
            if j - i >= 2 or (step == 1 and j > i):
                parts.append(f"{s[i]}..{s[j]}" + (f" step {step}" if step != 1 else ""))
                i = j + 1
                continue
        parts.append(str(s[i]))
        i += 1
    return ",".join(parts)


def _how(e: Entry, cfg: Step35Config, lay: Layout) -> str:
    k = e.kind
    bits = []
    if e.ep is not None:
        bits.append(f"EP-split {cfg.num_experts // lay.ep}/rank" if lay.ep > 1 else "experts")
    if k == "replicate":
        bits.append("replicated")
    elif k == "vocab":
        bits.append(f"vocab-padded to {cfg.padded_vocab(lay.tp)}, TP-split rows")
    elif k == "sidecar":
        bits.append(f"no Megatron slot: kept in {SIDECAR}/{MTP_HEADS}")
    elif k in ("column", "swiglu", "expert_fc1", "qkvg"):
        bits.append("TP-split rows" + {"swiglu": " as [gate_r; up_r]", "expert_fc1": " as [gate_r; up_r]",
                                       "qkvg": " per query group + gate rows"}.get(k, ""))
    elif k in ("row", "expert_fc2"):
        bits.append("TP-split columns")
    if e.key.endswith("expert_bias"):
        bits.append("fp32")
    if e.replica:
        bits.append("copy on the MTP stage")
    return ", ".join(bits)


def _mapping(cfg, entries, lay, out_dtype, want) -> list[MappingLine]:
    groups: dict[tuple, dict] = {}
    for e in entries:
        if e.kind == "extra":
            continue
        hf_pat = _hf_pattern(e.hf)
        mc = _mc_pattern(e.key) if e.key else f"{SIDECAR}/{MTP_HEADS}"
        shapes = tuple(want[h] for h in e.hf)
        rshape = _rank_shape(cfg, e, lay.tp, want)
        g = (hf_pat, mc, e.kind, shapes, rshape, e.replica)
        d = groups.setdefault(g, {"layers": set(), "count": 0, "e": e})
        if e.layer is not None:
            d["layers"].add(e.layer)
        d["count"] += 1
    out = []
    for (hf_pat, mc, kind, shapes, rshape, _), d in groups.items():
        hf = hf_pat.replace("{L}", "{" + compress(d["layers"]) + "}") if d["layers"] else hf_pat
        out.append(MappingLine(hf, [list(s) for s in shapes], mc, list(rshape) if rshape else None, kind,
                               _how(d["e"], cfg, lay), DTYPE_NAMES[out_dtype(d["e"])], d["count"]))
    return out


def _tensor_lines(cfg, entries, lay, out_dtype, want) -> list[TensorLine]:
    out = []
    for e in entries:
        if e.kind == "extra":
            continue
        shape = _rank_shape(cfg, e, lay.tp, want)
        dt = out_dtype(e)
        if shape is None:  # sidecar: the whole tensor
            nbytes = _numel(want[e.hf[0]]) * _itemsize(dt)
        else:
            nbytes = _numel(shape) * _itemsize(dt)
        out.append(TensorLine(list(e.hf), [list(want[h]) for h in e.hf], e.key or f"{SIDECAR}/{MTP_HEADS}", e.pp,
                              e.ep, list(shape) if shape else None, DTYPE_NAMES[dt], nbytes, e.expert))
    return out


def _model_summary(cfg: Step35Config, want: dict, dtypes: dict) -> dict:
    params = sum(_numel(s) for s in want.values())
    nbytes = sum(_numel(s) * _itemsize(dtypes[n]) for n, s in want.items())
    experts = sum(_numel(s) for n, s in want.items() if ".moe." in n and n.endswith("_proj.weight"))
    return {"layers": cfg.num_layers, "mtp_layers": cfg.num_mtp, "hidden": cfg.hidden, "vocab": cfg.vocab,
            "experts": cfg.num_experts, "top_k": int(cfg.raw.get("moe_top_k", 0) or 0),
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


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


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
             "config": "bare config.json, no weights", "mcore": "Megatron legacy checkpoint"}
    lines = [f"stepconv inspect: {r.source} ({kinds.get(r.source_kind, r.source_kind)})"]
    m = r.model
    if m:
        lines.append(f"  model      {m['layers']} layers + {m['mtp_layers']} MTP, hidden {m['hidden']}, "
                     f"vocab {m['vocab']}, "
                     f"{m['experts']} experts (top-{m['top_k']}) on {m['moe_layers']} MoE layers")
        lines.append(f"  params     {_count(m['params'])} ({_count(m['expert_params'])} in routed experts), "
                     f"{m['hf_tensors']} HF tensors, {_size(m['hf_bytes'])} as HF safetensors")
    lines.append(f"  plan       {r.direction}, TP={r.tp} PP={r.pp} EP={r.ep}, spec {r.spec}, dtype {r.dtype}")
    if r.rank_files:
        sizes = [f.bytes for f in r.rank_files]
        counts = sorted({f.tensors for f in r.rank_files})
        lines.append(f"  rank files {len(r.rank_files)} x {RANK_FILE}: {_size(sum(sizes))} total, "
                     f"{_size(min(sizes))} .. {_size(max(sizes))} each, "
                     f"{counts[0]}{'..' + str(counts[-1]) if len(counts) > 1 else ''} tensors each")
    for f in r.sidecar_files:
        lines.append(f"  sidecar    {f.name}: {_size(f.bytes)}, {f.tensors} tensor(s)")
    if r.hf_files:
        what = "HF output" if r.direction == "mcore-to-hf" else "HF input"
        lines.append(f"  {what:<10} {len(r.hf_files)} safetensors file(s), {_size(sum(f.bytes for f in r.hf_files))}")
    if r.planned:
        lines.append(f"  writes     {_size(r.total_output_bytes)} in total")
    pm = r.peak_memory
    if pm:
        lines.append(f"  peak mem   ~{_size(pm.estimate_bytes)} = 2 x {_size(pm.largest_bytes)} + 0.3 GB "
                     f"(largest: {pm.largest_name})")
        if pm.workers > 1:
            lines.append(f"             up to ~{_size(pm.parallel_bound_bytes)} with {pm.workers} worker threads "
                         f"each at its largest tensor (--jobs 1 for the single-worker figure)")
    lines.append("  status     " + ("OK" if r.ok else f"{len(r.errors)} error(s)"))
    for n in r.notes:
        lines.append(f"  note       {n}")
    if r.errors:
        lines += ["", "Errors"] + [f"  - {e}" for e in r.errors]
    if r.rank_files:
        lines += ["", "Rank files" + (" (planned; on disk)" if r.direction == "mcore-to-hf" else "")
                  + ": TP ranks of one PP stage and EP rank hold the same keys and shapes"]
        groups = _group_ranks(r.rank_files)
        for i, (name, fs) in enumerate(groups):
            if i == max_rank_lines:
                lines.append(f"  ... {len(groups) - i} more lines (to_dict() lists every file)")
                break
            f = fs[0]
            disk = ""
            if r.direction == "mcore-to-hf":
                sizes = sorted({x.on_disk for x in fs}, key=lambda v: -1 if v is None else v)
                disk = "; on disk " + (_size(sizes[0]) if len(sizes) == 1
                                       else f"{_size(sizes[0])} .. {_size(sizes[-1])}")
            lines.append(f"  {name}  {len(fs)} x {_size(f.bytes)} ({f.bytes} B), {f.tensors} tensors ({f.keys} keys)"
                         f"{disk}")
    if r.hf_files and r.direction == "mcore-to-hf":
        lines += ["", "HF output files"] + [f"  {f.name}  {_size(f.bytes):>10}  {f.tensors:>5} tensors"
                                             for f in r.hf_files]
    if r.mapping:
        lines += ["", "Name mapping (HF -> Megatron; {i} = layer index within its PP stage, {k} = MTP index, "
                      "{e} = local expert index)"]
        if r.pp > 1 and m and r.planned:
            per = m["layers"] // r.pp
            lines.append(f"  PP={r.pp}: stage s holds layers {per}*s .. {per}*s+{per - 1} (i = L - {per}*s); "
                         f"MTP layers on stage {r.pp - 1}")
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
