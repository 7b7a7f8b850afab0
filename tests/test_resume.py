"""kill -9 mid-conversion, rerun with --resume: completed rank files are kept, output is byte-identical."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import make_fixture, tree_digest as digest




def cli(*args):
    return [sys.executable, "-m", "stepconv.cli", *map(str, args)]


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical(tmp_path):
    hf = make_fixture.make_checkpoint(tmp_path / "hf", num_layers=8, hidden=1024, ffn=1024, moe_ffn=512, experts=8)
    ref = tmp_path / "ref"
    opts = ["--tp", "2", "--pp", "2", "--ep", "2", "--jobs", "1", "-q"]
    assert subprocess.run(cli("hf-to-mcore", hf, "-o", ref, *opts), capture_output=True).returncode == 0

    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    journal = partial / ".stepconv-journal.json"
    proc = subprocess.Popen(cli("hf-to-mcore", hf, "-o", out, *opts))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"outputs"') >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing under the final name
    visible = [p for p in partial.rglob("model_optim_rng.pt")]
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in visible}
    assert 1 <= len(kept) < 16
    for p in partial.rglob("*.pt"):  # whatever is complete under its name loads; half-written files end in .tmp
        assert p.suffix == ".pt"

    r = subprocess.run(cli("hf-to-mcore", hf, "-o", out, "--resume", *opts), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "already complete" in r.stdout
    for p, st in kept.items():
        q = out / p.relative_to(partial)
        assert (q.stat().st_ino, q.stat().st_mtime_ns) == st, f"{q} was rewritten"
    assert digest(out) == digest(ref)
    assert not partial.exists()
