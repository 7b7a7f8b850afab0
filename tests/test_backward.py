"""Backward parity: one training step of stepconv's Megatron model equals the HF reference's autograd gradients.

For a fixed batch, each layout runs megatron-core's own training path on CPU (gloo, fp32): the model in train
mode wrapped in megatron's DistributedDataParallel, one step of ``get_forward_backward_func()`` (pipeline p2p
included) with stepconv.mcore.train's Megatron-LM-style forward_step, then megatron's ``finalize_model_grads``
(sequence-parallel / q,k-norm all-reduces across TP, DP averaging with its expert scaling, embedding sync between
the first and the MTP stage). The per-rank gradients are merged back to HF tensors by the same plan and kinds the
converter uses (``mapping.plan`` + ``Kind.merge``: gate rows of rank r -> its heads' g_proj rows, experts by
global index) and compared with autograd through stepconv.mcore.testing's HF formulas, on the Megatron
objective: LM cross entropy over the true vocabulary + mtp_loss_scaling_factor/num_mtp x the MTP cross entropy
through the shared LM head (Megatron has no slot for HF's per-MTP ``shared_head.output``: it gets no gradient).
The router's selection bias gets none either (a buffer in Megatron, top-k only in HF).

Negative control: the same gradients merged as an even row split of [QKV; G] must fail.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURE, load_hf
from stepconv.config import Step35Config
from stepconv.kinds import COLUMN, EXTRA, QKVG_, VOCAB
from stepconv.mapping import Layout, plan
from stepconv.mcore.model import mtp_inner_layer_name
from stepconv.mcore.run import run_ranks
from stepconv.mcore.testing import reference_forward_graph
from stepconv.mcore.train import batch_from_tokens

RTOL = 1e-5
MTP_SCALE = 0.3  # not megatron's default 0.1, so a wrong factor shows
LAYOUTS = {"tp2-sp": (Layout(2, 1, 1), True), "tp2-ep2": (Layout(2, 1, 2), True), "pp2": (Layout(1, 2, 1), False)}


def _data(cfg: Step35Config) -> torch.Tensor:
    g = torch.Generator().manual_seed(13)
    return torch.randint(0, cfg.vocab, (2, 17), generator=g)  # tokens [2, 16] + their next-token labels


def _rank_state_dicts(cfg: Step35Config, tensors: dict, layout: Layout) -> dict:
    out: dict = {r: {} for r in layout.ranks()}
    for e in plan(cfg, layout, "local", mtp_inner_layer_name()):
        if not e.kind.megatron:
            continue
        srcs = [tensors[h] if e.expert is None else tensors[h][e.expert] for h in e.hf]
        for t, p, ep in layout.ranks():
            if p == e.stage and e.on(ep):
                out[(t, p, ep)][e.key] = None if e.kind is EXTRA else e.kind.split(srcs, e.ctx, t).contiguous()
    return out


def _train_step_worker(rank_sds: dict, cfg: Step35Config, data: torch.Tensor, sequence_parallel: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from stepconv.mcore.model import build_step35_model
    from stepconv.mcore.train import cuda_literal_is_cpu, forward_step

    coords = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
              ps.get_expert_model_parallel_rank())
    model = build_step35_model(cfg, perform_initialization=False, sequence_parallel=sequence_parallel,
                               config_overrides={"mtp_loss_scaling_factor": MTP_SCALE})
    model.load_state_dict(rank_sds[coords], strict=True)
    model.train()
    config = model.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config.finalize_model_grads_func = finalize_model_grads
    batch = batch_from_tokens(data)
    with cuda_literal_is_cpu():
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp], num_microbatches=1,
            seq_length=batch["tokens"].shape[1], micro_batch_size=batch["tokens"].shape[0], forward_only=False)
    grads = {n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()}
    lm = [r["lm loss"] for r in reports]
    return {"coords": coords, "grads": grads, "lm_loss": float(lm[0][0] / lm[0][1]) if lm else None,
            "sequence_parallel": config.sequence_parallel}


@pytest.fixture(scope="module")
def setup():
    cfg = Step35Config.of(load_hf_config())
    tensors = {k: v.float() for k, v in load_hf(FIXTURE).items()}
    data = _data(cfg)
    batch = batch_from_tokens(data)
    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    ref = reference_forward_graph(cfg, leaves, batch["tokens"])
    labels = batch["labels"]
    lm = F.cross_entropy(ref["logits"].flatten(0, 1), labels.flatten())
    total = lm
    for k, logits in enumerate(ref["mtp_logits_shared"]):  # position t predicts label t+k+1
        total = total + MTP_SCALE / cfg.num_mtp * F.cross_entropy(logits.flatten(0, 1), labels[:, k + 1:].flatten())
    total.backward()
    ref_grads = {k: v.grad for k, v in leaves.items()}
    return cfg, tensors, data, lm.item(), ref_grads


def load_hf_config() -> dict:
    import json

    return json.loads((FIXTURE / "config.json").read_text())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


def _merged(results: list, cfg: Step35Config, layout: Layout):
    """(entry, hf name, merged Megatron gradient, shards) for every plan entry that is a parameter."""
    by = {r["coords"]: r["grads"] for r in results}
    for e in plan(cfg, layout, "local", mtp_inner_layer_name()):
        if e.kind is EXTRA or not e.kind.megatron or e.replica:
            continue
        ep = e.ep_rank or 0
        shards = [by[(t, e.stage, ep)].get(e.key) for t in range(layout.tp_size)]
        yield e, shards


@pytest.fixture(scope="module", params=list(LAYOUTS))
def trained(request, setup):
    cfg, tensors, data, _, _ = setup
    layout, sp = LAYOUTS[request.param]
    results = run_ranks(_train_step_worker, _rank_state_dicts(cfg, tensors, layout), cfg, data, sp,
                        tp=layout.tp_size, pp=layout.pp_size, ep=layout.ep_size, start_method="forkserver")
    return layout, sp, results


@pytest.mark.slow
def test_loss_and_every_gradient_match_hf(setup, trained):
    cfg, _, _, ref_lm, ref_grads = setup
    layout, sp, results = trained
    assert all(r["sequence_parallel"] == sp for r in results)
    losses = [r["lm_loss"] for r in results if r["lm_loss"] is not None]
    assert losses and all(abs(x - ref_lm) <= RTOL * ref_lm for x in losses), (losses, ref_lm)
    checked, bad = set(), []
    for e, shards in _merged(results, cfg, layout):
        if any(s is None for s in shards):  # not a parameter in Megatron: the router's selection bias
            assert e.hf == (f"model.layers.{e.layer}.moe.router_bias",) and ref_grads[e.hf[0]] is None, e.key
            checked.add(e.hf[0])
            continue
        if e.kind is VOCAB:  # the padded rows join no softmax: exactly zero gradient
            pad = torch.cat(shards)[cfg.vocab:]
            assert pad.numel() and not pad.any(), e.key
        for name, g in zip(e.hf, e.kind.merge(shards, e.ctx)):
            want = ref_grads[name] if e.expert is None else ref_grads[name][e.expert]
            if _rel(g, want) > RTOL:
                bad.append((e.key, name, e.expert, _rel(g, want)))
            checked.add(name)
    assert not bad, bad[:10]
    no_slot = {n for n in ref_grads if n not in checked}
    assert all(n.endswith("transformer.shared_head.output.weight") for n in no_slot), no_slot
    assert all(ref_grads[n] is None for n in no_slot)
    # MTP layers are trained: their gradients are real (and matched above)
    L = cfg.num_layers
    assert ref_grads[f"model.layers.{L}.eh_proj.weight"].norm() > 0


@pytest.mark.slow
def test_negative_control_even_split_of_qkvg_fails(setup, trained):
    cfg, _, _, _, ref_grads = setup
    layout, _, results = trained
    if layout.tp_size == 1:
        pytest.skip("an even split equals the real one at TP=1")
    qkvg = [(e, shards) for e, shards in _merged(results, cfg, layout) if e.kind is QKVG_]
    assert qkvg
    for e, shards in qkvg:
        (naive,) = COLUMN.merge(shards, e.ctx)
        want = torch.cat([ref_grads[n] for n in e.hf])
        assert naive.shape == want.shape and _rel(naive, want) > 100 * RTOL, e.key
