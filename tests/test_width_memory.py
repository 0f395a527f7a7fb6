"""The dry run's memory model against measured steps: bench/width_memory.py --smoke (tiny width, seconds).

The committed bench/results/width_memory.json is the same script at LLaMA-2-7B width; here the tiny geometry
checks the code path and that the prediction still describes what a step allocates: the live tensor bytes the
step makes (counted op by op) within 15% of memory.predict_peak_memory's terms, and the process's RSS
high-water mark, which adds allocator slack and pages (a few MiB at this size), within [0.9, 1.4] of them.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))


def test_width_memory_smoke_prediction_matches_the_step(tmp_path):
    import width_memory

    out = tmp_path / "width.json"
    proc = subprocess.run([sys.executable, str(BENCH / "width_memory.py"), "--smoke", "--track", "--threads", "1",
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["geometry"] == width_memory.SMOKE and set(res["machine"]) >= {"cpu", "cpus", "torch"}
    rows = res["rows"]
    assert [(r["ctx"], r["options"]["mlp_chunk"]) for r in rows] == [(4096, 0), (4096, 512)]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["measured_bytes"] / r["predicted_bytes"])
        terms = r["predicted_terms"]
        assert terms["checkpointed_hidden_states"] == 2 * 4096 * 256 * 2          # 2 layer inputs, bf16
        assert set(terms["layer_moments"]) >= {"mlp_backward", "norm_backward", "attn_backward"}
        assert 0.85 < r["live_ratio"] < 1.15, r                 # what the step allocates: what the model counts
        assert 0.9 < r["ratio"] < 1.4, r                        # RSS: the same + allocator slack and pages
        assert r["measured_bytes"] >= 0.95 * r["live_tensor_peak_bytes"]
    plain, tiled = rows
    # MLP tiles: smaller, measured and predicted; the tiled peak is the RMSNorm backward's fp32 temporaries.
    assert tiled["measured_bytes"] < plain["measured_bytes"] and tiled["predicted_bytes"] < plain["predicted_bytes"]
    assert tiled["predicted_terms"]["layer_peak_moment"] == "norm_backward"
    assert tiled["live_peak_phase"].endswith("post_attention_layernorm bwd")


def test_memory_model_goals_and_offload_terms():
    from infra import memory
    from model import ModelArgs

    a7, a13 = ModelArgs(**memory.ARCHS["llama2-7b"]), ModelArgs(**memory.ARCHS["llama2-13b"])
    tiled_12k = memory.predict_peak_memory(a7, 12288, mlp_chunk=1024)
    assert tiled_12k["peak_bytes"] <= 12e9
    long = memory.predict_peak_memory(a7, 65536, mlp_chunk=1024, offload=True)
    assert long["peak_bytes"] <= 30e9
    # offload: every layer's input on the host, the device keeps the one the recompute brings back
    assert long["host_checkpoints"] == 32 * 65536 * 4096 * 2 and long["checkpointed_hidden_states"] == 0
    assert long["layer_recompute_per_token"]["input_copy"] == 4096 * 2
    assert memory.predict_peak_memory(a13, 8192, mlp_chunk=1024)["peak_bytes"] <= 24e9
    # per-token terms at 7B width (bench/width_memory.py --track counts the same tensors)
    t = tiled_12k["layer_recompute_per_token"]
    # q, k, v: RoPE's outputs kept whole + the shifted half's padded copies; outputs and lse over T + g / 4 tokens
    assert t["attention"] == round(3 * 1.5 * 2 * 4096 + (1 + 0.25 / 4) * (2 * 4096 + 4 * 32))
    assert t["attn_inputs"] == 2 * 8192 + 2 * 4096 + 4 * 4 * 64                     # 16-bit inputs, masks, h
    assert t["mlp"] == 5 * 2 * 11008 and t["norm_backward"] == 16 * 4096 + 2 * 4096
    full = memory.predict_peak_memory(a7, 12288, attn="full")
    assert full["layer_recompute_per_token"]["attention"] == 4 * 2 * 4096 + 4 * 32   # q, k, v, out, lse
