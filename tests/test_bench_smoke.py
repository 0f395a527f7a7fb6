"""The benchmarks in bench/ run end to end on tiny models and report figures that make sense.

bench/train_speed.py (ours vs HF + PEFT + bitsandbytes, its deadline, its FLOP count and dtype choice),
bench/ctx_memory.py (peak RSS against ctx) and
bench/gpu_check.py --cpu-smoke (the 7B GPU check's code path on a tiny model; with --fsdp on 2 gloo ranks) each run
as the user would
run them, in subprocesses, with their JSON output checked.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))


def run(script, *args, timeout=240):
    return subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_gpu_check_flops_per_token_match_reference():
    import gpu_check

    from model import ModelArgs

    m = ModelArgs(**gpu_check.LLAMA2_7B)
    n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)                                   # 6.48B decoder linear params
    r = 32 * 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008))                           # LoRA r=64 on the seven
    vd = 32000 * 4096
    f = gpu_check.flops_per_token(m, 8192, r, "full", 0.25)
    assert f["decoder_linear_params"] == n
    attention = 32 * 4 * 4096 * (8192 + 1) / 2                                       # forward, causal
    assert f["model"] == pytest.approx(4 * n + 6 * r + 4 * vd + 3 * attention, rel=1e-12)
    assert f["hardware"] == pytest.approx(6 * n + 8 * r + 6 * vd + 4 * attention, rel=1e-12)
    # REFERENCE §7: ~50 GFLOP per token at 8k (forward + recompute + input gradients).
    assert 48e9 < f["hardware"] < 52e9
    s2 = gpu_check.flops_per_token(m, 8192, r, "s2", 0.25)                           # groups of 2048 tokens
    assert f["hardware"] - s2["hardware"] == pytest.approx(4 * 32 * 4 * 4096 * (8192 - 2048) / 2, rel=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_cuda():
    proc = run("gpu_check.py", "--steps", "1", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "CUDA" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run("gpu_check.py", "--cpu-smoke", "--ctx", 512, "--dtypes", "bf16", "--steps", 1, "--grad-accum", 2,
               "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["cpu_smoke"] is True and len(res["results"]) == 1
    r = res["results"][0]
    assert r["dtype"] == "bfloat16" and r["ctx"] == 512 and r["pi_factor"] == 2.0   # trained ctx 256 -> PI x2
    assert r["optimizer"] == "torch.optim.adamw.AdamW"                         # paged AdamW is CUDA-only
    # LoRA r=64 on the seven linears of 2 layers, dim 128, intermediate 344.
    assert r["lora_params"] == 2 * 64 * (4 * (128 + 128) + 3 * (128 + 344))
    # Random weights (std 0.02): logits near 0, so the loss starts near ln(vocab) = ln(1024).
    assert len(r["losses"]) == 2 and all(abs(x - math.log(1024)) < 0.05 for x in r["losses"])
    assert not any(r["skipped"]) and r["tokens_per_s"] > 0 and r["peak_allocated"] > 0
    assert r["predicted_peak"] > 0 and 0 < r["mfu"] < r["hfu"]



def test_gpu_check_fsdp_cpu_smoke(tmp_path):
    """--fsdp under torchrun (gloo): the same step sharded, predicted per rank with the dry run's --fsdp model."""
    import gpu_check
    from infra import memory
    from model import ModelArgs

    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(BENCH / "gpu_check.py"), "--fsdp", "--cpu-smoke", "--ctx", "512", "--dtypes", "bf16",
                           "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    r = res["results"][0]
    assert res["fsdp"] is True and res["world_size"] == 2 and r["lora_params"] == 2 * 64 * (4 * 256 + 3 * 472)
    assert len(r["losses"]) == 2 and all(abs(x - math.log(1024)) < 0.05 for x in r["losses"])
    one = memory.predict_peak_memory(ModelArgs(**gpu_check.SMOKE), 512, dtype_bytes=2, loss_chunk=1024)
    parts = r["predicted_parts"]                                        # one rank of two: half the weights
    assert parts["nf4_weights"] == -(-one["nf4_weights"] // 2) and parts["fsdp_gathered_units"] > 0


TINY = ("--vocab", 512, "--dim", 64, "--intermediate", 128, "--layers", 2, "--heads", 4, "--ctx", 128,
        "--peak-size", 512)


@pytest.fixture(scope="module")
def speed_cache(tmp_path_factory):
    """One cache of train_speed.py's random checkpoint for the tests below (writing it imports transformers)."""
    return tmp_path_factory.mktemp("train_speed_cache")


def test_train_speed_tiny(tmp_path, speed_cache):
    import benchlib

    out = tmp_path / "speed.json"
    proc = run("train_speed.py", *TINY, "--steps", 1, "--repeats", 1, "--cache-dir", speed_cache, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["complete"] and res["stopped"] is None
    assert res["machine"]["cpu"] and res["machine"]["native_bf16"] == benchlib.native_bf16()
    (entry,) = res["configs"]
    # --dtype auto: bf16 only where the CPU computes it natively (or on CUDA), and the run says so.
    assert entry["dtype"] == ("bf16" if benchlib.native_bf16() or torch.cuda.is_available() else "fp32")
    assert f"dtype {entry['dtype']}: auto" in proc.stdout
    runs = {r["impl"]: r for r in entry["runs"]}
    assert [r["impl"] for r in entry["runs"]] == ["ours_s2", "ours_full", "hf_full"]
    s = entry["summary"]
    for a in ("ours_s2", "ours_full"):
        ratio = s["comparisons"][f"{a}/hf_full"]
        assert ratio["tokens_per_s"] == pytest.approx(runs[a]["tokens_per_s"] / runs["hf_full"]["tokens_per_s"])
        assert ratio["peak_bytes"] == pytest.approx(runs[a]["peak_bytes"] / runs["hf_full"]["peak_bytes"])
    for r in runs.values():
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and 0 < r["utilisation"] < 1
        assert r["flops_per_s"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"])
    # S²-Attn (groups of 128 / 4 tokens) does less attention work than full attention.
    assert runs["ours_s2"]["flops_per_token"] < runs["ours_full"]["flops_per_token"]
    # Same checkpoint, same tokens, LoRA B = 0: the first loss is the NF4 base's, computed by both alike.
    assert runs["ours_full"]["losses"][0] == pytest.approx(runs["hf_full"]["losses"][0], abs=0.01)
    lora = 2 * 64 * (4 * (64 + 64) + 3 * (64 + 128))
    assert {r["trainable_params"] for r in runs.values()} == {lora}


def test_train_speed_stops_at_the_deadline(tmp_path, speed_cache):
    out = tmp_path / "speed.json"
    proc = run("train_speed.py", *TINY, "--steps", 1, "--repeats", 1, "--deadline", 1, "--cache-dir", speed_cache,
               "--out", out)
    assert proc.returncode == 3, proc.stderr[-3000:]          # nothing to compare: says so, no traceback
    assert "stopped early" in proc.stdout and "Traceback" not in proc.stderr
    res = json.loads(out.read_text())
    assert not res["complete"] and "deadline" in res["stopped"]


def test_eval_speed_tiny(tmp_path):
    import benchlib

    out = tmp_path / "eval.json"
    proc = run("eval_speed.py", "--shape", "small", "--vocab", 512, "--dim", 64, "--intermediate", 128, "--layers", 2,
               "--heads", 4, "--seq-len", 64, "--windows", 1, "--reps", 1, "--dtypes", "fp32", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["machine"]["native_bf16"] == benchlib.native_bf16()
    (row,) = res["results"]
    assert row["dtype"] == "fp32" and row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0
    assert row["tokens_per_s_ratio"] == pytest.approx(row["ours_tokens_per_s"] / row["hf_tokens_per_s"])
    assert row["ours_loss"] == pytest.approx(row["hf_loss"], rel=1e-4)
    assert 0 < row["ours_utilisation"] < 1 and 0 < row["hf_utilisation"] < 1


def test_pick_dtype_without_native_bf16(monkeypatch):
    import benchlib

    monkeypatch.setattr(benchlib, "native_bf16", lambda: False)
    dtype, why = benchlib.pick_dtype("auto", "cpu")
    assert dtype == "fp32" and "no native bf16" in why
    assert benchlib.pick_dtype("bf16", "cpu")[0] == "bf16"                  # still there when asked for
    monkeypatch.setattr(benchlib, "native_bf16", lambda: True)
    assert benchlib.pick_dtype("auto", "cpu")[0] == "bf16"


def test_train_flops_per_token_formula():
    import benchlib

    d, i, L, V, r, ctx = 2048, 5504, 4, 32000, 64, 4096
    f = benchlib.train_flops_per_token(dim=d, intermediate=i, layers=L, heads=16, kv_heads=16, head_dim=128,
                                       vocab=V, lora_r=r, span=ctx)
    n = L * (4 * d * d + 3 * d * i)
    lora = L * r * (4 * 2 * d + 3 * (d + i))
    attn = L * 4 * d * (ctx + 1) / 2
    assert f["decoder_linear_params"] == n and f["lora_params"] == lora
    assert f["executed"] == pytest.approx(6 * n + 8 * lora + 4 * V * d + 4 * attn, rel=1e-12)
    assert f["model"] == pytest.approx(4 * n + 6 * lora + 4 * V * d + 3 * attn, rel=1e-12)
    s2 = benchlib.train_flops_per_token(dim=d, intermediate=i, layers=L, heads=16, kv_heads=16, head_dim=128,
                                        vocab=V, lora_r=r, span=ctx // 4)
    assert f["executed"] - s2["executed"] == pytest.approx(4 * L * 4 * d * (ctx - ctx // 4) / 2, rel=1e-12)


def test_ctx_memory_grows_linearly(tmp_path):
    out = tmp_path / "mem.json"
    proc = run("ctx_memory.py", "--ctx", 512, 1024, 2048, "--attn", "s2", "--vocab", 512, "--dim", 64,
               "--intermediate", 128, "--layers", 2, "--heads", 4, "--loss-chunk", 64, "--trained-ctx", 1024,
               "--cache-dir", tmp_path / "cache", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]["s2"]
    rows = res["rows"]
    assert [r["ctx"] for r in rows] == [512, 1024, 2048]
    assert [r["pi_factor"] for r in rows] == [1.0, 1.0, 2.0]
    peaks = [r["step_peak_above_load"] for r in rows]
    assert peaks[0] < peaks[1] < peaks[2]
    fit = res["fits"]["step_peak_above_load (all ctx)"]
    assert fit["r2_linear"] > 0.99
    # A few KiB per token at dim 64 (checkpointed hidden states + one layer's recompute), not megabytes.
    assert 1024 < fit["bytes_per_token"] < 64 * 1024
