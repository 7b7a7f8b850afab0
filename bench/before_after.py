#!/usr/bin/env python
"""Two stepconv checkouts side by side with `cp -r`, on the same data in one run (issue 11's before/after).

    python bench/before_after.py --before /path/to/old/checkout [--real-width] [--scale 8] [--out DIR]

For each case (the real-width checkpoint of `run_bench.py --real-width`, every weight distinct, and/or the
synthetic checkpoint at `--scale`, real tensor count): `cp -r` of the HF folder, then each conversion with the
old code and the new (this checkout), alternating, each its own process through the library API (`run_bench.py
--call`: no typer needed), with `run_bench.measure` (flushed, warmed page cache; wall + sync, CPU seconds of the
process tree, peak RSS); then mcore-to-hf of the new TP=2 output with each, `cp -r` of the exported folder and
`stepconv compare`. A fixed-cost row first: hf-to-mcore TP=2 of the 1/64-scale checkpoint (real tensor count,
0.18 GB) and the interpreter importing stepconv and torch. Prints a markdown table and writes it (and JSON) to
--out; each case's table is written as soon as it is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_bench as rb  # noqa: E402

NEW = str(HERE.parent)
IMPORTS = (("TP=2", ("--tp", "2")), ("torch_dist", ("--format", "torch_dist", "--tp", "2")),
           ("TP=2 x EP=2", ("--tp", "2", "--ep", "2")), ("TP=4", ("--tp", "4")), ("EP=2", ("--ep", "2")))


def _run(code: str, args: list[str], inp: Path, out: Path | None, log: Path) -> dict:
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([code] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p and p not in (NEW, BEFORE)])
    rb.VIA_LIBRARY = True
    r = rb.measure(rb.stepconv_cmd(*args), [inp], log=log)
    r["input_bytes"] = rb.du(inp)
    return r


def _log(work: Path, *parts: str) -> Path:
    return work / ("-".join(parts).replace(" ", "_").replace("/", "-") + ".log")


def case(label: str, scale: int, work: Path, imports, quick: bool = False, **kw) -> list[dict]:
    src, m = work / "hf", work / "m"
    facts = rb.make_synthetic(src, scale, **kw)
    print(f"{label}: {facts['bytes'] / 1e9:.2f} GB, {facts['tensors']} tensors, generated in {facts['seconds']} s",
          flush=True)
    rows = []

    def add(what: str, r: dict, base: dict | None) -> None:
        r.update(label=what, ratio=r["total_s"] / base["total_s"] if base else None,
                 cpu_per_gb=r["cpu_s"] / (r["input_bytes"] / 1e9))
        rows.append(r)
        print(f"  {what:<34} {r['total_s']:7.2f} s  cpu {r['cpu_s']:6.1f}  rss {r['peak_rss'] / 2**20:6.0f} MiB  "
              f"load {r['load']:.1f}", flush=True)

    cp = rb.measure(["cp", "-r", str(src), str(work / "cp")], [src])
    cp["input_bytes"] = rb.du(src)
    add("cp -r HF", cp, None)
    shutil.rmtree(work / "cp")
    for name, args in imports:
        for who, code in (("before", BEFORE), ("after", NEW)):
            out = m / ("kept" if (name, who) == ("TP=2", "after") else "out")  # (kept: mcore-to-hf's input)
            r = _run(code, ["hf-to-mcore", "--quiet", *args, str(src), "-o", str(out)], src, out,
                     _log(work, label, name, who))
            add(f"hf-to-mcore {name} ({who})", r, cp)
            shutil.rmtree(m / "out", ignore_errors=True)
    shutil.rmtree(src)
    back = work / "back"
    for who, code in (("before", BEFORE), ("after", NEW))[int(quick):]:
        r = _run(code, ["mcore-to-hf", "--quiet", str(m / "kept"), "-o", str(back / who)], m / "kept", back / who,
                 _log(work, label, "export", who))
        add(f"mcore-to-hf of TP=2 ({who})", r, cp)
        if who == "before":
            shutil.rmtree(back / who)
    shutil.rmtree(m)
    if quick:
        shutil.rmtree(back)
        return rows
    cp2 = rb.measure(["cp", "-r", str(back / "after"), str(work / "cp2")], [back / "after"])
    cp2["input_bytes"] = rb.du(back / "after")
    add("cp -r HF (of the export)", cp2, None)
    r = _run(NEW, ["compare", str(back / "after"), str(work / "cp2")], back / "after", None, _log(work, label, "cmp"))
    r["input_bytes"] = cp2["input_bytes"]
    add("compare (after)", r, cp2)
    shutil.rmtree(back)
    shutil.rmtree(work / "cp2")
    return rows


def fixed(work: Path) -> list[dict]:
    src = work / "hf-fixed"
    rb.make_synthetic(src, 64)
    cp = rb.measure(["cp", "-r", str(src), str(work / "cp-fixed")], [src])
    shutil.rmtree(work / "cp-fixed")
    rows = [dict(cp, label="cp -r (1/64 scale, 0.18 GB)")]
    for who, code in (("before", BEFORE), ("after", NEW)):
        r = _run(code, ["hf-to-mcore", "--quiet", "--tp", "2", str(src), "-o", str(work / "mf")], src, work / "mf",
                 work / f"fixed-{who}.log")
        rows.append(dict(r, label=f"hf-to-mcore TP=2 ({who})"))
        os.environ["PYTHONPATH"] = code
        rows.append(dict(rb.measure([sys.executable, "-c", "import stepconv.convert"]),
                         label=f"python -c 'import stepconv.convert' ({who})"))
    shutil.rmtree(work / "mf")
    shutil.rmtree(src)
    for r in rows:
        print(f"  {r['label']:<44} {r['wall_s']:7.2f} s  cpu {r['cpu_s']:6.2f}", flush=True)
    return rows


def markdown(title: str, rows: list[dict], mach: dict) -> str:
    lines = [f"**{title}** ({mach['nproc']} CPUs, {mach['cpu']}, torch {mach['torch']})", "",
             "| run | wall s | +sync s | total s | vs cp | CPU s | CPU s/GB | peak RSS MiB | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['wall_s']:.2f} | {r['sync_s']:.2f} | {r['total_s']:.2f} | "
                     f"{rb._f(r.get('ratio'))} | {r['cpu_s']:.1f} | {rb._f(r.get('cpu_per_gb'))} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {r['load']:.1f} |")
    return "\n".join(lines) + "\n"


BEFORE = ""


def main() -> int:
    global BEFORE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the old checkout (its folder holds stepconv/)")
    ap.add_argument("--real-width", action="store_true")
    ap.add_argument("--scale", type=int, action="append", default=[])
    ap.add_argument("--imports", default="TP=2,torch_dist,TP=2 x EP=2",
                    help=f"comma-separated, of: {', '.join(n for n, _ in IMPORTS)}")
    ap.add_argument("--out", default=str(HERE / "out" / "before-after"))
    ap.add_argument("--quick", action="store_true", help="mcore-to-hf with the new code only; no compare")
    a = ap.parse_args()
    BEFORE = str(Path(a.before).resolve())
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    imports = [(n, args) for n, args in IMPORTS if n in a.imports.split(",")]
    mach = rb.machine()
    text = markdown("fixed cost", fixed(work), mach)
    (work / "before-after.md").write_text(text)
    cases = ([("real width", 1, dict(layers=2, mtp=0, dense=1), True)] if a.real_width else []) + \
        [(f"1/{s} scale", s, {}, False) for s in a.scale]
    results = {}
    for label, scale, kw, distinct in cases:
        rows = case(label, scale, work, imports, a.quick, distinct=distinct, **kw)
        results[label] = rows
        text += "\n" + markdown(label, rows, mach)
        (work / "before-after.md").write_text(text)
        (work / f"before-after-{time.strftime('%H%M%S')}.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
