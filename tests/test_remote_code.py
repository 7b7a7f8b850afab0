"""`verify --trust-remote-code` runs the checkpoint folder's own modeling_step3p5.py, one layer at a time, strictly.

The remote file here is stepconv's own (tests/remote_code: the checkpoint's tensor names, StepFun's layer interface,
plain-torch Step-3.5 math), copied into a copy of the fixture as a user's checkpoint folder would hold StepFun's;
third-party code stays out of the repository. StepFun-shaped public copy on transformers 4.57.1: docs/VERIFY.md."""

import shutil
from pathlib import Path

import pytest
import transformers

from stepconv.config import StepconvError
from stepconv.convert import hf_to_mcore
from stepconv.verify import verify
from test_hardening import assert_one_line, cli

REMOTE = Path(__file__).resolve().parent / "remote_code"


def remote_folder(fixture_dir: Path, dst: Path, old: str | None = None, new: str | None = None) -> Path:
    """A copy of the fixture holding the remote code, its modeling file with `old` replaced by `new`. (Each variant
    gets its own folder name: transformers names the imported module after the folder.)"""
    shutil.copytree(fixture_dir, dst)
    for f in REMOTE.glob("*.py"):
        text = f.read_text()
        if old is not None and f.name == "modeling_step3p5.py":
            assert old in text
            text = text.replace(old, new)
        (dst / f.name).write_text(text)
    return dst


@pytest.fixture(scope="module")
def mcore(tmp_path_factory, fixture_dir):
    d = tmp_path_factory.mktemp("remote_mcore") / "tp2"
    hf_to_mcore(fixture_dir, d, tp=2, spec="local")
    return d


@pytest.mark.slow
def test_remote_code_passes_and_a_port_bug_fails_at_its_layer(fixture_dir, mcore, tmp_path):
    good = verify(remote_folder(fixture_dir, tmp_path / "remote_good"), mcore, trust_remote_code=True)
    assert good.passed, good.failures
    assert f"modeling_step3p5.py (Step3p5DecoderLayer) on transformers {transformers.__version__}" in good.reference
    assert "MTP not modelled by the file" in good.reference and len(good.mtp) == 1
    moe = [r for r in good.layers if "router_agreement" in r]
    assert [r["index"] for r in moe] == [2, 3] and all(r["router_agreement"] == 1.0 and r["expert"] for r in moe)

    # the file's MoE of layer 2 weights its experts by the biased scores: verify names layer 2, from the MLP
    bad = verify(remote_folder(fixture_dir, tmp_path / "remote_wrong_layer", "WRONG_LAYER = None", "WRONG_LAYER = 2"),
                 mcore, trust_remote_code=True, layers="0:3")
    assert not bad.passed and bad.first_divergent_layer == 2
    assert bad.failures[0].startswith("layer 2: mlp max rel"), bad.failures
    assert all(not r["failures"] for r in bad.layers if r["index"] in (0, 1))


def test_remote_load_is_strict_one_line_exit_2(fixture_dir, mcore, tmp_path, capsys):
    """A remote layer that names one tensor differently: both names listed, on one line, before any rank starts."""
    renamed = remote_folder(fixture_dir, tmp_path / "remote_renamed", "self.g_proj", "self.head_gate")
    code, _, err = cli(capsys, "verify", renamed, mcore, "--trust-remote-code", "--quiet")
    assert_one_line(code, err, 2, "strict load of configuration_step3p5.py/modeling_step3p5.py failed",
                    "model.layers.0.self_attn.head_gate.weight",  # a parameter with no tensor
                    "model.layers.0.self_attn.g_proj.weight")  # a tensor with no parameter


def test_remote_code_that_cannot_run_here_is_one_line(fixture_dir, mcore, tmp_path):
    # the file needs something this transformers lacks: the line names the installed version, the step, the error
    old = "from transformers import PreTrainedModel"
    broken = remote_folder(fixture_dir, tmp_path / "remote_unimportable", old, old + ", NoSuchThingInTransformers")
    with pytest.raises(StepconvError) as e:
        verify(broken, mcore, trust_remote_code=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"cannot run on transformers {transformers.__version__} (importing it: ImportError" in msg
    assert "NoSuchThingInTransformers" in msg
    # the folder's files are what runs: without them, the line says which are missing
    bare = tmp_path / "remote_absent"
    shutil.copytree(fixture_dir, bare)
    with pytest.raises(StepconvError, match="missing: configuration_step3p5.py, modeling_step3p5.py"):
        verify(bare, mcore, trust_remote_code=True)
