import glob
import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-step35"

_spec = importlib.util.spec_from_file_location("make_fixture", ROOT / "fixtures" / "make_fixture.py")
make_fixture = importlib.util.module_from_spec(_spec)
sys.modules["make_fixture"] = make_fixture
_spec.loader.exec_module(make_fixture)


def load_hf(d) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(f"{d}/*.safetensors")):
        out.update(load_file(f))
    return out


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def tree_digest(root) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    out = {}
    for p in Path(root).rglob("*"):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def fixture_tensors() -> dict[str, torch.Tensor]:
    return load_hf(FIXTURE)


@pytest.fixture
def hf(tmp_path, fixture_dir) -> Path:
    """A writable copy of the fixture checkpoint, for tests that damage it."""
    d = tmp_path / "hf"
    shutil.copytree(fixture_dir, d)
    return d
