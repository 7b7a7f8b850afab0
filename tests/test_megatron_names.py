"""Names, shapes and placement are megatron-core's: our local-spec rank files match a real GPTModel, per rank and
per model chunk, for every layout stepconv writes (TP, PP, EP, expert TP, uneven first/last stages, virtual stages).

Released megatron-core (0.16) has one head count per config and no head-wise gate, so this uses the fixture
variant with a single attention shape and compares shapes with linear_qkv's gate rows aside.

One gloo world of 4 processes serves every layout: each layout re-initialises megatron-core's parallel groups
(ranks with equal coordinates simply repeat), builds one GPTModel per virtual stage as Megatron-LM's training
does (``vp_stage``, first/last stage per chunk), and

- records each chunk's ``state_dict()`` shapes and its decoder layers' ``layer_number``;
- loads our rank file into the chunks (``strict=True``) and checks, against the HF tensors directly (not through
  stepconv), that decoder layer ``layer_number - 1``'s tensors sit there and that a folder's routed experts are
  its EP rank's experts at its ETP rank's rows, its dense and attention weights its TP rank's;
- saves the chunks' state dicts from the ranks Megatron-LM's ``save_checkpoint`` writes legacy files from
  (data-parallel rank 0 or expert-data-parallel rank 0), so the folders that exist are Megatron's own; that
  checkpoint (iteration 7, no stepconv metadata) then converts back to HF bit-exact.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import bit_equal, load_hf, make_fixture
from stepconv.convert import hf_to_mcore, layout_options, mcore_to_hf
from stepconv.mapping import Layout
from stepconv.megatron_io import load_rank_file, rank_dir_name

NUM_LAYERS = 8  # 8 layers: PP=2 with a first or last stage of 2 is uneven, and PP=2 x VPP=2 has 2 layers a chunk
WORLD = 4
# the layouts, and whether the Megatron-saved copy's args name VPP by num_layers_per_virtual_pipeline_stage only
LAYOUTS = (
    (Layout(2, 1, 1), False),
    (Layout(1, 2, 1), False),
    (Layout(2, 1, 2), False),
    (Layout(2, 1, 2, etp_size=1), False),
    (Layout(1, 2, 1, pp_first=2), False),
    (Layout(1, 2, 1, pp_last=2), False),
    (Layout(1, 2, 1, vpp_size=2), True),
    (Layout(2, 2, 2, etp_size=1, vpp_size=2), False),
    (Layout(1, 2, 1, pp_first=2, vpp_size=2), False),
    (Layout(1, 4, 1, pp_first=1, pp_last=1), False),
)


def _build_released_model(cfg: dict, tp: int, pp: int, ep: int, *, etp: int | None = None,
                          pp_first: int | None = None, pp_last: int | None = None, vpp: int | None = None,
                          vp_stage: int | None = None):
    """The local-spec GPTModel (one model chunk: `vp_stage` with VPP) megatron-core builds for this layout, as
    Megatron-LM's pretrain_gpt builds it: first/last stage per chunk, the MTP block only where it is placed."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec, get_gpt_layer_local_spec,
                                                          get_gpt_mtp_block_spec)
    from megatron.core.transformer import TransformerConfig

    L = cfg["num_hidden_layers"]
    moe = {int(x) for x in cfg["moe_layers_enum"].split(",")}
    tc = TransformerConfig(
        num_layers=L, hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_attention_groups"], kv_channels=cfg["head_dim"], ffn_hidden_size=cfg["intermediate_size"],
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, num_layers_in_first_pipeline_stage=pp_first,
        num_layers_in_last_pipeline_stage=pp_last, virtual_pipeline_model_parallel_size=vpp,
        use_cpu_initialization=True, normalization="RMSNorm", qk_layernorm=True, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, num_moe_experts=cfg["moe_num_experts"],
        moe_router_topk=cfg["moe_top_k"], moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=cfg["share_expert_dim"], moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_layer_freq=[int(i in moe) for i in range(L)],
        mtp_num_layers=cfg["num_nextn_predict_layers"], moe_token_dispatcher_type="allgather",
        moe_router_dtype="fp32", params_dtype=torch.float32, pipeline_dtype=torch.float32)
    block = get_gpt_decoder_block_spec(tc, use_transformer_engine=False, vp_stage=vp_stage)
    mtp = get_gpt_mtp_block_spec(tc, get_gpt_layer_local_spec(qk_layernorm=True), use_transformer_engine=False,
                                 vp_stage=vp_stage)
    padded = -(-cfg["vocab_size"] // (128 * tp)) * 128 * tp
    return GPTModel(config=tc, transformer_layer_spec=block, vocab_size=padded, max_sequence_length=64,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False,
                    mtp_block_spec=mtp, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                    vp_stage=vp_stage)


def _placement_problems(chunks, hf: dict, cfg: dict, tp: int, ep: int, etp: int, coords: tuple) -> list[str]:
    """What of our tensors (loaded into the chunks) is not where megatron-core's modules say, judged from the HF
    tensors with plain slicing: layer `layer_number - 1`'s norms, its attention / dense MLP at this TP rank's
    columns, and this EP rank's experts at this ETP rank's rows."""
    tp_rank, _, ep_rank, etp_rank = coords
    moe = {int(x) for x in cfg["moe_layers_enum"].split(",")}
    local = cfg["moe_num_experts"] // ep

    def part(n: int, size: int, rank: int) -> slice:
        return slice(rank * n // size, (rank + 1) * n // size)

    out = []

    def same(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if not torch.equal(got.detach().to(want.dtype), want):
            out.append(f"{what} at rank {coords}")

    for c, model in enumerate(chunks):
        layers = [(layer, f"model.layers.{layer.layer_number - 1}.") for layer in model.decoder.layers]
        if model.mtp_process:
            layers += [(m.transformer_layer, f"model.layers.{cfg['num_hidden_layers'] + k}.")
                       for k, m in enumerate(model.mtp.layers)]
        for layer, p in layers:
            i = int(p.split(".")[2])
            same(f"chunk {c} {p}input_layernorm", layer.input_layernorm.weight, hf[p + "input_layernorm.weight"])
            o = hf[p + "self_attn.o_proj.weight"]
            same(f"chunk {c} {p}o_proj", layer.self_attention.linear_proj.weight,
                 o[:, part(o.shape[1], tp, tp_rank)])
            if i not in moe:
                d = hf[p + "mlp.down_proj.weight"]
                same(f"chunk {c} {p}down_proj", layer.mlp.linear_fc2.weight, d[:, part(d.shape[1], tp, tp_rank)])
                continue
            for e, expert in enumerate(layer.mlp.experts.local_experts):
                g = ep_rank * local + e
                gate, up, down = (hf[p + f"moe.{n}_proj.weight"][g] for n in ("gate", "up", "down"))
                rows = part(gate.shape[0], etp, etp_rank)
                same(f"chunk {c} {p}expert {g} fc1", expert.linear_fc1.weight, torch.cat([gate[rows], up[rows]]))
                same(f"chunk {c} {p}expert {g} fc2", expert.linear_fc2.weight, down[:, rows])
    return out


def _worker(rank, port, cfg, hf_dir, root, out):
    from megatron.core import parallel_state as ps

    from stepconv.mcore.runtime import cpu_tensor_cuda_is_identity, destroy_parallel, init_parallel

    init_parallel(rank, WORLD, 1, 1, 1, port)  # the process group; each layout re-initialises megatron's groups
    hf = load_hf(hf_dir)
    heads = cfg["num_attention_heads"]
    try:
        for n, (lay, per_chunk_arg) in enumerate(LAYOUTS):
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(lay.tp_size, lay.pp_size, lay.vpp_size, expert_model_parallel_size=lay.ep_size,
                                         expert_tensor_parallel_size=lay.etp_size,
                                         create_gloo_process_groups=False)  # (the groups are gloo already)
            with cpu_tensor_cuda_is_identity():  # PP>1: the MTP stage's embedding copy is synced via .cuda()
                chunks = [_build_released_model(cfg, lay.tp_size, lay.pp_size, lay.ep_size, etp=lay.etp_size,
                                                pp_first=lay.pp_first, pp_last=lay.pp_last, vpp=lay.vpp_size,
                                                vp_stage=c if lay.vpp_size else None)
                          for c in range(lay.vpp_size or 1)]
            coords = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                      ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank())
            writer = ps.get_data_parallel_rank() == 0 or ps.get_expert_data_parallel_rank() == 0
            names = ["model"] if len(chunks) == 1 else [f"model{c}" for c in range(len(chunks))]  # Megatron-LM's
            sds = [m.state_dict() for m in chunks]
            result = {"coords": coords, "writer": writer, "problems": [],
                      "shapes": [{k: (list(v.shape) if isinstance(v, torch.Tensor) else None) for k, v in sd.items()}
                                 for sd in sds],
                      "layers": [[layer.layer_number for layer in m.decoder.layers] for m in chunks]}
            f = Path(root) / str(n) / "release" / rank_dir_name(*coords[:3], lay.pp_size, lay.ep_size) / "model_optim_rng.pt"
            if not f.exists():
                result["problems"].append(f"no rank file {f.parent.name} for rank {coords}")
            else:
                ours = load_rank_file(f)
                gates: list[dict] = []
                for name, model, sd in zip(names, chunks, sds):
                    own, gate = {}, {}
                    for k, v in ours[name].items():  # a gated linear_qkv: megatron's rows, then the rank's gate rows
                        own[k], gate[k] = (v[:sd[k].shape[0]], v[sd[k].shape[0]:]) if k.endswith("linear_qkv.weight") \
                            else (v, None)
                        if gate[k] is not None and gate[k].shape[0] != heads // lay.tp_size:
                            result["problems"].append(f"{name}.{k}: {gate[k].shape[0]} gate rows at rank {coords}")
                    model.load_state_dict(own, strict=True)
                    gates.append(gate)
                result["problems"] += _placement_problems(chunks, hf, cfg, lay.tp_size, lay.ep_size, lay.etp_size,
                                                          coords)
                if writer:  # what megatron-core itself then holds, saved as Megatron-LM's legacy save_checkpoint does
                    args = ours["args"]
                    for k in ("step35_config", "stepconv"):
                        delattr(args, k)
                    if per_chunk_arg:  # a run that set --num-layers-per-virtual-pipeline-stage
                        args.virtual_pipeline_model_parallel_size = args.num_virtual_stages_per_pipeline_rank = None
                        args.num_layers_per_virtual_pipeline_stage = NUM_LAYERS // lay.pp_size // lay.vpp_size
                    saved = {"args": args, "checkpoint_version": 3.0, "iteration": 7}
                    for name, model, gate in zip(names, chunks, gates):
                        sd = model.state_dict()
                        saved[name] = {k: torch.cat([v, gate[k]]) if gate.get(k) is not None else v for k, v in sd.items()}
                    torch.save(saved, os.path.join(out, f"saved_{n}_{rank}.pt"))
            torch.save(result, os.path.join(out, f"{n}_{rank}.pt"))
            torch.distributed.barrier()
    finally:
        destroy_parallel()


@pytest.mark.slow
def test_rank_files_match_megatron_core_for_every_layout(tmp_path):
    from stepconv.mcore.runtime import free_port

    hf = make_fixture.make_checkpoint(tmp_path / "hf", uniform=True, num_layers=NUM_LAYERS)
    cfg = json.loads((hf / "config.json").read_text())
    heads, hd, groups = cfg["num_attention_heads"], cfg["head_dim"], cfg["num_attention_groups"]
    root, out = tmp_path / "m", tmp_path / "out"
    out.mkdir()
    for n, (lay, _) in enumerate(LAYOUTS):
        assert WORLD % lay.world_size == 0
        hf_to_mcore(hf, root / str(n), spec="local", **layout_options(lay))
    mp.start_processes(_worker, args=(free_port(), cfg, str(hf), str(root), str(out)), nprocs=WORLD,
                       start_method="spawn")
    src = load_hf(hf)
    for n, (lay, _) in enumerate(LAYOUTS):
        results = [torch.load(out / f"{n}_{r}.pt", weights_only=False) for r in range(WORLD)]
        assert [p for r in results for p in r["problems"]] == [], lay
        # the rank folders: one per distinct (tp, pp, ep) of the grid, each written by a rank Megatron-LM saves from
        folders = {rank_dir_name(*r["coords"][:3], lay.pp_size, lay.ep_size) for r in results}
        writers = {rank_dir_name(*r["coords"][:3], lay.pp_size, lay.ep_size) for r in results if r["writer"]}
        written = {p.name for p in (root / str(n) / "release").iterdir()}
        assert folders == writers == written, (lay, folders, writers, written)
        for r in results:
            tp_rank, pp_rank, ep_rank, _ = r["coords"]
            # every decoder layer is where our stage/chunk arithmetic puts it
            assert [[k - 1 for k in c] for c in r["layers"]] == [list(x) for x in lay.chunks(NUM_LAYERS)[pp_rank]]
            ours = load_rank_file(root / str(n) / "release" / rank_dir_name(tp_rank, pp_rank, ep_rank, lay.pp_size,
                                                                             lay.ep_size) / "model_optim_rng.pt")
            names = ["model"] if lay.vpp_size is None else [f"model{c}" for c in range(lay.vpp_size)]
            assert sorted(k for k in ours if k.startswith("model")) == names
            for name, theirs in zip(names, r["shapes"]):
                assert sorted(ours[name]) == sorted(theirs), (lay, r["coords"], name)
                for k, shape in theirs.items():
                    mine = None if ours[name][k] is None else list(ours[name][k].shape)
                    if k.endswith("linear_qkv.weight"):
                        assert mine == [shape[0] + heads // lay.tp_size, shape[1]]  # + this rank's gate rows
                        assert shape[0] == (heads * hd + 2 * groups * hd) // lay.tp_size
                    else:
                        assert mine == shape, (lay, name, k)

        # the checkpoint megatron-core itself saved in this layout (iteration 7, no stepconv metadata) exports exactly
        saved_root = tmp_path / f"saved{n}"
        for r in range(WORLD):
            f = out / f"saved_{n}_{r}.pt"
            if f.exists():
                coords = results[r]["coords"][:3]
                d = saved_root / "iter_0000007" / rank_dir_name(*coords, lay.pp_size, lay.ep_size)
                d.mkdir(parents=True, exist_ok=True)
                os.replace(f, d / "model_optim_rng.pt")
        (saved_root / "latest_checkpointed_iteration.txt").write_text("7\n")
        h = tmp_path / f"h{n}"
        s = mcore_to_hf(saved_root, h, hf_config=hf / "config.json")
        back = load_hf(h)
        assert set(src) == set(back)
        assert all(bit_equal(src[k], back[k]) for k in src if "shared_head.output" not in k), lay
        assert any("output_layer" in note for note in s.notes)
