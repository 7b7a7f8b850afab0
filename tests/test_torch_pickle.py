"""A rank file's data.pkl written by `torch_pickle.dumps` is exactly what the pickler (torch.save's reduction of each
tensor, `torch_pickle.Pickler`) writes, and loads with torch.load(weights_only=True); the journal's digest of it."""

import argparse
from collections import OrderedDict

import pytest
import torch

from stepconv import torch_pickle
from stepconv.megatron_io import RankFileWriter, load_rank_file
from stepconv.safety import file_digest
from stepconv.torch_pickle import StorageRef, TensorRef, dumps, dumps_both, pickler_dumps, sample_state


def test_matches_the_pickler_here():
    assert torch_pickle.matches_pickler()


@pytest.mark.parametrize("chunks,entries", [(1, 0), (1, 1), (1, 2), (2, 40), (1, 999), (1, 1000), (3, 1001),
                                            (1, 2000), (1, 2001)])
@pytest.mark.parametrize("shared", [False, True])
def test_same_bytes_as_the_pickler(chunks, entries, shared):
    """Batches of 1000 (a last batch of one item is a SETITEM), BINPUT then LONG_BINPUT past 255 memo entries,
    several model chunks (VPP), `_extra_state` Nones, fp32/bf16/fp16, 0-4 dims, shape tuples shared (BINGET) or not
    (the path that skips the memo), strings `args` already holds ("cpu", "storage", "0": BINGET)."""
    ours, theirs = dumps_both(sample_state(chunks, entries, shared_shapes=shared))
    assert ours == theirs
    assert dumps(sample_state(chunks, entries, shared_shapes=shared)) == theirs


def test_same_bytes_odd_values():
    """Integers of every width (BININT1/2, BININT, LONG1), a key object used twice, a model chunk name and a key
    that are the very objects `args` holds, an args with > 256 memo entries, a non-ASCII key."""
    shared_key = "decoder.layers.0.mlp.linear_fc1.weight"
    args = argparse.Namespace(**{f"opt_{i}": f"value {i}" for i in range(300)}, model="model", key=shared_key,
                              device="cpu", params_dtype=torch.float32, ratio=0.5, flags=[True, None])
    big = TensorRef(StorageRef("1", torch.bfloat16, 3 * (2**31 + 5)), (3, 2**31 + 5))
    chunk = OrderedDict([(shared_key, TensorRef(StorageRef("0", torch.float32, 70000), (70000,))),
                         ("big", big), ("décodeur.poids", TensorRef(StorageRef("2", torch.float16, 300), (300,))),
                         ("x._extra_state", None)])
    chunk.update((f"k{i}", TensorRef(StorageRef(str(3 + i), torch.bfloat16, 2 * i), (2, i))) for i in range(300))
    other = OrderedDict([(shared_key, TensorRef(StorageRef("999", torch.float32, 4), (4,)))])  # the same key object
    state = {"args": args, "checkpoint_version": 3.0, "iteration": 12, args.model: chunk, "model1": other}
    ours, theirs = dumps_both(state)
    assert ours == theirs
    assert dumps(state) == theirs


def test_same_bytes_shared_chunk():
    """One model chunk object under two names: the pickler writes it once, then a BINGET."""
    state = sample_state(1, 20, shared_shapes=False)
    state["model1"] = state["model"]
    ours, theirs = dumps_both(state)
    assert ours == theirs and dumps(state) == theirs


def test_negative_control(monkeypatch):
    """A one-detail change to the emitter (batches of 999) is caught by the self-check, and `dumps` then goes
    through the pickler."""
    monkeypatch.setattr(torch_pickle, "BATCH", 999)
    torch_pickle.matches_pickler.cache_clear()
    try:
        ours, theirs = dumps_both(sample_state(1, 1001))
        assert ours != theirs
        assert not torch_pickle.matches_pickler()
        assert dumps(sample_state(1, 1001)) == pickler_dumps(sample_state(1, 1001))
    finally:
        monkeypatch.undo()
        torch_pickle.matches_pickler.cache_clear()
    assert torch_pickle.matches_pickler()


class Name(str):
    pass


def test_other_objects_go_to_the_pickler():
    """A state dict `dumps` does not write itself (a model chunk with a tensor, a chunk name of a str subclass, a
    plain dict) is pickled as before."""
    for state in ({"args": None, "iteration": 0, "model": OrderedDict(w=torch.ones(2))},
                  {"args": None, "iteration": 0, Name("model"): sample_state(1, 3)["model"]},
                  {"args": None, "iteration": 0, "model": {"w": None}}, {"model": OrderedDict()}):
        assert dumps(state) == pickler_dumps(state)  # (a str subclass's name is not a BINUNICODE)


def test_rank_file_loads_with_weights_only(tmp_path):
    """A rank file of two model chunks of 1,100 keys (tensors of three dtypes and `_extra_state` Nones) loads with
    torch.load(weights_only=True) and holds what was written."""
    path = tmp_path / "mp_rank_00" / "model_optim_rng.pt"
    w = RankFileWriter(path)
    want = {}
    dtypes = (torch.bfloat16, torch.float32, torch.float16)
    for c in range(2):
        for i in range(1100):
            key = f"decoder.layers.{i}.w" + ("._extra_state" if i % 9 == 8 else "")
            t = None if key.endswith("_extra_state") else torch.arange(i % 5 + 1 + 3 * c, dtype=dtypes[i % 3])
            if i % 4 == 0 and t is not None:
                t = t.view(1, -1)
            w.add(key, t, f"model{c}")
            want[(f"model{c}", key)] = t
    w.finish(argparse.Namespace(tensor_model_parallel_size=1, device="cpu"))
    torch.serialization.add_safe_globals([argparse.Namespace])  # (what megatron-core registers, as stepconv does)
    sd = torch.load(path, weights_only=True, mmap=True)
    assert [k for k in sd if k.startswith("model")] == ["model0", "model1"]
    for (m, key), t in want.items():
        got = sd[m][key]
        assert (got is None) if t is None else (got.dtype == t.dtype and torch.equal(got, t))
    assert load_rank_file(path)["model1"].keys() == sd["model1"].keys()


def test_file_digest_is_zipfiles(tmp_path):
    """The journal's digest of a rank file, its directory read in one pass (`torch_zip.central_directory`), is what
    the names and sizes `zipfile` lists give; a renamed record changes it; a file that is no zip is 'unreadable'."""
    import hashlib
    import zipfile

    path = tmp_path / "model_optim_rng.pt"
    torch.save({"a": torch.ones(3), "b": torch.zeros(2)}, path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        names = "".join(f"{i.filename}:{i.file_size};" for i in z.infolist())
        start = z.start_dir
    digest = file_digest(path)
    assert digest.startswith(f"zipdir:{hashlib.sha256(names.encode()).hexdigest()}:crc32x64M:")
    at = raw.rindex(b"/data/0")  # (in the directory: the last occurrence)
    assert at > start
    path.write_bytes(raw[:at] + b"/data/9" + raw[at + 7:])
    assert file_digest(path) not in (digest, "unreadable")
    path.write_bytes(raw[:-30])
    assert file_digest(path) == "unreadable"
