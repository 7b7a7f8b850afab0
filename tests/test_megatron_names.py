"""Names are megatron-core's: our local-spec rank files match a real GPTModel's state_dict() per rank.

Released megatron-core (0.16) has one head count per config and no head-wise gate, so this uses the
fixture variant with a single attention shape and compares shapes with linear_qkv's gate rows aside.
It also shows mcore-to-hf reading rank files saved by megatron-core itself (torch.save of the model's
own state_dict plus Megatron-style args).
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import bit_equal, load_hf, make_fixture
from stepconv.convert import hf_to_mcore, mcore_to_hf
from stepconv.megatron_io import load_rank_file, rank_dir_name


def _build_released_model(cfg: dict, tp: int, pp: int, ep: int):
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
        use_cpu_initialization=True, normalization="RMSNorm", qk_layernorm=True, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, num_moe_experts=cfg["moe_num_experts"],
        moe_router_topk=cfg["moe_top_k"], moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=cfg["share_expert_dim"], moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_layer_freq=[int(i in moe) for i in range(L)],
        mtp_num_layers=cfg["num_nextn_predict_layers"], moe_token_dispatcher_type="allgather",
        moe_router_dtype="fp32", params_dtype=torch.float32, pipeline_dtype=torch.float32)
    block = get_gpt_decoder_block_spec(tc, use_transformer_engine=False)
    mtp = get_gpt_mtp_block_spec(tc, get_gpt_layer_local_spec(qk_layernorm=True), use_transformer_engine=False)
    padded = -(-cfg["vocab_size"] // (128 * tp)) * 128 * tp
    return GPTModel(config=tc, transformer_layer_spec=block, vocab_size=padded, max_sequence_length=64,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False,
                    mtp_block_spec=mtp, pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage())


def _worker(rank, world, tp, pp, ep, port, cfg, mdir, out):
    from megatron.core import parallel_state as ps
    from stepconv.mcore.runtime import init_parallel

    init_parallel(rank, world, tp, pp, ep, port)
    torch.Tensor.cuda = lambda self, *a, **k: self  # embedding sync between PP stages moves to "cuda"
    model = _build_released_model(cfg, tp, pp, ep)
    coords = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
              ps.get_expert_model_parallel_rank())
    sd = model.state_dict()
    shapes = {k: (list(v.shape) if isinstance(v, torch.Tensor) else None) for k, v in sd.items()}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"coords": coords, "shapes": shapes}, f)
    if mdir:
        # load our tensors into the real model (gate rows aside) and save what megatron-core then holds
        ours = load_rank_file(__import__("pathlib").Path(mdir) / "release" /
                              rank_dir_name(*coords, pp, ep) / "model_optim_rng.pt")
        gates = {}
        own = {}
        for k, v in ours["model"].items():
            if k.endswith("linear_qkv.weight"):
                n = sd[k].shape[0]
                own[k], gates[k] = v[:n], v[n:]
            else:
                own[k] = v
        model.load_state_dict(own, strict=True)
        saved = model.state_dict()
        for k, g in gates.items():  # a gated model's linear_qkv: megatron's rows then the gate rows
            saved[k] = torch.cat([saved[k], g])
        args = ours["args"]
        for k in ("step35_config", "stepconv"):
            delattr(args, k)
        torch.save({"model": saved, "args": args, "checkpoint_version": 3.0, "iteration": 7},
                   os.path.join(out, f"saved_{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,ep", [(2, 1, 1), (1, 2, 1), (2, 1, 2)])
def test_local_spec_names_and_shapes_match_megatron_core(tmp_path, tp, pp, ep):
    from stepconv.mcore.runtime import free_port

    hf = make_fixture.make_checkpoint(tmp_path / "hf", uniform=True)
    cfg = json.loads((hf / "config.json").read_text())
    m = tmp_path / "m"
    hf_to_mcore(hf, m, tp=tp, pp=pp, ep=ep, spec="local")
    world = tp * pp * ep
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(world, tp, pp, ep, free_port(), cfg, str(m), str(out)), nprocs=world,
                       start_method="spawn")
    heads, hd, groups = cfg["num_attention_heads"], cfg["head_dim"], cfg["num_attention_groups"]
    seen = set()
    for r in range(world):
        got = json.loads((out / f"{r}.json").read_text())
        coords = tuple(got["coords"])
        seen.add(coords)
        ours = load_rank_file(m / "release" / rank_dir_name(*coords, pp, ep) / "model_optim_rng.pt")["model"]
        theirs = got["shapes"]
        assert sorted(ours) == sorted(theirs)
        for k, shape in theirs.items():
            mine = None if ours[k] is None else list(ours[k].shape)
            if k.endswith("linear_qkv.weight"):
                assert mine == [shape[0] + heads // tp, shape[1]]  # + this rank's gate rows
                assert shape[0] == (heads * hd + 2 * groups * hd) // tp
            else:
                assert mine == shape, k
    assert len(seen) == world

    # rank files saved by megatron-core itself (at iteration 7, no stepconv metadata) convert back exactly
    it = m / "iter_0000007"
    for r in range(world):
        coords = tuple(json.loads((out / f"{r}.json").read_text())["coords"])
        d = it / rank_dir_name(*coords, pp, ep)
        d.mkdir(parents=True, exist_ok=True)
        os.replace(out / f"saved_{r}.pt", d / "model_optim_rng.pt")
    (m / "latest_checkpointed_iteration.txt").write_text("7\n")
    h = tmp_path / "h"
    s = mcore_to_hf(m, h, hf_config=hf / "config.json")
    src, back = load_hf(hf), load_hf(h)
    assert set(src) == set(back)
    assert all(bit_equal(src[n], back[n]) for n in src if "shared_head.output" not in n)
    assert any("output_layer" in n for n in s.notes)
