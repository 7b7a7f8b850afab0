"""megatron_forward over tp*pp*ep CPU processes (gloo) on the tiny fixture equals the HF-semantics reference
forward: logits, every layer's hidden state, MTP block outputs."""

import json

import pytest
import torch

from stepconv.mcore.run import megatron_forward
from stepconv.mcore.testing import hf_to_mcore_rank_state_dicts, reference_forward, write_mcore_checkpoint

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def cfg(fixture_dir):
    return json.loads((fixture_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1100, (2, 20), generator=torch.Generator().manual_seed(3))  # 20 > window 8


@pytest.fixture(scope="module")
def ref(cfg, fixture_tensors, ids):
    return reference_forward(cfg, fixture_tensors, ids)


def check(out, ref, cfg, tol=TOL):
    L = cfg["num_hidden_layers"]
    assert out["logits"].shape == (2, 20, cfg["vocab_size"])
    torch.testing.assert_close(out["logits"], ref["logits"], **tol)
    assert len(out["hidden_states"]) == L + 1
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref["hidden_states"])):
        torch.testing.assert_close(a, b, **tol, msg=f"hidden state {i}")
    assert [m.shape[1] for m in out["mtp_hidden"]] == [20 - k - 1 for k in range(cfg["num_nextn_predict_layers"])]
    for a, b in zip(out["mtp_hidden"], ref["mtp_hidden"]):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(out["mtp_logits"], ref["mtp_logits_shared"]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.slow  # four spawned ranks each import torch and megatron-core: 30-60 s on 2 cores
def test_tp4_spawn_from_checkpoint_dir(tmp_path, cfg, fixture_tensors, ids, ref):
    """TP=4, the default spawn start method, rank files on disk."""
    write_mcore_checkpoint(tmp_path, hf_to_mcore_rank_state_dicts(cfg, fixture_tensors, tp=4, dtype=torch.float32),
                           tp=4, pp=1, ep=1)
    check(megatron_forward(tmp_path, cfg, ids, tp=4), ref, cfg)


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2)])
def test_parallel_layouts(cfg, fixture_tensors, ids, ref, tp, pp, ep):
    sds = hf_to_mcore_rank_state_dicts(cfg, fixture_tensors, tp=tp, pp=pp, ep=ep, dtype=torch.float32)
    check(megatron_forward(sds, cfg, ids, tp=tp, pp=pp, ep=ep, start_method="forkserver"), ref, cfg)


def test_window_convention_megatron(cfg, fixture_tensors, ids, ref):
    sds = hf_to_mcore_rank_state_dicts(cfg, fixture_tensors, tp=2, dtype=torch.float32)
    out = megatron_forward(sds, cfg, ids, tp=2, window_convention="megatron", start_method="forkserver")
    check(out, reference_forward(cfg, fixture_tensors, ids, window_convention="megatron"), cfg)
    assert (out["hidden_states"][2] - ref["hidden_states"][2]).abs().max() > 1e-3  # W+1 keys differ from W


def test_bf16_rank_files(cfg, fixture_tensors, ids, ref):
    sds = hf_to_mcore_rank_state_dicts(cfg, fixture_tensors, tp=2, ep=2)  # the fixture's own bf16
    out = megatron_forward(sds, cfg, ids, tp=2, ep=2, dtype=torch.bfloat16, start_method="forkserver")
    assert out["logits"].dtype == torch.bfloat16
    # per-position relative error; its median is robust to the few positions where bf16 rounding flips a
    # near-tied routing choice against the fp32 reference
    a, b = out["logits"].float(), ref["logits"]
    err = (a - b).norm(dim=-1) / b.norm(dim=-1)
    assert err.median() < 3e-2, err


def test_converter_output_end_to_end(tmp_path, fixture_dir, cfg, ids, ref):
    """The team's HF->Megatron converter (local spec) loads strictly and reproduces the reference."""
    convert = pytest.importorskip("stepconv.convert")
    convert.hf_to_mcore(fixture_dir, tmp_path / "m", tp=2, pp=2, ep=2, spec="local", dtype="fp32")
    check(megatron_forward(tmp_path / "m", cfg, ids, tp=2, pp=2, ep=2, start_method="forkserver"), ref, cfg)
