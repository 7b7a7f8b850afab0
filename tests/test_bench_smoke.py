"""Smoke test of bench/run_bench.py (the benchmark itself is run by hand): generator + one measured conversion."""

import importlib.util
import json
import sys

from conftest import ROOT
from stepconv.hf_io import HFCheckpoint
from stepconv.mapping import hf_shapes

_spec = importlib.util.spec_from_file_location("run_bench", ROOT / "bench" / "run_bench.py")
run_bench = importlib.util.module_from_spec(_spec)
sys.modules["run_bench"] = run_bench
_spec.loader.exec_module(run_bench)


def test_generator_and_one_measurement(tmp_path):
    kw = dict(layers=5, mtp=1, experts=16, vocab=1024)
    facts = run_bench.make_synthetic(tmp_path / "hf", 64, shard_bytes=200_000, **kw)
    ckpt = HFCheckpoint(tmp_path / "hf")  # loads and validates like the converter does
    cfg = ckpt.config
    assert (cfg.hidden, cfg.num_layers, cfg.num_mtp, cfg.num_experts) == (64, 5, 1, 16)
    assert {a.heads for a in cfg.attn_shapes()} == {64, 96} and {a.groups for a in cfg.attn_shapes()} == {8}
    assert set(ckpt.tensors) == set(hf_shapes(cfg))
    assert ckpt.tensors["model.layers.3.moe.gate_proj.weight"].shape == (16, 20, 64)
    assert facts["files"] > 1 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert facts["bytes"] == sum(i.nbytes for i in ckpt.tensors.values())
    assert not ckpt.lazy("model.embed_tokens.weight")[:].float().isnan().any()
    # the full size of a real-ratio checkpoint: scale 1 is the real model
    assert run_bench.checkpoint_bytes(run_bench.synth_config(1)) == 398_768_626_944

    out = tmp_path / "m"
    r = run_bench.measure(run_bench.stepconv_cmd("hf-to-mcore", "--quiet", "--tp", "2", str(tmp_path / "hf"), "-o",
                                                 str(out)), [tmp_path / "hf"], log=tmp_path / "log")
    assert out.is_dir() and r["wall_s"] > 0 and r["peak_rss"] > 50 << 20
    written = run_bench.du(out)
    assert r["wchar"] >= written and r["rchar"] >= facts["bytes"]
    assert r["warmed_bytes"] >= facts["bytes"]
    res = {"facts": dict(facts, largest_materialised="x", largest_materialised_bytes=1, rss_bound=1 << 30),
           "runs": [dict(r, label="hf-to-mcore TP=2", input_bytes=facts["bytes"], output_bytes=written,
                         ratio_wall=None, ratio_total=None, ratio_per_byte=None, rss_vs_bound=0.2)]}
    text = run_bench.markdown([res], run_bench.machine())
    assert "| 1/64 | hf-to-mcore TP=2 |" in text
    json.dumps(res)
