"""A rank file's data.pkl, the pickle torch.save writes for `{"args": ..., "model": {key: tensor}}`, with the tensor
references' opcodes written by our own code.

torch.save pickles each tensor as `_rebuild_tensor_v2(<persistent storage id>, 0, shape, stride, False, OrderedDict())`
through Python hooks (`persistent_id` for every object the pickler saves, `reducer_override` for every instance): ~19
Python calls a tensor, ~0.75-1.1 s for the 24.7k references of a rank file at the real tensor count on the 2-core
machine (issue 11). The opcodes of a reference are fixed but for its names, numbers and memo indices, so `dumps`
writes them itself (~20x faster), and leaves everything else (`args`, the top-level keys) to the same pickler as
before (`Pickler`), whose memo it continues.

The bytes are exactly `Pickler(f, protocol=2).dump(obj)`'s: the C pickler's rules followed here (protocol 2: no
frames, BINUNICODE for every str, BINPUT/LONG_BINPUT after every memoized object: str, non-empty tuple, global,
reduced instance; BINGET/LONG_BINGET for an object saved before, by identity, including strings `args` holds;
SETITEMS batches of 1000 items, SETITEM alone for a last batch of one) are checked against it once per process
(`matches_pickler`, else `Pickler` writes everything) and by tests/test_torch_pickle.py on varied state dicts.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from operator import attrgetter
from typing import Any, Sequence

import torch


@dataclass(slots=True)
class StorageRef:
    """A record of the rank file (`data/<key>`) holding `numel` elements of `dtype`."""

    key: str
    dtype: torch.dtype
    numel: int


@dataclass(slots=True)
class TensorRef:
    """A contiguous tensor of `shape` over a whole record; pickled as torch.save pickles a tensor."""

    storage: StorageRef
    shape: tuple[int, ...]


def storage_class(dtype: torch.dtype):
    name = torch.storage._dtype_to_storage_type_map()[dtype]  # e.g. "BFloat16Storage", as torch.save pickles it
    return getattr(torch, name)


class Pickler(pickle.Pickler):
    """torch.save's pickling of `TensorRef`s (the reference `dumps` is checked against, and its fallback)."""

    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", storage_class(obj.dtype), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, TensorRef):
            return (torch._utils._rebuild_tensor_v2,
                    (obj.storage, 0, tuple(obj.shape), _stride(obj.shape), False, OrderedDict()))
        return NotImplemented


def _stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


def pickler_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


BATCH = 1000  # the C pickler's BATCHSIZE: items per SETITEMS
_PUT, _LONG_PUT = struct.Struct("<cB"), struct.Struct("<cI")
_INT1, _INT2, _INT4 = struct.Struct("<cB"), struct.Struct("<cH"), struct.Struct("<ci")
_LEN = struct.Struct("<I")
_TUPLES = {1: b"\x85", 2: b"\x86", 3: b"\x87"}  # TUPLE1..3; longer tuples: MARK ... TUPLE


def _global_op(obj) -> bytes:
    """The GLOBAL opcode the pickler writes for a class or function (its own name mapping applied)."""
    raw = pickle.dumps(obj, protocol=2)  # PROTO 2, GLOBAL ..., BINPUT 0, STOP
    if not (raw[:2] == b"\x80\x02" and raw[2:3] == b"c" and raw[-3:] == b"q\x00."):
        raise ValueError(f"unexpected pickle of {obj!r}")
    return raw[2:-3]


def _int_op(v: int) -> bytes:
    if 0 <= v <= 0xFF:
        return _INT1.pack(b"K", v)
    if 0 <= v <= 0xFFFF:
        return _INT2.pack(b"M", v)
    if -0x80000000 <= v <= 0x7FFFFFFF:
        return _INT4.pack(b"J", v)
    data = pickle.encode_long(v)
    return (b"\x8a" + bytes([len(data)]) if len(data) < 256 else b"\x8b" + _LEN.pack(len(data))) + data


def _consts(memo: dict, rebuild, odict, get_op) -> tuple[bytes, bytes, bytes] | None:
    """The BINGETs of a reference's constants once all are memoized: (rebuild function, MARK, MARK, "storage"),
    ("cpu"), (OrderedDict)."""
    ids = [memo.get(id(x)) for x in (rebuild, "storage", "cpu", odict)]
    if None in ids:
        return None
    return get_op(ids[0]) + b"((" + get_op(ids[1]), get_op(ids[2]), b"\x89" + get_op(ids[3]) + b")R"


def _distinct(models: list, memo: dict) -> bool:
    """Is every object the references save (keys, storage keys, non-empty shapes, the references) a different object,
    none of them saved before (in `memo`) or a constant the references share? Then none is ever saved twice, and
    `_dumps` need not memoize them (the pickler would emit a BINGET only for an object it saw before). Checked with
    C-level set operations: 4 memo lookups and stores a reference cost ~30% of its time."""
    keys = [k for _, od in models for k in od]
    refs = [v for _, od in models for v in od.values() if v is not None]
    shapes = [r.shape for r in refs if r.shape]
    seen = set(map(id, keys))
    seen.update(map(id, refs), map(id, shapes), map(id, map(_STORAGE_KEY, refs)))
    shared = {id(x) for x in ("storage", "cpu", torch._utils._rebuild_tensor_v2, OrderedDict)}
    shared.update(id(name) for name, _ in models)
    shared.update(id(storage_class(d)) for d in {r.storage.dtype for r in refs})
    return len(seen) == len(keys) + 2 * len(refs) + len(shapes) and seen.isdisjoint(memo) and seen.isdisjoint(shared)


_STORAGE_KEY = attrgetter("storage.key")


def _plain_model(od) -> bool:
    """An OrderedDict of str keys -> TensorRef (with int shapes) or None: what `dumps` writes itself."""
    if type(od) is not OrderedDict:
        return False
    for k, v in od.items():
        if type(k) is not str:
            return False
        if v is not None and not (type(v) is TensorRef and type(v.shape) is tuple and type(v.storage.key) is str
                                  and type(v.storage.numel) is int and all(type(d) is int for d in v.shape)):
            return False
    return True


def dumps(obj: Any) -> bytes:
    """`Pickler(f, protocol=2).dump(obj)`'s bytes for a rank file's state dict: a dict of at most 1000 items whose
    last ones are the model chunks (OrderedDicts of TensorRef or None) after at least two others (args,
    checkpoint_version, iteration). Anything else, or a Python whose pickler writes otherwise, goes to `Pickler`."""
    items = list(obj.items()) if type(obj) is dict else []
    split = _models_from(items)
    if split < 2 or split == len(items) or len(items) > BATCH or not matches_pickler():
        return pickler_dumps(obj)
    return _dumps(items[:split], items[split:])


def _models_from(items: list) -> int:
    """Where the trailing model chunks (str name -> `_plain_model`) of a state dict's items begin."""
    split = len(items)
    while split and type(items[split - 1][0]) is str and _plain_model(items[split - 1][1]):
        split -= 1
    return split


def _dumps(head_items: list, models: list) -> bytes:
    head = dict(head_items)
    buf = io.BytesIO()
    p = Pickler(buf, protocol=2)
    p.dump(head)
    raw = buf.getvalue()
    # PROTO 2, EMPTY_DICT, BINPUT 0, MARK, <head items>, SETITEMS, STOP: the state dict's items continue before SETITEMS
    if raw[:6] != b"\x80\x02}q\x00(" or raw[-2:] != b"u.":
        raise ValueError("unexpected pickle of a rank file's header items")
    held = p.memo.copy()  # id -> (index, object): the objects stay alive while `held` does
    memo = {k: v[0] for k, v in held.items()}
    n = len(memo)
    out = [raw[:-2]]
    put = out.append

    def memo_op(index: int) -> bytes:  # BINPUT / LONG_BINPUT
        return _PUT.pack(b"q", index) if index < 256 else _LONG_PUT.pack(b"r", index)

    def get_op(index: int) -> bytes:  # BINGET / LONG_BINGET
        return _PUT.pack(b"h", index) if index < 256 else _LONG_PUT.pack(b"j", index)

    def save_str(s: str) -> None:
        nonlocal n
        i = memo.get(id(s))
        if i is not None:
            put(get_op(i))
            return
        data = s.encode("utf-8", "surrogatepass")
        put(b"X" + _LEN.pack(len(data)) + data + memo_op(n))
        memo[id(s)] = n
        n += 1

    def save_global(g, op: bytes) -> None:
        nonlocal n
        i = memo.get(id(g))
        if i is not None:
            put(get_op(i))
            return
        put(op + memo_op(n))
        memo[id(g)] = n
        n += 1

    def ints_tuple(t: tuple) -> bytes:  # a fresh tuple of ints, memoized (its index not yet counted)
        body = b"".join(map(_int_op, t))
        return body + _TUPLES[len(t)] if len(t) <= 3 else b"(" + body + b"t"

    rebuild, odict = torch._utils._rebuild_tensor_v2, OrderedDict
    rebuild_op, odict_op = _global_op(rebuild), _global_op(odict)
    classes: dict[torch.dtype, tuple] = {}
    shapes: dict[tuple, bytes] = {}  # shape -> its tuple's opcodes (not its BINPUT)

    def save_ref(ref: TensorRef) -> None:
        """A reference, every object through the memo (the general path)."""
        nonlocal n
        st = ref.storage
        save_global(rebuild, rebuild_op)
        put(b"((")  # MARK of the 6 arguments, MARK of the storage's persistent id
        save_str("storage")
        cls = classes.get(st.dtype)
        if cls is None:
            c = storage_class(st.dtype)
            cls = classes[st.dtype] = (c, _global_op(c))
        save_global(cls[0], cls[1])
        save_str(st.key)
        save_str("cpu")
        shape = ref.shape
        put(_int_op(st.numel) + b"t" + memo_op(n) + b"QK\x00")  # the id tuple, BINPERSID, offset 0
        n += 1
        i = memo.get(id(shape))
        if i is not None:
            put(get_op(i))
        elif shape:
            put(ints_tuple(shape) + memo_op(n))
            memo[id(shape)] = n
            n += 1
        else:
            put(b")")  # EMPTY_TUPLE (not memoized)
        if shape:
            put(ints_tuple(_stride(shape)) + memo_op(n) + b"\x89")  # stride, False
            n += 1
        else:
            put(b")\x89")
        save_global(odict, odict_op)
        # EMPTY_TUPLE, REDUCE: OrderedDict() memoized; the arguments' TUPLE memoized; REDUCE; the TensorRef
        put(b")R" + memo_op(n) + b"t" + memo_op(n + 1) + b"R" + memo_op(n + 2))
        memo[id(ref)] = n + 2
        n += 3

    r = _LONG_PUT.pack
    get = memo.get
    distinct = _distinct(models, memo)
    consts: tuple[bytes, bytes, bytes] = (b"", b"", b"")
    for name, od in models:
        save_str(name)
        i = memo.get(id(od))
        if i is not None:  # (the same chunk object under a second name)
            put(get_op(i))
            continue
        save_global(odict, odict_op)
        put(b")R" + memo_op(n))  # EMPTY_TUPLE, REDUCE: the model chunk, memoized
        memo[id(od)] = n
        n += 1
        items, left = iter(od.items()), len(od)
        while left:
            size = min(left, BATCH)
            left -= size
            if size > 1:
                put(b"(")
            for key, ref in islice(items, size):
                if ref is None:
                    save_str(key)
                    put(b"N")
                    continue
                st, shape = ref.storage, ref.shape
                skey = st.key
                cls = classes.get(st.dtype)
                # the common case, once the constants are memoized and indices need 4 bytes: every object new,
                # the reference's opcodes in one piece (BINPUTs at n .. n+7, a BINGET for each constant)
                if (n >= 256 and shape and cls is not None and len(cls) == 3
                        and (distinct or (get(id(key)) is None and get(id(skey)) is None and get(id(shape)) is None
                                          and get(id(ref)) is None))):
                    shape_op = shapes.get(shape)
                    if shape_op is None:
                        shape_op = shapes[shape] = (b"QK\x00" + ints_tuple(shape), ints_tuple(_stride(shape)))
                    kb = key.encode("utf-8", "surrogatepass")
                    sb = skey.encode("utf-8", "surrogatepass")
                    put(b"".join((b"X", _LEN.pack(len(kb)), kb, r(b"r", n), consts[0], cls[2], b"X", _LEN.pack(len(sb)),
                                  sb, r(b"r", n + 1), consts[1], _int_op(st.numel), b"t", r(b"r", n + 2), shape_op[0],
                                  r(b"r", n + 3), shape_op[1], r(b"r", n + 4), consts[2], r(b"r", n + 5), b"t",
                                  r(b"r", n + 6), b"R", r(b"r", n + 7))))
                    if not distinct:
                        memo[id(key)], memo[id(skey)], memo[id(shape)], memo[id(ref)] = n, n + 1, n + 3, n + 7
                    n += 8
                    continue
                save_str(key)
                save_ref(ref)
                cls = classes[st.dtype]
                if len(cls) == 2 and get(id(cls[0])) is not None:
                    ready = _consts(memo, rebuild, odict, get_op)
                    if ready is not None:
                        consts = ready
                        classes[st.dtype] = (*cls, get_op(memo[id(cls[0])]))
            put(b"u" if size > 1 else b"s")
    put(b"u.")
    del held
    return b"".join(out)


@lru_cache(maxsize=None)
def matches_pickler() -> bool:
    """Does `dumps` write what `Pickler` writes? (Checked once per process on two small state dicts: two model chunks,
    `_extra_state` entries, three dtypes, 0-4 dimensions, strings shared with args, > 256 memo entries, a batch of
    one item, shape tuples each its own and shared; False sends every data.pkl through `Pickler`.)"""
    try:  # (~25 ms) every object new, as RankFileWriter makes them (memo skipped); shared shapes (memo checked)
        return all(ours == theirs for ours, theirs in (dumps_both(sample_state(2, (1001, 3), shared_shapes=False)),
                                                       dumps_both(sample_state(1, 300))))
    except (ValueError, TypeError, KeyError, AttributeError, pickle.PicklingError):
        return False


def sample_state(chunks: int = 2, entries: int | Sequence[int] = 1001, args: Any = None,
                 shared_shapes: bool = True) -> dict:
    """A rank file's state dict of `chunks` model chunks of `entries` keys each (or `entries[c]` in chunk c): tensors of several dtypes and 0-4
    dimensions, every seventh an `_extra_state` (None), every fifth shape tuple shared with other references
    (`shared_shapes`; else each its own, as `RankFileWriter` makes them); `args` by default a Namespace with strings
    the references also use ("cpu", "storage", "0")."""
    import argparse

    if args is None:
        args = argparse.Namespace(device="cpu", kind="storage", first="0", dims=[1, 2], params_dtype=torch.bfloat16)
    dtypes = (torch.bfloat16, torch.float32, torch.float16)
    shapes = ((4, 3), (8,), (), (2, 3, 4), (1, 2, 3, 300), (70000, 2), (0, 5))
    state: dict = {"args": args, "checkpoint_version": 3.0, "iteration": 0}
    k = 0
    for c in range(chunks):
        od: OrderedDict = OrderedDict()
        for i in range(entries if isinstance(entries, int) else entries[c]):
            key = f"decoder.layers.{i}.weight"
            if i % 7 == 6:
                od[key + "._extra_state"] = None
            else:
                shape = shapes[i % len(shapes)]
                numel = 1
                for d in shape:
                    numel *= d
                od[key] = TensorRef(StorageRef(str(k), dtypes[i % len(dtypes)], numel),
                                    shape if shared_shapes and i % 5 == 4 else tuple(list(shape)))
            k += 1
        state["model" if chunks == 1 else f"model{c}"] = od
    return state


def dumps_both(obj: Any) -> tuple[bytes, bytes]:
    """(our bytes, the pickler's) for a state dict `dumps` writes itself: for the self-check and the tests."""
    items = list(obj.items())
    split = _models_from(items)
    return _dumps(items[:split], items[split:]), pickler_dumps(obj)
