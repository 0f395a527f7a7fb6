"""Peak memory of one LongQLoRA training step against context length: it must grow linearly.

LongQLoRA's claim rests on nothing in a training step growing faster than the sequence: NF4 weights and
the LoRA state are constant, gradient checkpointing keeps one hidden state per layer (L x T x dim),
attention never materialises a (T x T) score matrix (fused SDPA with full attention; S²-Attn works in
groups of T/4), and the chunked loss keeps a (chunk x vocab) working set whatever T is. So

    peak(T) = a + b T + max(loss chunk working set, c T)        (and no T^2 term)

where c T is one decoder layer's recompute + backward. Below the context where c T overtakes the loss
chunk the curve is flatter, so the fits are given over all contexts and over ctx >= --fit-from.

Measured against two baselines: a straight line (a least-squares line's R^2, and how much of the peak at the
longest context a parabola's T^2 term makes) and memory.predict_peak_memory, the dry run's prediction for the
same model and context (a device-memory model: compare the slopes). Each context length runs in a fresh
process (one run's freed memory cannot hide the next one's peak): a small random LLaMA (benchlib's cached
checkpoint) loaded by train.build_model with NF4 + LoRA r=64 on the seven projections, then one optimizer step
through train.train_step (gradient checkpointing, chunked loss, AdamW, bf16 compute) with S²-Attn or full
attention. Measured: the process's peak resident set size (VmHWM) and the peak during the step above the RSS
before it (/proc/self/clear_refs resets the high-water mark), with glibc's mmap threshold pinned
(benchlib.PINNED_MMAP: with glibc's dynamic threshold the S²-Attn step read ~110 KiB per token instead of ~36,
freed activations staying resident in the heap).

The model is LLaMA-shaped but small (dim 256, 4 layers, vocab 8000) and the loss chunk 256 tokens: at dim
256 a (1024 x 32000) loss chunk would outweigh one layer's recompute at 16k tokens, while at LLaMA-2-7B
scale (dim 4096) one layer's recompute at 8k is ~3x the loss chunk; these sizes keep that proportion.
No data: random tokens.

    python bench/ctx_memory.py --out bench/results/ctx_memory.json     # the committed run: 1k..16k, s2 and full
    python bench/ctx_memory.py --ctx 1024 4096 --attn s2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib

DEFAULT_CTX = (1024, 2048, 4096, 8192, 16384)


def model_args(a):
    from model import ModelArgs

    return ModelArgs(vocab_size=a.vocab, dim=a.dim, intermediate_size=a.intermediate, n_layers=a.layers,
                     n_heads=a.heads, norm_eps=1e-5, max_position_embeddings=a.trained_ctx)


def make_checkpoint(a) -> Path:
    """A random LLaMA in HF format written by hf.save_model, cached in --cache-dir."""
    return benchlib.random_checkpoint(Path(a.cache_dir) / (f"ctx_memory-v{a.vocab}-d{a.dim}-i{a.intermediate}-l{a.layers}"
                                                         f"-h{a.heads}-p{a.trained_ctx}-s{a.seed}"), model_args(a), a.seed)


def child(ckpt: Path, ctx: int, attn: str, a) -> dict:
    """One training step at `ctx` tokens; returns the memory figures."""
    import torch

    import train

    torch.set_num_threads(a.threads)
    rss_import = benchlib.rss_bytes()
    torch.manual_seed(a.seed)
    flags = train.parse_args(["--model", str(ckpt), "--ctx", str(ctx), "--attn", attn, "--quant", "nf4",
                              "--lora-r", "64", "--lora-alpha", "16", "--lora-dropout", "0.05",
                              "--loss-chunk", str(a.loss_chunk)])
    model, trainable, factor = train.build_model(flags, torch.bfloat16)
    optimizer = train.make_optimizer(trainable, 2e-4, 0.0, torch.device("cpu"))
    tokens = torch.randint(3, a.vocab, (1, ctx), generator=torch.Generator().manual_seed(a.seed))
    rss_loaded = benchlib.rss_bytes()
    peak_load = benchlib.peak_rss_bytes()
    resettable = benchlib.reset_peak_rss()
    t0 = time.perf_counter()
    r = train.train_step(model, [{"input_ids": tokens, "labels": tokens, "padding_mask": None}], optimizer,
                         torch.amp.GradScaler("cpu", enabled=False), max_grad_norm=0.3)
    seconds = time.perf_counter() - t0
    step_peak = benchlib.peak_rss_bytes()
    return {"ctx": ctx, "attn": attn, "pi_factor": factor, "loss": r["loss"], "seconds": seconds,
            "peak_rss": max(peak_load, step_peak), "rss_after_import": rss_import, "rss_after_load": rss_loaded,
            "step_peak_above_load": step_peak - rss_loaded if resettable else None}


# --------------------------------------------------------------------------- fitting

def fit(xs, ys, degree):
    """Least-squares polynomial coefficients (lowest power first) and R^2."""
    import numpy as np

    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    coef = np.polynomial.polynomial.polyfit(x, y, degree)
    pred = np.polynomial.polynomial.polyval(x, coef)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return [float(c) for c in coef], 1.0 - ss_res / ss_tot if ss_tot else 1.0


def analyse(rows, key):
    xs = [r["ctx"] for r in rows]
    ys = [r[key] for r in rows]
    (a, b), r2 = fit(xs, ys, 1)
    out = {"intercept_bytes": a, "bytes_per_token": b, "r2_linear": r2}
    if len(xs) >= 3:
        (qa, qb, qc), r2q = fit(xs, ys, 2)
        t = max(xs)
        # How much of the peak at the longest context the T^2 term accounts for, and against the T term.
        out.update(quad_coef=qc, r2_quadratic=r2q,
                   quad_share_of_peak_at_max_ctx=qc * t * t / (qa + qb * t + qc * t * t),
                   quad_vs_linear_term_at_max_ctx=qc * t * t / (qb * t) if qb else None)
    return out


# --------------------------------------------------------------------------- the parent

def run_child(ckpt, ctx, attn, argv, timeout):
    return benchlib.run_child([sys.executable, __file__, *argv, "--child", str(ckpt), str(ctx), attn], timeout,
                              benchlib.PINNED_MMAP)[0]


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, nargs="+", default=list(DEFAULT_CTX))
    p.add_argument("--attn", nargs="+", choices=["s2", "full"], default=["s2", "full"])
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--trained-ctx", type=int, default=4096,
                   help="max_position_embeddings of the model; PI factor ceil(ctx / this), as train.py")
    p.add_argument("--loss-chunk", type=int, default=256,
                   help="tokens per lm_head + CE chunk (train.py: 1024; see the docstring for why smaller here)")
    p.add_argument("--fit-from", type=int, default=4096,
                   help="also fit only the contexts >= this (where the per-token terms dominate the constant ones)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (memory does not depend on it)")
    p.add_argument("--jobs", type=int, default=2, help="processes measured at the same time (each its own RSS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds per process")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--cache-dir", default=str(benchlib.CACHE), help="where the random checkpoint is written and reused")
    p.add_argument("--child", nargs=3, metavar=("CKPT", "CTX", "ATTN"), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.child:
        print(json.dumps(child(Path(a.child[0]), int(a.child[1]), a.child[2], a)))
        return 0
    if any(c < 8 for c in a.ctx):
        raise ValueError("--ctx values must be at least 8 tokens")
    if a.dim % a.heads:
        raise ValueError(f"--dim {a.dim} is not a multiple of --heads {a.heads}")
    t0 = time.perf_counter()
    ckpt = make_checkpoint(a)
    from infra import memory

    margs = model_args(a)
    passthrough = ["--vocab", str(a.vocab), "--dim", str(a.dim), "--intermediate", str(a.intermediate),
                   "--layers", str(a.layers), "--heads", str(a.heads), "--trained-ctx", str(a.trained_ctx),
                   "--loss-chunk", str(a.loss_chunk), "--threads", str(a.threads), "--seed", str(a.seed)]
    print(f"model: vocab {a.vocab}, dim {a.dim}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, "
          f"trained ctx {a.trained_ctx} (PI beyond); NF4 + LoRA r=64 on 7 projections, gradient checkpointing, "
          f"bf16 compute, loss chunk {a.loss_chunk}, AdamW, batch 1, {a.threads} thread(s)")
    results = {}
    jobs = [(attn, ctx) for attn in a.attn for ctx in sorted(a.ctx)]
    # Longest first, so the pool's two workers finish together; each child is measured on its own.
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {job: pool.submit(run_child, ckpt, job[1], job[0], passthrough, a.timeout)
                   for job in sorted(jobs, key=lambda j: -j[1])}
    for attn in a.attn:
        rows = []
        for ctx in sorted(a.ctx):
            r = futures[(attn, ctx)].result()
            pred = memory.predict_peak_memory(margs, ctx, 1, 64, quant="nf4", dtype_bytes=2, lora_dropout=0.05,
                                             loss_chunk=a.loss_chunk, attn=attn)
            r["predicted_device_peak"] = pred["peak_bytes"]
            rows.append(r)
            print(f"  {attn:4s} ctx {ctx:6d}: peak RSS {mib(r['peak_rss'])} MiB, step peak above load "
                  f"{mib(r['step_peak_above_load'])} MiB, {r['seconds']:.1f} s, loss {r['loss']:.3f}", flush=True)
        keys = ["peak_rss", "predicted_device_peak"]
        if all(r["step_peak_above_load"] is not None for r in rows):
            keys.insert(1, "step_peak_above_load")
        upper = [r for r in rows if r["ctx"] >= a.fit_from]
        fits = {f"{k} (all ctx)": analyse(rows, k) for k in keys}
        if 2 <= len(upper) < len(rows):
            fits.update({f"{k} (ctx >= {a.fit_from})": analyse(upper, k) for k in keys})
        results[attn] = {"rows": rows, "fits": fits}

        print(f"\n{attn}: | ctx | peak RSS MiB | step peak above load MiB | +MiB per 1k tokens (peak RSS) | "
              f"predicted device peak MiB |")
        print("|---|---|---|---|---|")
        prev = None
        for r in rows:
            inc = "" if prev is None else f"{(r['peak_rss'] - prev['peak_rss']) / 2**20 / ((r['ctx'] - prev['ctx']) / 1000):.2f}"
            print(f"| {r['ctx']} | {mib(r['peak_rss'])} | {mib(r['step_peak_above_load'])} | {inc} | "
                  f"{mib(r['predicted_device_peak'])} |")
            prev = r
        for key, f in fits.items():
            line = (f"  {key}: {f['bytes_per_token'] / 1024:.2f} KiB per token + {f['intercept_bytes'] / 2**20:.1f} MiB, "
                    f"R^2 linear {f['r2_linear']:.5f}")
            if "quad_coef" in f:
                line += (f"; T^2 term at {max(a.ctx)} tokens: {100 * f['quad_share_of_peak_at_max_ctx']:+.2f}% "
                         f"of the peak ({100 * f['quad_vs_linear_term_at_max_ctx']:+.2f}% of the linear term)")
            print(line)
        print()
    seconds = time.perf_counter() - t0
    print(f"{seconds:.0f} s in all")
    if a.out:
        config = {k: getattr(a, k) for k in ("vocab", "dim", "intermediate", "layers", "heads", "trained_ctx",
                                              "loss_chunk", "threads", "seed")}
        benchlib.write_json(a.out, {"results": results, "config": config, "seconds": seconds,
                                    "machine": benchlib.machine()})
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    benchlib.cli_main(main)
