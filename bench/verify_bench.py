#!/usr/bin/env python
"""Time `stepconv verify` at Step-3.5-Flash's real width on a few layers, and extrapolate to the full model.

    python bench/verify_bench.py --out /tmp/vb [--scale 1] [--layers 3] [--moe 2] [--mtp 1]
        [--runs cuda:tp2:fp32,cuda:tp1ep2:fp32,cuda:tp2:bf16,cpu:tp2:fp32]

1. Generates a HF folder with the real config.json's fields at width 4096/scale (head counts 64/96, 8 KV groups,
   288 experts or `--experts`, vocab 128896), `--layers` main layers (layer 0 full attention, the rest sliding) of
   which the `--moe` last are MoE, and `--mtp` MTP layers. Every tensor is its own seeded normal draw (made on a
   GPU when there is one), so every expert of a stacked tensor has distinct weights (an expert mix-up is visible).
2. Converts it with hf-to-mcore to TP=2 and to TP=1 x EP=2 (local spec).
3. Runs each verify of `--runs` (device:layout:dtype) and prints, per run, the pass/fail, the worst per-layer
   teacher-forced numbers and seconds per dense and MoE layer on each side; then the full 45 + 3 MTP layer time
   extrapolated from them (the HF and Megatron sides overlap, so a layer costs the slower of the two).
   Results go to OUT/verify_bench.json.
4. `--controls DEVICE:DTYPE`: also checks, against the same HF pass as the exact TP=2 conversion, a copy of it with
   two independent one-detail bugs, each in its own layer: one head's gate row zeroed in layer 1 (TP rank 1) and
   routed expert 5 of the last MoE layer scaled by 1.05 (its down projection, both ranks). Teacher forcing keeps
   them apart: each shows only in its own layer's row. The rows go to OUT/verify_controls.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def make_config(scale: int, layers: int, moe: int, mtp: int, experts: int = 288) -> dict:
    from run_bench import synth_config

    cfg = synth_config(scale, layers=layers, mtp=mtp, experts=experts)
    cfg["moe_layers_enum"] = ",".join(str(i) for i in range(layers - moe, layers))
    return cfg


def make_checkpoint(out: Path, cfg: dict, seed: int = 0) -> None:
    """Distinct seeded weights of O(1) activation scale (as the tiny fixture's), bf16, router bias fp32."""
    from safetensors.torch import save_file

    from stepconv.config import Step35Config
    from stepconv.mapping import hf_shapes

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in hf_shapes(Step35Config.from_dict(cfg)).items():
        if name.endswith("router_bias"):
            t = 0.1 * torch.randn(shape, generator=g, device=dev)
        elif len(shape) == 1:  # zero-centred norms, stored as gamma - 1
            t = 0.2 * torch.randn(shape, generator=g, device=dev)
        elif name == "model.embed_tokens.weight":
            t = 3.0 * torch.randn(shape, generator=g, device=dev)
        else:
            t = torch.randn(shape, generator=g, device=dev) / shape[-1] ** 0.5
        tensors[name] = t.to(torch.float32 if name.endswith("router_bias") else torch.bfloat16).cpu()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def summarize(rep, cfg: dict) -> dict:
    rows = [r for r in rep.layers if r["index"] is not None]
    worst = {}
    for part in ("attn", "mlp", "layer"):
        vals = [r[part] for r in rows if part in r]
        if vals:
            worst[part] = {"max_rel": max(v["max_rel"] for v in vals), "min_cosine": min(v["cosine"] for v in vals)}
    experts = [r["expert"]["max_rel"] for r in rows if "expert" in r]
    routers = [r["router_agreement"] for r in rows if "router_agreement" in r]
    L = cfg["num_hidden_layers"]

    def secs(kind: str) -> dict:
        sel = [r for r in rows if (r["index"] >= L) == (kind == "mtp") and (kind == "mtp" or r["moe"] == (kind == "moe"))]
        if not sel:
            return {}
        hf = [r["hf_seconds"] or 0.0 for r in sel]
        mc = [r["megatron_seconds"] or 0.0 for r in sel]
        return {"hf_s": sum(hf) / len(sel), "megatron_s": sum(mc) / len(sel),
                "layer_s": sum(max(a, b) for a, b in zip(hf, mc)) / len(sel)}

    per = {k: secs(k) for k in ("dense", "moe", "mtp")}
    fixed = rep.seconds - sum(max(r["hf_seconds"] or 0, r["megatron_seconds"] or 0) for r in rows)
    full = fixed + 3 * per["dense"].get("layer_s", 0) + 42 * per["moe"].get("layer_s", 0) + 3 * (
        per["mtp"] or per["dense"]).get("layer_s", 0)
    return {"passed": rep.passed, "failures": rep.failures, "device": rep.device, "layout": rep.layout,
            "dtype": rep.dtype, "tokens": rep.batch * rep.seq_len, "seconds": rep.seconds, "worst": worst,
            "expert_max_rel": max(experts) if experts else None, "router_min": min(routers) if routers else None,
            "logits": rep.logits.__dict__ if rep.logits else None, "per_layer_s": per, "fixed_s": fixed,
            "full_model_estimate_s": full, "peak_rss_mib": rep.peak_rss_mib,
            "rows": [{k: r.get(k) for k in ("name", "attn", "mlp", "layer", "router_agreement", "expert",
                                             "hf_seconds", "megatron_seconds")} for r in rows]}


def controls(hf: Path, good: Path, out: Path, cfg: dict, device: str, dtype: str, seq_len=None) -> None:
    from stepconv.convert import hf_to_mcore
    from stepconv.megatron_io import load_rank_file
    from stepconv.verify import verify_many

    if not good.exists():
        hf_to_mcore(hf, good, tp=2, spec="local")
    bad = out / "tp2-controls"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(good, bad)
    last_moe = max(int(x) for x in cfg["moe_layers_enum"].split(","))
    for f in sorted((bad / "release").glob("mp_rank_*/model_optim_rng.pt")):
        obj = load_rank_file(f)
        # (every tensor copied out of the mapped file before the file is rewritten)
        model = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in obj["model"].items()}
        rank = int(f.parent.name.split("_")[2])
        if rank == 1:
            model["decoder.layers.1.self_attention.linear_qkv.weight"][-2] = 0  # one head's gate row on this rank
        fc2 = f"decoder.layers.{last_moe}.mlp.experts.local_experts.5.linear_fc2.weight"
        model[fc2] = model[fc2] * 1.05
        obj["model"] = model
        torch.save(obj, f)
    reps = verify_many(hf, [good, bad], dtype=dtype, device=device, seq_len=seq_len)
    rows = []
    for rep in reps:
        print(rep.table(), flush=True)
        rows.append({"checkpoint": Path(rep.mcore_dir).name, "passed": rep.passed, "failures": rep.failures,
                     "first_divergent_layer": rep.first_divergent_layer, "rows": summarize(rep, cfg)["rows"]})
    (out / "verify_controls.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    shutil.rmtree(bad, ignore_errors=True)


def main(argv=None) -> int:
    from stepconv.convert import hf_to_mcore
    from stepconv.mapping import Layout
    from stepconv.verify import verify

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--moe", type=int, default=1)
    ap.add_argument("--mtp", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--experts", type=int, default=288, help="routed experts per MoE layer (top-k stays 8)")
    ap.add_argument("--runs", default="cuda:tp2:fp32,cuda:tp1ep2:fp32,cuda:tp2:bf16,cuda:tp1ep2:bf16,cpu:tp2:fp32",
                    help="comma-separated device:layout:dtype; empty: only write the checkpoint (OUT/hf)")
    ap.add_argument("--controls", default=None, help="DEVICE:DTYPE, e.g. cuda:bf16")
    ap.add_argument("--keep", action="store_true", help="keep the converted checkpoints under OUT")
    ap.add_argument("--verify-layers", default=None, help="verify --layers A:B (e.g. 1:3: no head or MTP)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(a.scale, a.layers, a.moe, a.mtp, a.experts)
    hf = out / "hf"
    t = time.time()
    if not (hf / "config.json").exists():
        make_checkpoint(hf, cfg)
    print(f"checkpoint {time.time() - t:.1f} s", flush=True)
    dirs = {"tp2": (out / "tp2", dict(tp=2)), "tp1ep2": (out / "tp1ep2", dict(tp=1, ep=2))}
    results = []
    for run in filter(None, a.runs.split(",")):
        device, lay, dtype = run.split(":")
        d, kw = dirs[lay]
        if not d.exists():
            t = time.time()
            hf_to_mcore(hf, d, spec="local", **kw)
            print(f"hf-to-mcore {lay} {time.time() - t:.1f} s", flush=True)
        rep = verify(hf, d, dtype=dtype, device=device, seq_len=a.seq_len, layers=a.verify_layers,
                     layout=Layout(kw.get("tp", 1), 1, kw.get("ep", 1)))
        print(rep.table(), flush=True)
        s = summarize(rep, cfg)
        s["run"] = run
        results.append(s)
        print(json.dumps({k: s[k] for k in ("run", "passed", "seconds", "per_layer_s", "full_model_estimate_s",
                                            "worst", "expert_max_rel")}, indent=1), flush=True)
        (out / "verify_bench.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    if a.controls:
        controls(hf, dirs["tp2"][0], out, cfg, *a.controls.split(":"), seq_len=a.seq_len)
    if not a.keep:
        for d, _ in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
