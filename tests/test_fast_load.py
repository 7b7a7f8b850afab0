"""`stepconv.fast_load`: the same objects as torch.load(mmap=True, weights_only=True) on the files we write and on
torch.save's of a state dict, and never more than weights_only accepts: hostile pickles give up (then
`load_rank_file` behaves exactly as it does with torch.load alone) without running anything of theirs."""

from __future__ import annotations

import argparse
import copyreg
import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import make_fixture
from stepconv import fast_load, megatron_io
from stepconv.config import StepconvError
from stepconv.convert import hf_to_mcore
from stepconv.megatron_io import load_rank_file
from stepconv.torch_zip import central_directory


# --- identity with torch.load -----------------------------------------------------------------------------------
def _mapping_of(ptr: int) -> tuple[int, int, int]:
    """(start, end, inode) of the file mapping holding address `ptr`."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi and len(fields) >= 6:
                return lo, hi, int(fields[4])
    raise AssertionError(f"{ptr:#x} is in no file mapping")


def _tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


def _same(a, b, where="") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset(), a.requires_grad) == \
               (b.dtype, b.shape, b.stride(), b.storage_offset(), b.requires_grad), where
        sa, sb = (torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()) for t in (a, b))
        assert torch.equal(sa, sb), where  # every byte of the storage, whatever the strides
        assert type(a._backward_hooks) is type(b._backward_hooks) and a._backward_hooks == b._backward_hooks, where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
        assert a.__dict__ == b.__dict__ if isinstance(a, OrderedDict) else True, where
    elif isinstance(a, argparse.Namespace):
        _same(vars(a), vars(b), where)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where


def assert_loads_as_torch(path: Path) -> None:
    """fast_load.load(path) is torch.load(path, mmap=True, weights_only=True): same structure and values, tensors
    equal bit for bit with equal dtype, shape, stride and storage offset, on storages at the same file offsets of
    one mapping of `path` (and shared where torch's are)."""
    megatron_io._allow(megatron_io._SAFE)
    ours = fast_load.load(path)
    theirs = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    _same(ours, theirs)
    mine, torchs = _tensors(ours, []), _tensors(theirs, [])
    assert len(mine) == len(torchs)
    for ts in (mine, torchs):
        ptrs = [t.untyped_storage().data_ptr() for t in ts if t.untyped_storage().nbytes()]
        if ptrs:
            lo, hi, inode = _mapping_of(ptrs[0])
            assert inode == os.stat(path).st_ino and lo <= min(ptrs) and max(
                t.untyped_storage().data_ptr() + t.untyped_storage().nbytes() for t in ts) <= hi
            ts.append(lo)  # (the base, for the offsets below)
        else:
            ts.append(0)
    base_m, base_t = mine.pop(), torchs.pop()
    assert [t.untyped_storage().data_ptr() - base_m for t in mine] == \
           [t.untyped_storage().data_ptr() - base_t for t in torchs]
    assert [id(t) for t in mine].count(id(mine[0])) == [id(t) for t in torchs].count(id(torchs[0])) if mine else True


@pytest.fixture(scope="module")
def hf8(tmp_path_factory):
    return make_fixture.make_checkpoint(tmp_path_factory.mktemp("hf8") / "hf", num_layers=8)


@pytest.mark.parametrize("layout", [dict(tp=2), dict(tp=2, ep=2, dtype="fp32"), dict(pp=2, vpp=2)],
                         ids=["tp2", "tp2-ep2-fp32", "pp2-vpp2"])
def test_our_rank_files_load_as_with_torch(tmp_path, hf8, layout):
    hf_to_mcore(hf8, tmp_path / "m", spec="local", **layout)
    files = sorted((tmp_path / "m" / "release").glob("*/model_optim_rng.pt"))
    assert len(files) == layout.get("tp", 1) * layout.get("ep", 1) * layout.get("pp", 1)
    for f in files:
        assert_loads_as_torch(f)
    obj = fast_load.load(files[-1])
    model = obj[megatron_io.model_keys(obj)[0]]
    assert any(k.endswith("_extra_state") and v is None for k, v in model.items())
    dtypes = {v.dtype for v in model.values() if isinstance(v, torch.Tensor)}
    assert dtypes == ({torch.float32} if "dtype" in layout else {torch.bfloat16, torch.float32})


def test_torch_save_of_a_state_dict_loads_as_with_torch(tmp_path):
    """What Megatron-LM's legacy save writes: torch.save of {args, iteration, model: module.state_dict()}. A
    state_dict is an OrderedDict with `_metadata` (a BUILD); views share a storage; a tensor appears twice."""
    lin = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    sd = lin.state_dict()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd["view.t"], sd["view.row"], sd["empty"], sd["scalar"] = base.t(), base[2], torch.empty(0, 3), torch.tensor(7)
    sd["flags"], sd["ids"], sd["x._extra_state"], sd["again"] = base > 5, torch.arange(5), None, base
    args = argparse.Namespace(num_layers=2, params_dtype=torch.bfloat16, window=(511, 0), freq=[0, 1],
                              extra={"a": [1.5, None, True]}, name="x")
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7, "model": sd}, path)
    assert_loads_as_torch(path)
    obj = fast_load.load(path)
    assert obj["model"]._metadata == sd._metadata and obj["model"]["again"] is not obj["model"]["view.row"]
    assert obj["model"]["view.t"].untyped_storage().data_ptr() == obj["model"]["again"].untyped_storage().data_ptr()
    shared = {"a": base, "b": base}  # one tensor object twice: one object after loading, as torch.load gives
    torch.save({"model": shared}, path)
    obj = fast_load.load(path)
    assert obj["model"]["a"] is obj["model"]["b"]
    assert_loads_as_torch(path)


# --- hostile pickles --------------------------------------------------------------------------------------------
def _g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _s(text: str) -> bytes:
    b = text.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def _i(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little", signed=True)


def _tup(xs) -> bytes:
    return b"(" + b"".join(map(_i, xs)) + b"t"


OD = _g("collections", "OrderedDict") + b")R"  # an empty OrderedDict


def _tensor(key="0", numel=4, size=(4,), stride=(1,), hooks=OD, storage="FloatStorage", rebuild=None) -> bytes:
    return ((rebuild or _g("torch._utils", "_rebuild_tensor_v2")) + b"((" + _s("storage") + _g("torch", storage)
            + _s(key) + _s("cpu") + _i(numel) + b"tQ" + _i(0) + _tup(size) + _tup(stride) + b"\x89" + hooks + b"tR")


def _rank(items: bytes, extra: bytes = b"") -> bytes:
    """{'model': OrderedDict(<items>), 'iteration': 1 <extra>} as protocol-2 pickle bytes."""
    return (b"\x80\x02}(" + _s("model") + OD + b"(" + items + b"u" + _s("iteration") + _i(1) + extra + b"u.")


def _archive(path: Path, pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch.save archive holding `pkl` as data.pkl (and `records`: data/<key> -> bytes), as torch writes it."""
    w = torch._C.PyTorchFileWriter(str(path))
    w.write_record("data.pkl", pkl, len(pkl))
    for name, data in {".format_version": b"1", ".storage_alignment": b"64", "byteorder": b"little",
                       **{f"data/{k}": v for k, v in (records or {"0": bytes(16)}).items()}}.items():
        w.write_record(name, data, len(data))
    w.write_end_of_file()
    return path


def _outcome(path: Path, monkeypatch=None):
    """load_rank_file's result, or its error: (type, one-line message)."""
    try:
        return load_rank_file(path)
    except Exception as e:
        return type(e), str(e)


def _today(path: Path, monkeypatch) -> object:
    """What load_rank_file does with torch.load alone (the fast loader always giving up)."""
    def give_up(p):
        raise fast_load.GiveUp("test")
    with monkeypatch.context() as m:
        m.setattr(fast_load, "load", give_up)
        return _outcome(path)


def _assert_as_today(path: Path, monkeypatch) -> None:
    """fast_load gives up on `path`, and load_rank_file then does exactly what it does without fast_load."""
    with pytest.raises(fast_load.GiveUp):
        fast_load.load(path)
    now, before = _outcome(path), _today(path, monkeypatch)
    if isinstance(before, tuple):
        assert now == before
    else:
        _same(now, before)


def test_the_hand_made_archive_loads(tmp_path):
    """Control for the hostile cases below: the unaltered hand-made pickle takes the fast path."""
    path = _archive(tmp_path / "ok.pt", _rank(_s("w") + _tensor()))
    assert_loads_as_torch(path)
    assert load_rank_file(path)["model"]["w"].tolist() == [0.0] * 4


@pytest.fixture
def sentinel(tmp_path):
    p = tmp_path / "EXECUTED"
    yield p
    assert not p.exists(), "the pickle ran code"


def _call(module: str, name: str, *args: str) -> bytes:
    return _g(module, name) + b"(" + b"".join(map(_s, args)) + b"tR"


@pytest.mark.parametrize("module,name,how", [("os", "system", "touch {}"), ("posix", "system", "touch {}"),
                                             ("builtins", "eval", "open({!r}, 'w')"),
                                             ("builtins", "exec", "open({!r}, 'w')")])
def test_dangerous_globals_are_refused_unrun(tmp_path, monkeypatch, sentinel, module, name, how):
    path = _archive(tmp_path / "m.pt", _rank(_s("w") + _tensor(), _s("x") + _call(module, name,
                                                                                  how.format(str(sentinel)))))
    _assert_as_today(path, monkeypatch)
    assert isinstance(_outcome(path), tuple) and _outcome(path)[0] is StepconvError


@pytest.mark.parametrize("module,name", [("builtins", "getattr"), ("builtins", "setattr"), ("builtins", "__import__"),
                                         ("builtins", "object"), ("builtins", "type"), ("builtins", "list"),
                                         ("builtins", "set"), ("builtins", "bytearray"), ("copyreg", "_reconstructor"),
                                         ("torch", "load"), ("torch", "Tensor"), ("torch._utils", "_rebuild_parameter"),
                                         ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "device"),
                                         ("torch.serialization", "_get_layout"), ("collections", "Counter"),
                                         ("argparse", "ArgumentParser"), ("pathlib", "PosixPath"),
                                         ("torch", "UntypedStorage"), ("torch.storage", "TypedStorage")])
def test_every_global_outside_the_list_gives_up(tmp_path, module, name):
    """Widening the allowlist (getattr would reach anything) fails here."""
    path = _archive(tmp_path / "m.pt", _rank(_s("w") + _tensor(), _s("x") + _g(module, name)))
    with pytest.raises(fast_load.GiveUp, match="global"):
        fast_load.load(path)


HOSTILE = {
    # a REDUCE on an allowed callable with arguments it is not given by torch.save (weights_only accepts both)
    "OrderedDict with items": _rank(_s("w") + _g("collections", "OrderedDict") + b"(](" + _s("a") + _i(1)
                                    + b"tatR"),
    "Namespace called": _rank(_s("w") + _g("argparse", "Namespace") + b")R"),
    "rebuild on a string storage": _rank(_s("w") + _g("torch._utils", "_rebuild_tensor_v2") + b"(" + _s("x")
                                         + _i(0) + _tup((4,)) + _tup((1,)) + b"\x89" + OD + b"tR"),
    "rebuild with requires_grad": _rank(_s("w") + _tensor().replace(b"\x89" + OD, b"\x88" + OD)),
    # backward hooks: torch.load sets tensor._backward_hooks to whatever the pickle gives
    "non-empty backward hooks": _rank(_s("w") + _tensor(hooks=OD + b"(" + _s("h") + _i(1) + b"u")),
    "hooks filled after the call": _rank(_s("w") + _tensor(hooks=OD + b"q\x07") + _s("v") + b"h\x07"
                                         + b"(" + _s("h") + _i(1) + b"u"),
    # persistent ids
    "missing record": _rank(_s("w") + _tensor(key="9")),
    "record shorter than the storage": _rank(_s("w") + _tensor(numel=8, size=(8,))),
    "record longer than the storage": _rank(_s("w") + _tensor(numel=2, size=(2,))),
    "tensor beyond its storage": _rank(_s("w") + _tensor(size=(5,))),
    "storage reused as another dtype": _rank(_s("w") + _tensor() + _s("v") + _tensor(storage="IntStorage")),
    "location not cpu": _rank(_s("w") + _tensor().replace(_s("cpu"), _s("mps"))),
    "persistent id not storage": _rank(_s("w") + b"(" + _s("module") + _i(1) + b"tQ"),
    # opcodes weights_only does not implement
    "INST": lambda sentinel: _rank(_s("w") + b"(" + _s(f"touch {sentinel}") + b"ios\nsystem\n"),
    "OBJ": _rank(_s("w") + b"(" + _g("argparse", "Namespace") + b"o"),
    "INST of an allowed class": _rank(_s("w") + b"(iargparse\nNamespace\n"),
    "PERSID (text)": _rank(_s("w") + b"P0\n"),
    "STACK_GLOBAL": lambda sentinel: _rank(_s("w") + _s("os") + _s("system") + b"\x93(" + _s(f"touch {sentinel}")
                                           + b"tR"),
    "DUP and POP": _rank(_s("w") + _i(1) + b"2" + b"0"),
    "protocol 4": _rank(_s("w") + _i(1)).replace(b"\x80\x02", b"\x80\x04", 1),
    # BUILD: monkey-patching a class, setting a tensor's state, a no-op BUILD on a list
    "BUILD on the Namespace class": _rank(_s("w") + _g("argparse", "Namespace") + b"N}(" + _s("__eq__")
                                          + _g("collections", "OrderedDict") + b"u\x86b"),
    "BUILD on a tensor": _rank(_s("w") + _tensor() + b"((" + _s("storage") + _g("torch", "FloatStorage") + _s("0")
                               + _s("cpu") + _i(4) + b"tQ" + _i(1) + _tup((3,)) + _tup((1,)) + b"tb"),
    "BUILD None on a list": _rank(_s("w") + b"]Nb"),
    "BUILD None on a dict": _rank(_s("w") + b"}Nb"),
    "BUILD None on a string": _rank(_s("w") + _s("x") + b"Nb"),
    "BUILD on the rebuild function": _rank(_s("w") + _g("torch._utils", "_rebuild_tensor_v2") + b"}("
                                           + _s("__defaults__") + _i(1) + b"ub"),
    "BUILD twice on an OrderedDict": _rank(_s("w") + OD + b"}b}b"),
    # empty batches (C: a no-op on anything; weights_only: only on a list/dict)
    "empty SETITEMS on a tuple": _rank(_s("w") + b")(u"),
    "empty APPENDS on a dict": _rank(_s("w") + b"}(e"),
    "SETITEM on a list": _rank(_s("w") + b"]" + _i(0) + b"a" + _i(0) + _i(5) + b"s"),
    "SETITEMS on a list": _rank(_s("w") + b"]" + _i(0) + b"a(" + _i(0) + _i(5) + b"u"),
    "the GLOBAL fast_load puts in for a list": _rank(_s("w") + _g(" stepconv", "list") + b")R"),
    "SETITEM on a tensor": _rank(_s("w") + _tensor() + _i(0) + _i(1) + b"s"),
    "APPEND on an OrderedDict": _rank(_s("w") + OD + _i(1) + b"a"),
    "memo index beyond 2**22": _rank(_s("w") + _i(1) + b"r\x00\x00\x40\x00"),
    "no STOP": _rank(_s("w") + _i(1))[:-1],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pickles_give_up_and_load_as_today(tmp_path, monkeypatch, sentinel, case):
    pkl = HOSTILE[case]
    path = _archive(tmp_path / "m.pt", pkl if isinstance(pkl, bytes) else pkl(sentinel))
    _assert_as_today(path, monkeypatch)
    assert argparse.Namespace.__eq__ is object.__eq__ or argparse.Namespace.__eq__.__module__ == "argparse"
    assert torch._utils._rebuild_tensor_v2.__defaults__ == (None,)


def test_ext_opcodes_are_refused_even_with_a_primed_extension_cache(tmp_path, monkeypatch, sentinel):
    """EXT fetches from copyreg's process-wide cache without asking find_class: primed with os.system by another
    unpickler in the process, it would hand the pickle os.system."""
    copyreg.add_extension("os", "system", 240)
    try:
        pickle.loads(b"\x80\x02\x82\xf0.")  # (the permissive unpickler caches os.system under code 240)
        path = _archive(tmp_path / "m.pt", _rank(_s("w") + b"\x82\xf0(" + _s(f"touch {sentinel}") + b"tR"))
        _assert_as_today(path, monkeypatch)
    finally:
        copyreg.remove_extension("os", "system", 240)
        copyreg.clear_extension_cache()


def test_give_up_is_not_swallowed_for_damaged_archives(tmp_path, monkeypatch):
    """A truncated or non-zip file: the fast loader gives up and the error is torch's, as before."""
    good = _archive(tmp_path / "ok.pt", _rank(_s("w") + _tensor()))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:-30])
    for p in (bad,):
        with pytest.raises((fast_load.GiveUp, StepconvError)):
            fast_load.load(p)
        assert _outcome(p) == _today(p, monkeypatch)


# --- torch_dist chunks: load_bytes ------------------------------------------------------------------------------
def test_torch_dist_chunks_load_as_with_torch(tmp_path, fixture_dir):
    """Every chunk blob of a torch_dist export: load_bytes gives torch.load(BytesIO)'s tensor, on its own copy."""
    from torch.distributed.checkpoint import FileSystemReader

    hf_to_mcore(fixture_dir, tmp_path / "m", tp=2, format="torch_dist")
    it = tmp_path / "m" / "release"
    infos = [i for i in FileSystemReader(str(it)).read_metadata().storage_data.values()
             if not i.relative_path.startswith("__objects")]
    assert len(infos) > 50
    for info in infos:
        with open(it / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        ours = fast_load.load_bytes(blob)
        _same(ours, torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
        assert ours.untyped_storage().resizable()  # (owned memory, as torch's reader gives; not a view of `blob`)


@pytest.mark.parametrize("case", ["dangerous global", "INST", "record shorter than the storage"])
def test_load_bytes_gives_up_on_hostile_blobs(tmp_path, sentinel, case):
    pkl = {"dangerous global": _call("os", "system", f"touch {sentinel}") + b".",
           "INST": b"(" + _s(f"touch {sentinel}") + b"ios\nsystem\n.",
           "record shorter than the storage": _tensor(numel=8, size=(8,)) + b"."}[case]
    blob = _archive(tmp_path / "c.pt", b"\x80\x02" + pkl).read_bytes()
    with pytest.raises(fast_load.GiveUp):
        fast_load.load_bytes(blob)
    assert fast_load.load_bytes(_archive(tmp_path / "ok.pt", b"\x80\x02" + _tensor() + b".").read_bytes()).numel() == 4



_READER = torch._C.PyTorchFileReader


class _OlderReader:
    """torch's zip reader as torch 2.11 has it: no `get_record_size`."""

    def __init__(self, source):
        self._r = _READER(source)

    def __getattr__(self, name):
        if name == "get_record_size":
            raise AttributeError(name)
        return getattr(self._r, name)


def test_a_torch_whose_reader_cannot_tell_record_sizes_still_loads_fast(tmp_path, fixture_dir, monkeypatch):
    """torch 2.11's PyTorchFileReader has no get_record_size, and fast_load gave up on every file there (torch.load
    then read them, slowly): the sizes come from the zip's central directory instead, for rank files and blobs
    (torch_dist chunks) alike, with torch.load's result; a record shorter than its storage still gives up."""
    hf_to_mcore(fixture_dir, tmp_path / "m", tp=2)
    paths = sorted((tmp_path / "m" / "release").glob("*/model_optim_rng.pt"))
    ok = _archive(tmp_path / "ok.pt", b"\x80\x02" + _tensor() + b".").read_bytes()
    short = _archive(tmp_path / "short.pt", b"\x80\x02" + _tensor(numel=8, size=(8,)) + b".").read_bytes()
    monkeypatch.setattr(torch._C, "PyTorchFileReader", _OlderReader)
    calls = []
    monkeypatch.setattr(fast_load, "central_directory", lambda *a: calls.append(a) or central_directory(*a))
    for path in paths:
        assert_loads_as_torch(path)
    _same(fast_load.load_bytes(ok), torch.load(io.BytesIO(ok), map_location="cpu", weights_only=True))
    assert len(calls) == len(paths) + 1  # (the sizes came from the central directory)
    with pytest.raises(fast_load.GiveUp, match="not a record of 32 bytes"):
        fast_load.load_bytes(short)
