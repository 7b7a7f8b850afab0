#!/usr/bin/env python
"""Benchmark stepconv against `cp -r` on a synthetic checkpoint in the exact Step-3.5-Flash format.

    python bench/run_bench.py --scale 16 --scale 8 [--out bench/out] [--profile]

1. Generates a Hugging Face folder with Step-3.5-Flash's tensor names, dtypes and config.json fields and
   the real geometry ratios, every width divided by `--scale` (a power of two): hidden 4096/s, head_dim
   128/s, FFN 11264/s, expert FFN 1280/s, while the head counts (64 full / 96 sliding, 8 KV groups), the
   288 experts stacked as [E, F_moe, H], the 128896-row vocabulary, the 45 layers (3 dense + 42 MoE) and
   the 3 MTP layers stay as in the real model. Scale 16 is ~1.9 GB, scale 8 ~6.7 GB, scale 1 the real
   ~399 GB. (`--target-gb` picks the scale nearest a size instead.) Tensors are torch.empty filled by
   tiling one seeded random block (valid bf16, no NaN), written with safetensors in ~2 GB shards plus
   model.safetensors.index.json.
2. Times, each as its own `stepconv ... --quiet` subprocess: hf-to-mcore --tp 4, hf-to-mcore --tp 2 --ep 2,
   mcore-to-hf of the TP=4 output, hf-to-mcore --format torch_dist and mcore-to-hf of that; and `cp -r` of each conversion's input, on the same disk. Page cache:
   dropping caches is not possible here, so before every run (cp and conversion alike) the dirty pages
   are flushed with `sync` and the run's input is read once in full (warm cache for every run; none of the
   runs hits the disk for reads). For each run: wall time to exit, time of the `sync` that follows
   (writeback of what it wrote; cp does not fsync, the converter does for safetensors files only), peak
   RSS of the whole process tree (sum of VmRSS over the child and its descendants, polled every 20 ms,
   and the child's VmHWM), bytes read and written (/proc/<pid>/io of the exited child before it is reaped,
   which includes its reaped descendants: rchar/wchar at the syscall level, read_bytes/write_bytes at
   the block layer), MB/s, conversion/cp ratios and peak RSS against 2 x the largest tensor the converter
   materialises + 1 GiB.
3. Prints a markdown table and writes it, with a JSON copy, under --out.

`--profile` also runs hf-to-mcore --tp 4 and mcore-to-hf under py-spy (`pip install py-spy`) and prints
where the samples land.

    python bench/run_bench.py --real-width --side-by-side 8 [--via-library]

issue 11's measurement (`bench_side_by_side`): the real widths (hidden 4096, real head counts, 288 experts,
vocab 128896; `--rw-layers` 2 layers, `--rw-dense` 1 of them dense; every weight distinct) and/or 1/8 scale,
each conversion (TP=4, EP=2, TP=2xEP=2, torch_dist, TP=2, mcore-to-hf, compare) next to `cp -r` in the same
run, with CPU seconds per GB, peak RSS, the load average, and the fixed cost of a run; at most two copies of
a checkpoint on disk (~25 GB free for the real-width case).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REAL_CONFIG = ROOT / "fixtures" / "step3p5-flash-config.json"
GiB = 1 << 30


# --- 1. synthetic checkpoint -------------------------------------------------------------------
def synth_config(scale: int = 16, *, layers: int = 45, mtp: int = 3, experts: int = 288,
                 vocab: int = 128896, dense: int = 3) -> dict:
    """The real config.json with every width divided by `scale`; layer pattern rebuilt for `layers` + `mtp`, the
    first `dense` layers dense (the real model: 3), the rest MoE."""
    if scale < 1 or scale & (scale - 1) or scale > 64:
        raise ValueError(f"scale must be a power of two <= 64 (so widths 4096, 128, 11264, 1280 stay integral); "
                         f"got {scale}")
    cfg = json.loads(REAL_CONFIG.read_text())
    hd = 128 // scale
    cfg.update(hidden_size=4096 // scale, head_dim=hd, intermediate_size=11264 // scale,
               moe_intermediate_size=1280 // scale, share_expert_dim=1280 // scale, num_hidden_layers=layers,
               num_nextn_predict_layers=mtp, moe_num_experts=experts, vocab_size=vocab,
               moe_top_k=min(cfg["moe_top_k"], experts))
    cfg["attention_other_setting"] = dict(cfg["attention_other_setting"], head_dim=hd, true_head_dim=hd)
    n = layers + mtp
    types = ["full_attention" if i % 4 == 0 and i < layers else "sliding_attention" for i in range(n)]
    cfg["layer_types"] = types
    cfg["rope_theta"] = [5000000.0 if t == "full_attention" else 10000.0 for t in types]
    cfg["partial_rotary_factors"] = [0.5 if t == "full_attention" else 1.0 for t in types]
    cfg["moe_layers_enum"] = ",".join(str(i) for i in range(min(dense, layers), layers))
    cfg["swiglu_limits"] = [7 if i in (layers - 2, layers - 1) else 0.0 for i in range(n)]
    cfg["swiglu_limits_shared"] = [16 if i == layers - 1 else 0.0 for i in range(n)]
    return cfg


def checkpoint_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from stepconv.config import Step35Config
    from stepconv.mapping import hf_shapes

    return hf_shapes(Step35Config.from_dict(cfg))


@functools.lru_cache(maxsize=8)
def _dtypes(cfg_json: str) -> dict[str, torch.dtype]:
    from stepconv.config import Step35Config
    from stepconv.convert import config_dtypes

    return config_dtypes(Step35Config.from_dict(json.loads(cfg_json)))


def checkpoint_dtypes(cfg: dict) -> dict[str, torch.dtype]:
    """The converter's own dtype rule (config torch_dtype; the router bias fp32)."""
    return _dtypes(json.dumps(cfg, sort_keys=True))


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def checkpoint_bytes(cfg: dict) -> int:
    dtypes = checkpoint_dtypes(cfg)
    return sum(_nbytes(dtypes[n], s) for n, s in checkpoint_shapes(cfg).items())


def scale_for(target_gb: float, **kw) -> int:
    """The power-of-two scale whose checkpoint size is nearest `target_gb` (log distance)."""
    import math

    return min((1, 2, 4, 8, 16, 32, 64),
               key=lambda s: abs(math.log(checkpoint_bytes(synth_config(s, **kw)) / (target_gb * 1e9))))


_BLOCK = 1 << 20


def _block() -> torch.Tensor:
    g = torch.Generator().manual_seed(35)
    b = (torch.randn(_BLOCK, generator=g) * 0.02).to(torch.bfloat16)
    return torch.cat([b, b])


def _fill(name: str, shape, dtype: torch.dtype, block: torch.Tensor) -> torch.Tensor:
    if dtype != torch.bfloat16:  # the router bias (fp32): small, random
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)
    t = torch.empty(shape, dtype=torch.bfloat16)
    flat = t.view(-1)
    src = block[zlib.crc32(name.encode()) % _BLOCK:][:_BLOCK]  # a per-tensor rotation of one random block
    k = flat.numel() // _BLOCK
    if k:
        flat[:k * _BLOCK].view(k, _BLOCK).copy_(src)
    rest = flat.numel() - k * _BLOCK
    if rest:
        flat[k * _BLOCK:].copy_(src[:rest])
    return t


# bf16 bit patterns 0x3A00-0x3CFF: positive normal numbers 2^-11 .. 2^-5 (about the real weights' magnitude), never NaN
_BF16_LO, _BF16_HI = 0x3A00, 0x3D00


def _fill_distinct(name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """Every element drawn on its own (seeded by the name and the row block): each expert of a stack has its own
    weights, so no converter or cache can profit from repeats. Random bf16 bit patterns (~4x faster to draw than
    randn), row blocks drawn on all cores (each block its own generator, so the result does not depend on them)."""
    if dtype != torch.bfloat16:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)
    t = torch.empty(shape, dtype=torch.int16)
    flat = t.view(-1)
    step = 1 << 22

    def block(k: int) -> None:
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{k}".encode()))
        flat[k:k + step].random_(_BF16_LO, _BF16_HI, generator=g)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(block, range(0, flat.numel(), step)))
    return t.view(torch.bfloat16)


def make_synthetic(out: str | os.PathLike, scale: int = 16, *, shard_bytes: int = 2 * 10**9, distinct: bool = False,
                   **kw) -> dict:
    """Write the synthetic HF checkpoint to `out`; returns its facts (sizes, largest tensors). `distinct`: every
    element drawn on its own (the real-width case) instead of tiling one random 1M-element block."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = synth_config(scale, **kw)
    shapes, dtypes = checkpoint_shapes(cfg), checkpoint_dtypes(cfg)
    names = list(shapes)
    shards, cur, size = [], [], 0
    for n in names:
        b = _nbytes(dtypes[n], shapes[n])
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    shards.append(cur)
    block = _block()
    weight_map, total = {}, 0
    t0 = time.time()
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _fill_distinct(n, shapes[n], dtypes[n]) if distinct else _fill(n, shapes[n], dtypes[n], block)
                   for n in shard}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
            total += _nbytes(dtypes[n], shapes[n])
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2) + "\n")
    largest = max(names, key=lambda n: _nbytes(dtypes[n], shapes[n]))
    return {"path": str(out), "scale": scale, "hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
            "mtp": cfg["num_nextn_predict_layers"], "experts": cfg["moe_num_experts"], "vocab": cfg["vocab_size"],
            "tensors": len(names), "files": len(shards), "bytes": total, "disk_bytes": du(out),
            "largest_tensor": largest, "largest_tensor_bytes": _nbytes(dtypes[largest], shapes[largest]),
            "seconds": round(time.time() - t0, 2)}


def largest_materialised(path: str | os.PathLike, tp: int = 1, ep: int = 1) -> tuple[str, int]:
    """The largest tensor set the converter holds at once (stepconv.inspect's peak-memory basis)."""
    from stepconv.inspect import inspect_path

    r = inspect_path(path, tp=tp, ep=ep)
    return r.peak_memory.largest_name, r.peak_memory.largest_bytes


# --- 2. measurement ----------------------------------------------------------------------------
def du(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def warm(paths) -> int:
    """Read every file once (page cache), returning the bytes read."""
    n = 0
    buf = bytearray(16 << 20)
    for p in paths:
        p = Path(p)
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            with open(f, "rb", buffering=0) as fh:
                while True:
                    got = fh.readinto(buf)
                    if not got:
                        break
                    n += got
    return n


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f if line.strip())}


def _pss(pid: int) -> int:
    """The process's proportional set size: its private pages plus its share of each page it shares (0 if gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def measure(cmd: list[str], warm_paths=(), *, log: Path | None = None, interval: float = 0.02) -> dict:
    """Run `cmd` with a flushed and warmed page cache; wall, sync, peak tree memory and I/O of the process tree.

    The tree's memory is its summed VmRSS while it is one process, and its summed Pss once it has children: forked
    worker processes share the parent's pages (torch's libraries, the plan), which VmRSS counts once per process
    (16 workers at 1/8 scale: 6.8 GB summed VmRSS against 1.3 GB of Pss, 16-core device)."""
    import psutil

    subprocess.run(["sync"], check=True)
    warmed = warm(warm_paths)
    out = open(log, "wb") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    peak_tree, hwm, samples, anon, file_ = 0, 0, 0, 0, 0
    ps = psutil.Process(proc.pid)
    kids: list[int] = []
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if samples % 10 == 0:  # descendants every ~0.2 s: scanning /proc costs ~1 ms
            try:
                kids = [c.pid for c in ps.children(recursive=True)]
            except psutil.Error:
                kids = []
        st = _status(proc.pid)
        hwm = max(hwm, st.get("VmHWM", 0))
        anon = max(anon, st.get("RssAnon", 0))
        file_ = max(file_, st.get("RssFile", 0))
        if kids:
            rss = _pss(proc.pid) + sum(_pss(pid) for pid in kids)
        else:
            rss = st.get("VmRSS", 0)
        peak_tree = max(peak_tree, rss)
        samples += 1
        time.sleep(interval)
    wall = time.perf_counter() - t0
    io = _io(proc.pid)  # exited, not yet reaped: the whole tree's totals
    _, status, ru = os.wait4(proc.pid, 0)  # CPU time of the child and its reaped descendants
    rc = proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    t1 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    sync_s = time.perf_counter() - t1
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}\n{tail}")
    return {"cmd": " ".join(cmd), "wall_s": wall, "sync_s": sync_s, "total_s": wall + sync_s,
            "cpu_s": ru.ru_utime + ru.ru_stime, "load": os.getloadavg()[0],
            "peak_rss": max(peak_tree, hwm), "peak_tree_rss": peak_tree, "vm_hwm": hwm, "samples": samples,
            "peak_rss_anon": anon, "peak_rss_file": file_,
            "rchar": io["rchar"], "wchar": io["wchar"], "read_bytes": io["read_bytes"],
            "write_bytes": io["write_bytes"], "warmed_bytes": warmed}


VIA_LIBRARY = False  # --via-library: run conversions as `run_bench.py --call ...` (library calls, no typer)


def call_library(argv: list[str]) -> int:
    """`stepconv hf-to-mcore|mcore-to-hf|compare` with the options the benchmark uses, through the library API, for
    machines where the CLI's own dependencies (typer, pydantic) are missing. The collector is off from the start,
    as the CLI's conversion commands have it (`stepconv.cli._conversion`)."""
    import gc

    gc.disable()
    from stepconv.compare import compare_hf
    from stepconv.convert import hf_to_mcore, mcore_to_hf

    ap = argparse.ArgumentParser()
    ap.add_argument("command")
    ap.add_argument("paths", nargs="+")
    ap.add_argument("-o", dest="out")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--format", default="torch")
    ap.add_argument("--jobs", "-j", type=int, default=None)
    ap.add_argument("--threads", action="store_true")
    a = ap.parse_args(argv)
    if a.command == "hf-to-mcore":
        hf_to_mcore(a.paths[0], a.out, tp=a.tp, ep=a.ep, format=a.format, jobs=a.jobs, processes=not a.threads)
    elif a.command == "mcore-to-hf":
        mcore_to_hf(a.paths[0], a.out, jobs=a.jobs, processes=not a.threads)
    else:
        return 0 if compare_hf(a.paths[0], a.paths[1]).identical else 1
    return 0


def stepconv_cmd(*args: str) -> list[str]:
    if VIA_LIBRARY:
        return [sys.executable, str(Path(__file__).resolve()), "--call", *args]
    exe = Path(sys.executable).with_name("stepconv")
    if exe.exists():
        return [str(exe), *args]
    return ["stepconv", *args] if shutil.which("stepconv") else [sys.executable, "-m", "stepconv.cli", *args]


def bench_scale(scale: int, work: Path, *, keep: bool = False, shard_bytes: int = 2 * 10**9, repeat: int = 3,
                **kw) -> dict:
    """Generate at `scale`, then `repeat` rounds of cp / hf-to-mcore TP4 / TP2xEP2 / cp of TP4 output / mcore-to-hf /
    hf-to-mcore torch_dist / cp of it / mcore-to-hf of it.

    Rounds are interleaved (the disk's speed drifts); each run's figures are kept, and the summary per run
    takes the median time over rounds and the largest peak RSS.
    """
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"hf-s{scale}"
    facts = make_synthetic(src, scale, shard_bytes=shard_bytes, **kw)
    name, mat = largest_materialised(src, tp=4)
    facts["largest_materialised"], facts["largest_materialised_bytes"] = name, mat
    facts["rss_bound"] = 2 * mat + GiB
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    samples: dict[str, list[dict]] = {}

    def run(label: str, cmd: list[str], inp: Path, out: Path, baseline: str | None = None):
        if out.exists():
            shutil.rmtree(out)
        r = measure(cmd, [inp], log=logs / f"s{scale}-{label.replace(' ', '_')}.log")
        r.update(label=label, input_bytes=du(inp), output_bytes=du(out), baseline=baseline)
        samples.setdefault(label, []).append(r)
        print(f"  {label:<24} {r['wall_s']:7.2f} s (+{r['sync_s']:.2f} s sync)  "
              f"peak RSS {r['peak_rss'] / 2**20:6.0f} MiB"
              f" (anon {r['peak_rss_anon'] / 2**20:.0f}, file {r['peak_rss_file'] / 2**20:.0f})"
              f"  wrote {r['output_bytes'] / 1e9:.2f} GB", flush=True)
        return r

    print(f"scale {scale}: {facts['bytes'] / 1e9:.2f} GB in {facts['files']} files, generated in "
          f"{facts['seconds']} s", flush=True)
    m4, m22, back, dist = work / "mcore-tp4", work / "mcore-tp2-ep2", work / "hf-back", work / "mcore-dist"
    cp_out, cp_m = work / "cp-hf", work / "cp-mcore"
    for k in range(repeat):
        print(f" round {k + 1}/{repeat}", flush=True)
        run("cp -r HF", ["cp", "-r", str(src), str(cp_out)], src, cp_out)
        shutil.rmtree(cp_out)
        run("hf-to-mcore TP=4", stepconv_cmd("hf-to-mcore", "--quiet", "--tp", "4", str(src), "-o", str(m4)), src, m4,
            "cp -r HF")
        run("hf-to-mcore TP=2 EP=2", stepconv_cmd("hf-to-mcore", "--quiet", "--tp", "2", "--ep", "2", str(src), "-o",
                                                  str(m22)), src, m22, "cp -r HF")
        shutil.rmtree(m22)
        run("cp -r mcore TP=4", ["cp", "-r", str(m4), str(cp_m)], m4, cp_m)
        shutil.rmtree(cp_m)
        run("mcore-to-hf (of TP=4)", stepconv_cmd("mcore-to-hf", "--quiet", str(m4), "-o", str(back)), m4, back,
            "cp -r mcore TP=4")
        shutil.rmtree(back)
        run("hf-to-mcore torch_dist", stepconv_cmd("hf-to-mcore", "--quiet", "--format", "torch_dist", "--tp", "4",
                                                   str(src), "-o", str(dist)), src, dist, "cp -r HF")
        run("cp -r torch_dist", ["cp", "-r", str(dist), str(cp_m)], dist, cp_m)
        shutil.rmtree(cp_m)
        run("mcore-to-hf (of torch_dist)", stepconv_cmd("mcore-to-hf", "--quiet", str(dist), "-o", str(back)), dist,
            back, "cp -r torch_dist")
        shutil.rmtree(back)
        shutil.rmtree(dist)
    if not keep:
        for p in (m4, src):
            shutil.rmtree(p, ignore_errors=True)
    runs = [summarize_runs(v) for v in samples.values()]
    by = {r["label"]: r for r in runs}
    for r in runs:
        b = by.get(r["baseline"]) if r["baseline"] else None
        r["ratio_wall"] = r["wall_s"] / b["wall_s"] if b else None
        r["ratio_total"] = r["total_s"] / b["total_s"] if b else None
        # per byte written: a TP2xEP2 output is larger than its input (non-expert tensors on both EP ranks)
        r["ratio_per_byte"] = (r["total_s"] / r["output_bytes"]) / (b["total_s"] / b["output_bytes"]) if b else None
        r["rss_vs_bound"] = r["peak_rss"] / facts["rss_bound"]
    return {"facts": facts, "runs": runs}


IMPORT_RUNS = (("hf-to-mcore TP=4", ("--tp", "4")), ("hf-to-mcore EP=2", ("--ep", "2")),
               ("hf-to-mcore TP=2 EP=2", ("--tp", "2", "--ep", "2")),
               ("hf-to-mcore torch_dist", ("--format", "torch_dist", "--tp", "2")),
               ("hf-to-mcore TP=2", ("--tp", "2")))  # (last: its output is mcore-to-hf's input)


def bench_side_by_side(label: str, scale: int, work: Path, *, distinct: bool = False, shard_bytes: int = 2 * 10**9,
                       **kw) -> dict:
    """Every conversion of issue 11 next to `cp -r` of the same bytes, in one run, holding at most two copies of
    the checkpoint on disk (the real-width case is 11.9 GB): cp of the HF folder; hf-to-mcore TP=4, EP=2,
    TP=2xEP=2, torch_dist, TP=2 (each output deleted but the last); the HF folder deleted; mcore-to-hf of the
    TP=2 output (baseline: the cp of the HF folder, the same tensor bytes); cp of the result (a second cp
    baseline, late in the run) and `stepconv compare` of the two copies. Each run also reports its CPU time
    (user + system of the process tree) per GB of input and the 1-minute load average when it ended."""
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"hf-{label}"
    facts = make_synthetic(src, scale, shard_bytes=shard_bytes, distinct=distinct, **kw)
    name, mat = largest_materialised(src, tp=2)
    facts.update(label=label, largest_materialised=name, largest_materialised_bytes=mat, rss_bound=2 * mat + GiB)
    print(f"{label}: {facts['bytes'] / 1e9:.2f} GB in {facts['files']} files ({facts['tensors']} tensors), generated "
          f"in {facts['seconds']} s", flush=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    runs: list[dict] = []

    def run(what: str, cmd: list[str], inp: Path, out: Path, baseline: str | None) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        r = measure(cmd, [inp], log=logs / re.sub(r"[^A-Za-z0-9=.-]+", "_", f"{label}-{what}.log"))
        r.update(label=what, input_bytes=du(inp), output_bytes=du(out) if out.exists() else 0, baseline=baseline)
        runs.append(r)
        print(f"  {what:<26} {r['total_s']:7.2f} s  cpu {r['cpu_s']:6.1f} s  peak RSS {r['peak_rss'] / 2**20:6.0f} MiB"
              f"  load {r['load']:.1f}", flush=True)
        return r

    cp_hf, m2, back, back2 = work / "cp-hf", work / "mcore", work / "hf-back", work / "hf-back2"
    run("cp -r HF", ["cp", "-r", str(src), str(cp_hf)], src, cp_hf, None)
    shutil.rmtree(cp_hf)
    for what, args in IMPORT_RUNS:
        run(what, stepconv_cmd("hf-to-mcore", "--quiet", *args, str(src), "-o", str(m2)), src, m2, "cp -r HF")
        if what != IMPORT_RUNS[-1][0]:
            shutil.rmtree(m2)
    shutil.rmtree(src)
    run("mcore-to-hf (of TP=2)", stepconv_cmd("mcore-to-hf", "--quiet", str(m2), "-o", str(back)), m2, back,
        "cp -r HF")
    shutil.rmtree(m2)
    run("cp -r HF (again)", ["cp", "-r", str(back), str(back2)], back, back2, None)
    run("compare (of the copies)", stepconv_cmd("compare", str(back), str(back2)), back, work / "none",
        "cp -r HF (again)")
    shutil.rmtree(back)
    shutil.rmtree(back2)
    cps = {r["label"]: r for r in runs if r["baseline"] is None}
    for r in runs:
        b = cps.get(r["baseline"])
        r["ratio_total"] = r["total_s"] / b["total_s"] if b else None
        r["ratio_per_byte"] = ((r["total_s"] / max(r["output_bytes"], r["input_bytes"]))
                               / (b["total_s"] / b["output_bytes"])) if b else None
        r["cpu_s_per_gb"] = r["cpu_s"] / (r["input_bytes"] / 1e9)
        r["rss_vs_bound"] = r["peak_rss"] / facts["rss_bound"]
    return {"facts": facts, "runs": runs}


def fixed_cost(work: Path) -> dict:
    """Start-up, plan and audit of a run, measured on a checkpoint with the real tensor count and almost no bytes
    (scale 1/64: 804 tensors, 0.18 GB): its hf-to-mcore TP=2 wall time, less the time `cp -r` takes for its
    bytes, bounds the fixed cost from above; also the interpreter with stepconv and torch imported."""
    src = work / "hf-fixed"
    make_synthetic(src, 64)
    cp = measure(["cp", "-r", str(src), str(work / "cp-fixed")], [src])
    shutil.rmtree(work / "cp-fixed")
    (work / "logs").mkdir(exist_ok=True)
    conv = measure(stepconv_cmd("hf-to-mcore", "--quiet", "--tp", "2", str(src), "-o", str(work / "m-fixed")), [src],
                   log=work / "logs" / "fixed.log")
    imp = measure([sys.executable, "-c", "import stepconv.convert"])
    shutil.rmtree(work / "m-fixed")
    shutil.rmtree(src)
    return {"bytes": checkpoint_bytes(synth_config(64)), "convert_s": conv["wall_s"], "cp_s": cp["wall_s"],
            "fixed_s": conv["wall_s"] - cp["wall_s"], "cpu_s": conv["cpu_s"], "import_s": imp["wall_s"],
            "import_cpu_s": imp["cpu_s"], "load": conv["load"]}


def side_by_side_markdown(results: list[dict], fixed: dict | None) -> str:
    lines = []
    if fixed:
        lines += [f"Fixed cost: hf-to-mcore TP=2 of a {fixed['bytes'] / 1e9:.2f} GB checkpoint with the real tensor "
                  f"count took {fixed['convert_s']:.2f} s, `cp -r` of it {fixed['cp_s']:.2f} s: fixed cost <= "
                  f"**{fixed['fixed_s']:.2f} s** ({fixed['cpu_s']:.2f} CPU s), of which {fixed['import_s']:.2f} s "
                  f"({fixed['import_cpu_s']:.2f} CPU s) is starting Python and importing stepconv and torch "
                  f"(load {fixed['load']:.1f}).", ""]
    for res in results:
        f = res["facts"]
        lines += [f"**{f['label']}**: hidden {f['hidden']}, {f['layers']} layers, {f['mtp']} MTP, {f['experts']} "
                  f"experts, vocab {f['vocab']}: {f['bytes'] / 1e9:.2f} GB, {f['tensors']} tensors in {f['files']} "
                  f"files; largest materialised {f['largest_materialised']} "
                  f"({f['largest_materialised_bytes'] / 2**20:.0f} MiB), RSS bound {f['rss_bound'] / 2**20:.0f} MiB.",
                  "", "| run | wall s | +sync s | total s | vs cp | vs cp per byte | CPU s | CPU s/GB | peak RSS MiB | "
                  "RSS / bound | load (1 min) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["runs"]:
            lines.append(f"| {r['label']} | {r['wall_s']:.2f} | {r['sync_s']:.2f} | {r['total_s']:.2f} | "
                         f"{_f(r['ratio_total'])} | {_f(r['ratio_per_byte'])} | {r['cpu_s']:.1f} | "
                         f"{r['cpu_s_per_gb']:.2f} | {r['peak_rss'] / 2**20:.0f} | {r['rss_vs_bound']:.2f} | "
                         f"{r['load']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def summarize_runs(rs: list[dict]) -> dict:
    """Median times over rounds, min/max of the total, the largest peak RSS; I/O counts of the last round."""
    import statistics

    out = dict(rs[-1])
    for k in ("wall_s", "sync_s", "total_s"):
        out[k] = statistics.median(r[k] for r in rs)
    out["total_min_s"] = min(r["total_s"] for r in rs)
    out["total_max_s"] = max(r["total_s"] for r in rs)
    out["rounds"] = len(rs)
    for k in ("peak_rss", "peak_rss_anon", "peak_rss_file", "peak_tree_rss", "vm_hwm"):
        out[k] = max(r[k] for r in rs)
    out["samples_per_round"] = [{k: r[k] for k in ("wall_s", "sync_s", "total_s", "peak_rss")} for r in rs]
    return out


# --- 3. report ---------------------------------------------------------------------------------
def machine() -> dict:
    import psutil

    st = os.statvfs(ROOT)
    disk = subprocess.run(["df", "-h", str(ROOT)], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
            "disk": disk, "free_gb": round(st.f_bavail * st.f_frsize / 1e9, 1), "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__,
            "safetensors": __import__("safetensors").__version__,
            "stepconv_commit": _git("rev-parse", "--short", "HEAD"),
            "stepconv_dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def _git(*args: str) -> str:
    try:
        p = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        return p.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(results: list[dict], mach: dict) -> str:
    lines = [f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach['ram_gib']} GiB RAM, disk `{mach['disk']}`, "
             f"kernel {mach['kernel']}, Python {mach['python']}, torch {mach['torch']}, "
             f"safetensors {mach['safetensors']}; stepconv at commit {mach['stepconv_commit'] or '?'}"
             f"{' (with uncommitted changes)' if mach['stepconv_dirty'] else ''}.", ""]
    lines += ["| scale | HF size | files | tensors | largest source tensor | largest materialised | "
              "RSS bound (2x + 1 GiB) |", "|---|---|---|---|---|---|---|"]
    for res in results:
        f = res["facts"]
        lines.append(f"| 1/{f['scale']} (hidden {f['hidden']}) | {f['bytes'] / 1e9:.2f} GB | {f['files']} | "
                     f"{f['tensors']} | {f['largest_tensor_bytes'] / 2**20:.0f} MiB ({f['largest_tensor']}) | "
                     f"{f['largest_materialised_bytes'] / 2**20:.0f} MiB ({f['largest_materialised']}) | "
                     f"{f['rss_bound'] / 2**20:.0f} MiB |")
    lines += ["", "Times are medians over rounds (total = wall + the `sync` after it, min-max over rounds); "
                  "peak RSS is the largest over rounds.", "",
              "| scale | run | wall s | +sync s | total s (min-max) | vs cp (wall) | vs cp (total) | vs cp per byte | "
                  "peak RSS MiB | (anon / file-backed) | RSS / bound | rchar GB | wchar GB | write_bytes GB | "
                  "MB/s (in/wall) | "
                  "MB/s (out/total) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        s = res["facts"]["scale"]
        for r in res["runs"]:
            lines.append(
                f"| 1/{s} | {r['label']} | {r['wall_s']:.2f} | {r['sync_s']:.2f} | {r['total_s']:.2f} "
                f"({r.get('total_min_s', r['total_s']):.1f}-{r.get('total_max_s', r['total_s']):.1f}) | "
                f"{_f(r['ratio_wall'])} | {_f(r['ratio_total'])} | {_f(r['ratio_per_byte'])} | "
                f"{r['peak_rss'] / 2**20:.0f} | {r['peak_rss_anon'] / 2**20:.0f} / {r['peak_rss_file'] / 2**20:.0f} | "
                f"{r['rss_vs_bound']:.2f} | {r['rchar'] / 1e9:.2f} | "
                f"{r['wchar'] / 1e9:.2f} | {r['write_bytes'] / 1e9:.2f} | "
                f"{r['input_bytes'] / 1e6 / r['wall_s']:.0f} | {r['output_bytes'] / 1e6 / r['total_s']:.0f} |")
    return "\n".join(lines) + "\n"


# --- profiling ---------------------------------------------------------------------------------
def profile(scale: int, work: Path, rate: int = 97, **kw) -> str:
    """py-spy record --native (all threads, on-CPU samples) of hf-to-mcore TP=4 and mcore-to-hf; a summary table."""
    spy = Path(sys.executable).with_name("py-spy")
    spy = str(spy) if spy.exists() else shutil.which("py-spy")
    if not spy:
        return "py-spy not installed (pip install py-spy)\n"
    src = work / f"hf-s{scale}"
    if not src.exists():
        make_synthetic(src, scale, **kw)
    out = []
    m4, back = work / "prof-mcore", work / "prof-hf"
    for label, cmd, res, inp in (
            ("hf-to-mcore TP=4", stepconv_cmd("hf-to-mcore", "--quiet", "--tp", "4", str(src), "-o", str(m4)), m4, src),
            ("mcore-to-hf", stepconv_cmd("mcore-to-hf", "--quiet", str(m4), "-o", str(back)), back, m4)):
        if res.exists():
            shutil.rmtree(res)
        raw = work / f"prof-{res.name}.txt"
        subprocess.run(["sync"], check=True)
        warm([inp])
        t0 = time.perf_counter()
        subprocess.run([spy, "record", "--native", "--threads", "-r", str(rate), "-f", "raw", "-o", str(raw), "--",
                        *cmd], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        out.append(f"### {label} (scale 1/{scale}, {wall:.1f} s under py-spy)\n\n"
                   + summarize_profile(raw.read_text(), wall * rate))
    for p in (m4, back):
        shutil.rmtree(p, ignore_errors=True)
    return "\n".join(out)


# (category, substrings: the first category one of whose substrings appears in the stack wins; order matters)
CATEGORIES = [
    ("startup: imports", ("_find_and_load",)),
    ("Python GC (gc_collect_main)", ("gc_collect_main",)),
    ("pickling rank-file state dicts (_dumps)", ("_dumps",)),
    ("torch.load of rank files (unpickling, per tensor)", ("load_rank_file",)),
    ("kernel write: page cache (writev/pwrite/write)", ("writev", "pwrite64", "__libc_write", ";write ")),
    ("zip CRC32 of records", ("crc32",)),
    ("kernel read (preadv/read)", ("preadv", ";read ", "__libc_read")),
    ("madvise / munmap / page faults", ("madvise", "munmap", "mprotect")),
    ("tensor copies (cat, clone, contiguous, tobytes)", ("cat_serial_kernel", "direct_copy_kernel", "THPVariable_cat",
                                                         "clone", "contiguous", "tobytes", "memmove", "memcpy")),
    ("split / merge Python logic", ("split_entry", "merge_entry", "_split", "_merge")),
    ("main thread waiting on workers", ("Condition.wait", "Future.result")),
    ("rest of RankFileWriter.add / finish", ("RankFileWriter",)),
    ("rest of source reads (LazyTensor, _read_rows)", ("_read_rows", "LazyTensor", "_read_sources")),
    ("rest of SafetensorsWriter", ("SafetensorsWriter",)),
    ("rest of the conversion loop", ("_run_unit", "mcore_to_hf", "hf_to_mcore")),
]


def summarize_profile(raw: str, possible: float | None = None, top: int = 10) -> str:
    """Collapsed stacks -> share of on-CPU samples per category and per leaf frame."""
    cats, leaves = Counter(), Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        s = ";" + stack.replace(" (", " (") + ";"
        frames = [f.split(" (")[0] for f in stack.split(";")]
        key = ";" + ";".join(frames) + " "
        cat = next((c for c, subs in CATEGORIES if any(x in key or x in s for x in subs)), "other")
        cats[cat] += n
        leaves[frames[-1]] += n
    if not total:
        return "(no samples)\n"
    head = f"{total} on-CPU samples"
    if possible:
        head += f" ({total / possible:.2f} cores busy on average)"
    lines = [head + ".", "", "| where | share of on-CPU samples |", "|---|---|"]
    lines += [f"| {k} | {v / total:.0%} |" for k, v in cats.most_common()]
    lines += ["", "| top leaf frames | share |", "|---|---|"]
    lines += [f"| `{k[:90]}` | {v / total:.0%} |" for k, v in leaves.most_common(top)]
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    global VIA_LIBRARY
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--call"]:
        return call_library(argv[1:])
    if "--via-library" in argv:
        VIA_LIBRARY = True
        argv = [x for x in argv if x != "--via-library"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, action="append", help="width divisor (power of two); repeatable")
    ap.add_argument("--target-gb", type=float, action="append", help="pick the scale nearest this size; repeatable")
    ap.add_argument("--layers", type=int, default=45)
    ap.add_argument("--mtp", type=int, default=3)
    ap.add_argument("--experts", type=int, default=288)
    ap.add_argument("--vocab", type=int, default=128896)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--out", default=str(HERE / "out"), help="work folder (same disk as the data under test)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of every run (medians are reported)")
    ap.add_argument("--keep", action="store_true", help="keep generated data and outputs")
    ap.add_argument("--profile", action="store_true", help="also profile the largest scale with py-spy")
    ap.add_argument("--real-width", action="store_true",
                    help="issue 11's side-by-side runs at the real widths: hidden 4096, the real head counts, 288 "
                         "experts and vocabulary, --rw-layers layers (--rw-dense of them dense), every weight distinct")
    ap.add_argument("--rw-layers", type=int, default=2)
    ap.add_argument("--via-library", action="store_true", help="run conversions through the library API, not the "
                    "stepconv CLI (for machines without the CLI's dependencies)")
    ap.add_argument("--rw-dense", type=int, default=1)
    ap.add_argument("--side-by-side", type=int, action="append", default=[],
                    help="issue 11's side-by-side runs at this scale (real layer count); repeatable")
    a = ap.parse_args(argv)
    if a.real_width or a.side_by_side:
        return main_side_by_side(a)
    kw = dict(layers=a.layers, mtp=a.mtp, experts=a.experts, vocab=a.vocab)
    scales = list(a.scale or []) + [scale_for(t, **kw) for t in (a.target_gb or [])]
    scales = scales or [16, 8]
    work = Path(a.out)
    need = max(checkpoint_bytes(synth_config(s, **kw)) for s in scales) * 3.3
    free = shutil.disk_usage(work.parent if not work.exists() else work).free
    if need > free:
        print(f"need ~{need / 1e9:.1f} GB free under {work}, have {free / 1e9:.1f} GB", file=sys.stderr)
        return 2
    mach = machine()
    results = [bench_scale(s, work, keep=a.keep or a.profile, shard_bytes=int(a.shard_gb * 1e9), repeat=a.repeat, **kw)
               for s in scales]
    text = markdown(results, mach)
    cmd = "python bench/run_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"Command: `{cmd}`\n\n" + text
    if a.profile:
        text += "\n## Profile\n\n" + profile(min(scales), work, **kw)
        for s in scales:
            if not a.keep:
                shutil.rmtree(work / f"hf-s{s}", ignore_errors=True)
                shutil.rmtree(work / "mcore-tp4", ignore_errors=True)
                shutil.rmtree(work / "hf-back", ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (work / f"results-{stamp}.md").write_text(text)
    (work / f"results-{stamp}.json").write_text(json.dumps({"machine": mach, "results": results}, indent=2))
    print(text)
    return 0


def main_side_by_side(a) -> int:
    work = Path(a.out)
    cases = [("real width", 1, dict(layers=a.rw_layers, mtp=0, experts=a.experts, vocab=a.vocab, dense=a.rw_dense),
              True)] if a.real_width else []
    cases += [(f"1/{s} scale", s, dict(layers=a.layers, mtp=a.mtp, experts=a.experts, vocab=a.vocab), False)
              for s in a.side_by_side]
    need = max(checkpoint_bytes(synth_config(s, **kw)) for _, s, kw, _ in cases) * 2.1
    free = shutil.disk_usage(work.parent if not work.exists() else work).free
    if need > free:
        print(f"need ~{need / 1e9:.1f} GB free under {work}, have {free / 1e9:.1f} GB", file=sys.stderr)
        return 2
    mach = machine()
    fixed = fixed_cost(work)
    results = [bench_side_by_side(label, s, work, distinct=d, shard_bytes=int(a.shard_gb * 1e9), **kw)
               for label, s, kw, d in cases]
    text = (f"Command: `python bench/run_bench.py {' '.join(sys.argv[1:])}`\n\nMachine: {mach['nproc']} CPUs "
            f"({mach['cpu']}), {mach['ram_gib']} GiB RAM, disk `{mach['disk']}`, torch {mach['torch']}, stepconv "
            f"{mach['stepconv_commit'] or '?'}{' (with uncommitted changes)' if mach['stepconv_dirty'] else ''}."
            f"\n\n" + side_by_side_markdown(results, fixed))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (work / f"side-by-side-{stamp}.md").write_text(text)
    (work / f"side-by-side-{stamp}.json").write_text(json.dumps({"machine": mach, "fixed": fixed,
                                                                 "results": results}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
