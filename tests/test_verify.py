"""verify passes on correct conversions and fails, naming the layer, on broken ones (a verify that passes these is
broken). Each world of rank processes checks several checkpoints against one HF pass (verify_many): gloo worlds
are what costs time here."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from stepconv.config import StepconvError
from stepconv.convert import hf_to_mcore, reshard
from stepconv.mapping import Layout
from stepconv.megatron_io import load_rank_file
from stepconv.verify import compare_logits, parse_layers, pick_device, verify, verify_many


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixture_dir):
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for tp, pp, ep, spec in [(2, 1, 1, "local"), (2, 2, 2, "te")]:
        d = root / f"tp{tp}pp{pp}ep{ep}"
        hf_to_mcore(fixture_dir, d, tp=tp, pp=pp, ep=ep, spec=spec)
        out[(tp, pp, ep)] = d
    out["dist"] = root / "dist"
    reshard(out[(2, 1, 1)], out["dist"], format="torch_dist")
    return out


def _corrupt(src, dst, edit):
    """Copy a converted checkpoint, then apply edit(models: {tp_rank: state_dict}) and save."""
    shutil.copytree(src, dst)
    files = {}
    for f in sorted((dst / "release").glob("mp_rank_*/model_optim_rng.pt")):
        obj = load_rank_file(f)
        obj["model"] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in obj["model"].items()}
        files[f] = obj
    models = {int(f.parent.name.split("_")[2]): o["model"] for f, o in files.items()}
    edit(models)
    for f, o in files.items():
        torch.save(o, f)
    return dst


QKV = "decoder.layers.1.self_attention.linear_qkv.weight"  # a sliding layer: 12 heads, 4 groups, head_dim 16
EXPERT = "decoder.layers.3.mlp.experts.local_experts.5.linear_fc2.weight"  # the last layer is MoE


def swap_gate_rows_between_ranks(m):
    a, b = m[0][QKV], m[1][QKV]
    ga, gb = a[-1].clone(), b[-1].clone()
    a[-1], b[-1] = gb, ga


def zero_one_gate_row(m):
    m[1][QKV][-2] = 0


def swap_q_and_k_rows_in_a_group(m):
    w = m[0][QKV]  # group 0 on rank 0: q rows 0..47 (3 heads x 16), k rows 48..63
    q, k = w[0:16].clone(), w[48:64].clone()
    w[0:16], w[48:64] = k, q


def shift_a_norm_by_one(m):
    for sd in m.values():
        sd["decoder.layers.1.input_layernorm.weight"] += 1  # the zero-centred weight applied as 1+w


def scale_one_expert_of_the_last_layer(m):
    for sd in m.values():  # (a row-parallel weight: each TP rank holds a slice of expert 5's down projection)
        sd[EXPERT] *= 1.05


CONTROLS = {e.__name__: (e, layer) for e, layer in [
    (swap_gate_rows_between_ranks, 1), (zero_one_gate_row, 1), (swap_q_and_k_rows_in_a_group, 1),
    (shift_a_norm_by_one, 1), (scale_one_expert_of_the_last_layer, 3)]}


@pytest.fixture(scope="module")
def controls(converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    return {name: _corrupt(converted[(2, 1, 1)], root / name, edit) for name, (edit, _) in CONTROLS.items()}


def _check_pass(r, dtype):
    print(r.table())
    assert r.passed, r.failures
    assert r.first_divergent_layer is None and len(r.mtp) == 1
    assert [row["name"] for row in r.layers] == ["embedding", "layer 0", "layer 1", "layer 2", "layer 3", "MTP 0"]
    moe = [row for row in r.layers if row.get("moe") and "expert" in row]
    assert len(moe) == 2 and all(row["router_agreement"] == 1.0 and row["expert"]["experts_seen"] == 16
                                 for row in moe)
    if dtype == "fp32":
        assert r.logits.max_abs <= 1e-4 and r.logits.top1 == 1.0 and r.head.max_abs <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_exact_conversions_pass_and_each_control_fails_at_its_layer(converted, controls, fixture_dir, dtype):
    """fp32: TP=2 at its own layout, TE/PP=2/EP=2 and torch_dist resplit to it. bf16: the TE/PP=2/EP=2 rank files
    read directly (TP=2 EP=2 world), the controls resplit to that layout."""
    if dtype == "fp32":
        good = [converted[(2, 1, 1)], converted[(2, 2, 2)], converted["dist"]]
        layout = None
    else:
        good, layout = [converted[(2, 2, 2)]], Layout(2, 1, 2)
    reports = verify_many(fixture_dir, good + list(controls.values()), dtype=dtype, layout=layout)
    for r in reports[:len(good)]:
        _check_pass(r, dtype)
    for (name, (_, layer)), r in zip(CONTROLS.items(), reports[len(good):]):
        print(name, r.failures)
        assert not r.passed and r.first_divergent_layer == layer, (name, r.failures)
        assert all(f.startswith(f"layer {layer}:") for f in r.failures if f.startswith("layer")), r.failures
    expert_row = reports[-1].layers[4]
    assert expert_row["expert"]["worst_expert"] == 5 and 0.04 < expert_row["expert"]["max_rel"] < 0.06


def test_slice_prompt_file_and_json(converted, fixture_dir, tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text("\n".join(" ".join(str((7 * i + j) % 1100) for j in range(20)) for i in range(3)) + "\n")
    r = verify(fixture_dir, converted[(2, 1, 1)], prompt_file=f, layers="2:3", layout=Layout(1, 1, 1))
    assert r.passed and (r.batch, r.seq_len) == (3, 20) and r.layer_range == (2, 3)
    assert [row["name"] for row in r.layers] == ["embedding", "layer 2"] and r.logits is None and not r.mtp
    d = json.loads(json.dumps(r.to_dict()))
    assert d["passed"] and d["first_divergent_layer"] is None and d["layers"][1]["expert"]["experts_seen"] >= 12


def test_parse_layers_and_device_errors():
    assert parse_layers(None, 45) == (0, 45) and parse_layers("40:", 45) == (40, 45) and parse_layers(":3", 45) == (0, 3)
    for bad in ("3", "5:2", "0:46", "a:b"):
        with pytest.raises(StepconvError, match="--layers"):
            parse_layers(bad, 45)
    with pytest.raises(StepconvError, match=r"--device cuda needs 2 GPU\(s\).*visible"):
        pick_device("cuda", 2 + (torch.cuda.device_count() if torch.cuda.is_available() else 0))
    with pytest.raises(StepconvError, match="--device must be cpu or cuda"):
        pick_device("tpu", 1)


@pytest.mark.slow
def test_cli_names_the_broken_layer(controls, fixture_dir, tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "stepconv.cli", "verify", str(fixture_dir),
                        str(controls["shift_a_norm_by_one"]), "--layers", "0:2", "--json", str(out), "--quiet"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "FAIL: layer 1:" in p.stdout and "Traceback" not in p.stderr, p.stderr
    rep = json.loads(out.read_text())
    assert rep["passed"] is False and rep["first_divergent_layer"] == 1 and rep["layout"] == "TP=2 EP=1"
    assert [row["name"] for row in rep["layers"]] == ["embedding", "layer 0", "layer 1"]
    assert rep["layers"][2]["failures"] and not rep["layers"][1]["failures"]


def test_compare_logits_metrics():
    a = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    m = compare_logits(a, a.clone())
    assert m.max_abs == 0 and m.top1 == 1 and abs(m.cosine - 1) < 1e-12 and abs(m.kl) < 1e-12
    b = a.flip(-1)
    m = compare_logits(a, b)
    assert m.top1 == 0 and m.kl > 0 and m.max_abs == 5
    x, y = torch.randn(130, 7), torch.randn(130, 7)  # chunked (64 rows at a time) == all at once
    c, w = compare_logits(x, y), compare_logits(x, y, rows=1000)
    assert all(abs(getattr(c, k) - getattr(w, k)) < 1e-9 for k in ("max_abs", "mean_abs", "cosine", "kl", "top1"))


def test_streamed_reference_is_the_whole_model_layer_by_layer_and_strict(fixture_dir, tmp_path):
    """One layer at a time gives the whole-model reference's numbers bit for bit; a tensor missing from the
    checkpoint is named before anything runs."""
    import json as _json

    from safetensors.torch import load_file, save_file

    from stepconv.hf_reference import StreamedReference, load_hf_reference
    from stepconv.verify import make_input_ids

    ids = make_input_ids(1100, 2, 24, 0)
    full = load_hf_reference(fixture_dir).forward(ids)
    ref = StreamedReference(fixture_dir)
    h = ref.start(ids)
    assert torch.equal(h, full["hidden_states"][0])
    for i in range(4):
        t = ref.layer(i, h)
        h = t.out
        assert torch.equal(h, full["hidden_states"][i + 1])
        assert (t.slots is not None) == (i >= 2)
    assert torch.equal(ref.final(h), full["logits"])
    z, logits = ref.mtp(0, h)
    assert torch.equal(z, full["mtp_hidden"][0]) and torch.equal(logits, full["mtp_logits"][0])

    bad = tmp_path / "bad"
    shutil.copytree(fixture_dir, bad)
    index = _json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.3.moe.up_proj.weight"
    shard = index["weight_map"].pop(name)
    tensors = load_file(str(bad / shard))
    del tensors[name]
    save_file(tensors, str(bad / shard), metadata={"format": "pt"})
    (bad / "model.safetensors.index.json").write_text(_json.dumps(index))
    with pytest.raises(ValueError, match="layers.3.mlp.experts.gate_up_proj"):
        StreamedReference(bad)
