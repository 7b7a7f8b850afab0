"""verify passes on correct conversions and fails on broken ones (a verify that passes these is broken)."""

import json
import subprocess
import sys

import pytest
import torch

from stepconv.convert import hf_to_mcore
from stepconv.megatron_io import load_rank_file
from stepconv.verify import compare_logits, verify


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixture_dir):
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for tp, pp, ep, spec in [(1, 1, 1, "te"), (2, 1, 1, "local"), (4, 1, 1, "te"), (2, 2, 2, "local")]:
        d = root / f"tp{tp}pp{pp}ep{ep}"
        hf_to_mcore(fixture_dir, d, tp=tp, pp=pp, ep=ep, spec=spec)
        out[(tp, pp, ep)] = d
    return out


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 1, 1), (4, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_verify_passes(converted, fixture_dir, layout, dtype):
    r = verify(fixture_dir, converted[layout], dtype=dtype)
    print(r.table())
    assert r.passed, r.failures
    assert r.seq_len > 2 * 8  # longer than twice the sliding window
    assert len(r.mtp) == 1 and r.first_divergent_layer is None
    if dtype == "fp32":
        assert r.logits.max_abs <= 1e-4 and r.logits.top1 == 1.0


def _corrupt(src, dst, edit):
    """Copy a converted checkpoint, then apply edit(models: {(tp, pp, ep): state_dict}) and save."""
    import shutil

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


@pytest.mark.parametrize("edit", [swap_gate_rows_between_ranks, zero_one_gate_row, swap_q_and_k_rows_in_a_group,
                                  shift_a_norm_by_one])
def test_verify_fails_on_broken_checkpoints(converted, fixture_dir, tmp_path, edit):
    bad = _corrupt(converted[(2, 1, 1)], tmp_path / "bad", edit)
    r = verify(fixture_dir, bad, dtype="fp32")
    print(r.table())
    assert not r.passed
    assert r.first_divergent_layer == 1  # the per-layer comparison points at the broken layer


@pytest.mark.slow
def test_cli_verify_json_and_exit_codes(converted, fixture_dir, tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "stepconv.cli", "verify", str(fixture_dir), str(converted[(4, 1, 1)]),
                        "--json", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "PASS" in p.stdout and "KL" in p.stdout and "top-5" in p.stdout
    rep = json.loads(out.read_text())
    assert rep["passed"] and rep["layout"] == "TP=4 PP=1 EP=1" and rep["window_convention"] == "hf"
    assert len(rep["layers"]) == 4 + 1 + 1  # embedding, 4 layers, 1 MTP
    bad = _corrupt(converted[(2, 1, 1)], tmp_path / "bad", zero_one_gate_row)
    p = subprocess.run([sys.executable, "-m", "stepconv.cli", "verify", str(fixture_dir), str(bad)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "FAIL" in p.stdout


def test_prompt_file(converted, fixture_dir, tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text("\n".join(" ".join(str((7 * i + j) % 1100) for j in range(20)) for i in range(3)) + "\n")
    r = verify(fixture_dir, converted[(1, 1, 1)], prompt_file=f)
    assert r.passed and (r.batch, r.seq_len) == (3, 20)


def test_compare_logits_metrics():
    a = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    m = compare_logits(a, a.clone())
    assert m.max_abs == 0 and m.top1 == 1 and abs(m.cosine - 1) < 1e-12 and abs(m.kl) < 1e-12
    b = a.flip(-1)
    m = compare_logits(a, b)
    assert m.top1 == 0 and m.kl > 0 and m.max_abs == 5
