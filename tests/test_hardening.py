"""Hardening: one generated bad input per class (malformed safetensors, config values, Megatron rank files and
metadata, file-system faults, concurrent and resumed runs). Each must end in one `error:` line on stderr, no
traceback, the documented exit code (2 bad input, 3 environment), and nothing under the final output name.

Most cases run the CLI in-process (`stepconv.cli.main`, the same boundary as the console script, without a
torch import per case); the file-size-limit cases need a process of their own (RLIMIT_FSIZE)."""

import argparse
import enum
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from stepconv.cli import main
from stepconv.config import Step35Config
from stepconv.convert import hf_to_mcore
from stepconv.errors import StepconvError
from stepconv.megatron_io import load_rank_file
from stepconv.publish import OutputLock

SHARD = "model-00002-of-00002.safetensors"


def cli(capsys, *args):
    """`stepconv ARGS` in this process, through the console script's own entry point: (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["stepconv", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code, err, expected_code, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


# --- malformed safetensors headers: generated from the fixture's own header --------------------------------
def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header = mutate(header) or header
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _tensors(h):
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _shift(h, k, delta):
    h[k]["data_offsets"] = [o + delta for o in h[k]["data_offsets"]]


HEADER_FAULTS = {  # each makes the file invalid by the safetensors format's rules
    "overlap": lambda h: _shift(h, _tensors(h)[2], -2),
    "negative offset": lambda h: _shift(h, _tensors(h)[0], -8),
    "gap": lambda h: _shift(h, _tensors(h)[-1], 2),
    "duplicate offsets": lambda h: h[_tensors(h)[3]].update(data_offsets=list(h[_tensors(h)[2]]["data_offsets"])),
    "shape not ints": lambda h: h[_tensors(h)[1]].update(shape="64x64"),
    "offsets floats": lambda h: h[_tensors(h)[1]].update(data_offsets=[0.5, 1e300]),
    "unknown dtype": lambda h: h[_tensors(h)[1]].update(dtype=7),
    "extra field": lambda h: h[_tensors(h)[1]].update(extra=1),
    "size != shape x dtype": lambda h: h[_tensors(h)[1]].update(shape=[1]),
    "metadata not strings": lambda h: h.update(__metadata__={"format": ["pt"]}),
    "not an object": lambda h: b"[1, 2, 3]",
    "NaN in header": lambda h: json.dumps(h).replace('"pt"', "NaN").encode(),
}


@pytest.mark.parametrize("fault", sorted(HEADER_FAULTS))
def test_malformed_safetensors_header(hf, tmp_path, capsys, fault):
    _rewrite_header(hf / SHARD, HEADER_FAULTS[fault])
    code, _, err = cli(capsys, "hf-to-mcore", "-q", hf, "-o", tmp_path / "o")
    assert_one_line(code, err, 2, SHARD)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    code, _, err = cli(capsys, "inspect", hf)  # the same validation, the same verdict
    assert code == 2 and SHARD in err + _


def test_safetensors_library_refuses_what_we_refuse(hf):
    """Negative control for the generator: the safetensors library itself rejects each generated fault."""
    from safetensors import safe_open

    original = (hf / SHARD).read_bytes()
    for fault in ("overlap", "negative offset", "gap", "duplicate offsets"):
        (hf / SHARD).write_bytes(original)
        _rewrite_header(hf / SHARD, HEADER_FAULTS[fault])
        with pytest.raises(Exception):
            with safe_open(hf / SHARD, "pt") as f:
                [f.get_tensor(k) for k in f.keys()]


@pytest.mark.parametrize("index", [{"weight_map": ["a"]}, {"weight_map": {"x": 3}}, {"weight_map": {"x": "../x.safetensors"}},
                                   [], {"weight_map": {}}])
def test_malformed_index(hf, tmp_path, capsys, index):
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line(*cli(capsys, "hf-to-mcore", "-q", hf, "-o", tmp_path / "o")[::2], 2, "index")


# --- config values: every validated field, each with values of the wrong type, range or finiteness ------------
def _config_faults():
    bad_ints = {"abc": "abc", "float": 1.5, "bool": True, "negative": -1, "huge": 10**12}
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_attention_groups",
                "head_dim", "intermediate_size", "moe_num_experts", "moe_top_k", "sliding_window"):
        for label, v in bad_ints.items():
            yield f"{key}={label}", {key: v}
    for key in ("rms_norm_eps", "rope_theta", "moe_router_scaling_factor"):
        yield f"{key}=NaN", {key: float("nan")}
        yield f"{key}=str", {key: "x"}
    yield "layer_types wrong", {"layer_types": ["full_attention", 3]}
    yield "sliding_window=0", {"sliding_window": 0}
    yield "groups not dividing heads", {"num_attention_groups": 3}
    yield "moe_layers_enum out of range", {"moe_layers_enum": "2,99"}
    yield "top_k above experts", {"moe_top_k": 17}


CONFIG_FAULTS = dict(_config_faults())


def test_every_config_fault_is_one_error(fixture_dir):
    base = json.loads((fixture_dir / "config.json").read_text())
    for name, patch in CONFIG_FAULTS.items():
        with pytest.raises(StepconvError):
            cfg = Step35Config.from_dict({**base, **patch})
            cfg.validate_parallel(1, 1, 1)  # (still bounded: the valid-value lists are sized from the config)
            pytest.fail(f"{name}: accepted")


@pytest.mark.parametrize("name,needle", [("moe_num_experts=huge", "moe_num_experts"), ("rope_theta=NaN", "NaN"),
                                         ("sliding_window=0", "sliding_window")])
def test_config_fault_cli(hf, tmp_path, capsys, name, needle):
    cfg = {**json.loads((hf / "config.json").read_text()), **CONFIG_FAULTS[name]}
    (hf / "config.json").write_text(json.dumps(cfg))  # (json writes NaN literally, as a hostile file would)
    code, _, err = cli(capsys, "hf-to-mcore", "-q", hf, "-o", tmp_path / "o")
    assert_one_line(code, err, 2, "config.json", needle)
    assert not (tmp_path / "o").exists()


# --- Megatron rank files and metadata: generated from a real conversion -----------------------------------------
@pytest.fixture(scope="module")
def mcore(tmp_path_factory, fixture_dir):
    d = tmp_path_factory.mktemp("mc") / "m"
    hf_to_mcore(fixture_dir, d, tp=2)
    return d


def _rank(root, tp_rank):
    return root / "release" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"


def _resave(path, fn):
    obj = dict(load_rank_file(path))
    obj["model"] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in obj["model"].items()}
    fn(obj)
    path.unlink()
    torch.save(obj, path)


class _CallsPrint:
    def __reduce__(self):
        return (print, ("unpickled: builtins.print was called",))


def _zip_bomb(path):
    obj = dict(load_rank_file(path))
    obj["model"] = dict(obj["model"])
    obj["model"]["embedding.word_embeddings.weight"] = torch.zeros(1 << 22)  # 16 MB of zeros, deflated to ~16 KB
    tmp = path.with_suffix(".plain")
    torch.save(obj, tmp)
    with zipfile.ZipFile(tmp) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    tmp.unlink()


FC2 = "decoder.layers.0.mlp.linear_fc2.weight"
EMB = "embedding.word_embeddings.weight"
RANK_FAULTS = {  # (which rank file, how): each exports wrong HF weights if it is not caught
    "transposed on every rank": ("all", lambda o: o["model"].update({FC2: o["model"][FC2].T.contiguous()})),
    "short embedding shard": (1, lambda o: o["model"].update({EMB: o["model"][EMB][:-1].clone()})),
    "int8 weights": (0, lambda o: o["model"].update({FC2: o["model"][FC2].to(torch.int8)})),
    "extra key": (1, lambda o: o["model"].update({"decoder.layers.0.extra.weight": torch.zeros(2)})),
    "replica differs": (1, lambda o: o["model"].update(
        {"decoder.final_layernorm.weight": o["model"]["decoder.final_layernorm.weight"] + 1})),
    "recorded dtype int8": (0, lambda o: o["args"].stepconv.update(
        source_dtypes={**o["args"].stepconv["source_dtypes"], "model.layers.0.self_attn.o_proj.weight": "I8"})),
    "TP 10^9 in args": (0, lambda o: setattr(o["args"], "tensor_model_parallel_size", 10**9)),
    "metadata not an object": (0, lambda o: setattr(o["args"], "stepconv", ["x"])),
    "zip bomb": (1, _zip_bomb),
    # a global Megatron never writes: refused by name, never called (megatron-core's own globals get stand-ins)
    "foreign global in args": (0, lambda o: setattr(o["args"], "extra", _CallsPrint())),
}


@pytest.mark.parametrize("fault", sorted(RANK_FAULTS))
def test_malformed_rank_files(mcore, tmp_path, capsys, fault):
    m = tmp_path / "m"
    shutil.copytree(mcore, m)
    which, how = RANK_FAULTS[fault]
    for r in ((0, 1) if which == "all" else (which,)):
        if fault == "zip bomb":
            how(_rank(m, r))
        else:
            _resave(_rank(m, r), lambda o: (o.update(args=argparse.Namespace(**vars(o["args"]))),
                                            setattr(o["args"], "stepconv", json.loads(json.dumps(o["args"].stepconv))),
                                            how(o)))
    code, _, err = cli(capsys, "mcore-to-hf", "-q", m, "-o", tmp_path / "h")
    assert_one_line(code, err, 2)
    assert not (tmp_path / "h").exists() and not (tmp_path / "h.partial").exists()
    if fault != "replica differs":  # (a value check: inspect reads no tensor bytes)
        code, out, err = cli(capsys, "inspect", m)  # inspect agrees with the conversion
        assert code == 2, out


def test_newer_megatron_enum_in_args_loads_as_a_stand_in(mcore, tmp_path, capsys, monkeypatch):
    """Megatron-LM dev (bd5c98f779) saves `args.inference_cuda_graph_scope` as an enum megatron-core 0.16.1 lacks;
    its checkpoints must still export (seen on the device: mcore-to-hf refused them), the value an inert stand-in."""
    import megatron.core.transformer.enums as enums

    class InferenceCudaGraphScope(enum.Enum):  # as dev defines it, under dev's module path
        none = 1
        block = 2

    InferenceCudaGraphScope.__module__, InferenceCudaGraphScope.__qualname__ = enums.__name__, "InferenceCudaGraphScope"
    m = tmp_path / "m"
    shutil.copytree(mcore, m)
    with monkeypatch.context() as mp:
        mp.setattr(enums, "InferenceCudaGraphScope", InferenceCudaGraphScope, raising=False)
        for r in (0, 1):
            _resave(_rank(m, r), lambda o: setattr(o["args"], "inference_cuda_graph_scope",
                                                   InferenceCudaGraphScope.none))
    assert not hasattr(enums, "InferenceCudaGraphScope")
    name = "megatron.core.transformer.enums.InferenceCudaGraphScope"
    assert name in torch.serialization.get_unsafe_globals_in_checkpoint(str(_rank(m, 0)))
    value = load_rank_file(_rank(m, 0))["args"].inference_cuda_graph_scope
    assert repr(value) == f"{name}(1)" and not isinstance(value, InferenceCudaGraphScope)
    code, _, err = cli(capsys, "mcore-to-hf", "-q", m, "-o", tmp_path / "h")
    assert code == 0, err


TRACKER_FAULTS = {
    "not UTF-8": lambda t: t.write_bytes(b"\xff\xfe\x00"),
    "dev zero": lambda t: (t.unlink(), t.symlink_to("/dev/zero")),
    "huge": lambda t: t.write_text("1" * 100_000),
    "path": lambda t: t.write_text("../../etc"),
}


@pytest.mark.parametrize("fault", sorted(TRACKER_FAULTS) + ["--iteration"])
def test_tracker_and_iteration(mcore, tmp_path, capsys, fault):
    m = tmp_path / "m"
    shutil.copytree(mcore, m)
    extra = ["--iteration", "../../etc"] if fault == "--iteration" else []
    if not extra:
        TRACKER_FAULTS[fault](m / "latest_checkpointed_iteration.txt")
    assert_one_line(*cli(capsys, "mcore-to-hf", "-q", m, "-o", tmp_path / "h", *extra)[::2], 2)
    assert not (tmp_path / "h").exists()


def test_fifo_in_place_of_a_shard(hf, tmp_path, capsys):
    (hf / SHARD).unlink()
    os.mkfifo(hf / SHARD)
    assert_one_line(*cli(capsys, "hf-to-mcore", "-q", hf, "-o", tmp_path / "o")[::2], 2, "FIFO")


def test_carried_files_allow_list_no_links_never_over_output(mcore, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(mcore, m)
    side = m / "stepconv" / "hf_files"
    side.mkdir(parents=True, exist_ok=True)
    (side / "model.safetensors").write_bytes(b"planted")
    (side / "config.json").write_text("{}")
    (tmp_path / "secret.txt").write_text("outside")
    (side / "notes.txt").symlink_to(tmp_path / "secret.txt")
    (side / "tokenizer.json").write_text("{}")
    code, _, err = cli(capsys, "mcore-to-hf", "-q", m, "-o", tmp_path / "h")
    assert code == 0, err
    h = tmp_path / "h"
    assert (h / "tokenizer.json").read_text() == "{}"
    assert not (h / "notes.txt").exists() and (h / "model.safetensors").read_bytes() != b"planted"
    assert json.loads((h / "config.json").read_text())["model_type"] == "step3p5"


# --- file-system faults: a file-size limit in a process of its own ------------------------------------------
def _limited(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("args", [["hf-to-mcore", "--tp", "2"], ["hf-to-mcore", "--format", "torch_dist"],
                                  ["mcore-to-hf"]])
def test_file_size_limit_is_exit_3_not_an_abort(fixture_dir, mcore, tmp_path, args):
    out = tmp_path / "o"
    src = mcore if args[0] == "mcore-to-hf" else fixture_dir
    p = subprocess.run([sys.executable, "-m", "stepconv.cli", *args, "-q", str(src), "-o", str(out)],
                       capture_output=True, text=True, preexec_fn=_limited(150_000), timeout=300)
    assert_one_line(p.returncode, p.stderr, 3, "File too large")
    assert not out.exists() and not (tmp_path / "o.partial").exists()


# --- publication -----------------------------------------------------------------------------------------------
def test_second_run_is_told_who_holds_the_output(fixture_dir, tmp_path, capsys):
    out = tmp_path / "o"
    lock = OutputLock(out)
    lock.acquire()  # (what a first run holds for its whole duration)
    try:
        assert_one_line(*cli(capsys, "hf-to-mcore", "-q", fixture_dir, "-o", out)[::2], 3, "another stepconv run",
                        f"pid {os.getpid()}")
    finally:
        lock.release()
    assert not out.exists()
    assert cli(capsys, "hf-to-mcore", "-q", fixture_dir, "-o", out)[0] == 0


def test_only_folders_stepconv_created_are_deleted(fixture_dir, tmp_path, capsys):
    out = tmp_path / "o"
    mine = tmp_path / "o.partial"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert_one_line(*cli(capsys, "hf-to-mcore", "-q", fixture_dir, "-o", out)[::2], 2, "not created by stepconv")
    assert (mine / "keep.txt").read_text() == "mine"
    shutil.rmtree(mine)
    mine.symlink_to(fixture_dir)  # a link would make the run write into the input
    assert_one_line(*cli(capsys, "hf-to-mcore", "-q", fixture_dir, "-o", out, "--resume")[::2], 2,
                    "symbolic link")
    assert sorted(p.name for p in fixture_dir.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", SHARD,
         "model.safetensors.index.json"])


def test_resume_needs_the_same_options_and_reverifies_files(fixture_dir, tmp_path, capsys, monkeypatch):
    from stepconv import convert

    ref, out, partial = tmp_path / "ref", tmp_path / "o", tmp_path / "o.partial"
    hf_to_mcore(fixture_dir, ref, tp=2, pp=2)

    def interrupted(root, sizes):  # every unit complete and journaled, then the run stops
        raise StepconvError("interrupted for the test")

    monkeypatch.setattr(convert, "audit_on_disk", interrupted)
    with pytest.raises(StepconvError):
        hf_to_mcore(fixture_dir, out, tp=2, pp=2, resume=True)
    monkeypatch.undo()
    assert_one_line(*cli(capsys, "hf-to-mcore", "-q", fixture_dir, "-o", out, "--resume", "--tp", "2")[::2], 2,
                    "other options")
    victim, flipped = sorted(partial.rglob("model_optim_rng.pt"))[1:3]
    victim.write_bytes(victim.read_bytes()[:-100])  # a reused file that is no longer what the journal recorded
    data = bytearray(flipped.read_bytes())  # same size, same zip directory, one weight byte changed (record CRCs
    data[len(data) // 2] ^= 0xFF            # are 0 in rank files: only the journal's content digest sees this)
    flipped.write_bytes(bytes(data))
    code, stdout, err = cli(capsys, "hf-to-mcore", "-q", fixture_dir, "-o", out, "--resume", "--tp", "2", "--pp", "2")
    assert code == 0, err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.pt")} == \
        {p.relative_to(ref): p.read_bytes() for p in ref.rglob("*.pt")}


def test_output_dot(fixture_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    assert_one_line(*cli(capsys, "hf-to-mcore", "-q", fixture_dir, "-o", ".")[::2], 2, "already exists")
    assert list(work.iterdir()) == []


# --- errors inside verify's rank processes -------------------------------------------------------------------
def _fail_on_rank(path):
    open(path).read()  # an OSError with its errno and file name, raised inside a rank process


@pytest.mark.slow
def test_rank_process_error_comes_back_as_one_line(tmp_path, capsys):
    from stepconv.errors import report
    from stepconv.mcore.run import RankError, run_ranks

    with pytest.raises(RankError) as e:
        run_ranks(_fail_on_rank, str(tmp_path / "absent"), tp=1)
    assert report(e.value) == 2  # through the same boundary as every command
    err = capsys.readouterr().err
    assert_one_line(2, err, 2, "rank 0", str(tmp_path / "absent"))


def test_verify_validates_like_the_conversions(hf, mcore, tmp_path, capsys):
    """verify refuses, before any rank starts, what the conversions refuse: on either side."""
    m = tmp_path / "m"
    shutil.copytree(mcore, m)
    how = RANK_FAULTS["transposed on every rank"][1]
    for r in (0, 1):
        _resave(_rank(m, r), how)
    assert_one_line(*cli(capsys, "verify", hf, m)[::2], 2, FC2, "this rank's shard")
    _rewrite_header(hf / SHARD, HEADER_FAULTS["overlap"])
    assert_one_line(*cli(capsys, "verify", hf, mcore)[::2], 2, SHARD, "contiguous")


@pytest.mark.parametrize("make, needle", [
    (lambda p: os.mkfifo(p), "FIFO"),                                  # would block verify forever
    (lambda p: p.write_text("1 2 x\n"), "integer token ids"),          # not token ids
    (lambda p: p.write_bytes(b"\xff\xfe1 2\n"), "not UTF-8"),
    (lambda p: p.write_text("1 2 3\n4 5\n"), "same number"),           # ragged rows
])
def test_prompt_file_is_validated_like_every_input(tmp_path, make, needle):
    from stepconv.verify import read_prompt_file

    p = tmp_path / "prompt.txt"
    make(p)
    with pytest.raises(StepconvError, match=needle):
        read_prompt_file(p)
    if needle == "FIFO":  # and a good file still reads
        p.unlink()
        p.write_text("1 2 3\n4 5 6\n")
        assert read_prompt_file(p).tolist() == [[1, 2, 3], [4, 5, 6]]
