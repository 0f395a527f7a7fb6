"""Benchmark of quant.py (QLoRA's NF4 base weights) against bitsandbytes on CPU, in one process.

Prints, for a 4096 x 4096 weight (and 4096 x 11008 with --big):
- NF4 quantize and dequantize throughput (Mparam/s), ours vs bitsandbytes.quantize_4bit / dequantize_4bit,
  and the ratio ours / bnb (time);
- Linear4bit forward + input-gradient backward time vs a frozen dense nn.Linear, both bf16, and the ratio;
- peak extra RSS of quantize_nf4 / dequantize_nf4 on a 4096 x 11008 bf16 weight (fresh child process),
  to show the chunking: far below the 180 MB a full fp32 copy would take.
Each figure is the median of a few repetitions; the two implementations alternate so machine load hits both.

Baselines: bitsandbytes' own NF4 kernels (the same blocksize 64 and double quantization) and a dense bf16
nn.Linear. No data: random weights. No committed JSON (README: printed figures).

usage: python bench/nf4_bench.py [--big] [--tokens 512] [--reps 3] [--threads 1] [--out nf4.json]
Threads default to 1 for both libraries (OMP_NUM_THREADS): on a shared, oversubscribed machine multi-threaded
timings of many small ops are dominated by waiting for descheduled threads, which says little about either
implementation. Pass --threads N on a quiet machine.
"""
import argparse
import json
import os
import statistics
import sys
import time

if __name__ == "__main__":  # must be set before torch / bitsandbytes start their OpenMP runtimes
    _threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
    os.environ["OMP_NUM_THREADS"] = _threads

import torch

import benchlib  # noqa: E402
import quant  # noqa: E402  (benchlib put the repository root on sys.path)

RESULTS = []            # what --out writes: one dict per printed figure


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(fns: dict, reps: int) -> dict:
    """Median seconds per callable, running them in turn `reps` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_codec(out_f, in_f, reps):
    import bitsandbytes.functional as BF

    w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
    n = w.numel() / 1e6
    q = alternate({
        "ours": lambda: quant.quantize_nf4(w),
        "bnb": lambda: BF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True),
    }, reps)
    packed, state = quant.quantize_nf4(w)
    bnb_state = benchlib.state_to_bnb(state)
    d = alternate({
        "ours": lambda: quant.dequantize_nf4(packed, state, torch.bfloat16),
        "bnb": lambda: BF.dequantize_4bit(packed, bnb_state),
    }, reps * 2)
    for name, t in (("quantize", q), ("dequantize", d)):
        print(f"{name:10s} {out_f}x{in_f}: ours {n / t['ours']:7.1f} Mparam/s  bnb {n / t['bnb']:7.1f} Mparam/s  "
              f"time ours/bnb {t['ours'] / t['bnb']:.2f}")
        RESULTS.append({"what": name, "shape": [out_f, in_f], "ours_seconds": t["ours"], "bnb_seconds": t["bnb"],
                        "time_ratio": t["ours"] / t["bnb"]})


def bench_linear(out_f, in_f, tokens, reps):
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * in_f**-0.5
    q = quant.Linear4bit.from_weight(w, compute_dtype=torch.bfloat16, backend="torch")
    dense = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize())
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, out_f, dtype=torch.bfloat16)

    def step(layer):
        return lambda: layer(x).backward(g)

    t = alternate({"nf4": step(q), "dense": step(dense)}, reps)
    print(f"linear fwd+bwd {out_f}x{in_f}, {tokens} tokens, bf16: Linear4bit {t['nf4'] * 1e3:7.1f} ms  "
          f"nn.Linear {t['dense'] * 1e3:7.1f} ms  ratio {t['nf4'] / t['dense']:.2f}")
    RESULTS.append({"what": "linear fwd+bwd bf16", "shape": [out_f, in_f], "tokens": tokens,
                    "nf4_seconds": t["nf4"], "dense_seconds": t["dense"], "time_ratio": t["nf4"] / t["dense"]})


def child_peak_rss(what):
    """Run in a fresh process: peak RSS growth (MB) of one quantize or dequantize of a 4096 x 11008 bf16 weight."""
    w = torch.randn(4096, 11008, dtype=torch.bfloat16)
    packed, state = quant.quantize_nf4(w)
    benchlib.reset_peak_rss()
    base = benchlib.rss_bytes()
    if what == "quantize":
        result = quant.quantize_nf4(w)
        result_mb = w.numel() * (0.5 + 1 / 64) / 1e6  # packed bytes + uint8 scales
    else:
        result = quant.dequantize_nf4(packed, state, torch.bfloat16)
        result_mb = w.numel() * 2 / 1e6
    grown = (benchlib.peak_rss_bytes() - base) / 1e6
    del result
    print(f"peak RSS growth, {what} 4096x11008 bf16: {grown:6.1f} MB (the result itself is {result_mb:.1f} MB; "
          f"an fp32 copy of the weight would be {w.numel() * 4 / 1e6:.0f} MB)")
    print(json.dumps({"what": f"peak RSS growth of {what}", "shape": [4096, 11008], "grown_mb": grown,
                      "result_mb": result_mb}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", action="store_true", help="also run 4096 x 11008")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for torch and bitsandbytes")
    p.add_argument("--out", help="write the figures and the machine (CPU model, native bf16) as JSON here")
    p.add_argument("--child", choices=["quantize", "dequantize"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_peak_rss(args.child)
        return
    machine = benchlib.machine()
    print(f"{machine['cpu']}, native bf16: {machine['native_bf16']}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    shapes = [(4096, 4096)] + ([(4096, 11008)] if args.big else [])
    for out_f, in_f in shapes:
        bench_codec(out_f, in_f, args.reps)
        bench_linear(out_f, in_f, args.tokens, args.reps)
    for what in ("quantize", "dequantize"):
        r, proc = benchlib.run_child([sys.executable, os.path.abspath(__file__), "--child", what,
                                      "--threads", str(args.threads)])
        print("\n".join(proc.stdout.strip().splitlines()[:-1]))
        RESULTS.append(r)
    if args.out:
        benchlib.write_json(args.out, {"machine": machine, "threads": torch.get_num_threads(), "results": RESULTS})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
