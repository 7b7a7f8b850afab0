"""torch_dist written and read by stepconv: bit-exact round trips (HF and legacy), exact dry-run sizes, resharding,
and bad or hostile input refused in one line with nothing published."""

import hashlib
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import bit_equal, load_hf
from stepconv.config import StepconvError
from stepconv.convert import hf_to_mcore, mcore_to_hf, reshard
from stepconv.inspect import inspect_path
from stepconv.torch_dist import read_index


def assert_hf_equal(h, want):
    back = load_hf(h)
    assert set(back) == set(want)
    assert [n for n in want if not bit_equal(back[n], want[n])] == []


@pytest.mark.parametrize("tp,pp,ep,spec,dtype", [(1, 1, 1, "local", "keep"), (2, 1, 2, "te", "keep"),
                                                (4, 2, 1, "local", "fp32"), (2, 2, 2, "te", "bf16")])
def test_hf_torch_dist_hf_is_bit_exact_and_inspect_predicts_every_file(tmp_path, fixture_dir, fixture_tensors, tp, pp,
                                                                         ep, spec, dtype):
    m, h = tmp_path / "m", tmp_path / "h"
    s = hf_to_mcore(fixture_dir, m, tp=tp, pp=pp, ep=ep, spec=spec, dtype=dtype, format="torch_dist")
    assert (m / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert {"metadata.json", "common.pt", ".metadata"} <= {p.name for p in (m / "release").iterdir()}
    assert not list(m.glob("release/mp_rank_*")) and "global keys" in "\n".join(s.lines())
    import megatron.core  # noqa: F401  (registers megatron-core's safe globals, as Megatron-LM's loader relies on)

    common = torch.load(m / "release" / "common.pt", weights_only=True)
    a = common["args"]
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size) == (tp, pp, ep)
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.ckpt_format) == (4, 64, 8, "torch_dist")
    mcore_to_hf(m, h)
    assert_hf_equal(h, fixture_tensors)
    r = inspect_path(fixture_dir, tp=tp, pp=pp, ep=ep, spec=spec, dtype=dtype, format="torch")  # (legacy: no dist files)
    assert r.dist_files == []
    r = inspect_path(fixture_dir, tp=tp, pp=pp, ep=ep, spec=spec, dtype=dtype, format="torch_dist")
    written = {str(p.relative_to(m)): p.stat().st_size for p in (m / "release").iterdir()}
    assert {f.name: f.bytes for f in r.dist_files} == written
    back = inspect_path(m)
    assert back.ok and back.format == "torch_dist", back.errors
    assert {f.name: f.bytes for f in back.hf_files} == {p.name: p.stat().st_size for p in h.glob("*.safetensors")}


def test_keys_are_global_and_the_gate_is_split(tmp_path, fixture_dir):
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, pp=2, ep=2, spec="local", format="torch_dist")
    md = read_index(m / "release").state_dict_metadata
    # per-layer global keys (no PP-local numbering), the gate as _qkv/_gate, experts stacked, vocab unpadded
    assert tuple(md["decoder.layers.3.self_attention.linear_qkv.weight._qkv"].size) == ((12 + 8) * 16, 64)
    assert tuple(md["decoder.layers.3.self_attention.linear_qkv.weight._gate"].size) == (12, 64)
    assert tuple(md["decoder.layers.0.self_attention.linear_qkv.weight._qkv"].size) == ((8 + 8) * 16, 64)
    assert tuple(md["decoder.layers.2.mlp.experts.experts.linear_fc1.weight"].size) == (16, 64, 64)
    assert tuple(md["embedding.word_embeddings.weight"].size) == (1100, 64)
    assert md["decoder.layers.2.mlp.router.expert_bias"].properties.dtype == torch.float32
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in md  # local spec's sharded-key map
    assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in md
    assert "mtp.layers.0.transformer_layer.self_attention.linear_proj.weight" in md
    assert "decoder.layers.2.mlp.experts.experts.linear_fc2._extra_state/shard_5_16" in md
    assert "decoder.layers.1.mlp.linear_fc1._extra_state/shard_0_1" in md
    assert not any(k.startswith("decoder.layers.0.") and "local_experts" in k for k in md)
    chunks = md["decoder.layers.2.mlp.experts.experts.linear_fc1.weight"].chunks
    assert sorted(tuple(c.offsets)[0] for c in chunks) == list(range(16))  # one chunk per expert


def test_layers_cut_in_parts_round_trip_and_inspect_predicts_them(tmp_path, fixture_dir, fixture_tensors,
                                                                   monkeypatch):
    from stepconv import torch_dist

    monkeypatch.setattr(torch_dist, "PART_ELEMENTS", 20_000)
    m, h = tmp_path / "m", tmp_path / "h"
    hf_to_mcore(fixture_dir, m, tp=2, ep=2, format="torch_dist")
    written = {p.name: p.stat().st_size for p in (m / "release").iterdir()}
    assert {"__3_0.distcp", "__3_1.distcp", "__3_2.distcp"} <= set(written)
    assert all(n < 3 * 20_000 * 4 for k, n in written.items() if k.startswith("__3_"))
    r = inspect_path(fixture_dir, tp=2, ep=2, format="torch_dist")
    assert {f.name.split("/")[-1]: f.bytes for f in r.dist_files} == written
    mcore_to_hf(m, h)
    assert_hf_equal(h, fixture_tensors)


def test_the_index_is_the_same_whatever_order_the_units_run_in(tmp_path, fixture_dir, monkeypatch):
    """`.metadata` lists tensors and chunks in the units' planned order, not in the order they finished."""
    from stepconv.torch_dist import TorchDistWriter

    hf_to_mcore(fixture_dir, tmp_path / "a", tp=2, ep=2, format="torch_dist", jobs=1)
    planned = TorchDistWriter.units
    monkeypatch.setattr(TorchDistWriter, "units", lambda self, entries: planned(self, entries)[::-1])
    hf_to_mcore(fixture_dir, tmp_path / "b", tp=2, ep=2, format="torch_dist", jobs=1)
    a, b = ((tmp_path / x / "release" / ".metadata").read_bytes() for x in "ab")
    assert a == b and len(read_index(tmp_path / "a" / "release").storage_data) > 100


def test_legacy_torch_dist_legacy_is_byte_identical(tmp_path, fixture_dir, fixture_tensors):
    """SRC -> DST -> SRC' (reshard between formats and layouts): SRC' rank files are byte for byte SRC's."""
    a, d, b, c = tmp_path / "a", tmp_path / "d", tmp_path / "b", tmp_path / "c"
    hf_to_mcore(fixture_dir, a, tp=2, pp=2, ep=2, spec="local")
    reshard(a, d, format="torch_dist")
    reshard(d, b, format="torch")  # layout and spec default to the source's (recorded in its args)
    digest = lambda root: {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                           for p in sorted(root.rglob("*")) if p.is_file()}
    assert digest(a) == digest(b)
    reshard(d, c, tp=4, pp=1, ep=1, format="torch")  # another layout
    mcore_to_hf(c, tmp_path / "h")
    assert_hf_equal(tmp_path / "h", fixture_tensors)
    assert len(list(c.glob("release/mp_rank_*"))) == 4


def test_reshard_audit_and_validation(tmp_path, fixture_dir):
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, format="torch_dist")
    with pytest.raises(StepconvError, match="valid values 1, 2, 4; got 3"):
        reshard(m, tmp_path / "o", tp=3)
    with pytest.raises(StepconvError, match="--resume works with --format torch"):
        hf_to_mcore(fixture_dir, tmp_path / "o", format="torch_dist", resume=True)
    with pytest.raises(StepconvError, match="--format must be one of torch, torch_dist"):
        hf_to_mcore(fixture_dir, tmp_path / "o", format="zarr")
    assert not (tmp_path / "o").exists()


class _Payload:
    def __reduce__(self):
        return (subprocess.call, (["touch", "/tmp/stepconv-pwned"],))


def _cli(*args):
    p = subprocess.run([sys.executable, "-m", "stepconv.cli", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stderr


def test_hostile_or_broken_torch_dist_is_refused_in_one_line(tmp_path, fixture_dir):
    good = tmp_path / "good"
    hf_to_mcore(fixture_dir, good, tp=2, format="torch_dist")
    cases = {}

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d / "release")
        cases[name] = d

    def payload(it):  # a pickle that would run a command if unpickled plainly
        (it / ".metadata").write_bytes(pickle.dumps({"x": _Payload()}))

    def truncate(it):
        f = max(it.glob("__*_0.distcp"), key=lambda p: p.stat().st_size)
        f.write_bytes(f.read_bytes()[:100])

    def drop_key(it):
        md = read_index(it)
        del md.state_dict_metadata["decoder.layers.1.self_attention.linear_proj.weight"]
        (it / ".metadata").write_bytes(pickle.dumps(md))

    variant("payload", payload)
    variant("truncated", truncate)
    variant("missing", drop_key)
    pwned = __import__("pathlib").Path("/tmp/stepconv-pwned")
    pwned.unlink(missing_ok=True)
    for name, needle in (("payload", "refusing to unpickle"), ("truncated", "truncated"),
                         ("missing", "decoder.layers.1.self_attention.linear_proj.weight is missing")):
        code, err = _cli("mcore-to-hf", cases[name], "-o", tmp_path / f"h-{name}")
        lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
        assert not (tmp_path / f"h-{name}").exists()
        assert not inspect_path(cases[name]).ok
    assert not pwned.exists()


@pytest.mark.slow
def test_verify_runs_on_torch_dist_at_the_recorded_and_another_layout(tmp_path, fixture_dir):
    from stepconv.mapping import Layout
    from stepconv.verify import verify

    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, ep=2, spec="local", format="torch_dist")
    for layout in (None, Layout(1, 2, 1)):
        r = verify(fixture_dir, m, dtype="fp32", layout=layout)
        assert r.passed and r.logits.max_abs <= 1e-4, r.failures


def test_reads_a_gate_fused_per_rank_into_linear_qkv(tmp_path, fixture_dir, fixture_tensors):
    """stepconv's model on released megatron-core (no `._qkv`/`._gate` split) saves each rank's fused
    [qkv_r; gate_r] under one `linear_qkv.weight` key: the export undoes it with the TP recorded in the args."""
    import torch.distributed.checkpoint as dcp

    from stepconv.config import AttnShape
    from stepconv.kinds import QKVG_, SplitContext
    from stepconv.torch_dist import TorchDistReader

    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, spec="local", format="torch_dist")
    it = m / "release"
    index = read_index(it)
    reader = TorchDistReader(it, index, "local", 16)
    full = {}
    for key, md in index.state_dict_metadata.items():
        if hasattr(md, "size"):
            full[key] = reader.region(key, (0,) * len(md.size), out=torch.empty(tuple(md.size), dtype=md.properties.dtype))
    for qkv_key in [k for k in full if k.endswith("._qkv")]:
        base = qkv_key.removesuffix("._qkv")
        full_attention = base.startswith("decoder.layers.0.")  # layer 0 (8 heads); 1-3 and MTP are sliding (12)
        shape = AttnShape(8, 4, 16) if full_attention else AttnShape(12, 4, 16)
        qkv, gate = full.pop(qkv_key), full.pop(base + "._gate")
        g = shape.heads * shape.head_dim
        per_group = qkv.view(shape.groups, -1, 64)  # per group [q..., k, v]
        q = per_group[:, :g // shape.groups].reshape(-1, 64)
        k = per_group[:, g // shape.groups:g // shape.groups + 16].reshape(-1, 64)
        v = per_group[:, g // shape.groups + 16:].reshape(-1, 64)
        full[base] = torch.cat([QKVG_.split([q, k, v, gate], SplitContext(2, shape), r) for r in range(2)])
    out = tmp_path / "fused"
    (out / "release").mkdir(parents=True)
    dcp.save(full, storage_writer=dcp.FileSystemWriter(str(out / "release")), no_dist=True)
    for name in ("common.pt", "metadata.json"):
        shutil.copy(it / name, out / "release" / name)
    shutil.copy(m / "latest_checkpointed_iteration.txt", out / "latest_checkpointed_iteration.txt")
    assert not any(k.endswith("._gate") for k in read_index(out / "release").state_dict_metadata)
    mcore_to_hf(out, tmp_path / "h", hf_config=fixture_dir / "config.json")
    back = load_hf(tmp_path / "h")
    assert [n for n in fixture_tensors if "shared_head.output" not in n
            and not bit_equal(back[n], fixture_tensors[n])] == []
