"""A faster `torch.load(path, map_location="cpu", mmap=True, weights_only=True)` for the torch.save files stepconv
reads (legacy rank files, `common.pt`; `load_bytes`: torch_dist chunks), which accepts strictly less than weights_only
does and otherwise gives up.

Why: weights_only's unpickler is a Python loop over every opcode, and its per-storage path (`load_tensor`,
`detect_fake_mode`, TypedStorage wrappers) costs ~190 us a tensor: ~4.7 s for one 1/64-scale rank file of 24,675
tensors on the 2-core machine, most of an export at small widths. Here the pickle runs on the C unpickler: 1.1-1.7
CPU-s for that file on the same (shared, loaded) machine, 45-70 us a tensor, ~20 us of it torch's own `empty`,
`set_` and storage slice (docs/BENCHMARKS.md, "fast_load").

`load(path)` returns what torch.load returns (same keys and values; every tensor with the same dtype, shape,
stride, storage offset and bytes, its storage a slice of one `UntypedStorage.from_file` mapping of the whole file at
the record's offset, as torch.load(mmap=True) maps it), or raises `GiveUp` having run nothing of the pickle's
choosing; the caller then loads with torch.load(weights_only=True), so what is accepted or refused, and every error
message, stays torch's. Giving up is always safe; it only costs time.

Why untrusted bytes cannot do more here than under weights_only (the C unpickler runs every opcode it knows, so
the confinement is in what the pickle can reach):

1. Opcodes. Before unpickling, the whole opcode stream is parsed (`_scan`) and anything outside the opcodes
   weights_only's own unpickler implements is refused: no INST/OBJ (which instantiate), no EXT1/2/4 (which fetch
   objects from copyreg's process-wide extension cache without asking `find_class`), no PERSID/STRING/BINBYTES/
   frames/NEWOBJ_EX/STACK_GLOBAL/POP/DUP, no PROTO other than 2 at the start. The scan parses exactly as the C
   unpickler does (left to right, each opcode's argument length fixed or given by its length prefix), and stops
   at the first STOP as it does. LONG_BINPUT indices above 2**22 are refused: the C unpickler's memo is an array
   as long as the largest index (a 10-byte pickle could otherwise make it allocate gigabytes).
2. Names. `find_class` (GLOBAL) admits an explicit list, each a subset of weights_only's defaults or of what
   stepconv registers for it (argparse.Namespace): `torch._utils._rebuild_tensor_v2`, `collections.OrderedDict`,
   `argparse.Namespace`, torch's legacy storage classes (`torch.FloatStorage`..) and torch dtypes. None of them is
   returned as itself except the dtypes (immutable, not callable): the pickle gets stand-ins of ours, all without
   `__dict__`, which refuse attribute assignment:
   - REDUCE (call the object below the arguments): the only callables a pickle can reach are ours. The
     `_rebuild_tensor_v2` stand-in checks its arguments (a storage from our `persistent_load`, a non-negative int
     offset, tuples of non-negative ints of equal length that stay inside the storage, requires_grad False,
     backward_hooks an OrderedDict stand-in that is still empty and without state, metadata None or empty) and
     records them; no tensor exists until the end. The OrderedDict stand-in accepts no arguments and returns an
     empty dict of ours. The Namespace class stand-in refuses to be called (its metaclass), so it can only be
     created by NEWOBJ, with no arguments. A storage class is a marker, not callable.
   - NEWOBJ (`cls.__new__(cls, *args)`, only for types): only the Namespace stand-in is a type.
   - BUILD (`inst.__setstate__(state)`, else update `inst.__dict__` / setattr): every object of ours defines
     `__setstate__`; it refuses, except the OrderedDict and Namespace stand-ins', which take one dict of str keys
     (what weights_only does for them), once. The C unpickler's BUILD with state None is a silent no-op on any
     object without `__setstate__` (weights_only refuses it on anything but its allowed types), so the stand-ins
     holding a state in the result must be as many as the BUILD opcodes the scan saw. Builtins on the stack (str,
     tuple, dict, ...) have neither `__setstate__` nor `__dict__`: BUILD on them fails or is that no-op.
   - APPEND(S)/SETITEM(S) on anything but a list/dict look up `append`/`extend` or `__setitem__` on it; none of
     our objects has them (the OrderedDict stand-in is a dict, as an OrderedDict is). An empty APPENDS/SETITEMS
     (MARK directly before it) is a no-op in C whatever the target: refused by the scan. The C unpickler also
     assigns list items (SETITEM with an int key), which weights_only refuses: the scan replaces each EMPTY_LIST
     by a GLOBAL of ours (a module name with a space, refused where the pickle itself names it), EMPTY_TUPLE,
     REDUCE, which pushes a `_List`, a list that refuses item assignment (APPEND(S) extend it, as they do a list).
     A pickle has no positions in it, so replacing an opcode by others with the same stack effect changes nothing
     else.
   - BINPERSID calls our `persistent_load`, which accepts only ('storage', <storage class marker>, key, 'cpu' or
     'cuda[:N]', numel) where `data/<key>` is a record of exactly numel * itemsize bytes (a key seen before: the
     same dtype and numel), and returns a marker.
   No other opcode calls anything: the rest push constants, build tuples, or read and write the memo.
3. The result. After unpickling, one walk (`_Build`) turns the stand-ins into what torch.load builds: tensors
   (`torch.empty(0, dtype).set_(storage slice, offset, size, stride)`, requires_grad False, `_backward_hooks` the
   empty OrderedDict, as `torch._utils._rebuild_tensor_v2` does), OrderedDicts (and their `__dict__` state),
   Namespaces and lists; dicts are updated in place, tuples rebuilt, sharing kept. Anything else reachable (a
   storage marker outside a tensor, a stand-in callable, a value of another type) gives up.
The archive: torch's own zip reader (`torch._C.PyTorchFileReader`) finds the records and their offsets, as
torch.load does, and their sizes (a torch whose reader cannot tell them, 2.11 for one: the zip's central directory,
`torch_zip.central_directory`, where the archive is laid out as torch's writer lays it out); a TorchScript archive
(`constants.pkl`), a `byteorder` other than "little", a non-default load endianness or a big-endian host give up.
"""

from __future__ import annotations

import argparse
import io
import operator
import os
import pickle
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .torch_zip import central_directory


class GiveUp(Exception):
    """The fast loader does not handle this file (the caller loads it with torch.load(weights_only=True))."""


# --- 1. the opcode stream ---------------------------------------------------------------------------------------
# opcodes weights_only implements (torch/_weights_only_unpickler.py), by argument length; the ones counted or
# checked (BUILD, APPEND(S), SETITEM(S)) and those with a length prefix (BINUNICODE, SHORT_BINSTRING, LONG1), GLOBAL
# and STOP are handled one at a time in `_scan`, the rest skipped in runs by one regex
_NO_ARG = b"\x81R(t\x85\x86\x87N\x89\x88)}\x8fQ"  # NEWOBJ REDUCE MARK TUPLE TUPLE1-3 NONE NEWFALSE NEWTRUE
#                                                 EMPTY_TUPLE EMPTY_DICT EMPTY_SET BINPERSID
_RUN = re.compile(b"(?:[" + re.escape(_NO_ARG) + b"]|[Khq].|M..|[Jj]....|r..[\\x00-\\x3f]\\x00|G.{8})*+", re.S)
_COUNTED = frozenset(b"baesu")  # BUILD APPEND APPENDS SETITEMS SETITEM
_LEN4, _LEN1 = ord("X"), frozenset(b"U\x8a")  # BINUNICODE; SHORT_BINSTRING, LONG1
_GLOBAL, _STOP, _MARK, _EMPTY_LIST = ord("c"), ord("."), ord("("), ord("]")
_OWN_MODULE = " stepconv"  # (not a module name: GLOBALs of ours, put in by `_scan`, refused in the pickle itself)
_NEW_LIST = f"c{_OWN_MODULE}\nlist\n)R".encode()  # GLOBAL, EMPTY_TUPLE, REDUCE: pushes a `_List`, as ] pushes a list


def _scan(data: bytes) -> tuple[bytes, int]:
    """Parse the opcode stream as the C unpickler will; refuse any opcode weights_only does not implement, and an
    empty APPENDS/SETITEMS. Returns the pickle with each EMPTY_LIST made a `_List` of ours, and the number of BUILD
    opcodes."""
    if data[:2] != b"\x80\x02":
        raise GiveUp("not pickle protocol 2")
    pos, n, builds, prev, lists = 2, len(data), 0, -1, []
    match = _RUN.match
    while True:
        end = match(data, pos).end()
        if end > pos:
            prev = -1  # (only MARK matters, right before APPENDS/SETITEMS)
            if data[end - 1] == _MARK:
                prev = _MARK  # (or an argument byte equal to it: a false alarm only gives up)
            pos = end
        if pos >= n:
            raise GiveUp("pickle ends without STOP")
        op = data[pos]
        if op == _LEN4:
            pos += 5 + int.from_bytes(data[pos + 1:pos + 5], "little")
        elif op in _LEN1:
            pos += 2 + (data[pos + 1] if pos + 1 < n else 0)
        elif op in _COUNTED:
            if op in b"eu" and prev == _MARK:
                raise GiveUp("empty APPENDS/SETITEMS")
            builds += op == ord("b")
            pos += 1
        elif op == _EMPTY_LIST:
            lists.append(pos)
            pos += 1
        elif op == _GLOBAL:
            nl = data.find(b"\n", pos + 1)
            if data[pos + 1:nl] == _OWN_MODULE.encode():
                raise GiveUp("a GLOBAL of ours in the pickle")
            nl = data.find(b"\n", nl + 1) if nl >= 0 else nl
            if nl < 0:
                raise GiveUp("GLOBAL without its lines")
            pos = nl + 1
        elif op == _STOP:
            break
        else:
            raise GiveUp(f"opcode {bytes([op])!r} at {pos}")
        prev = -1
    if lists:  # (a pickle has no positions in it: opcodes can be replaced by others of the same stack effect)
        data = _NEW_LIST.join(data[i + 1:j] for i, j in zip([-1] + lists, lists + [pos + 1]))
    else:
        data = data[:pos + 1]
    return data, builds


# --- 2. what the pickle can reach -------------------------------------------------------------------------------
class _Inert:
    """Base of our stand-ins: no `__dict__`, no attribute assignment, BUILD refused."""
    __slots__ = ()

    def __setattr__(self, name, value):
        raise GiveUp("attribute assignment")

    def __setstate__(self, state=None):
        raise GiveUp("BUILD on a stand-in")


class _StorageType(_Inert):
    """`torch.FloatStorage` & co.: only a marker for `persistent_load` (the dtype of the storage it names)."""
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        object.__setattr__(self, "dtype", dtype)


class _Record(tuple):
    """A stand-in that is a tuple of its fields (made at C speed: ~25k a rank file); BUILD refused."""
    __slots__ = ()

    def __setstate__(self, state=None):
        raise GiveUp("BUILD on a stand-in")


class _List(list):
    """A list that refuses SETITEM (the C unpickler assigns list items, weights_only does not); APPEND(S) extend it."""
    __slots__ = ()

    def __setitem__(self, index, value):
        raise GiveUp("SETITEM on a list")

    def __setstate__(self, state=None):
        raise GiveUp("BUILD on a list")


def _new_list(*args) -> _List:
    if args:
        raise GiveUp("list with arguments")
    return _List()


class _Storage(_Record):
    """(key, dtype, nbytes, file offset) of a storage a persistent id names."""
    __slots__ = ()


class _Tensor(_Record):
    """(_Storage, offset, size, stride, backward_hooks) of a `_rebuild_tensor_v2` call."""
    __slots__ = ()


class _Stateful:
    """BUILD (`__setstate__`) once, with a dict of str keys, kept in `state` (what weights_only puts in `__dict__`)."""
    __slots__ = ()

    def __setattr__(self, name, value):
        raise GiveUp("attribute assignment")

    def __setstate__(self, state=None):
        if not isinstance(self, _Stateful) or type(state) is not dict or not all(type(k) is str for k in state) \
                or self.state is not None:
            raise GiveUp("BUILD state")
        object.__setattr__(self, "state", state)


class _ODict(_Stateful, dict):
    """An OrderedDict as the pickle builds it (REDUCE without arguments, SETITEMS, BUILD of its `__dict__`)."""
    __slots__ = ("state",)


class _NoCall(type):
    def __call__(cls, *args, **kwargs):
        raise GiveUp("call of a class stand-in")


class _Namespace(_Stateful, metaclass=_NoCall):
    """argparse.Namespace as the pickle builds it (NEWOBJ without arguments, BUILD of its `__dict__`); the class
    cannot be called (REDUCE), only NEWOBJ reaches `__new__`."""
    __slots__ = ("state",)
    __getinitargs__ = None  # (INST/OBJ, refused by the scan anyway, would then call the class: refused)

    def __new__(cls, *args):
        if args:
            raise GiveUp("Namespace with arguments")
        self = object.__new__(cls)
        object.__setattr__(self, "state", None)
        return self


def _ordered_dict(*args) -> _ODict:
    if args:
        raise GiveUp("OrderedDict with arguments")
    d = _ODict()
    object.__setattr__(d, "state", None)
    return d


_INT = {int}


def _rebuild_tensor_v2(storage=None, offset=None, size=None, stride=None, requires_grad=None, hooks=None,
                       metadata=None, *more) -> _Tensor:
    # (~25k calls a rank file: the checks are C-level builtins over the tuples)
    if (more or type(storage) is not _Storage or type(offset) is not int or type(size) is not tuple
            or type(stride) is not tuple or len(size) != len(stride) or {*map(type, size), *map(type, stride)} - _INT
            or min((offset, *size, *stride)) < 0 or requires_grad is not False or type(hooks) is not _ODict or hooks
            or hooks.state is not None or not (metadata is None or (type(metadata) is dict and not metadata))):
        raise GiveUp("_rebuild_tensor_v2 arguments")
    if all(size):  # (no element: torch's set_ accepts any offset)
        last = offset + sum(map(operator.mul, size, stride)) - sum(stride)  # offset + sum((n - 1) * s)
        if (last + 1) * storage[1].itemsize > storage[2]:
            raise GiveUp("tensor outside its storage")
    return _Tensor((storage, offset, size, stride, hooks))


class _RebuildTensorV2(_Inert):
    __slots__ = ()
    __call__ = staticmethod(_rebuild_tensor_v2)


class _OrderedDict(_Inert):
    __slots__ = ()
    __call__ = staticmethod(_ordered_dict)


class _NewList(_Inert):
    __slots__ = ()
    __call__ = staticmethod(_new_list)


_STORAGE_NAMES = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensorV2(),
    ("collections", "OrderedDict"): _OrderedDict(),
    ("argparse", "Namespace"): _Namespace,
    (_OWN_MODULE, "list"): _NewList(),  # (only where `_scan` put it)
    **{("torch", n + "Storage"): _StorageType(torch.serialization.StorageType(n + "Storage").dtype)
       for n in _STORAGE_NAMES},
    **{("torch", str(t).split(".", 1)[1]): t for t in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
        torch.int8, torch.uint8, torch.bool)},
}
_LOCATION = re.compile(r"cpu|cuda(:\d+)?")


class _Loader(pickle.Unpickler):
    """The C unpickler, reaching only our stand-ins (module docstring, point 2)."""

    def __init__(self, data: bytes, reader, records: set[str], record_size):
        super().__init__(io.BytesIO(data), encoding="utf-8")  # (torch.load's default encoding)
        self.reader, self.records = reader, records  # torch's zip reader, its "data/<key>" record names
        self.record_size = record_size  # record name -> bytes
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        found = _GLOBALS.get((module, name))
        if found is None:
            raise GiveUp(f"global {module}.{name}")
        return found

    def persistent_load(self, pid):
        if type(pid) is not tuple or len(pid) != 5:
            raise GiveUp("persistent id")
        kind, stype, key, location, numel = pid
        if (type(kind) is not str or kind != "storage" or type(stype) is not _StorageType or type(key) is not str
                or type(location) is not str or (location != "cpu" and not _LOCATION.fullmatch(location))
                or type(numel) is not int or numel < 0):
            raise GiveUp("persistent id")
        nbytes = numel * stype.dtype.itemsize
        seen = self.storages.get(key)
        if seen is not None:
            if seen[1] is not stype.dtype or seen[2] != nbytes:
                raise GiveUp("storage reused with another dtype or size")
            return seen
        name = "data/" + key
        if name not in self.records or self.record_size(name) != nbytes:
            raise GiveUp(f"storage {key!r} is not a record of {nbytes} bytes")
        st = self.storages[key] = _Storage((key, stype.dtype, nbytes, self.reader.get_record_offset(name)))
        return st


# --- 3. the result ----------------------------------------------------------------------------------------------
_PLAIN = (str, int, float, bool, type(None), bytes, torch.dtype)


class _Build:
    """Stand-ins -> torch.load's objects (module docstring, point 3)."""

    def __init__(self, storage):
        self.storage = storage  # (file offset, nbytes) -> the record's UntypedStorage
        self.done: dict[int, Any] = {}  # id(stand-in or container) -> result (sharing and cycles kept)
        self.storages: dict[str, torch.UntypedStorage] = {}
        self.keep: list = []  # what `done` refers to by id stays alive
        self.builds = 0  # stand-ins with a BUILD state

    def value(self, v, depth: int = 0):
        t = type(v)
        if t in _PLAIN:
            return v
        r = self.done.get(id(v))
        if r is not None:
            if r is _BUSY:
                raise GiveUp("a cycle through a tuple")
            return r
        if depth > 100:
            raise GiveUp("nested too deeply")
        self.keep.append(v)
        if t is _Tensor:
            r = self.tensor(v)
        elif t is _ODict:
            r = self.done[id(v)] = OrderedDict()
            done, keep, tensor = self.done, self.keep, self.tensor
            for k, x in v.items():  # (a rank file's model: ~25k tensors, the one hot loop here)
                if type(k) is not str and type(k) is not int:
                    raise GiveUp("a key that is not str or int")
                if type(x) is _Tensor and id(x) not in done:
                    keep.append(x)
                    r[k] = done[id(x)] = tensor(x)
                else:
                    r[k] = self.value(x, depth + 1)
            self.state(r, v, depth)
        elif t is _Namespace:
            r = self.done[id(v)] = argparse.Namespace()
            self.state(r, v, depth)
        elif t is dict:
            self.done[id(v)] = v
            for k, x in v.items():
                v[self.key(k)] = self.value(x, depth + 1)
            return v
        elif t is _List:
            r = self.done[id(v)] = []
            r.extend(self.value(x, depth + 1) for x in v)
        elif t is tuple:
            self.done[id(v)] = _BUSY
            r = tuple(self.value(x, depth + 1) for x in v)
        elif t is set and not v:
            r = v
        else:
            raise GiveUp(f"a {t.__name__} in the result")
        self.done[id(v)] = r
        return r

    def state(self, r, v: _Stateful, depth: int) -> None:
        if v.state is not None:
            self.builds += 1
            r.__dict__.update(self.value(v.state, depth + 1))

    @staticmethod
    def key(k):
        if type(k) not in (str, int):
            raise GiveUp("a key that is not str or int")
        return k

    def tensor(self, v: _Tensor) -> torch.Tensor:
        (key, dtype, nbytes, at), offset, size, stride, hooks = v
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = self.storage(at, nbytes)
        if hooks or hooks.state is not None:  # (filled after the call, through the memo)
            raise GiveUp("backward hooks")
        # as torch._utils._rebuild_tensor_v2 builds it: requires_grad False, _backward_hooks an empty OrderedDict
        t = torch.empty(0, dtype=dtype).set_(st, offset, size, stride)
        h = self.done.get(id(hooks))
        if h is None:
            self.keep.append(hooks)
            h = self.done[id(hooks)] = OrderedDict()
        t._backward_hooks = h
        return t


_BUSY = object()


def load(path: Path) -> Any:
    """torch.load(path, map_location="cpu", mmap=True, weights_only=True)'s result, or GiveUp."""
    if str(path).endswith(".safetensors"):  # (torch.load hands those to safetensors)
        raise GiveUp("a safetensors file")
    with open(path, "rb") as f:
        head = f.read(4)
    shared = torch.serialization.get_default_mmap_options() == torch.serialization.MAP_SHARED

    def mapping():  # as torch.load(mmap=True) maps the file: whole, once; a record's storage is a slice of it
        whole = torch.UntypedStorage.from_file(os.fspath(path), shared, os.path.getsize(path))
        return lambda at, nbytes: whole[at:at + nbytes]
    return _load(head, lambda: torch._C.PyTorchFileReader(str(path)), mapping,
                 lambda: central_directory(path, os.path.getsize(path)))


def load_bytes(blob: bytes) -> Any:
    """torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)'s result (each storage its own copy of
    the record's bytes, as torch's reader gives it), or GiveUp. (A torch_dist chunk: one tensor a blob.)"""
    def copies():
        return lambda at, nbytes: (torch.UntypedStorage.from_buffer(blob, dtype=torch.uint8, offset=at, count=nbytes)
                                   if nbytes else torch.UntypedStorage(0))
    return _load(blob[:4], lambda: torch._C.PyTorchFileReader(io.BytesIO(blob)), copies,
                 lambda: central_directory(None, len(blob), io.BytesIO(blob)))


def _record_sizes(reader, directory):
    """record name -> its bytes: torch's reader's `get_record_size`, or, where this torch's reader has none (torch
    2.11 lacks it; fast_load then gave up on every file and an export of the 6.8 GB 1/8-scale checkpoint spent ~4 s
    in torch.load's unpickler on a 16-core machine), the zip's own central directory (`torch_zip`) as torch's writer
    lays it out; anything else gives up."""
    size = getattr(reader, "get_record_size", None)
    if size is not None:
        return size
    records = directory()
    if records is None:
        raise GiveUp("no record sizes: this torch's zip reader has no get_record_size, and the archive is not laid "
                     "out as torch's writer lays it out")
    sizes = {name.split("/", 1)[1]: n for name, _, n in records if "/" in name}  # (torch drops the top folder)
    return sizes.__getitem__


def _load(head: bytes, open_reader, storages, directory) -> Any:
    if sys.byteorder != "little":
        raise GiveUp("byte order")
    if head != b"PK\x03\x04":  # (torch.load reads anything else as its legacy format)
        raise GiveUp("not a zip archive")
    try:
        reader = open_reader()
        names = reader.get_all_records()
        if "data.pkl" not in names or "constants.pkl" in names:
            raise GiveUp("no data.pkl, or a TorchScript archive")
        if ("byteorder" in names and reader.get_record("byteorder") != b"little") or (
                "byteorder" not in names and torch.serialization.get_default_load_endianness() not in (
                    None, torch.serialization.LoadEndianness.LITTLE)):  # (what torch.load then assumes)
            raise GiveUp("byte order")
        data, builds = _scan(reader.get_record("data.pkl"))
        records = {n for n in names if n.startswith("data/")}
        obj = _Loader(data, reader, records, _record_sizes(reader, directory)).load()
        build = _Build(storages())
        result = build.value(obj)
        if build.builds != builds:  # a BUILD that reached no stand-in of ours (module docstring, point 2)
            raise GiveUp("BUILD on an object that is not ours")
        return result
    except GiveUp:
        raise
    except Exception as e:  # (whatever went wrong, torch.load decides: giving up is always safe)
        raise GiveUp(f"{type(e).__name__}: {e}") from None
