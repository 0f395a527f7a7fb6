"""Evaluation speed: our perplexity forward (eval.token_nll: SDPA attention + chunked loss) against HF
transformers' LlamaForCausalLM(input_ids, labels=input_ids).loss, on the same checkpoint and windows.

A random LLaMA-shaped checkpoint (transformers' save_pretrained, vocabulary 32,000) is written to a temporary
directory once; both implementations load it densely in each --dtypes dtype and score the same random windows
of --seq-len tokens, one window per forward. The two are timed alternately (best of --reps rounds, after one
warm-up window) in one process, so that load from other processes hits both alike, with --threads torch threads
(default 1: the machine this was developed on is shared). Also checks that both give the same mean loss (fp32:
1e-4 relative; bf16 loosely, the roundings differ), and reports each side's matmul FLOP/s (2N + 2H + A per
token, benchlib.eval_flops_per_token) against the machine's matmul peak measured in the same dtype, per wall
second and per CPU second (CPU time hardly depends on what else runs on a shared machine).

Shapes (--shape): small (dim 256, 4 layers, seq 1024: the lm_head and loss weigh as much as the decoder), d2048
(dim 2048, intermediate 5504, 4 layers, 16 heads, seq 4096: decoder-dominated, as a 7B is).

No data: random tokens.

    python bench/eval_speed.py --shape d2048 --out bench/results/eval_speed.json    # the committed run
    python bench/eval_speed.py --shape small               # ~1 minute
    python bench/eval_speed.py --dtypes fp32 --windows 8 --seq-len 2048
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import benchlib

SHAPES = {
    "small": dict(dim=256, intermediate=688, layers=4, heads=4, seq_len=1024),
    "d1024": dict(dim=1024, intermediate=2752, layers=4, heads=8, seq_len=2048),
    "d2048": dict(dim=2048, intermediate=5504, layers=4, heads=16, seq_len=4096),
}


def hf_config(vocab: int, c: dict) -> dict:
    return dict(vocab_size=vocab, hidden_size=c["dim"], intermediate_size=c["intermediate"],
                num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["heads"],
                max_position_embeddings=max(4096, c["seq_len"]), rms_norm_eps=1e-6)


def ours_loss(model, window):
    from eval import token_nll

    return token_nll(model, window).mean().item()


def hf_loss(model, window):
    import torch

    with torch.inference_mode():
        return model(input_ids=window, labels=window).loss.item()


def timed(fn, model, windows):
    """(wall seconds, CPU seconds) for all windows, and their mean loss."""
    t0, c0 = time.perf_counter(), time.process_time()
    losses = [fn(model, w) for w in windows]
    return (time.perf_counter() - t0, time.process_time() - c0), sum(losses) / len(losses)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="d2048")
    for k in ("dim", "intermediate", "layers", "heads", "seq_len"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"override the shape's {k}")
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, one per core)")
    p.add_argument("--out", help="write the results JSON here")
    args = p.parse_args()
    import torch

    from infra import hf
    from transformers import LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    c = {**SHAPES[args.shape], **{k: getattr(args, k) for k in SHAPES[args.shape] if getattr(args, k) is not None}}
    machine = benchlib.machine()
    print(f"machine: {machine['cpu']}, native bf16: {machine['native_bf16']}, torch {machine['torch']}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    if "bf16" in args.dtypes and not machine["native_bf16"]:
        print("note: this CPU has no native bf16; the bf16 figures measure torch's emulation")
    flops = benchlib.eval_flops_per_token(dim=c["dim"], intermediate=c["intermediate"], layers=c["layers"],
                                          heads=c["heads"], kv_heads=c["heads"], head_dim=c["dim"] // c["heads"],
                                          vocab=args.vocab, ctx=c["seq_len"])
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, args.vocab, (1, c["seq_len"]), generator=g) for _ in range(args.windows)]
    tokens = args.windows * c["seq_len"]
    rows, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = benchlib.random_hf_checkpoint(Path(tmp) / "ckpt", hf_config(args.vocab, c), seed=0)
        for name in args.dtypes:
            dtype = getattr(torch, benchlib.DTYPES[name])
            ours = hf.load_model(ckpt, dtype=dtype)
            ref = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").eval()
            n_params = sum(t.numel() for t in ours.parameters())
            ours_loss(ours, windows[0]), hf_loss(ref, windows[0])         # warm-up
            best = {"ours": [float("inf")] * 2, "hf": [float("inf")] * 2}     # (wall, CPU) seconds
            rounds = []
            peaks = [benchlib.matmul_peak(name)]
            for _ in range(args.reps):                                     # alternate, keep the best of each
                t, loss_ours = timed(ours_loss, ours, windows)
                th, loss_hf = timed(hf_loss, ref, windows)
                for side, x in (("ours", t), ("hf", th)):
                    best[side] = [min(a, b) for a, b in zip(best[side], x)]
                rounds.append(th[0] / t[0])
            peaks.append(benchlib.matmul_peak(name))
            peak = max(p["flops_per_s"] for p in peaks)
            peak_cpu = max(p["flops_per_cpu_s"] for p in peaks)
            (t_ours, c_ours), (t_hf, c_hf) = best["ours"], best["hf"]
            row = {"dtype": name, "ours_tokens_per_s": tokens / t_ours, "hf_tokens_per_s": tokens / t_hf,
                   "tokens_per_s_ratio": t_hf / t_ours, "cpu_time_ratio": c_ours / c_hf, "per_round_ratios": rounds,
                   "ours_loss": loss_ours, "hf_loss": loss_hf, "params": n_params,
                   "matmul_flops_per_s": peak, "ours_utilisation": flops * tokens / t_ours / peak,
                   "hf_utilisation": flops * tokens / t_hf / peak, "matmul_flops_per_cpu_s": peak_cpu,
                   "ours_cpu_utilisation": flops * tokens / c_ours / peak_cpu,
                   "hf_cpu_utilisation": flops * tokens / c_hf / peak_cpu}
            rows.append(row)
            print(f"{name}: {n_params / 1e6:.1f}M params, {args.windows} x {c['seq_len']} tokens: ours "
                  f"{row['ours_tokens_per_s']:,.0f} tok/s, HF {row['hf_tokens_per_s']:,.0f} tok/s, ratio "
                  f"{row['tokens_per_s_ratio']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in rounds)}; CPU time "
                  f"ours / HF {row['cpu_time_ratio']:.2f}); "
                  f"mean loss ours {loss_ours:.6f} HF {loss_hf:.6f}", flush=True)
            if name == "fp32" and abs(loss_ours - loss_hf) > 1e-4 * abs(loss_hf):
                raise SystemExit(f"fp32 losses differ: ours {loss_ours} HF {loss_hf}")
            del ours, ref
    print(f"\nshape {args.shape}: dim {c['dim']}, intermediate {c['intermediate']}, {c['layers']} layers, "
          f"{c['heads']} heads, vocab {args.vocab}, seq {c['seq_len']}; {machine['cpu']}\n")
    print("| dtype | ours tok/s | HF tok/s | ours / HF | CPU time HF / ours | utilisation ours / HF (per CPU s) | "
          "matmul peak GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['ours_tokens_per_s']:,.0f} | {r['hf_tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s_ratio']:.2f}x | {1 / r['cpu_time_ratio']:.2f}x | {100 * r['ours_utilisation']:.0f}% / "
              f"{100 * r['hf_utilisation']:.0f}% ({100 * r['ours_cpu_utilisation']:.0f}% / "
              f"{100 * r['hf_cpu_utilisation']:.0f}%) | {r['matmul_flops_per_s'] / 1e9:.1f} |")
    if args.out:
        benchlib.write_json(args.out, {"machine": machine, "shape": args.shape, "config": {**c, "vocab": args.vocab},
                                       "threads": torch.get_num_threads(), "windows": args.windows,
                                       "reps": args.reps, "flops_per_token": flops, "results": rows,
                                       "seconds": time.perf_counter() - t_start})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
