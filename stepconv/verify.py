"""Logit parity between the HF reference and the Megatron model loaded from stepconv's rank files.

The HF side is transformers' own Step3p7 text model (stepconv.hf_reference); the Megatron side is
stepconv.mcore's GPTModel on real megatron-core, run as TP x PP x EP processes. Both see the same
seeded token ids; the report compares logits, every layer's hidden state and the MTP heads.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import Step35Config, StepconvError
from .mapping import MTP_BLOCK, Layout, detect_mtp_block, respec_state_dict
from .megatron_io import RANK_FILE, load_rank_file, rank_dir_name

GATES = {
    "fp32": {"max_abs": 1e-4, "top1": 1.0},
    "bf16": {"cosine": 0.999, "top1": 0.99},
}
MIN_POSITIONS = 256
# a hidden state "diverges" when its max abs diff exceeds this fraction of its max magnitude
LAYER_TOL = {"fp32": 1e-4, "bf16": 5e-2}


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
    window_convention: str
    batch: int
    seq_len: int
    logits: Metrics
    layers: list[dict]
    first_divergent_layer: int | None
    mtp: list[Metrics] = field(default_factory=list)
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [("main logits", self.logits)] + [(f"MTP {k} logits", m) for k, m in enumerate(self.mtp)]
        head = f"{'':<14}{'max|d|':>11}{'mean|d|':>11}{'cosine':>11}{'KL(hf|mc)':>11}{'top-1':>8}{'top-5':>8}"
        lines = [f"verify {self.hf_dir} vs {self.mcore_dir}",
                 f"  {self.layout}, {self.dtype}, batch {self.batch} x {self.seq_len} tokens, sliding window "
                 f"convention {self.window_convention}", head]
        for name, m in rows:
            lines.append(f"{name:<14}{m.max_abs:>11.3e}{m.mean_abs:>11.3e}{m.cosine:>11.6f}{m.kl:>11.3e}"
                         f"{100 * m.top1:>7.1f}%{100 * m.top5:>7.1f}%")
        worst = max(self.layers, key=lambda r: r["rel"]) if self.layers else None
        lines.append("hidden states: " + (f"first divergent layer {self.first_divergent_layer}"
                                          if self.first_divergent_layer is not None else "no layer diverges")
                     + (f" (worst: {worst['name']} rel {worst['rel']:.2e})" if worst else ""))
        gate = GATES[self.dtype]
        lines.append("gate: " + ", ".join(f"{k} {'<=' if k == 'max_abs' else '>='} {v}" for k, v in gate.items()))
        lines.append(("PASS" if self.passed else "FAIL: " + "; ".join(self.failures)) + f"  ({self.seconds:.1f} s)")
        return "\n".join(lines)


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> Metrics:
    """a = reference (HF), b = candidate (Megatron); [..., V] compared per position in fp64."""
    a = a.reshape(-1, a.shape[-1]).double()
    b = b.reshape(-1, b.shape[-1]).double()
    d = (a - b).abs()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    k = min(5, a.shape[-1])
    ta, tb = a.topk(k, -1).indices, b.topk(k, -1).indices
    overlap = (ta.unsqueeze(-1) == tb.unsqueeze(-2)).any(-1).double().mean().item()
    return Metrics(a.shape[0], d.max().item(), d.mean().item(), cos, kl, top1, overlap)


def _gate(m: Metrics, dtype: str, what: str) -> list[str]:
    g, out = GATES[dtype], []
    if "max_abs" in g and not m.max_abs <= g["max_abs"]:
        out.append(f"{what} max|d| {m.max_abs:.2e} > {g['max_abs']:.0e}")
    if "cosine" in g and not m.cosine >= g["cosine"]:
        out.append(f"{what} cosine {m.cosine:.6f} < {g['cosine']}")
    if not m.top1 >= g["top1"]:
        out.append(f"{what} top-1 {100 * m.top1:.1f}% < {100 * g['top1']:.0f}%")
    if any(math.isnan(x) for x in (m.max_abs, m.cosine)):
        out.append(f"{what} has NaN")
    return out


def make_input_ids(vocab: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


def read_prompt_file(path: str | os.PathLike) -> torch.Tensor:
    """Token ids, whitespace separated; one line per batch row (rows of equal length)."""
    rows = [[int(x) for x in line.split()] for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or len({len(r) for r in rows}) != 1:
        raise StepconvError(f"{path}: expected one or more lines of the same number of integer token ids")
    return torch.tensor(rows, dtype=torch.long)


class RankFiles:
    """Per-rank state dicts for the Megatron runner, renamed to the local spec the CPU model uses."""

    def __init__(self, itdir: Path, cfg: dict, layout: Layout, spec: str, mtp_block: str):
        self.itdir, self.cfg, self.layout, self.spec, self.mtp_block = itdir, cfg, layout, spec, mtp_block

    def __call__(self, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
        lay = self.layout
        path = self.itdir / rank_dir_name(tp_rank, pp_rank, ep_rank, lay.pp_size, lay.ep_size) / RANK_FILE
        sd = load_rank_file(path)["model"]
        if self.spec == "local" and self.mtp_block == MTP_BLOCK:
            return dict(sd)
        return respec_state_dict(sd, Step35Config.from_dict(self.cfg), lay, pp_rank, ep_rank, src=self.spec,
                                 dst="local", src_mtp=self.mtp_block)


class ResplitRanks:
    """Per-rank local-spec state dicts at `layout` built from a checkpoint of any format or layout (torch_dist,
    or legacy files saved at another layout): each rank process reads only the tensors its rank holds."""

    def __init__(self, mcore_dir: Path, iteration: str | None, hf_config: Path, layout: Layout):
        self.mcore_dir, self.iteration, self.hf_config, self.layout = mcore_dir, iteration, hf_config, layout

    def __call__(self, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
        from .convert import plan_export, rank_state_dict

        src = plan_export(self.mcore_dir, iteration=self.iteration, hf_config=self.hf_config)
        return rank_state_dict(src, self.layout, "local", tp_rank, pp_rank, ep_rank)


def verify(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, *, dtype: str = "fp32", batch: int | None = None,
           seq_len: int | None = None, prompt_file: str | os.PathLike | None = None, seed: int = 0,
           iteration: str | None = None, trust_remote_code: bool = False,
           window_convention: str | None = None, device: str | None = None,
           layout: Layout | None = None) -> VerifyReport:
    """Logit parity of `hf_dir` and the Megatron checkpoint `mcore_dir` (legacy or torch_dist), the Megatron side run
    at `layout` (default: the layout recorded in the checkpoint's args)."""
    from .hf_reference import load_hf_reference
    from .mcore.run import megatron_forward

    t0 = time.time()
    if dtype not in GATES:
        raise StepconvError(f"--dtype must be fp32 or bf16; got {dtype!r}")
    hf_dir, mcore_dir = Path(hf_dir), Path(mcore_dir)
    cfg = Step35Config.from_file(hf_dir / "config.json")
    from .convert import plan_export

    src = plan_export(mcore_dir, iteration=iteration, hf_config=hf_dir / "config.json")
    if src.problems:
        raise StepconvError(src.problems[0])
    args = src.args
    lay = layout or src.layout
    cfg.validate_parallel(lay.tp_size, lay.pp_size, lay.ep_size)
    tp, pp, ep = lay.tp_size, lay.pp_size, lay.ep_size
    if window_convention is None:
        window_convention = (getattr(args, "stepconv", None) or {}).get("sliding_window_convention") or getattr(
            args, "step35_window_convention", "hf")
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    device = device or ("cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= tp * pp * ep else "cpu")

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

    t1 = time.time()
    ref = load_hf_reference(hf_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    with torch.no_grad():
        hf = ref.forward(ids)
    t_hf = time.time() - t1
    t1 = time.time()
    if src.format == "torch" and lay == src.layout:
        keys = [e.key for e in src.entries if e.stage == pp - 1 and e.kind.megatron]
        loader = RankFiles(src.source.path, cfg.raw, lay, src.spec, detect_mtp_block(keys))
    else:
        loader = ResplitRanks(Path(mcore_dir), iteration, hf_dir / "config.json", lay)
    mc = megatron_forward(loader, cfg.raw, ids, tp=tp, pp=pp, ep=ep, window_convention=window_convention,
                          dtype=torch_dtype, start_method="spawn" if device == "cuda" else "forkserver", device=device)
    t_mc = time.time() - t1

    logits = compare_logits(hf["logits"], mc["logits"][..., :cfg.vocab])
    layers, first = [], None
    tol = LAYER_TOL[dtype]
    for i, (a, b) in enumerate(zip(hf["hidden_states"], mc["hidden_states"])):
        a, b = a.double(), b.double()
        diff = (a - b).abs().max().item()
        rel = diff / max(a.abs().max().item(), 1e-12)
        name = "embedding" if i == 0 else f"layer {i - 1}"
        layers.append({"name": name, "max_abs": diff, "rel": rel})
        if first is None and rel > tol:
            first = i - 1
    mtp = []
    with torch.no_grad():
        for k, (h_hf, h_mc) in enumerate(zip(hf.get("mtp_hidden", []), mc.get("mtp_hidden", []))):
            n = h_hf.shape[1]
            mc_logits = ref.mtp_logits(k, h_mc[:, :n].to(h_hf.dtype))
            mtp.append(compare_logits(hf["mtp_logits"][k], mc_logits))
            a, b = h_hf.double(), h_mc[:, :n].double()
            layers.append({"name": f"mtp {k}", "max_abs": (a - b).abs().max().item(),
                           "rel": (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)})

    failures = _gate(logits, dtype, "logits")
    for k, m in enumerate(mtp):
        failures += _gate(m, dtype, f"MTP {k}")
    if len(mtp) != cfg.num_mtp:
        failures.append(f"MTP: compared {len(mtp)} of {cfg.num_mtp} layers")
    report = VerifyReport(str(hf_dir), str(mcore_dir), f"TP={tp} PP={pp} EP={ep}", dtype, window_convention, batch,
                          seq_len, logits, layers, first, mtp, passed=not failures, failures=failures,
                          timings={"hf_forward_s": t_hf, "megatron_s": t_mc, **mc.get("timings", {})})
    report.seconds = time.time() - t0
    return report


def write_json(report: VerifyReport, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
