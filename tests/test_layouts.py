"""The parallel layouts of real Megatron runs: expert tensor parallelism (--etp), uneven first/last pipeline stages
(--pp-first/--pp-last) and virtual pipeline stages (--vpp).

The layout arithmetic is checked against megatron-core's own functions (layer offsets and counts, the rank grid);
conversions round-trip bit-exact; args carry Megatron-LM's names and are what export reads back. That the files
hold what a real GPTModel holds, rank by rank and chunk by chunk, is `test_megatron_names`.
"""

import argparse
import json

import pytest
import torch

from conftest import ROOT, bit_equal, load_hf, make_fixture
from stepconv.config import Step35Config, StepconvError, layer_chunks
from stepconv.convert import (ImportOptions, config_dtypes, hf_to_mcore, layout_options, mcore_to_hf, plan_import,
                              reshard)
from stepconv.inspect import inspect_path, render
from stepconv.mapping import Layout, plan
from stepconv.megatron_io import load_rank_file, rank_dir_name
from test_cli import one_line_error, run
from test_convert import assert_inspect_matches

REAL = ROOT / "fixtures" / "step3p5-flash-config.json"
# the layouts the issue names, then uneven stages with virtual stages
ROUND_TRIPS = [Layout(2, 1, 2, etp_size=1), Layout(1, 2, 1, pp_first=2), Layout(1, 2, 1, pp_last=2),
               Layout(1, 2, 1, vpp_size=2), Layout(2, 2, 2, etp_size=1, vpp_size=2),
               Layout(1, 2, 1, pp_first=2, vpp_size=2)]


@pytest.fixture(scope="module")
def hf8(tmp_path_factory):
    """The fixture with 8 layers (6 MoE): PP=2 with 2 on one stage is uneven, PP=2 x VPP=2 has 2 layers a chunk."""
    return make_fixture.make_checkpoint(tmp_path_factory.mktemp("hf8") / "hf", num_layers=8)


def _tiles(chunks, num_layers: int) -> bool:
    """Every layer exactly once, in order, over non-empty chunks taken round by round (the interleaved order)."""
    order = [stage[c] for c in range(len(chunks[0])) for stage in chunks]
    return all(len(r) for r in order) and [i for r in order for i in r] == list(range(num_layers))


def test_layer_chunks_are_megatron_cores_offsets_and_counts():
    """Every (layers, PP, VPP, first, last): where stepconv accepts a split, megatron-core's
    get_transformer_layer_offset and get_num_layers_to_build give the same chunks; where stepconv refuses one,
    megatron-core refuses it too or gives no tiling of the layers (it does not check every case itself), or PP is 1
    (Megatron-LM refuses VPP there; a first or last stage that is the only stage is no split)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    accepted = refused = 0
    for L in (1, 2, 3, 4, 6, 8, 9, 12, 45):
        for pp in (1, 2, 3, 4, 5, 8):
            for vpp in (None, 2, 3):
                for first in (None, 1, 2, 3, 4, 6):
                    for last in (None, 1, 2, 3):
                        try:
                            ours = layer_chunks(L, pp, vpp, first, last)
                        except ValueError:
                            ours = None
                        try:
                            tc = TransformerConfig(num_layers=L, hidden_size=8, num_attention_heads=1,
                                                   pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                                   virtual_pipeline_model_parallel_size=vpp,
                                                   num_layers_in_first_pipeline_stage=first,
                                                   num_layers_in_last_pipeline_stage=last)
                            theirs = tuple(tuple(
                                range(get_transformer_layer_offset(tc, c if vpp else None, p),
                                      get_transformer_layer_offset(tc, c if vpp else None, p)
                                      + get_num_layers_to_build(tc, c if vpp else None, p))
                                for c in range(vpp or 1)) for p in range(pp))
                        except (ValueError, AssertionError, ZeroDivisionError):
                            theirs = None
                        case = (L, pp, vpp, first, last)
                        if ours is not None:
                            accepted += 1
                            assert ours == theirs and _tiles(ours, L), case
                        else:
                            refused += 1
                            assert theirs is None or not _tiles(theirs, L) or pp == 1, case
    assert accepted > 300 and refused > 3000
    # the example: 8 layers, PP=2, VPP=2
    assert layer_chunks(8, 2, 2) == ((range(0, 2), range(4, 6)), (range(2, 4), range(6, 8)))


@pytest.mark.parametrize("tp,ep,etp,pp", [(1, 1, 1, 1), (2, 1, 1, 2), (2, 2, 1, 1), (4, 2, 1, 2), (2, 4, 1, 1),
                                          (4, 2, 2, 1), (8, 8, 1, 1), (2, 4, 2, 3), (1, 2, 2, 1), (2, 4, 4, 1)])
def test_rank_folders_are_megatron_cores_rank_grid(tp, ep, etp, pp):
    """Layout.grid is megatron-core's RankGenerator (order tp-cp-ep-dp-pp) for dense and expert parts; the rank
    folders are exactly those Megatron-LM's save_checkpoint writes (ranks of data-parallel or expert-data-parallel
    rank 0), each holding one ETP shard where ETP divides TP; otherwise writers of one folder would clash."""
    from megatron.core.parallel_state import RankGenerator

    lay = Layout(tp, pp, ep, etp)
    world = lay.world_size
    dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")

    def index(gen, token) -> dict[int, int]:
        return {r: g.index(r) for g in gen.get_ranks(token) for r in g}

    t, p, d = index(dense, "tp"), index(dense, "pp"), index(dense, "dp")
    k, e, ed = index(expert, "tp"), index(expert, "ep"), index(expert, "dp")
    assert lay.grid() == [(t[r], p[r], e[r], k[r]) for r in range(world)]
    writers = {(t[r], p[r], e[r]) for r in range(world) if d[r] == 0 or ed[r] == 0}
    assert set(lay.ranks()) == writers == {(t[r], p[r], e[r]) for r in range(world)}
    shards = {}
    for r in range(world):
        shards.setdefault((t[r], p[r], e[r]), set()).add(k[r])
    one_each = all(len(s) == 1 for s in shards.values())
    assert (lay.rank_problems() == []) == one_each == (tp % etp == 0)
    if one_each:
        assert all(lay.expert_tp_rank(*f) == next(iter(s)) for f, s in shards.items())
    if (tp, ep, etp) == (2, 2, 1):  # the example: two folders, not a 2 x 2 grid
        assert [rank_dir_name(*r, pp, ep) for r in lay.ranks()] == ["mp_rank_00_000", "mp_rank_01_001"]


@pytest.mark.parametrize("lay", ROUND_TRIPS, ids=str)
def test_round_trip_is_bit_exact(tmp_path, hf8, lay):
    src = load_hf(hf8)
    for spec in ("local", "te"):
        m, h = tmp_path / f"m-{spec}", tmp_path / f"h-{spec}"
        s = hf_to_mcore(hf8, m, spec=spec, **layout_options(lay))
        assert str(lay) in s.lines()[1] and f"({len(lay.ranks())} rank files)" in s.lines()[1]
        assert sorted(p.name for p in (m / "release").iterdir()) == sorted(
            rank_dir_name(*r, lay.pp_size, lay.ep_size) for r in lay.ranks())
        mcore_to_hf(m, h, max_shard_size="300KB")
        back = load_hf(h)
        assert set(back) == set(src) and [n for n in src if not bit_equal(src[n], back[n])] == []
    # inspect predicts the files of both directions exactly, and reads the layout back from the args
    assert_inspect_matches(hf8, m, h, "300KB", spec="te", **layout_options(lay))
    r = inspect_path(m)
    assert r.ok and (r.tp, r.pp, r.ep, r.etp, r.pp_first, r.pp_last, r.vpp) == tuple(layout_options(lay).values())


def test_files_and_args(tmp_path, hf8):
    """TP=2 PP=2 VPP=2 EP=2 ETP=1: where each layer, expert shard and the head sit, and Megatron-LM's arg names."""
    m = tmp_path / "m"
    hf_to_mcore(hf8, m, tp=2, pp=2, vpp=2, ep=2, etp=1, spec="local")
    src = load_hf(hf8)
    assert sorted(p.name for p in (m / "release").iterdir()) == [
        "mp_rank_00_000_000", "mp_rank_00_001_000", "mp_rank_01_000_001", "mp_rank_01_001_001"]
    first = load_rank_file(m / "release" / "mp_rank_01_000_001" / "model_optim_rng.pt")
    last = load_rank_file(m / "release" / "mp_rank_01_001_001" / "model_optim_rng.pt")
    a = first["args"]
    assert sorted(k for k in first if k.startswith("model")) == ["model0", "model1"]
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size,
            a.expert_tensor_parallel_size, a.virtual_pipeline_model_parallel_size,
            a.num_virtual_stages_per_pipeline_rank) == (2, 2, 2, 1, 2, 2)
    assert a.decoder_first_pipeline_num_layers is None and a.decoder_last_pipeline_num_layers is None
    cfg = Step35Config.from_file(hf8 / "config.json")
    plain = plan_import(cfg, config_dtypes(cfg), ImportOptions(tp=2)).args  # Megatron-LM's values without them
    assert (plain.expert_tensor_parallel_size, plain.virtual_pipeline_model_parallel_size,
            plain.num_virtual_stages_per_pipeline_rank, plain.decoder_first_pipeline_num_layers,
            plain.decoder_last_pipeline_num_layers) == (2, None, None, None, None)
    uneven = plan_import(cfg, config_dtypes(cfg), ImportOptions(pp=2, pp_first=3, pp_last=5)).args
    assert (uneven.decoder_first_pipeline_num_layers, uneven.decoder_last_pipeline_num_layers) == (3, 5)
    # PP rank 0 holds layers 0,1 (model0) and 4,5 (model1); PP rank 1 holds 2,3 and 6,7, each chunk from local 0
    norm = "input_layernorm.weight"
    for obj, layers in ((first, (0, 1, 4, 5)), (last, (2, 3, 6, 7))):
        for j, i in enumerate(layers):
            assert torch.equal(obj[f"model{j // 2}"][f"decoder.layers.{j % 2}.{norm}"], src[f"model.layers.{i}.{norm}"])
        assert f"decoder.layers.2.{norm}" not in obj["model0"] and f"decoder.layers.2.{norm}" not in obj["model1"]
    # the embedding in model0 of the first stage; final norm, output layer, MTP and MTP's embedding copy in the last
    # stage's model1
    assert "embedding.word_embeddings.weight" in first["model0"] and "output_layer.weight" not in first["model1"]
    assert {"decoder.final_layernorm.weight", "output_layer.weight", "embedding.word_embeddings.weight",
            "mtp.layers.0.enorm.weight"} <= set(last["model1"])
    assert not any(k.startswith(("mtp.", "output_layer", "embedding")) for k in last["model0"])
    # TP rank 1 with EP rank 1 at ETP=1: this EP rank's experts whole, the dense MLP and shared experts at TP rank 1
    fc1 = last["model0"]["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"]  # layer 2, expert 8+3
    assert torch.equal(fc1, torch.cat([src["model.layers.2.moe.gate_proj.weight"][11],
                                       src["model.layers.2.moe.up_proj.weight"][11]]))
    shared = last["model0"]["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"]
    assert torch.equal(shared, src["model.layers.2.share_expert.down_proj.weight"][:, 16:])


def test_export_reads_the_layout_megatron_lm_recorded(tmp_path, hf8):
    """Args as a Megatron-LM run leaves them: VPP from num_layers_per_virtual_pipeline_stage alone, ETP absent
    (= TP); layouts stepconv cannot read are refused by name."""
    args = argparse.Namespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              expert_model_parallel_size=2, num_layers=8, num_layers_per_virtual_pipeline_stage=2)
    assert Layout.from_args(args, "x") == Layout(2, 2, 2, etp_size=2, vpp_size=2)
    args.num_virtual_stages_per_pipeline_rank = 4
    assert Layout.from_args(args, "x").vpp_size == 4
    args.pipeline_model_parallel_layout = "Et|tL"
    with pytest.raises(StepconvError, match="pipeline_model_parallel_layout"):
        Layout.from_args(args, "x")
    # a real file whose args name VPP only that way
    m = tmp_path / "m"
    hf_to_mcore(hf8, m, pp=2, vpp=2, spec="local")
    for r in range(2):
        f = m / "release" / rank_dir_name(0, r, 0, 2, 1) / "model_optim_rng.pt"
        obj = load_rank_file(f)
        obj = {k: ({n: (t.clone() if t is not None else None) for n, t in v.items()} if k.startswith("model") else v)
               for k, v in obj.items()}
        a = obj["args"]
        a.virtual_pipeline_model_parallel_size = a.num_virtual_stages_per_pipeline_rank = None
        a.num_layers_per_virtual_pipeline_stage = 2
        torch.save(obj, f)
    mcore_to_hf(m, tmp_path / "h")
    src, back = load_hf(hf8), load_hf(tmp_path / "h")
    assert all(bit_equal(src[n], back[n]) for n in src)


def test_verify_reads_these_layouts_at_the_runs_tp_and_ep(tmp_path, hf8):
    """verify's Megatron side runs one piece at a time at TP x EP with ETP = TP: for a VPP + ETP checkpoint its
    pieces are re-split from the checkpoint (ResplitWeights), and equal those a plain conversion's rank files give."""
    from stepconv.mcore.stream import RankFileWeights, ResplitWeights

    a, plain = tmp_path / "a", tmp_path / "plain"
    hf_to_mcore(hf8, a, tp=2, pp=2, vpp=2, ep=2, etp=1, spec="local")
    hf_to_mcore(hf8, plain, tp=2, pp=2, ep=2, spec="local")
    cfg = Step35Config.from_file(hf8 / "config.json")
    resplit = ResplitWeights(a, None, hf8 / "config.json", 2, 2)
    files = RankFileWeights(plain / "release", cfg.raw, Layout(2, 2, 2), "local")
    pieces = [("embedding", "first"), ("embedding", "mtp"), ("norm",), ("output",)] + [
        ("layer", i) for i in range(cfg.num_layers + cfg.num_mtp)]
    for piece in pieces:
        for t in range(2):
            for e in range(2):
                got, want = resplit(piece, t, e), files(piece, t, e)
                assert sorted(got) == sorted(want), piece
                assert all(bit_equal(got[k], want[k]) for k in want if want[k] is not None), (piece, t, e)


def test_reshard_between_layouts_and_torch_dist(tmp_path, hf8):
    """legacy VPP + ETP -> torch_dist (global keys; the layout only in args) -> uneven legacy -> HF, bit-exact."""
    src = load_hf(hf8)
    a, d, b = tmp_path / "a", tmp_path / "d", tmp_path / "b"
    hf_to_mcore(hf8, a, tp=2, pp=2, vpp=2, ep=2, etp=1, spec="te")
    reshard(a, d, format="torch_dist")
    r = inspect_path(d)
    assert r.ok and (r.etp, r.vpp) == (1, 2)  # the source's layout, recorded
    reshard(d, b, format="torch", tp=1, pp=2, pp_last=2)
    lay = inspect_path(b)
    assert lay.ok and (lay.tp, lay.etp, lay.pp_last, lay.vpp) == (1, 1, 2, None)  # ETP followed the new TP
    mcore_to_hf(b, tmp_path / "h")
    back = load_hf(tmp_path / "h")
    assert [n for n in src if not bit_equal(src[n], back[n])] == []


def _problems(cfg: Step35Config, *args, **kw) -> list[str]:
    return Layout(*args, **kw).problems(cfg)


def test_validation_names_the_valid_values(tmp_path, hf8):
    real = Step35Config.from_file(REAL)
    assert _problems(real, 1, 8, pp_first=4) == [
        "--pp-first 4 leaves 41 layer(s) for the 7 other stage(s), which must split them evenly: valid --pp-first "
        "values with --pp 8: 3..38 step 7"]
    assert _problems(real, 1, 8, vpp_size=3) == [
        "--pp must divide 45 layers: valid values 1, 3, 5, 9, 15, 45; got 8; or uneven stages with --pp 8: "
        "--pp-first 3,24 or --pp-last 3,24"]
    assert _problems(real, 1, 8, pp_last=3, vpp_size=2) == [
        "--vpp 2 must divide every stage's layer count (3/6): valid --vpp values 1, 3"]
    assert _problems(real, 1, 1, vpp_size=2) == ["--vpp needs --pp > 1 (pipeline stages to split)"]
    assert "needs --pp > 2" in _problems(real, 1, 2, pp_first=40, pp_last=5, vpp_size=5)[0]
    assert _problems(real, 2, etp_size=3) == [
        "--etp must divide the routed experts' FFN width 1280: valid values 1, 2, 4, 5, 8, 10, 16, 20, ... "
        "(10 more); got 3"]
    assert _problems(real, 1, 8, 8, etp_size=1, pp_first=3, vpp_size=3) == []
    # a folder would need two ETP shards: refused for legacy files, fine for torch_dist (global keys)
    clash = inspect_path(hf8, tp=1, ep=2, etp=2)
    assert clash.errors == ["--etp 2 with --tp 1: the ranks of TP index 0 and EP index 0 hold different expert "
                            "shards, which one legacy rank file cannot hold: valid --etp values with --tp 1 --ep 2: 1 "
                            "(or --format torch_dist)"]
    assert inspect_path(hf8, tp=1, ep=2, etp=2, format="torch_dist").ok
    code, _, err = run("hf-to-mcore", "--pp", "2", "--pp-first", "8", hf8, "-o", tmp_path / "x")
    one_line_error(code, err, "--pp-first 8 leaves 0 layer(s)", "valid --pp-first values with --pp 2: 1..7")
    assert not (tmp_path / "x").exists()


def test_inspect_plans_stepfuns_recipe(tmp_path):
    """45 layers as StepFun's SFT recipe runs them, PP=8 x VPP=3 (a first stage of 3), EP=8, ETP=1 (on the fixture's
    dimensions): every rank file planned, the stages shown; per chunk a local layer numbering."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(make_fixture.tiny_config(num_layers=45)))
    r = inspect_path(cfg, tp=2, pp=8, pp_first=3, vpp=3, ep=8, etp=1)
    assert r.ok, r.errors
    assert len(r.rank_files) == 8 * 8  # (tp, ep) pairs (0,0),(1,1),(0,2),..: 8 per stage, not 2 x 8
    text = render(r)
    assert "TP=2 PP=8 EP=8 ETP=1 PP-first=3 VPP=3" in text
    assert "stage 0: layers 0 (model0), 15 (model1), 30 (model2)" in text
    assert "stage 7: layers 13..14 (model0), 28..29 (model1), 43..44 (model2)" in text
    entries = plan(Step35Config.from_file(cfg), Layout(2, 8, 8, 1, 3, None, 3), "te")
    where = {e.layer: (e.stage, e.chunk, e.key.split(".")[2]) for e in entries
             if e.key.startswith("decoder.layers.") and e.key.endswith("linear_proj.weight")}
    assert where[15] == (0, 1, "0") and where[16] == (1, 1, "0") and where[44] == (7, 2, "1")
