"""Streaming: peak RSS stays flat as the layer count grows (same geometry at 1x, 2x and 4x the layers)."""

import json
import subprocess
import sys

import pytest

from conftest import make_fixture

MEASURE = r"""
import json, re, sys
from stepconv.convert import hf_to_mcore, mcore_to_hf
direction, src, dst, fmt = sys.argv[1:5]
if direction == "import":
    hf_to_mcore(src, dst, tp=2, ep=2, format=fmt)
else:
    mcore_to_hf(src, dst)
# VmHWM, not ru_maxrss: the latter survives exec and would report the pytest parent's peak
peak = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"peak_kb": peak}))
"""

SCALE = dict(hidden=1024, ffn=1024, moe_ffn=512, experts=8)


def _peak_mb(direction, src, dst, fmt) -> float:
    p = subprocess.run([sys.executable, "-c", MEASURE, direction, str(src), str(dst), fmt], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return r["peak_kb"] / 1024


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_peak_rss_is_flat_in_layer_count(tmp_path, fmt):
    sizes, peaks_in, peaks_out = {}, {}, {}
    for layers in (4, 8, 16) if fmt == "torch" else (4, 16):
        hf = make_fixture.make_checkpoint(tmp_path / f"hf{layers}", num_layers=layers, **SCALE)
        sizes[layers] = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20
        peaks_in[layers] = _peak_mb("import", hf, tmp_path / f"m{layers}", fmt)
        peaks_out[layers] = _peak_mb("export", tmp_path / f"m{layers}", tmp_path / f"h{layers}", fmt)
        for f in hf.glob("*.safetensors"):
            f.unlink()
    grow_data = sizes[16] - sizes[4]
    print(f"{fmt}: checkpoint MB {sizes}; peak RSS MB import {peaks_in} export {peaks_out}")
    # 4x the layers adds ~{grow_data:.0f} MB of tensors; a converter that held the model would grow by that much
    assert grow_data > 200
    assert peaks_in[16] - peaks_in[4] < 0.15 * grow_data, (peaks_in, sizes)
    assert peaks_out[16] - peaks_out[4] < 0.15 * grow_data, (peaks_out, sizes)
