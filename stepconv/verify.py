"""Parity of a Megatron checkpoint with the HF checkpoint it came from, streamed one layer at a time.

The HF side is transformers' own Step3p7 layers (``stepconv.hf_reference.StreamedReference``), or with
``trust_remote_code`` the checkpoint folder's own modeling_step3p5.py (``stepconv.remote_reference``); the Megatron
side is stepconv.mcore's Step-3.5 modules on real megatron-core (``stepconv.mcore.stream``), run as a TP x EP world of
processes (gloo on CPU, NCCL on GPUs). Each side holds one layer at a time, loaded with only that layer's weights,
so memory does not grow with depth. The caller runs the HF layers and leaves each one's inputs and outputs in an
exchange folder; the ranks, a few layers behind, run the same Megatron layer:

* teacher-forced (what passes or fails): the Megatron layer gets the HF layer's input; its attention gets the HF
  input, its MLP the HF post-attention residual, its MoE router and experts the HF MLP input (router agreement:
  fraction of tokens whose top-k set is identical; experts: each selected expert's own output under the HF
  routing, through megatron's dispatcher, compared expert by expert). Differences are relative to what the
  sublayer adds to the residual stream (its update), so a one-head error is not hidden by the residual.
* free-running: the Megatron chain fed by its own outputs, to the final logits and the MTP heads (max/mean |d|,
  cosine, KL, top-1/5), as a user running Megatron would see them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import StepconvError
from .mapping import Layout, detect_mtp_block
from .safety import bounded_text

# Gates. Per layer (teacher-forced, relative to the sublayer's update): max_rel = max|d| / max|update|,
# cosine of the updates; experts: sqrt(sum |d|^2 / sum |out|^2) over one expert's selections, the worst expert.
# bf16 gates the attention and MLP sublayers only: a whole MoE layer in bf16 routes some tokens differently after
# its own attention's rounding (measured at real width: layer cosine 0.99967 on an exact conversion, while each
# sublayer fed the HF input stays >= 0.99989). docs/VERIFY.md gives the measurements behind every bf16 number.
GATES = {
    "fp32": {"layer_max_rel": 1e-4, "expert_rel": 1e-4, "router": 0.99, "logits_max_abs": 1e-4, "top1": 1.0},
    "bf16": {"sublayer_cosine": 0.9996, "expert_rel": 0.02, "router": 0.95},
}
MIN_POSITIONS = 256
AHEAD = 2  # HF layers the caller may run ahead of the ranks (each one's exchange file holds its activations)


@dataclass
class Metrics:
    positions: int
    max_abs: float
    mean_abs: float
    cosine: float
    kl: float
    top1: float
    top5: float


@dataclass
class VerifyReport:
    hf_dir: str
    mcore_dir: str
    layout: str
    dtype: str
    device: str
    window_convention: str
    batch: int
    seq_len: int
    layer_range: tuple[int, int]
    layers: list[dict]
    first_divergent_layer: int | None
    reference: str = ""  # what ran the HF side (and what of the model it does not cover)
    logits: Metrics | None = None  # free-running chain
    head: Metrics | None = None  # final norm + output layer on the HF last hidden state
    mtp: list[Metrics] = field(default_factory=list)
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    peak_rss_mib: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        a, b = self.layer_range
        lines = [f"verify {self.hf_dir} vs {self.mcore_dir}",
                 f"  {self.layout} on {self.device}, {self.dtype}, batch {self.batch} x {self.seq_len} tokens, layers "
                 f"{a}:{b}, sliding window convention {self.window_convention}",
                 f"  HF side: {self.reference}",
                 "teacher-forced per layer (relative to the sublayer's update; chain = free-running, relative to "
                 "the hidden state):",
                 f"{'':<12}{'attn max':>10}{'mlp max':>10}{'layer max':>10}{'mean':>10}{'cosine':>11}"
                 f"{'router':>8}{'expert':>10}{'chain':>10}"]

        def g(row, part, key, fmt="{:10.2e}"):
            v = (row.get(part) or {}).get(key)
            return fmt.format(v) if v is not None else " " * len(fmt.format(0.0))

        for r in self.layers:
            router = f"{100 * r['router_agreement']:7.1f}%" if "router_agreement" in r else " " * 8
            expert = f"{r['expert']['max_rel']:10.2e}" if "expert" in r else " " * 10
            mark = "  <-- " + "; ".join(r["failures"]) if r.get("failures") else ""
            lines.append(f"{r['name']:<12}{g(r, 'attn', 'max_rel')}{g(r, 'mlp', 'max_rel')}{g(r, 'layer', 'max_rel')}"
                         f"{g(r, 'layer', 'mean_rel')}{g(r, 'layer', 'cosine', '{:11.7f}')}{router}{expert}"
                         f"{g(r, 'chain', 'max_rel')}{mark}")
        head = f"{'':<16}{'max|d|':>11}{'mean|d|':>11}{'cosine':>11}{'KL(hf|mc)':>11}{'top-1':>8}{'top-5':>8}"
        rows = [("head (forced)", self.head), ("logits (chain)", self.logits)] + [
            (f"MTP {k} (chain)", m) for k, m in enumerate(self.mtp)]
        if any(m is not None for _, m in rows):
            lines.append(head)
        for name, m in rows:
            if m is not None:
                lines.append(f"{name:<16}{m.max_abs:>11.3e}{m.mean_abs:>11.3e}{m.cosine:>11.6f}{m.kl:>11.3e}"
                             f"{100 * m.top1:>7.1f}%{100 * m.top5:>7.1f}%")
        lines.append("first divergent layer: " + (str(self.first_divergent_layer)
                                                   if self.first_divergent_layer is not None else "none"))
        lines.append("gate: " + ", ".join(f"{k} {v}" for k, v in GATES[self.dtype].items()))
        lines.append(("PASS" if self.passed else "FAIL: " + "; ".join(self.failures)) + f"  ({self.seconds:.1f} s)")
        return "\n".join(lines)


def compare_logits(a: torch.Tensor, b: torch.Tensor, rows: int = 64) -> Metrics:
    """a = reference (HF), b = candidate (Megatron); [..., V] compared per position in fp64, `rows` positions at a
    time (a real-vocab batch in fp64 at once would take gigabytes)."""
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    n, k = a.shape[0], min(5, a.shape[-1])
    mx = tot = cos = kl = top1 = top5 = 0.0
    for lo in range(0, n, rows):
        x, y = a[lo:lo + rows].double(), b[lo:lo + rows].double()
        d = (x - y).abs()
        mx, tot = max(mx, d.max().item()), tot + d.sum().item()
        cos += torch.nn.functional.cosine_similarity(x, y, dim=-1).sum().item()
        lx, ly = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        kl += (lx.exp() * (lx - ly)).sum().item()
        top1 += (x.argmax(-1) == y.argmax(-1)).double().sum().item()
        tx, ty = x.topk(k, -1).indices, y.topk(k, -1).indices
        top5 += (tx.unsqueeze(-1) == ty.unsqueeze(-2)).any(-1).double().mean(-1).sum().item()
    return Metrics(n, mx, tot / max(n * a.shape[-1], 1), cos / n, kl / n, top1 / n, top5 / n)


def diff_stats(ref: torch.Tensor, cand: torch.Tensor, base: torch.Tensor | None) -> dict:
    """max/mean relative difference and cosine of `cand` against `ref`; with `base` (the shared input), of the updates
    `cand - base` and `ref - base`."""
    r, c = ref.double(), cand.double()
    if base is not None:
        r, c = r - base.double(), c - base.double()
    d = (c - r).abs()
    return {"max_rel": d.max().item() / max(r.abs().max().item(), 1e-30),
            "mean_rel": d.mean().item() / max(r.abs().mean().item(), 1e-30),
            "cosine": torch.nn.functional.cosine_similarity(r.flatten(), c.flatten(), dim=0).item()}


def expert_stats(hf_slots: torch.Tensor, mc_slots: list[torch.Tensor], idx: torch.Tensor) -> dict:
    """Each expert's outputs under identical routing: slot j of `hf_slots` [k, T, H] and `mc_slots[j]` [T, H] are the
    outputs of expert `idx[:, j]` for every token. Per expert sqrt(sum |d|^2 / sum |hf|^2); the worst one."""
    E = int(idx.max().item()) + 1
    err, ref = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    for j, mc in enumerate(mc_slots):
        h = hf_slots[j].double()
        err.index_add_(0, idx[:, j], (mc.double() - h).pow(2).sum(-1))
        ref.index_add_(0, idx[:, j], h.pow(2).sum(-1))
    used = ref > 0
    rel = torch.where(used, (err / ref.clamp_min(1e-300)).sqrt(), torch.zeros_like(err))
    worst = int(rel.argmax().item())
    return {"max_rel": rel[worst].item(), "worst_expert": worst, "experts_seen": int(used.sum().item())}


def _logit_failures(m: Metrics, dtype: str, what: str) -> list[str]:
    g, out = GATES[dtype], []
    if any(math.isnan(x) for x in (m.max_abs, m.cosine)):
        return [f"{what} has NaN"]
    if "logits_max_abs" in g and not m.max_abs <= g["logits_max_abs"]:
        out.append(f"{what} max|d| {m.max_abs:.2e} > {g['logits_max_abs']:.0e}")
    if "top1" in g and not m.top1 >= g["top1"]:
        out.append(f"{what} top-1 {100 * m.top1:.1f}% < {100 * g['top1']:.0f}%")
    return out


def row_failures(row: dict, dtype: str) -> list[str]:
    """Why a per-layer row fails its dtype's gate (empty: it passes)."""
    g, out = GATES[dtype], []
    parts = ("attn", "mlp", "layer") if "attn" in row else ("layer",) if "layer" in row else ("chain",)
    if "sublayer_cosine" in g and "attn" in row:
        parts = ("attn", "mlp")
    for part in parts:
        s = row[part]
        if any(math.isnan(s[k]) for k in ("max_rel", "cosine")):
            out.append(f"{part} NaN")
        elif "layer_max_rel" in g and not s["max_rel"] <= g["layer_max_rel"]:
            out.append(f"{part} max rel {s['max_rel']:.1e} > {g['layer_max_rel']:.0e}")
        elif "sublayer_cosine" in g and not s["cosine"] >= g["sublayer_cosine"]:
            out.append(f"{part} cosine {s['cosine']:.5f} < {g['sublayer_cosine']}")
    if "router_agreement" in row and not row["router_agreement"] >= g["router"]:
        out.append(f"router agreement {100 * row['router_agreement']:.1f}% < {100 * g['router']:.0f}%")
    if "expert" in row and not row["expert"]["max_rel"] <= g["expert_rel"]:
        e = row["expert"]
        out.append(f"expert {e['worst_expert']} rel {e['max_rel']:.1e} > {g['expert_rel']:.0e}")
    return out


def make_input_ids(vocab: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


PROMPT_LIMIT = 64 << 20  # 64 MiB: ~8M token ids as text, far beyond any verify batch


def read_prompt_file(path: str | os.PathLike) -> torch.Tensor:
    """Token ids, whitespace separated; one line per batch row (rows of equal length). Read like every other input:
    a regular file, at most PROMPT_LIMIT bytes (a FIFO or /dev/zero would otherwise hang or fill memory)."""
    text = bounded_text(Path(path), "prompt file of token ids", PROMPT_LIMIT)
    try:
        rows = [[int(x) for x in line.split()] for line in text.splitlines() if line.strip()]
    except ValueError:
        raise StepconvError(f"{path}: expected integer token ids separated by spaces, one row per line") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise StepconvError(f"{path}: expected one or more lines of the same number of integer token ids")
    return torch.tensor(rows, dtype=torch.long)


def parse_layers(text: str | None, num_layers: int) -> tuple[int, int]:
    """`--layers A:B` (Python slice of the main layers, either end optional) -> (A, B)."""
    if text is None:
        return 0, num_layers
    try:
        a, b = text.split(":")
        lo, hi = int(a) if a.strip() else 0, int(b) if b.strip() else num_layers
    except ValueError:
        raise StepconvError(f"--layers {text!r}: expected A:B (e.g. 40:45, 3:, :5)") from None
    if not 0 <= lo < hi <= num_layers:
        raise StepconvError(f"--layers {text!r}: need 0 <= A < B <= {num_layers} (num_hidden_layers)")
    return lo, hi


def pick_device(device: str | None, world: int) -> str:
    """cuda when asked or when there are enough GPUs (one per rank), else cpu; one line when cuda cannot be."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        return "cuda" if have >= world else "cpu"
    if device not in ("cpu", "cuda"):
        raise StepconvError(f"--device must be cpu or cuda; got {device!r}")
    if device == "cuda" and have < world:
        raise StepconvError(f"--device cuda needs {world} GPU(s) (one per rank, TP x EP = {world}); {have} visible")
    return device


def _put(exchange: Path, tag: str, tensors: dict) -> None:
    tmp = exchange / f"hf_{tag}.tmp"
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    tmp.replace(exchange / f"hf_{tag}.pt")  # the ranks see a file only once it is whole


def _progress(exchange: Path) -> int:
    try:
        return int((exchange / "progress").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def verify(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, **options) -> VerifyReport:
    """Parity of `hf_dir` and the Megatron checkpoint `mcore_dir` (legacy or torch_dist), streamed layer by layer.

    The Megatron side runs at `layout`'s TP and EP (default: the checkpoint's; PP plays no role when layers run one
    at a time), on `device` ("cpu", "cuda"; default cuda when there is a GPU per rank). `layers` "A:B" checks main
    layers A..B-1 only (both sides start layer A from the HF embeddings; the head and MTP need B = num layers).
    `dtype` "fp32" checks the conversion (bf16 weights upcast exactly); "bf16" runs both sides in bf16.
    `options` are those of `verify_many`.

    Example: ``verify("Step-3.5-Flash", "Step-3.5-Flash-mcore", layers="40:45").passed``.
    """
    return verify_many(hf_dir, [mcore_dir], **options)[0]


def verify_many(hf_dir: str | os.PathLike, mcore_dirs: list, *, dtype: str = "fp32", batch: int | None = None,
                seq_len: int | None = None, prompt_file: str | os.PathLike | None = None, seed: int = 0,
                iteration: str | None = None, trust_remote_code: bool = False,
                window_convention: str | None = None, device: str | None = None,
                layout: Layout | None = None, layers: str | None = None, quiet: bool = True) -> list[VerifyReport]:
    """`verify` of several Megatron checkpoints of one HF checkpoint against a single HF pass, in one world of rank
    processes (each layer is loaded and run once per checkpoint); one report each. All run at one TP x EP: `layout`,
    else the first checkpoint's; a checkpoint saved otherwise (or torch_dist) is resplit to it as it is read."""
    from .convert import check_export, check_hf, plan_export
    from .mcore.run import RankError, start_ranks
    from .mcore.stream import RankFileWeights, ResplitWeights, StreamJob, stream_rank
    from .progress import steps

    t0 = time.time()
    if dtype not in GATES:
        raise StepconvError(f"--dtype must be fp32 or bf16; got {dtype!r}")
    hf_dir = Path(hf_dir)
    cfg = check_hf(hf_dir).config  # the conversions' own validation of the reference folder
    srcs = []
    for d in mcore_dirs:
        src = plan_export(d, iteration=iteration, hf_config=hf_dir / "config.json")
        check_export(src)  # the same validation as mcore-to-hf, before any rank starts
        srcs.append(src)
    args = srcs[0].args
    lay = layout or srcs[0].layout
    cfg.validate_parallel(lay.tp_size, 1, lay.ep_size)
    tp, ep = lay.tp_size, lay.ep_size
    first, last = parse_layers(layers, cfg.num_layers)
    full = last == cfg.num_layers
    if window_convention is None:
        window_convention = (getattr(args, "stepconv", None) or {}).get("sliding_window_convention") or getattr(
            args, "step35_window_convention", "hf")
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    device = pick_device(device, tp * ep)

    if prompt_file is not None:
        ids = read_prompt_file(prompt_file)
        if int(ids.max()) >= cfg.vocab or int(ids.min()) < 0:
            raise StepconvError(f"{prompt_file}: token ids must be in [0, {cfg.vocab})")
    else:
        window = cfg.sliding_window or 0
        seq_len = seq_len or max(2 * window + 8, 16)  # longer than twice the window: the window is exercised
        if batch is None:  # enough positions that one top-1 flip is under the 1% bf16 allowance
            batch = max(2, -(-MIN_POSITIONS // seq_len))
        ids = make_input_ids(cfg.vocab, batch, seq_len, seed)
    batch, seq_len = ids.shape

    weights = []
    for d, src in zip(mcore_dirs, srcs):
        # the run's TP and EP with ETP = TP and one model chunk per rank (any PP): pieces straight from the rank files
        if src.format == "torch" and (src.layout.tp_size, src.layout.ep_size, src.layout.etp_size) == (tp, ep, tp) \
                and not src.layout.vpp_size:
            keys = [e.key for e in src.entries if e.stage == src.layout.pp_size - 1 and e.kind.megatron]
            weights.append(RankFileWeights(src.source.path, cfg.raw, src.layout, src.spec, detect_mtp_block(keys)))
        else:
            weights.append(ResplitWeights(Path(d), iteration, hf_dir / "config.json", tp, ep))
    ref = _reference(hf_dir, trust_remote_code, torch_dtype, device)  # its strict name check runs before any rank
    exchange = Path(tempfile.mkdtemp(prefix="stepconv_verify_"))
    pieces = 1 + (last - first) + (1 + cfg.num_mtp if full else 0)
    job = StreamJob(cfg.raw, weights, torch_dtype, window_convention, str(exchange), first, last, full)
    hf_seconds: dict[str, float] = {}
    put = 0
    group = None
    try:
        group = start_ranks(stream_rank, job, tp=tp, pp=1, ep=ep, device=device,
                            start_method="spawn" if device == "cuda" else "forkserver")
        with steps(2 * pieces, "verify", quiet=quiet) as report:
            def tick(what: str) -> None:
                if report is not None:
                    report(put + _progress(exchange), what)

            def hand_over(tag: str, tensors: dict) -> None:
                nonlocal put
                while put - _progress(exchange) >= AHEAD:  # the ranks are behind: wait (and notice if one failed)
                    group.poll(0.1)
                    tick(f"Megatron {_progress(exchange)}/{pieces}")
                _put(exchange, tag, tensors)
                put += 1
                tick(f"HF {tag.replace('_', ' ')}")

            t1 = time.time()
            h = ref.start(ids)
            hand_over("start", {"ids": ids, "h": h})
            hf_seconds["start"] = time.time() - t1
            for i in range(first, last):
                t1 = time.time()
                tr = ref.layer(i, h)
                hf_seconds[f"layer_{i}"] = time.time() - t1
                extra = {"x": tr.x, "idx": tr.idx, "slots": tr.slots} if tr.idx is not None else {}
                hand_over(f"layer_{i}", {"in": h, "mid": tr.mid, "out": tr.out, **extra})
                h = tr.out
                del tr, extra
            mtp_logits = []
            if full:
                t1 = time.time()
                hand_over("final", {"h": h, "logits": ref.final(h)})
                hf_seconds["final"] = time.time() - t1
                hk = h
                for k in range(cfg.num_mtp):
                    t1 = time.time()
                    z, lg = ref.mtp(k, hk)
                    hf_seconds[f"mtp_{k}"] = time.time() - t1
                    hand_over(f"mtp_{k}", {"in": hk, "out": z})
                    mtp_logits.append(lg.cpu())
                    hk = z
            t_hf = time.time() - t0
            results = group.results(poll=lambda: tick(f"Megatron {_progress(exchange)}/{pieces}"))
    except RankError as e:
        raise StepconvError(f"Megatron side: {e}") from None
    finally:
        (exchange / "abort").touch()
        if group is not None:
            group.stop()
        shutil.rmtree(exchange, ignore_errors=True)

    mc_seconds = results[0]["seconds"]
    rss = {"reference": _peak_rss_mib(), "ranks": [r["peak_rss_mib"] for r in results]}
    reports = []
    for d, lead in zip(mcore_dirs, results[0]["sources"]):
        rows, failures, first_bad = lead["rows"], [], None
        for r in rows:
            tag = "start" if r["index"] is None else (f"layer_{r['index']}" if r["index"] < cfg.num_layers
                                                      else f"mtp_{r['index'] - cfg.num_layers}")
            r["hf_seconds"], r["megatron_seconds"] = hf_seconds.get(tag), mc_seconds.get(tag)
            r["failures"] = row_failures(r, dtype)
            if r["failures"]:
                failures.append(f"{r['name']}: {r['failures'][0]}")
                if first_bad is None and r["index"] is not None:
                    first_bad = r["index"]
        mtp = []
        if full:
            failures += _logit_failures(lead["head"], dtype, "head (teacher-forced)")
            if dtype == "fp32":  # bf16 chains drift by design (docs/VERIFY.md): reported, gated per layer instead
                failures += _logit_failures(lead["logits"], dtype, "logits")
            for k, normed in enumerate(lead["mtp_normed"]):
                mtp.append(compare_logits(mtp_logits[k], ref.mtp_logits(k, normed).cpu()))
                if dtype == "fp32":
                    failures += _logit_failures(mtp[-1], dtype, f"MTP {k}")
            if len(mtp) != cfg.num_mtp:
                failures.append(f"MTP: compared {len(mtp)} of {cfg.num_mtp} layers")
        rep = VerifyReport(str(hf_dir), str(d), f"TP={tp} EP={ep}", dtype, device, window_convention, batch, seq_len,
                           (first, last), rows, first_bad, ref.description, lead.get("logits"), lead.get("head"), mtp,
                           passed=not failures, failures=failures,
                           timings={"hf_s": t_hf, "total_s": time.time() - t0, "hf_pieces_s": hf_seconds,
                                    "megatron_pieces_s": mc_seconds}, peak_rss_mib=rss)
        rep.seconds = time.time() - t0
        reports.append(rep)
    return reports


def _reference(hf_dir: Path, trust_remote_code: bool, dtype: torch.dtype, device: str):
    """The HF side: transformers' in-tree Step3p7 layers, or with `trust_remote_code` the folder's own modeling file
    (``remote_reference``, which never imports the in-tree model, so it also runs on transformers 4.x)."""
    where = "cuda" if device == "cuda" else "cpu"
    if trust_remote_code:
        from .remote_reference import RemoteReference

        return RemoteReference(hf_dir, dtype=dtype, device=where)
    from .hf_reference import StreamedReference

    try:
        return StreamedReference(hf_dir, dtype=dtype, device=where)
    except (ValueError, NotImplementedError) as e:  # strict-load problems, unsupported configs: one line
        raise StepconvError(f"{hf_dir}: {str(e).splitlines()[0]}") from None


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(report: VerifyReport, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
