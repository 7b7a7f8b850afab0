"""`stepconv` command line: a thin typer layer over stepconv.convert / verify / inspect."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import report

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Step-3.5-Flash checkpoints between Hugging Face and Megatron-Core.\n\n"
                       "Example: stepconv hf-to-mcore --tp 4 Step-3.5-Flash/ && stepconv verify Step-3.5-Flash/ "
                       "Step-3.5-Flash-mcore/")


ETP_HELP = ("Expert tensor-parallel size (Megatron's expert_tensor_parallel_size): routed experts' fc1/fc2 split "
            "over it, everything else over --tp; legacy files need it to divide --tp (commonly 1) [default: --tp].")
PP_FIRST_HELP = ("Layers on the first pipeline stage (Megatron's decoder_first_pipeline_num_layers); the other stages "
                 "split the rest evenly (e.g. 45 layers, --pp 8 --pp-first 3).")
PP_LAST_HELP = "Layers on the last pipeline stage (Megatron's decoder_last_pipeline_num_layers)."
VPP_HELP = ("Virtual pipeline stages per PP rank (Megatron's num_virtual_stages_per_pipeline_rank): rank files hold "
            "model0..model{V-1}, the interleaved schedule's layers.")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="On an error, print the traceback before the one-line "
                                                            "message (also: STEPCONV_DEBUG=1).")) -> None:
    """Exit codes: 0 success, 1 verify FAIL / compare differs, 2 bad input, 3 environment (disk full, read-only,
    permission, out of memory, output locked by another run)."""
    import os

    if debug:
        os.environ["STEPCONV_DEBUG"] = "1"  # (inherited by verify's rank processes)


def _conversion() -> None:
    """A conversion command's process builds no reference cycles (engine.gc_paused): the collector stays off from
    before its imports (torch's import: 2.3 s with it off vs 2.6-2.7 s on, 2-core machine) to the exit."""
    import gc

    gc.disable()


@app.command("hf-to-mcore")
def hf_to_mcore_cmd(
    hf_dir: Path = typer.Argument(..., help="Hugging Face Step-3.5-Flash folder (config.json + safetensors)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder [default: <HF_DIR>-mcore beside the input]."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size; must divide query groups and heads (e.g. 1, 2, 4, 8)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size; must divide num_hidden_layers (e.g. 45 -> 1, 3, 5, 9) "
                                            "unless --pp-first/--pp-last take the remainder."),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel size; must divide moe_num_experts (e.g. 288 -> 8)."),
    etp: Optional[int] = typer.Option(None, "--etp", help=ETP_HELP),
    pp_first: Optional[int] = typer.Option(None, "--pp-first", help=PP_FIRST_HELP),
    pp_last: Optional[int] = typer.Option(None, "--pp-last", help=PP_LAST_HELP),
    vpp: Optional[int] = typer.Option(None, "--vpp", help=VPP_HELP),
    spec: str = typer.Option("te", "--spec", help="Megatron layer spec whose parameter names to write: te (TransformerEngine, "
                                                   "TEGroupedMLP experts) or local (SequentialMLP)."),
    fmt: str = typer.Option("torch", "--format", help="torch (legacy mp_rank_* files, --ckpt-format torch) or torch_dist "
                                                      "(Megatron's default: global keys, loads at any layout)."),
    dtype: str = typer.Option("keep", "--dtype", help="keep (as stored), bf16 or fp32. The router expert bias stays fp32."),
    window: str = typer.Option("hf", "--window-convention", help="Sliding window written to args: hf (W keys incl. "
                                                                  "current, window_size=(W-1,0)) or megatron (W+1 keys)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from <OUT>.partial, skipping "
                                                         "rank files already complete (same input and options)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget for parallel work, e.g. 64GB "
                                                                         "[default: half the machine's RAM]."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Most rank-file groups converted at once "
                                                                  "[default: CPU count, within --max-memory]."),
    processes: bool = typer.Option(True, "--processes/--threads", help="Run rank-file groups in worker processes "
                                                                       "(forked; not on Windows) or in threads of one "
                                                                       "process."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Convert a HF checkpoint to Megatron: legacy per-rank files (mp_rank_*/model_optim_rng.pt) or torch_dist.

    Example: stepconv hf-to-mcore --tp 4 --ep 8 --pp 3 Step-3.5-Flash/ -o Step-3.5-Flash-tp4-pp3-ep8

    A training run's layout: stepconv hf-to-mcore --tp 2 --ep 8 --etp 1 --pp 8 --pp-first 3 --vpp 3 Step-3.5-Flash/
    """
    _conversion()
    from .convert import hf_to_mcore
    from .hf_io import HFCheckpoint, parse_size
    from .progress import progress

    budget = parse_size(max_memory, "--max-memory") if max_memory else None
    total = sum(t.nbytes for t in HFCheckpoint(hf_dir).tensors.values())
    with progress(total, "hf-to-mcore", quiet=quiet) as report:
        s = hf_to_mcore(hf_dir, out, tp=tp, pp=pp, ep=ep, spec=spec, dtype=dtype, overwrite=overwrite,
                        window_convention=window, resume=resume, max_memory=budget, jobs=jobs, progress=report,
                        format=fmt, etp=etp, pp_first=pp_first, pp_last=pp_last, vpp=vpp, processes=processes)
    typer.echo("\n".join(s.lines()))


@app.command("mcore-to-hf")
def mcore_to_hf_cmd(
    mcore_dir: Path = typer.Argument(..., help="Megatron checkpoint folder (with latest_checkpointed_iteration.txt), "
                                               "or one of its iteration folders."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder [default: <MCORE_DIR>-hf beside the input]."),
    iteration: Optional[str] = typer.Option(None, "--iteration", help="Iteration number or 'release' [default: latest]."),
    hf_config: Optional[Path] = typer.Option(None, "--hf-config", help="Step-3.5 config.json, for checkpoints saved by a "
                                                                       "Megatron training run (no stepconv metadata)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors file, e.g. 5GB, 500MB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Tensors merged and written at once, each in its own "
                                                                  "worker [default: CPU count, at most 4]."),
    processes: bool = typer.Option(True, "--processes/--threads", help="Merge in worker processes (forked; not on "
                                                                       "Windows) where tensors average under 1 MiB, "
                                                                       "or always in threads of one process."),
    dtype: str = typer.Option("source", "--dtype", help="HF dtype of the output: source (each tensor's original dtype as "
                                                         "hf-to-mcore recorded it, else config.json's torch_dtype), "
                                                         "bf16, fp16 or fp32 (e.g. fp32 after training in fp32; the "
                                                         "router bias stays fp32)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Convert Megatron legacy per-rank files back to a HF folder; the layout (TP, PP, EP, ETP, stages, VPP) comes
    from the checkpoint's args.

    Example: stepconv mcore-to-hf Step-3.5-Flash-mcore/ -o Step-3.5-Flash-hf --iteration 2000
    """
    _conversion()
    from .convert import mcore_to_hf
    from .progress import progress

    with progress(0, "mcore-to-hf", quiet=quiet) as report:
        s = mcore_to_hf(mcore_dir, out, iteration=iteration, hf_config=hf_config, max_shard_size=max_shard_size,
                        overwrite=overwrite, jobs=jobs, dtype=dtype, progress=report, processes=processes)
    typer.echo("\n".join(s.lines()))


@app.command("reshard")
def reshard_cmd(
    src: Path = typer.Argument(..., help="Megatron checkpoint (legacy or torch_dist; root or iteration folder)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    fmt: Optional[str] = typer.Option(None, "--format", help="torch or torch_dist [default: the source's]."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Tensor-parallel size [default: the source's]."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Pipeline-parallel size [default: the source's]."),
    ep: Optional[int] = typer.Option(None, "--ep", help="Expert-parallel size [default: the source's]."),
    etp: Optional[int] = typer.Option(None, "--etp", help=ETP_HELP.replace("[default: --tp]", "[default: the source's, "
                                                                          "or --tp if the source's followed its TP]")),
    pp_first: Optional[int] = typer.Option(None, "--pp-first", help=PP_FIRST_HELP + " [default: the source's unless "
                                                                                   "--pp is given]"),
    pp_last: Optional[int] = typer.Option(None, "--pp-last", help=PP_LAST_HELP + " [default: as --pp-first]"),
    vpp: Optional[int] = typer.Option(None, "--vpp", help=VPP_HELP + " [default: as --pp-first]"),
    spec: Optional[str] = typer.Option(None, "--spec", help="te or local names [default: the source's]."),
    iteration: Optional[str] = typer.Option(None, "--iteration", help="Source iteration or 'release' [default: latest]."),
    hf_config: Optional[Path] = typer.Option(None, "--hf-config", help="Step-3.5 config.json, for checkpoints saved by a "
                                                                       "Megatron training run (no stepconv metadata)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Megatron -> Megatron: another format and/or layout, without writing HF in between; audited, streamed.

    Example: stepconv reshard step35-tp4-pp3-ep8 -o step35-dist --format torch_dist
    """
    _conversion()
    from .convert import reshard
    from .progress import progress

    opts = {k: v for k, v in dict(format=fmt, tp=tp, pp=pp, ep=ep, spec=spec, etp=etp, pp_first=pp_first,
                                  pp_last=pp_last, vpp=vpp).items() if v is not None}
    with progress(0, "reshard", quiet=quiet) as report:
        s = reshard(src, out, iteration=iteration, hf_config=hf_config, overwrite=overwrite, progress=report, **opts)
    typer.echo("\n".join(s.lines()))


@app.command("verify")
def verify_cmd(
    hf_dir: Path = typer.Argument(..., help="The HF Step-3.5-Flash folder (the reference)."),
    mcore_dir: Path = typer.Argument(..., help="The Megatron checkpoint converted from it."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 (checks the conversion; bf16 weights upcast exactly) or bf16 "
                                                       "(checks bf16 runtime numerics; per-layer gates, docs/VERIFY.md)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (one GPU per TP x EP rank; the HF side on "
                                                                "GPU 0) [default: cuda when there are enough GPUs]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Check main layers A..B-1 only, e.g. 40:45 (both sides "
                                                                "start from the HF embeddings; head and MTP need B = "
                                                                "num_hidden_layers)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=2, max=1 << 20, help="Tokens per sequence [default: 2 x sliding_window + 8, "
                                                                  "so the window is exercised]."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, max=1 << 16, help="Sequences [default: enough for 256 positions, min 2]."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Token ids instead of random ones: one "
                                                                           "sequence per line, whitespace separated."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random token ids."),
    iteration: Optional[str] = typer.Option(None, "--iteration", help="Megatron iteration or 'release' [default: latest]."),
    window: Optional[str] = typer.Option(None, "--window-convention", help="Override the checkpoint's sliding-window "
                                                                           "convention: hf or megatron."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=(
        "Run the HF side with the folder's own modeling_step3p5.py, layer by layer and strictly (StepFun's runs on "
        "transformers 4.57.1, not 5.x: docs/VERIFY.md).")),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the full report (per-layer table "
                                                                  "included) as JSON here."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Run the Megatron side at this TP [default: the checkpoint's]."),
    ep: Optional[int] = typer.Option(None, "--ep", help="... at this EP [default: the checkpoint's]. (Layers run one "
                                                        "at a time, so there is no pipeline split to choose.)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Parity of the HF model and the Megatron model (real megatron-core, TP x EP processes), one layer at a time.

    Each side holds one layer in memory. Per layer, teacher-forced (the Megatron layer gets the HF layer's input):
    max/mean relative difference and cosine of attention, MLP and layer updates; on MoE layers the router agreement
    and each expert's output under identical routing. Then the free-running chain to the logits and MTP heads
    (max/mean |d|, cosine, KL, top-1/5). Exit 0 on pass, 1 on fail (naming the first divergent layer).

    Example: stepconv verify Step-3.5-Flash/ Step-3.5-Flash-mcore/ --device cuda --json verify.json
    """
    import os
    import warnings

    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # megatron-core's "TE/Apex not installed" chatter, per rank
    warnings.simplefilter("ignore")
    from .verify import verify, write_json

    layout = None
    if (tp, ep) != (None, None):
        from .convert import plan_export
        from .mapping import Layout

        rec = plan_export(mcore_dir, iteration=iteration, hf_config=hf_dir / "config.json").layout
        layout = Layout(tp or rec.tp_size, 1, ep or rec.ep_size)
    r = verify(hf_dir, mcore_dir, dtype=dtype, batch=batch, seq_len=seq_len, prompt_file=prompt_file, seed=seed,
               iteration=iteration, trust_remote_code=trust_remote_code, window_convention=window, layout=layout,
               device=device, layers=layers, quiet=quiet)
    typer.echo(r.table())
    if json_path:
        write_json(r, json_path)
    raise typer.Exit(0 if r.passed else 1)


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="A HF folder (weights optional), a bare config.json, or a Megatron checkpoint."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Tensor-parallel size to plan for (HF input) [default: 1]."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Pipeline-parallel size to plan for (HF input) [default: 1]."),
    ep: Optional[int] = typer.Option(None, "--ep", help="Expert-parallel size to plan for (HF input) [default: 1]."),
    etp: Optional[int] = typer.Option(None, "--etp", help="Expert tensor-parallel size to plan for (HF input) "
                                                          "[default: --tp]."),
    pp_first: Optional[int] = typer.Option(None, "--pp-first", help="Layers on the first pipeline stage (HF input)."),
    pp_last: Optional[int] = typer.Option(None, "--pp-last", help="Layers on the last pipeline stage (HF input)."),
    vpp: Optional[int] = typer.Option(None, "--vpp", help="Virtual pipeline stages per PP rank (HF input)."),
    spec: str = typer.Option("te", "--spec", help="te or local parameter names (HF input)."),
    dtype: str = typer.Option("keep", "--dtype", help="keep, bf16 or fp32 (HF input)."),
    fmt: str = typer.Option("torch", "--format", help="torch or torch_dist (HF input: the format to plan)."),
    full: bool = typer.Option(False, "--full", help="List every tensor, not one line per name pattern."),
    iteration: Optional[str] = typer.Option(None, "--iteration", help="Megatron input: iteration or 'release'."),
    hf_config: Optional[Path] = typer.Option(None, "--hf-config", help="Megatron input: Step-3.5 config.json when the "
                                                                       "checkpoint carries none."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the plan as JSON here."),
) -> None:
    """The plan without writing anything: per-rank files with bytes and tensor counts, the HF <-> Megatron name
    mapping, the estimated peak memory, and every validation error up front (exit 2 if any).

    Example: stepconv inspect fixtures/step3p5-flash-config.json --tp 8 --ep 8
    """
    import json

    from .inspect import inspect_path, render

    r = inspect_path(path, tp=tp, pp=pp, ep=ep, spec=spec, dtype=dtype, full=full, iteration=iteration,
                     hf_config=hf_config, format=fmt, etp=etp, pp_first=pp_first, pp_last=pp_last, vpp=vpp)
    typer.echo(render(r))
    if json_path:
        json_path.write_text(json.dumps(r.to_dict(), indent=2, default=str) + "\n")
    if not r.ok:  # the report lists every error; stderr gets the one line every command ends with
        more = f" ({len(r.errors) - 1} more in the report)" if len(r.errors) > 1 else ""
        typer.echo(f"error: {r.errors[0] if r.errors else 'the plan failed'}{more}", err=True)
    raise typer.Exit(0 if r.ok else 2)  # (exit 1 is verify's FAIL only)


@app.command("compare")
def compare_cmd(
    a: Path = typer.Argument(..., help="First HF folder."),
    b: Path = typer.Argument(..., help="Second HF folder."),
) -> None:
    """Check two HF checkpoints are bit-identical: tensor names, dtypes, shapes, bytes and config.json.

    Example: stepconv compare Step-3.5-Flash/ Step-3.5-Flash-mcore-hf/
    """
    from .compare import compare_hf

    c = compare_hf(a, b)
    if c.identical:
        typer.echo(f"identical: {c.tensors} tensors, {c.bytes / 1e6:.2f} MB bit-exact, config.json equal")
        return
    for what, names in (("only in " + str(a), c.only_a), ("only in " + str(b), c.only_b), ("differ", c.differ)):
        if names:
            typer.echo(f"{what}: {len(names)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    if not c.config_equal:
        typer.echo("config.json differs")
    raise typer.Exit(1)


def main() -> None:
    """The one error boundary: every failure of every command is one `error:` line on stderr and an exit code
    (stepconv.errors: 2 bad input, 3 environment), never a traceback unless --debug."""
    try:
        code = app(standalone_mode=False)  # (click returns typer.Exit's code instead of exiting)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted; no output was published", err=True)
        sys.exit(130)
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's usage errors (typer's copy of click)
            if type(e).__name__ == "NoArgsIsHelpError":
                typer.echo(e.format_message())
                sys.exit(0)
            typer.echo(f"error: {e.format_message()} (see --help)", err=True)
            sys.exit(2)
        sys.exit(report(e))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
