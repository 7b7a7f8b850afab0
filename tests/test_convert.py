"""Round trips are bit-exact, rank files hold Megatron's layout, and the audit refuses bad conversions."""

import json
import shutil

import pytest
import torch

from conftest import bit_equal, load_hf
from stepconv import convert, mapping
from stepconv.config import AttnShape, StepconvError
from stepconv.convert import hf_to_mcore, mcore_to_hf
from stepconv.inspect import inspect_path
from stepconv.megatron_io import load_rank_file, model_keys, rank_dir_name

LAYOUTS = [  # (tp, pp, ep, spec, dtype)
    (1, 1, 1, "te", "keep"),
    (2, 1, 1, "local", "keep"),
    (4, 1, 1, "te", "keep"),
    (1, 2, 1, "local", "keep"),
    (1, 1, 2, "te", "keep"),
    (2, 2, 2, "local", "keep"),
    (4, 4, 8, "te", "keep"),
    (2, 1, 2, "te", "fp32"),
    (4, 2, 1, "local", "bf16"),
]


def assert_inspect_matches(hf, m, h, max_shard_size="5GB", **opts):
    """`inspect` (a dry run) predicts every file both conversions wrote: names, bytes, tensors and keys, exactly."""
    r = inspect_path(hf, **opts)
    assert r.ok, r.errors
    files = {str(p.relative_to(m)): p for p in m.glob("release/*/model_optim_rng.pt")}
    assert sorted(f.name for f in r.rank_files) == sorted(files)
    for f in r.rank_files:
        obj = load_rank_file(files[f.name])
        values = [v for k in model_keys(obj) for v in obj[k].values()]  # (`model`, or `model0`.. with VPP)
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        assert (f.bytes, f.keys, f.tensors, f.data_bytes) == (
            files[f.name].stat().st_size, len(values), len(tensors), sum(t.numel() * t.element_size() for t in tensors))
    assert {f.name: f.bytes for f in r.sidecar_files} == {
        str(p.relative_to(m)): p.stat().st_size for p in (m / "stepconv").glob("*.safetensors")}
    back = inspect_path(m, max_shard_size=max_shard_size)
    assert back.ok, back.errors
    assert {f.name: f.bytes for f in back.hf_files} == {p.name: p.stat().st_size for p in h.glob("*.safetensors")}


@pytest.mark.parametrize("tp,pp,ep,spec,dtype", LAYOUTS)
def test_round_trip_is_bit_exact(tmp_path, fixture_dir, fixture_tensors, tp, pp, ep, spec, dtype):
    m, h = tmp_path / "m", tmp_path / "h"
    hf_to_mcore(fixture_dir, m, tp=tp, pp=pp, ep=ep, spec=spec, dtype=dtype)
    mcore_to_hf(m, h, max_shard_size="200KB")
    assert_inspect_matches(fixture_dir, m, h, "200KB", tp=tp, pp=pp, ep=ep, spec=spec, dtype=dtype)
    back = load_hf(h)
    assert set(back) == set(fixture_tensors)
    bad = [n for n in fixture_tensors if not bit_equal(back[n], fixture_tensors[n])]
    assert bad == []
    assert back["model.layers.2.moe.router_bias"].dtype == torch.float32
    assert json.loads((h / "config.json").read_text()) == json.loads((fixture_dir / "config.json").read_text())
    assert (h / "generation_config.json").exists() and (h / "model.safetensors.index.json").exists()


def test_round_trip_at_tp8(tmp_path):
    """TP=8 needs 8 query groups: a fixture variant with 8 groups, 8 full and 16 sliding heads."""
    from conftest import make_fixture

    hf = make_fixture.make_checkpoint(tmp_path / "hf", groups=8, heads=8, sliding_heads=16)
    src = load_hf(hf)
    for tp, ep in ((8, 1), (8, 2)):
        m, h = tmp_path / f"m{tp}{ep}", tmp_path / f"h{tp}{ep}"
        hf_to_mcore(hf, m, tp=tp, ep=ep)
        mcore_to_hf(m, h)
        assert_inspect_matches(hf, m, h, tp=tp, ep=ep)
        back = load_hf(h)
        assert set(back) == set(src) and all(bit_equal(back[n], src[n]) for n in src)


def test_rank_files_load_under_megatron_safe_globals_only(tmp_path, fixture_dir):
    """What Megatron-LM's loader does: torch.load(weights_only=True) with megatron-core's allowlist."""
    import megatron.core  # noqa: F401  (registers megatron-core's SAFE_GLOBALS for the process, as on import there)

    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, pp=2, ep=2)
    for f in (m / "release").glob("mp_rank_*/model_optim_rng.pt"):
        obj = torch.load(f, map_location="cpu", weights_only=True)
        assert set(obj) == {"model", "args", "checkpoint_version", "iteration"}


SAFE_GLOBALS_SCRIPT = r"""
import argparse, sys
from pathlib import Path
import torch
assert "megatron.core" not in sys.modules
from stepconv import megatron_io
real = torch.load
def load_while_megatron_core_is_imported(*a, **k):  # another thread importing megatron-core mid-load
    import megatron.core  # noqa: F401  (registers Namespace & co. for the process)
    return real(*a, **k)
torch.load = load_while_megatron_core_is_imported
megatron_io.load_rank_file(Path(sys.argv[1]))
torch.load = real
assert argparse.Namespace in torch.serialization.get_safe_globals(), "a load unregistered megatron-core's globals"
"""


def test_a_load_never_unregisters_megatron_cores_safe_globals(tmp_path, fixture_dir):
    """torch's safe_globals context removes, on exit, every global it named, for the whole process; a load that
    overlapped megatron-core's import used to leave Megatron's own load_common_state_dict failing afterwards."""
    import subprocess
    import sys

    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=1)
    f = next((m / "release").glob("mp_rank_*/model_optim_rng.pt"))
    r = subprocess.run([sys.executable, "-c", SAFE_GLOBALS_SCRIPT, str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]


def test_layout_files_and_args(tmp_path, fixture_dir):
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, pp=2, ep=2, spec="local")
    assert (m / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    dirs = sorted(p.name for p in (m / "release").iterdir())
    assert dirs == sorted(f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2))
    obj = load_rank_file(m / "release" / "mp_rank_01_001_001" / "model_optim_rng.pt")
    a = obj["args"]
    assert obj["checkpoint_version"] == 3.0 and obj["iteration"] == 0
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size) == (2, 2, 2)
    assert a.head_wise_attn_gate is True and a.num_layers == 4 and a.mtp_num_layers == 1
    assert a.padded_vocab_size == 1280 and a.moe_layer_freq == [0, 0, 1, 1] and a.window_size == (7, 0)
    assert a.apply_layernorm_1p and a.qk_layernorm and a.moe_router_score_function == "sigmoid"
    sd = obj["model"]
    # stage 1 of 2 holds layers 2,3 as local 0,1, the MTP layer, the embedding copy and the output layer
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in sd
    assert "decoder.layers.2.input_layernorm.weight" not in sd
    assert sd["mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight"].shape == (
        (12 * 16 + 2 * 4 * 16) // 2 + 12 // 2, 64)
    assert sd["mlp.router.expert_bias".join(["decoder.layers.0.", ""])].dtype == torch.float32
    assert sd["embedding.word_embeddings.weight"].shape == (640, 64)
    assert sd["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None


def _expected_qkv(q, k, v, g, shape: AttnShape, tp: int, r: int) -> torch.Tensor:
    """Built independently: per group [q heads of the group; k; v], groups of rank r, then its heads' gate rows."""
    hd, hpg = shape.head_dim, shape.heads // shape.groups
    qh = q.view(shape.groups, hpg * hd, -1)
    kh, vh = k.view(shape.groups, hd, -1), v.view(shape.groups, hd, -1)
    per_group = torch.cat([qh, kh, vh], dim=1)  # [groups, (hpg+2)*hd, H]
    gpr = shape.groups // tp
    qkv = per_group[r * gpr:(r + 1) * gpr].reshape(-1, q.shape[-1])
    return torch.cat([qkv, g.view(tp, shape.heads // tp, -1)[r]])


QKV_CASES = [(0, "decoder.layers.0", AttnShape(8, 4, 16)), (1, "decoder.layers.1", AttnShape(12, 4, 16)),
             (4, "mtp.layers.0.transformer_layer", AttnShape(12, 4, 16))]


def qkv_layout_errors(m, fixture_tensors, tp) -> list[tuple[int, int]]:
    """(HF layer, TP rank) whose rank file's linear_qkv is not the independently built Megatron layout."""
    bad = []
    for layer, key, shape in QKV_CASES:
        p = f"model.layers.{layer}.self_attn."
        q, k, v, g = (fixture_tensors[p + n] for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "g_proj.weight"))
        for r in range(tp):
            sd = load_rank_file(m / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt")["model"]
            if not torch.equal(sd[f"{key}.self_attention.linear_qkv.weight"], _expected_qkv(q, k, v, g, shape, tp, r)):
                bad.append((layer, r))
    return bad


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_rank_linear_qkv_is_megatrons_layout(tmp_path, fixture_dir, fixture_tensors, tp):
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=tp, spec="te")
    assert qkv_layout_errors(m, fixture_tensors, tp) == []


def test_a_gate_row_on_the_wrong_rank_is_caught(tmp_path, fixture_dir, fixture_tensors):
    """Negative control on real files: swap one gate row between the TP rank files of a converted checkpoint;
    the layout check above names that layer on both ranks, and the export no longer reproduces g_proj."""
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, spec="te")
    files = [m / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt" for r in (0, 1)]
    objs = [load_rank_file(f) for f in files]
    models = [{k: (v.clone() if v is not None else None) for k, v in o["model"].items()} for o in objs]
    key = "decoder.layers.1.self_attention.linear_qkv.weight"
    models[0][key][-1], models[1][key][-1] = models[1][key][-1].clone(), models[0][key][-1].clone()
    for f, o, sd in zip(files, objs, models):
        torch.save({**o, "model": sd}, f)
    assert qkv_layout_errors(m, fixture_tensors, 2) == [(1, 0), (1, 1)]
    mcore_to_hf(m, tmp_path / "h")
    back = load_hf(tmp_path / "h")
    assert not torch.equal(back["model.layers.1.self_attn.g_proj.weight"], fixture_tensors["model.layers.1.self_attn.g_proj.weight"])
    assert bit_equal(back["model.layers.1.self_attn.q_proj.weight"], fixture_tensors["model.layers.1.self_attn.q_proj.weight"])


def test_audit_refuses_to_publish_when_a_source_is_not_consumed(tmp_path, fixture_dir, monkeypatch):
    real = mapping.plan

    def drop_experts(*a, **k):
        return [e for e in real(*a, **k) if not (e.key.endswith("linear_fc2.weight5") and e.expert == 5)]

    monkeypatch.setattr(convert, "plan", drop_experts)
    out = tmp_path / "m"
    with pytest.raises(StepconvError, match="not consumed exactly once.*moe.down_proj"):
        hf_to_mcore(fixture_dir, out, tp=2)
    assert not out.exists() and not (tmp_path / "m.partial").exists()


def test_audit_refuses_a_source_consumed_twice(tmp_path, fixture_dir, monkeypatch):
    real = mapping.plan
    monkeypatch.setattr(convert, "plan", lambda *a, **k: (lambda p: p + [e for e in p if e.kind.name == "row"][:1])(real(*a, **k)))
    with pytest.raises(StepconvError):
        hf_to_mcore(fixture_dir, tmp_path / "m", tp=2)
    assert not (tmp_path / "m").exists()


def test_interrupted_conversion_leaves_nothing_under_the_final_name(tmp_path, fixture_dir, monkeypatch):
    from stepconv import megatron_io

    calls = {"n": 0}
    real_add = megatron_io.RankFileWriter.add

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real_add(self, *args)

    monkeypatch.setattr(megatron_io.RankFileWriter, "add", flaky)
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        hf_to_mcore(fixture_dir, out, tp=2)
    assert not out.exists()


def test_export_reads_checkpoint_without_stepconv_metadata_given_hf_config(tmp_path, fixture_dir, fixture_tensors):
    m, h = tmp_path / "m", tmp_path / "h"
    hf_to_mcore(fixture_dir, m, tp=2, spec="local")
    for r in range(2):  # strip what only stepconv writes, as a Megatron training run's save would
        f = m / "release" / rank_dir_name(r, 0, 0, 1, 1) / "model_optim_rng.pt"
        obj = load_rank_file(f)
        obj = {"model": {k: (v.clone() if v is not None else None) for k, v in obj["model"].items()},
               "args": obj["args"], "iteration": 0, "checkpoint_version": 3.0}
        del obj["args"].step35_config, obj["args"].stepconv
        torch.save(obj, f)
    shutil.rmtree(m / "stepconv")
    with pytest.raises(StepconvError, match="--hf-config"):
        mcore_to_hf(m, h)
    s = mcore_to_hf(m, h, hf_config=fixture_dir / "config.json")
    back = load_hf(h)
    assert all(bit_equal(back[n], fixture_tensors[n]) for n in fixture_tensors if "shared_head.output" not in n)
    assert torch.equal(back["model.layers.4.transformer.shared_head.output.weight"], fixture_tensors["lm_head.weight"])
    assert any("set to output_layer" in n for n in s.notes)


def test_export_reads_newer_megatron_naming_and_te_extra_states(tmp_path, fixture_dir, fixture_tensors):
    """megatron-core >= 0.17 names the MTP block `mtp_model_layer`; newer TE saves `_extra_state` for norms too."""
    m, h = tmp_path / "m", tmp_path / "h"
    hf_to_mcore(fixture_dir, m, tp=2, spec="te")
    for f in (m / "release").glob("mp_rank_*/model_optim_rng.pt"):
        obj = load_rank_file(f)
        sd = {k.replace(".transformer_layer.", ".mtp_model_layer."): (v.clone() if v is not None else None)
              for k, v in obj["model"].items()}
        sd["decoder.final_layernorm._extra_state"] = None
        del sd["decoder.layers.0.self_attention.core_attention._extra_state"]
        torch.save({**obj, "model": sd}, f)
    mcore_to_hf(m, h)
    back = load_hf(h)
    assert all(bit_equal(back[n], fixture_tensors[n]) for n in fixture_tensors)


def test_export_refuses_a_missing_weight(tmp_path, fixture_dir):
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, spec="local")
    f = m / "release" / "mp_rank_01" / "model_optim_rng.pt"
    obj = load_rank_file(f)
    sd = {k: (v.clone() if v is not None else None) for k, v in obj["model"].items()  # no views of the file we rewrite
          if k != "decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight"}
    torch.save({**obj, "model": sd}, f)
    with pytest.raises(StepconvError, match="missing decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight"):
        mcore_to_hf(m, tmp_path / "h")
    assert not (tmp_path / "h").exists()


def test_export_dtype_keeps_fp32_trained_weights_exact(tmp_path, fixture_dir, fixture_tensors):
    """A run that trained in fp32 saves fp32 weights that bf16 cannot hold; `--dtype source` (the default) writes the
    recorded bf16 and says so, `--dtype fp32` writes them exactly (the router bias is fp32 either way)."""
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=1, dtype="fp32")
    f = m / "release" / rank_dir_name(0, 0, 0, 1, 1) / "model_optim_rng.pt"
    sd = torch.load(f, weights_only=False)
    key = "decoder.layers.0.self_attention.linear_proj.weight"
    trained = sd["model"][key] + 1e-3 * torch.randn(sd["model"][key].shape, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(trained.bfloat16().float(), trained)  # "training" left values bf16 cannot hold
    sd["model"][key] = trained
    torch.save(sd, f)

    s = mcore_to_hf(m, tmp_path / "h16")
    assert any("params_dtype" in n and "--dtype fp32" in n for n in s.notes), s.notes
    assert load_hf(tmp_path / "h16")["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16

    mcore_to_hf(m, tmp_path / "h32", dtype="fp32")
    out = load_hf(tmp_path / "h32")
    assert torch.equal(out["model.layers.0.self_attn.o_proj.weight"], trained)
    for name, t in fixture_tensors.items():
        if name != "model.layers.0.self_attn.o_proj.weight":
            assert out[name].dtype == torch.float32 and torch.equal(out[name], t.float()), name
    assert json.loads((tmp_path / "h32" / "config.json").read_text())["torch_dtype"] == "float32"
    with pytest.raises(StepconvError, match="--dtype must be"):
        mcore_to_hf(m, tmp_path / "bad", dtype="int8")
