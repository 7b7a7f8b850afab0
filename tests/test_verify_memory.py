"""verify's memory does not grow with depth: twice the layers, at most 1.15x the peak RSS on either side.

Measured in a subprocess: the HF side's peak is the process's VmHWM (reset between the two runs through
/proc/self/clear_refs), each rank's is its own peak, reported by the rank. The widths make one MoE layer ~50 MB
in fp32, so a verify holding every layer (as the whole-model verify did) would grow by ~200 MB per side from 4 to
8 layers, well past 1.15x the ~0.6-0.9 GB a process starts with."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import json, re, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from make_fixture import make_checkpoint
from stepconv.convert import hf_to_mcore
from stepconv.verify import verify

def main():
    root = Path(sys.argv[1])
    out = {}
    for n in (4, 8):
        hf = make_checkpoint(root / f"hf{n}", num_layers=n, hidden=256, ffn=2048, moe_ffn=1024, experts=16, top_k=4)
        hf_to_mcore(hf, root / f"mc{n}", tp=1, spec="local")
    for n in (4, 8):
        Path("/proc/self/clear_refs").write_text("5")  # restart the VmHWM count
        r = verify(root / f"hf{n}", root / f"mc{n}", batch=2, seq_len=24)
        assert r.passed, r.failures
        hwm = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024
        out[n] = {"reference": hwm, "rank": max(r.peak_rss_mib["ranks"])}
    print(json.dumps(out))

if __name__ == "__main__":
    main()
'''


@pytest.mark.slow
def test_peak_rss_is_flat_in_depth(tmp_path):
    script = tmp_path / "measure.py"
    script.write_text(SCRIPT)
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    p = subprocess.run([sys.executable, str(script), str(tmp_path), str(fixtures)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    peak = {int(k): v for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}
    print(peak)
    for side in ("reference", "rank"):
        assert peak[8][side] <= 1.15 * peak[4][side], (side, peak)
