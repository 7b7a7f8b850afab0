"""Bad input: one clear line, non-zero exit, no traceback, nothing published."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepconv.convert import hf_to_mcore


def run(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "stepconv.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def one_line_error(code, err, *needles):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def rewrite(d, fn):
    """Apply fn(tensors: dict) to the second shard file, keeping the index in step."""
    f = d / "model-00002-of-00002.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != f.name or k in t}
    idx["weight_map"].update({k: f.name for k in t})
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_help_explains_every_option_with_an_example():
    for cmd in ([], ["hf-to-mcore"], ["mcore-to-hf"]):
        code, out, _ = run(*cmd, "--help")
        assert code == 0 and "Example" in out
    code, out, _ = run("hf-to-mcore", "--help")
    for opt in ("--tp", "--pp", "--ep", "--spec", "--dtype", "--overwrite", "-o"):
        assert opt in out


def test_cli_round_trip(tmp_path, fixture_dir):
    code, out, err = run("hf-to-mcore", "--tp", "4", fixture_dir, "-o", tmp_path / "m")
    assert code == 0, err
    assert "TP=4 PP=1 EP=1" in out and "MTP" in out
    code, out, err = run("mcore-to-hf", tmp_path / "m", "-o", tmp_path / "h")
    assert code == 0, err


def test_wrong_model_type(hf, tmp_path):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf / "config.json").write_text(json.dumps(cfg))
    one_line_error(*run("hf-to-mcore", hf, "-o", tmp_path / "o")[::2], "model_type", "step3p5")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("opts,needle", [
    (["--tp", "3"], "valid values 1, 2, 4"),
    (["--tp", "8"], "valid values 1, 2, 4"),
    (["--pp", "3"], "valid values 1, 2, 4"),
    (["--ep", "3"], "valid values 1, 2, 4, 8"),
    (["--spec", "fancy"], "te, local"),
    (["--dtype", "int8"], "keep, bf16 or fp32"),
])
def test_invalid_parallel_and_options(hf, tmp_path, opts, needle):
    one_line_error(*run("hf-to-mcore", *opts, hf, "-o", tmp_path / "o")[::2], needle)
    assert not (tmp_path / "o").exists()


def test_missing_unexpected_and_misshapen_tensors(hf, tmp_path):
    rewrite(hf, lambda t: t.pop("lm_head.weight"))
    one_line_error(*run("hf-to-mcore", hf, "-o", tmp_path / "o")[::2], "missing", "lm_head.weight")
    rewrite(hf, lambda t: t.update({"lm_head.weight": torch.zeros(1100, 64, dtype=torch.bfloat16),
                                    "model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}))
    one_line_error(*run("hf-to-mcore", hf, "-o", tmp_path / "o")[::2], "unexpected", "model.layers.9.mlp.up_proj")
    rewrite(hf, lambda t: (t.pop("model.layers.9.mlp.up_proj.weight"),
                           t.update({"lm_head.weight": torch.zeros(1000, 64, dtype=torch.bfloat16)})))
    one_line_error(*run("hf-to-mcore", hf, "-o", tmp_path / "o")[::2], "wrong shape", "lm_head.weight [1000, 64]")
    assert not (tmp_path / "o").exists()


def test_truncated_and_corrupt_safetensors(hf, tmp_path):
    f = hf / "model-00002-of-00002.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    one_line_error(*run("hf-to-mcore", hf, "-o", tmp_path / "o")[::2], "truncated", f.name)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    one_line_error(*run("hf-to-mcore", hf, "-o", tmp_path / "o")[::2], "corrupt", f.name)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tmp_path, fixture_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(*run("hf-to-mcore", fixture_dir, "-o", out)[::2], "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run("hf-to-mcore", fixture_dir, "-o", out, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "latest_checkpointed_iteration.txt").exists()


def test_megatron_dir_with_missing_rank(tmp_path, fixture_dir):
    m = tmp_path / "m"
    hf_to_mcore(fixture_dir, m, tp=2, ep=2)
    shutil.rmtree(m / "release" / "mp_rank_01_001")
    one_line_error(*run("mcore-to-hf", m, "-o", tmp_path / "h")[::2], "missing", "mp_rank_01_001")
    assert not (tmp_path / "h").exists()


def test_not_a_megatron_dir(tmp_path, fixture_dir):
    one_line_error(*run("mcore-to-hf", fixture_dir, "-o", tmp_path / "h")[::2], "latest_checkpointed_iteration.txt")


def test_default_output_is_beside_the_input(hf):
    code, out, err = run("hf-to-mcore", hf)
    assert code == 0, err
    assert (hf.parent / "hf-mcore" / "latest_checkpointed_iteration.txt").exists()


def test_compare_detects_a_single_flipped_byte(hf, fixture_dir):
    code, out, _ = run("compare", fixture_dir, hf)
    assert code == 0 and "identical" in out
    f = hf / "model-00001-of-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    code, out, _ = run("compare", fixture_dir, hf)
    assert code == 1 and "differ: 1" in out
