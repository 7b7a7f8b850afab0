"""stepconv.inspect: the plan of a conversion, exact file sizes, name mapping and collected validation errors."""

import json
import re
import shutil
from pathlib import Path

import torch

import pytest

from conftest import ROOT, make_fixture
from stepconv.config import StepconvError
from stepconv.convert import hf_to_mcore, mcore_to_hf
from stepconv.inspect import compress, inspect_path, render
from stepconv.megatron_io import load_rank_file
from stepconv.config import Step35Config
from stepconv.mapping import Layout, hf_shapes, plan

REAL = ROOT / "fixtures" / "step3p5-flash-config.json"


@pytest.fixture(scope="module")
def real_tp8_ep8():
    return inspect_path(REAL, tp=8, ep=8)


def test_real_config_tp8_ep8_plan(real_tp8_ep8):
    r = real_tp8_ep8
    text = render(r)
    assert r.ok and r.planned and r.source_kind == "config"
    assert sorted(f.name for f in r.rank_files) == sorted(
        f"release/mp_rank_{t:02d}_{e:03d}/model_optim_rng.pt" for t in range(8) for e in range(8))
    # 199.38 B params (spec section 2.3); 190.25 B of them in the 42 x 3 stacked expert tensors
    assert r.model["params"] == 199_384_301_376
    experts = 42 * 3 * 288 * 1280 * 4096
    assert r.model["expert_params"] == experts
    # rank files: experts once (EP- and TP-split); split tensors on each of the 8 EP ranks; replicated ones (norms,
    # router, expert bias) on all 64 ranks; the 3 MTP output heads go to the sidecar; embedding and lm_head padded
    # 128896 -> 129024 rows; the router expert bias is fp32
    shapes = hf_shapes(Step35Config.from_file(REAL))
    heads = 3 * 128896 * 4096
    replicated = sum(_n(s) for n, s in shapes.items() if n.endswith(("norm.weight", "moe.gate.weight", "router_bias")))
    split = r.model["params"] - experts - heads - replicated
    pad = 2 * (129024 - 128896) * 4096
    bias_extra = 42 * 288 * 2  # fp32 instead of bf16
    want = 2 * experts + 8 * 2 * (split + pad) + 64 * (2 * replicated + bias_extra)
    assert sum(f.data_bytes for f in r.rank_files) == want
    assert 0 < r.total_rank_bytes - want < 1e-3 * want  # zip records and pickled state dicts (~1.3 MB per file)
    assert r.sidecar_files[0].bytes > 2 * heads
    # peak: the largest entry is the embedding's 8 padded shards together (they outweigh its unpadded source)
    pm = r.peak_memory
    assert pm.largest_name == "model.embed_tokens.weight" and pm.largest_bytes == 129024 * 4096 * 2
    assert (pm.factor, pm.extra_bytes) == (3, 80 << 20)  # (two 32 MiB read-ahead batches, size classes 25% over)
    # each of a unit's 8 rank files may hold 64 MiB written behind and 16 gather buffers of 1 MiB
    assert pm.write_bytes == 8 * (64 + 16) << 20
    assert pm.estimate_bytes == pm.workers * (3 * pm.largest_bytes + pm.extra_bytes + pm.write_bytes) + pm.fixed_bytes
    assert_printed_peak_adds_up(text, pm)
    assert "model.layers.{3..44}.moe.{gate,up}_proj.weight [288,1280,4096]x2 -> " \
           "decoder.layers.{i}.mlp.experts.linear_fc1.weight{e} [320,4096]/rank" in text
    assert "model.layers.{1..43 except 4..40 step 4}.self_attn.{q,k,v,g}_proj.weight" in text
    assert "EP-split 36/rank" in text
    assert len(text.splitlines()) < 120



_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def assert_printed_peak_adds_up(text: str, pm) -> None:
    """The printed peak-memory line is arithmetic a reader can redo:
    total = workers x (factor x largest + read-ahead + write-behind) + fixed."""
    line = next(l for l in text.splitlines() if l.lstrip().startswith("peak mem"))
    num = r"([\d.]+) (B|KB|MB|GB|TB)"
    m = re.search(rf"~{num} = (\d+) worker\(s\) x \((\d+) x {num}(?: \+ {num} read-ahead)?(?: \+ {num} write-behind)? *\)"
                  rf" \+ {num} fixed", line)
    assert m, line
    val = lambda i: float(m.group(i)) * _UNITS[m.group(i + 1)]  # noqa: E731
    total, workers, factor, largest, fixed = val(1), int(m.group(3)), int(m.group(4)), val(5), val(11)
    extra = (val(7) if m.group(7) else 0.0) + (val(9) if m.group(9) else 0.0)
    assert (workers, factor) == (pm.workers, pm.factor)
    assert abs(workers * (factor * largest + extra) + fixed - total) <= 0.01 * total  # 3 significant digits
    assert abs(total - pm.estimate_bytes) <= 0.005 * pm.estimate_bytes


def test_printed_peak_check_catches_wrong_arithmetic(real_tp8_ep8):
    """Negative control: the line the previous inspect printed ('2 x 1.06 GB + 0.3 GB' for a 3.54 GB figure)."""
    r = real_tp8_ep8
    bad = render(r).replace(f"= {r.peak_memory.workers} worker(s) x (3 x", f"= {r.peak_memory.workers} worker(s) x (2 x")
    try:
        assert_printed_peak_adds_up(bad, r.peak_memory)
    except AssertionError:
        return
    raise AssertionError("a peak-memory line whose arithmetic is wrong passed the check")


def test_peak_memory_is_the_conversions_worker_plan(tmp_path, fixture_dir):
    """inspect's workers and working set are the ones hf-to-mcore sizes its pool with, for the same options."""
    for jobs, budget in ((3, None), (8, 400 << 20), (1, None)):
        s = hf_to_mcore(fixture_dir, tmp_path / f"m{jobs}", tp=2, ep=2, jobs=jobs, max_memory=budget)
        r = inspect_path(fixture_dir, tp=2, ep=2, jobs=jobs, max_memory=budget)
        note = next(n for n in s.notes if "within --max-memory" in n)
        kind = "thread(s)" if r.peak_memory.workers == 1 else "process(es)"  # (several units: worker processes)
        assert note.startswith(f"{r.peak_memory.workers} worker {kind}"), (note, r.peak_memory)
        per_worker = (r.peak_memory.factor * r.peak_memory.largest_bytes + r.peak_memory.extra_bytes
                      + r.peak_memory.write_bytes)
        assert f"(largest working set {per_worker / 2**20:.0f} MiB)" in note


def test_pipeline_stages_only_move_layers(fixture_dir):
    """PP moves layers between files: the same tensor data in total, plus the embedding copy megatron-core
    builds on the MTP stage (one per EP rank x TP rank)."""
    flat = inspect_path(fixture_dir, tp=2, ep=2)
    for pp in (2, 4):
        r = inspect_path(fixture_dir, tp=2, ep=2, pp=pp)
        assert r.ok and len(r.rank_files) == 4 * pp
        emb_copy = 2 * 2 * 640 * 64 * 2  # EP x TP x [1280/2, 64] bf16
        assert sum(f.data_bytes for f in r.rank_files) == sum(f.data_bytes for f in flat.rank_files) + emb_copy


def test_invalid_layout_lists_every_error():
    r = inspect_path(REAL, tp=16, ep=7, pp=4)
    assert not r.ok and not r.planned and r.rank_files == []
    assert len(r.errors) == 3
    tp_err, pp_err, ep_err = r.errors
    assert "valid values 1, 2, 4, 8; got 16" in tp_err
    assert "valid values 1, 3, 5, 9, 15, 45; got 4; or uneven stages with --pp 4: --pp-first 3..42 step 3" in pp_err
    assert "valid values 1, 2, 3, 4, 6, 8, 9, 12" in ep_err and "got 7" in ep_err
    text = render(r)
    assert "3 error(s)" in text and "got 16" in text
    assert r.mapping  # the name mapping is still shown (for TP=PP=EP=1)


def test_megatron_folder_input(tmp_path, fixture_dir):
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, ep=2)
    r = inspect_path(m)
    assert r.ok, r.errors
    assert (r.direction, r.tp, r.pp, r.ep, r.spec) == ("mcore-to-hf", 2, 1, 2, "te")
    for f in r.rank_files:
        on_disk = m / "release" / f.name.split("/", 1)[1]
        model = load_rank_file(on_disk)["model"]
        assert (f.bytes, f.keys, f.tensors) == (on_disk.stat().st_size, len(model),
                                                sum(isinstance(v, torch.Tensor) for v in model.values()))
    assert len(r.rank_files) == 4
    h = tmp_path / "h"
    mcore_to_hf(m, h)
    produced = sorted(h.glob("*.safetensors"))
    assert [f.name for f in r.hf_files] == [p.name for p in produced]
    assert [f.bytes for f in r.hf_files] == [p.stat().st_size for p in produced]
    assert r.peak_memory is not None and "restored bit-exact from stepconv/mtp_heads.safetensors" in " ".join(r.notes)
    assert "mcore-to-hf, TP=2 PP=1 EP=2" in render(r)
    # an iteration folder works too, as for mcore-to-hf; a layout that disagrees with the args, and a missing rank,
    # are errors
    assert inspect_path(m / "release").ok
    shutil.rmtree(m / "release" / "mp_rank_01_001")
    bad = inspect_path(m, tp=4)
    assert any("--tp 4 does not match the checkpoint (TP=2" in e for e in bad.errors)
    assert any("1 rank file(s) missing" in e and "mp_rank_01_001" in e for e in bad.errors)
    assert json.loads(json.dumps(bad.to_dict()))["ok"] is False


def test_megatron_input_checks_every_rank_file_like_the_export(tmp_path, fixture_dir):
    """A misshapen tensor in a rank file other than the first: inspect and mcore-to-hf both refuse it, naming it."""
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, spec="local")
    f = m / "release" / "mp_rank_01" / "model_optim_rng.pt"
    obj = load_rank_file(f)
    sd = {k: (v.clone() if v is not None else None) for k, v in obj["model"].items()}
    key = "decoder.layers.0.mlp.linear_fc2.weight"
    sd[key] = sd[key].T.contiguous()
    torch.save({**obj, "model": sd}, f)
    r = inspect_path(m)
    assert not r.ok and any("model.layers.0.mlp.down_proj.weight" in e for e in r.errors), r.errors
    with pytest.raises(StepconvError, match="model.layers.0.mlp.down_proj.weight"):
        mcore_to_hf(m, tmp_path / "h")


def test_config_only_folder_matches_full_folder(tmp_path, fixture_dir):
    d = tmp_path / "cfg"
    d.mkdir()
    shutil.copy(fixture_dir / "config.json", d / "config.json")
    r = inspect_path(d, tp=2, ep=2)
    full = inspect_path(fixture_dir, tp=2, ep=2)
    assert r.ok and r.source_kind == "hf-config-only" and r.hf_files == []
    assert [(f.name, f.bytes, f.tensors) for f in r.rank_files] == [(f.name, f.bytes, f.tensors)
                                                                     for f in full.rank_files]
    assert "config.json only" in render(r)
    bare = inspect_path(d / "config.json", tp=2, ep=2)
    assert bare.source_kind == "config" and bare.to_dict()["total_rank_bytes"] == r.total_rank_bytes


def test_hf_tensor_errors_are_collected(tmp_path):
    cfg = make_fixture.tiny_config()
    t = make_fixture.make_tensors(cfg)
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.1.mlp.extra.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    t["model.layers.0.self_attn.g_proj.weight"] = torch.zeros(9, 64, dtype=torch.bfloat16)
    make_fixture.write_checkpoint(tmp_path / "bad", cfg, t)
    r = inspect_path(tmp_path / "bad", tp=3)
    text = " | ".join(r.errors)
    assert len(r.errors) == 4, r.errors
    assert "got 3" in text and "missing" in text and "model.layers.1.mlp.up_proj.weight" in text
    assert "model.layers.1.mlp.extra.weight" in text and "g_proj.weight [9, 64] (expected [8, 64])" in text


def test_full_lists_every_tensor(fixture_dir):
    r = inspect_path(fixture_dir, tp=2, pp=2, ep=2, full=True)
    cfg_entries = [e for e in plan(_cfg(fixture_dir), Layout(2, 2, 2), "te") if e.kind.sources]
    assert len(r.tensors) == len(cfg_entries)
    text = render(r)
    assert "mlp.experts.linear_fc1.weight3" in text and "expert 7" in text
    json.dumps(r.to_dict())


def test_not_found_and_bad_config(tmp_path):
    r = inspect_path(tmp_path / "nope")
    assert not r.ok and "not found" in r.errors[0]
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "llama"}))
    r = inspect_path(tmp_path / "c.json")
    assert not r.ok and "step3p5" in r.errors[0]


def test_compress():
    assert compress([3, 4, 5]) == "3..5"
    assert compress(range(0, 45, 4)) == "0..44 step 4"
    assert compress([i for i in range(1, 44) if i % 4]) == "1..43 except 4..40 step 4"
    assert compress([2]) == "2"
    assert compress([1, 5]) == "1,5"


def _n(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _cfg(d: Path):
    return Step35Config.from_file(d / "config.json")


def test_worker_plan_counts_what_output_files_hold_while_written_behind(fixture_dir):
    """Per worker, the plan adds each of its unit's output files' write-behind bound (`GatherFile.most_held`): a
    rank file folds its resume digest in (16 gather buffers), a torch_dist data file does not (4); TP=4 units have
    four rank files. A budget that fits the working set without them gets fewer workers."""
    from stepconv.hf_io import GatherFile

    mib = 1 << 20
    assert GatherFile.most_held(digest=True) == 80 * mib and GatherFile.most_held(digest=False) == 68 * mib
    for tp, fmt, files, per_file in ((2, "torch", 2, 80), (4, "torch", 4, 80), (2, "torch_dist", 1, 68)):
        pm = inspect_path(fixture_dir, tp=tp, format=fmt, jobs=4).peak_memory
        assert pm.write_bytes == files * per_file * mib, (tp, fmt, pm)
        assert f"+ {pm.write_bytes / 1e6:.2f} MB write-behind" in pm.formula
        without = pm.factor * pm.largest_bytes + pm.extra_bytes
        budget = 3 * (without + pm.write_bytes) // 2  # (room for two workers if writes were not counted)
        assert budget >= 2 * without
        tight = inspect_path(fixture_dir, tp=tp, format=fmt, jobs=4, max_memory=budget).peak_memory
        assert tight.workers == 1, (tp, fmt, tight)
