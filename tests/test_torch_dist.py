"""torch_dist output checked against released megatron-core 0.16.1 itself (``megatron_truth``).

Uses the fixture variant with one attention shape, which a single TransformerConfig can express. Released
megatron-core has no head-wise gate; ``megatron_truth`` explains how the gate is bridged (the dev branch's
``linear_qkv.weight._qkv`` / ``._gate`` keys). What is compared:

- the key space: stepconv's ``.metadata`` against the real model's ``sharded_state_dict()``;
- loading: megatron's ``dist_checkpointing.load`` at its default strictness fills the real model with
  exactly the tensors of stepconv's legacy rank files for the same layout;
- exporting: a checkpoint that megatron's own ``dist_checkpointing.save`` wrote converts back to HF
  bit-exactly.

``test_megatron_truth_round_trips_legacy_files`` checks the ground truth (and this file's expectations)
against megatron alone, so the others measure stepconv, not the helpers.
"""

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

import megatron_truth
from test_fast_load import assert_loads_as_torch
from conftest import bit_equal, load_hf, make_fixture
from stepconv.convert import hf_to_mcore, mcore_to_hf
from stepconv.megatron_io import RANK_FILE, TRACKER, load_rank_file, rank_dir_name

VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
QKV = megatron_truth.QKV
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                 "common_backend_version": 1}


def _fixture(tmp_path: Path) -> tuple[Path, dict]:
    hf = make_fixture.make_checkpoint(tmp_path / "hf", uniform=True)
    return hf, json.loads((hf / "config.json").read_text())


def _gated(truth: dict[str, tuple], cfg: dict, vocab_rows: int | None = None) -> dict[str, tuple]:
    """Megatron's key space as a head-wise-gated torch_dist checkpoint stores it: key -> kind[, global shape].

    ``...linear_qkv.weight`` becomes ``._qkv`` (same shape) plus ``._gate`` ``[nh, H]``; with ``vocab_rows``
    the vocab matrices' dim 0 is that instead of megatron's padded vocab.
    """
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    qkv_rows = (heads + 2 * cfg["num_attention_groups"]) * cfg["head_dim"]
    out = {}
    for key, entry in truth.items():
        if entry[0] == "object":
            out[key] = ("object",)
            continue
        shape = tuple(entry[1])
        if key.endswith(QKV):
            assert shape == (qkv_rows, hidden)
            out[key + megatron_truth.QKV_SUFFIX] = ("tensor", shape)
            out[key + megatron_truth.GATE_SUFFIX] = ("tensor", (heads, hidden))
        elif key in VOCAB_KEYS and vocab_rows is not None:
            out[key] = ("tensor", (vocab_rows, *shape[1:]))
        else:
            out[key] = ("tensor", shape)
    return out


def _stored(iter_dir: Path) -> dict[str, tuple]:
    """A torch_dist folder's ``.metadata``: key -> ("tensor", global shape) or ("object",) for byte entries."""
    md = FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata
    out = {}
    for key, m in md.items():
        if isinstance(m, TensorStorageMetadata):
            out[key] = ("tensor", tuple(m.size))
        else:
            assert isinstance(m, BytesStorageMetadata)
            out[key] = ("object",)
    return out


def _stored_dtypes(iter_dir: Path) -> dict[str, torch.dtype]:
    md = FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata
    return {k: m.properties.dtype for k, m in md.items() if isinstance(m, TensorStorageMetadata)}


def _expected_dtype(key: str) -> torch.dtype:
    # the fixture is bf16 except the fp32 router bias; a bf16 training run stores the same (megatron keeps
    # expert_bias fp32)
    return torch.float32 if key.endswith("router.expert_bias") else torch.bfloat16


def _legacy(hf: Path, out: Path, tp: int, pp: int, ep: int) -> Path:
    hf_to_mcore(hf, out, tp=tp, pp=pp, ep=ep, spec="local")
    return out


def _same_values(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """Equal bit for bit up to the dtype width (megatron's model is float32, the checkpoints bf16)."""
    return (theirs.shape == ours.shape and bit_equal(theirs.to(ours.dtype), ours)
            and bit_equal(ours.to(theirs.dtype), theirs))


def _assert_loaded_is_legacy(loaded: dict, legacy_dir: Path, cfg: dict, tp: int, pp: int, ep: int) -> None:
    """Every rank megatron loaded holds exactly its legacy rank file's tensors (gated linear_qkv reassembled)."""
    assert len(loaded) == tp * pp * ep
    heads = cfg["num_attention_heads"]
    for coords, theirs in loaded.items():
        ours = load_rank_file(legacy_dir / "release" / rank_dir_name(*coords, pp, ep) / RANK_FILE)["model"]
        ours = {k: v for k, v in ours.items() if v is not None}
        gates = {k for k in theirs if k.endswith(megatron_truth.GATE_SUFFIX)}
        assert gates == {k + megatron_truth.GATE_SUFFIX for k in ours if k.endswith(QKV)}
        assert sorted(set(theirs) - gates) == sorted(ours)
        for k, t in theirs.items():
            if k in gates:
                continue
            if k.endswith(QKV):
                gate = theirs[k + megatron_truth.GATE_SUFFIX]
                assert gate.shape[0] == heads // tp
                t = torch.cat([t, gate])
            assert _same_values(t, ours[k]), (coords, k)


@pytest.mark.slow
def test_megatron_truth_round_trips_legacy_files(tmp_path):
    """The helpers against megatron alone: megatron saves the legacy rank files and loads them back unchanged,
    and the gated key space this file expects is what megatron's own save stored."""
    hf, cfg = _fixture(tmp_path)
    tp, pp, ep = 2, 1, 1
    legacy = _legacy(hf, tmp_path / "legacy", tp, pp, ep)
    it = megatron_truth.save_with_megatron(hf, legacy, tmp_path / "meg", tp, pp, ep, 5)
    assert it == tmp_path / "meg" / "iter_0000005"
    assert (tmp_path / "meg" / TRACKER).read_text().strip() == "5"
    assert_loads_as_torch(it / "common.pt")  # megatron-core's own torch.save: fast_load gives torch.load's objects
    assert _stored(it) == _gated(megatron_truth.sharded_keys(hf, tp, pp, ep), cfg)
    assert _stored_dtypes(it) == {k: _expected_dtype(k) for k in _stored_dtypes(it)}
    _assert_loaded_is_legacy(megatron_truth.load_with_megatron(it, hf, tp, pp, ep), legacy, cfg, tp, pp, ep)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,ep", [(2, 1, 1), (1, 2, 1), (2, 1, 2)])
def test_local_spec_keys_and_shapes_match_megatron_core(tmp_path, tp, pp, ep):
    from megatron.core import dist_checkpointing

    hf, cfg = _fixture(tmp_path)
    out = tmp_path / "m"
    hf_to_mcore(hf, out, tp=tp, pp=pp, ep=ep, spec="local", format="torch_dist")
    assert (out / TRACKER).read_text().strip() == "release"
    it = out / "release"
    assert json.loads((it / "metadata.json").read_text()) == METADATA_JSON

    truth = megatron_truth.sharded_keys(hf, tp, pp, ep)
    vocab = cfg["vocab_size"]
    padded = -(-vocab // (128 * tp)) * 128 * tp
    assert padded != vocab and all(truth[k][1][0] == padded for k in VOCAB_KEYS)
    stored = _stored(it)
    # megatron's keys, shapes and ShardedObject keys; gate split out; the true (unpadded) vocab rows
    assert stored == _gated(truth, cfg, vocab_rows=vocab)
    assert all(stored[k] == ("tensor", (vocab, cfg["hidden_size"])) for k in VOCAB_KEYS)
    assert _stored_dtypes(it) == {k: _expected_dtype(k) for k in _stored_dtypes(it)}

    # what Megatron-LM's load_checkpoint reads from common.pt (weights_only, megatron's safe globals)
    common = dist_checkpointing.load_common_state_dict(str(it))
    args = common["args"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (
        cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"])
    assert common["checkpoint_version"] == 3.0
    assert common["content_metadata"]["singleton_local_shards"] is False


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,ep", [(2, 1, 1), (1, 2, 1), (2, 1, 2)])
def test_megatron_loads_it_at_default_strictness(tmp_path, tp, pp, ep):
    hf, cfg = _fixture(tmp_path)
    out = tmp_path / "m"
    hf_to_mcore(hf, out, tp=tp, pp=pp, ep=ep, spec="local", format="torch_dist")
    legacy = _legacy(hf, tmp_path / "legacy", tp, pp, ep)
    loaded = megatron_truth.load_with_megatron(out / "release", hf, tp, pp, ep)
    _assert_loaded_is_legacy(loaded, legacy, cfg, tp, pp, ep)


@pytest.mark.slow
def test_megatron_loads_layers_cut_in_parts(tmp_path, monkeypatch):
    """A layer's tensors in several data files (`PART_ELEMENTS`, here tiny) load into megatron-core's model."""
    from stepconv import torch_dist

    hf, cfg = _fixture(tmp_path)
    monkeypatch.setattr(torch_dist, "PART_ELEMENTS", 20_000)
    out = tmp_path / "m"
    hf_to_mcore(hf, out, tp=2, spec="local", format="torch_dist")
    assert (out / "release" / "__3_2.distcp").exists()
    legacy = _legacy(hf, tmp_path / "legacy", 2, 1, 1)
    loaded = megatron_truth.load_with_megatron(out / "release", hf, 2, 1, 1)
    _assert_loaded_is_legacy(loaded, legacy, cfg, 2, 1, 1)


@pytest.mark.slow
def test_megatron_saved_checkpoint_exports_bit_exact(tmp_path):
    hf, cfg = _fixture(tmp_path)
    legacy = _legacy(hf, tmp_path / "legacy", 2, 1, 1)
    root = tmp_path / "meg"
    megatron_truth.save_with_megatron(hf, legacy, root, 2, 1, 1, 5)
    assert not (root / "stepconv").exists()  # nothing of stepconv's beside megatron's own output

    h = tmp_path / "h"
    s = mcore_to_hf(root, h, hf_config=hf / "config.json")
    src, back = load_hf(hf), load_hf(h)
    assert set(src) == set(back)
    heads = [n for n in src if "shared_head.output" in n]
    assert heads
    assert all(bit_equal(src[n], back[n]) for n in src if n not in heads)
    # no stepconv sidecar: the MTP heads are output_layer's copy (the fixture's own heads differ from lm_head)
    assert not any(bit_equal(src[n], src["lm_head.weight"]) for n in heads)
    assert all(bit_equal(back[n], back["lm_head.weight"]) for n in heads)
    assert any("output_layer" in n for n in s.notes)


def test_data_files_are_synced_once_by_the_publish_step_and_no_journal_is_written(tmp_path, monkeypatch):
    """Units close their `.distcp` files without waiting for the disk (no fsync of the `.tmp` file a unit writes,
    and no resume journal written: a torch_dist run cannot be resumed); each data file is fsynced once, under its
    final name, by the publish step's pass over the staging folder, after `metadata.json` is written and before the
    folder is renamed into place."""
    import os

    events = []
    fsync, open_ = os.fsync, open

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_open(file, *a, **k):
        if str(file).endswith("metadata.json"):
            events.append(("write", str(file)))
        return open_(file, *a, **k)

    hf, _ = _fixture(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr("builtins.open", recording_open)
    hf_to_mcore(hf, out, tp=2, spec="local", format="torch_dist")
    monkeypatch.undo()
    data = sorted(p.name for p in (out / "release").glob("__*.distcp") if p.name != "__objects_0.distcp")
    assert len(data) > 2
    names = [(kind, os.path.basename(n)) for kind, n in events]
    assert not [n for kind, n in names if kind == "fsync" and n.endswith(".distcp.tmp")], names
    assert not [n for kind, n in names if "journal" in n], names
    synced = [i for i, (kind, n) in enumerate(names) if kind == "fsync" and n in data]
    assert sorted(names[i][1] for i in synced) == data  # each once, under its final name
    written = next(i for i, (kind, _) in enumerate(names) if kind == "write")
    published = max(i for i, (kind, n) in enumerate(events) if kind == "fsync" and n == str(tmp_path))  # (renamed)
    assert written < min(synced) and max(synced) < published
