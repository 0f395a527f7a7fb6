"""Evaluation speed: our perplexity forward (eval.token_nll: SDPA attention + chunked loss) against HF
transformers' LlamaForCausalLM(input_ids, labels=input_ids).loss, on the same checkpoint and windows, CPU.

A small LLaMA-shaped model (4 layers, hidden 256, LLaMA's 32,000-token vocabulary, ~20M parameters of which
16M are the embedding and the head, so the logits/loss part weighs as much as it does at 7B scale) is written
to a temporary HF directory once; both implementations load it and score the same random windows of seq_len
tokens, one window per forward, in fp32 and bf16. The two are timed alternately (best of --reps rounds, after
one warm-up window) so that load from other processes hits both alike. Also checks that both give the same
mean loss (fp32: 1e-4 relative; bf16: loosely, the roundings differ).

    python bench/eval_speed.py                    # ~2-3 minutes on 2 cores
    python bench/eval_speed.py --windows 8 --seq-len 2048
    python bench/eval_speed.py --threads 1        # steadier figures on a machine busy with other work
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hf  # noqa: E402
from eval import token_nll  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_checkpoint(path: Path, vocab: int, dim: int, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=int(dim * 8 / 3 // 16 * 16),
                      num_hidden_layers=layers, num_attention_heads=dim // 64, num_key_value_heads=dim // 64,
                      max_position_embeddings=4096, rms_norm_eps=1e-6)
    LlamaForCausalLM(cfg).save_pretrained(path)


def ours_loss(model, window):
    return token_nll(model, window).mean().item()


def hf_loss(model, window):
    with torch.inference_mode():
        return model(input_ids=window, labels=window).loss.item()


def best_time(fn, model, windows, reps):
    """Seconds for all windows, best of `reps` passes; plus the mean loss."""
    best, losses = float("inf"), []
    for _ in range(reps):
        t0 = time.perf_counter()
        losses = [fn(model, w) for w in windows]
        best = min(best, time.perf_counter() - t0)
    return best, sum(losses) / len(losses)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, args.vocab, (1, args.seq_len), generator=g) for _ in range(args.windows)]
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), args.vocab, args.dim, args.layers)
        rows = []
        for name in args.dtypes:
            dtype = DTYPES[name]
            ours = hf.load_model(tmp, dtype=dtype)
            hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            n_params = sum(t.numel() for t in ours.parameters())
            ours_loss(ours, windows[0]), hf_loss(hf, windows[0])          # warm-up
            t_ours = t_hf = float("inf")
            for _ in range(args.reps):                                     # alternate, keep the best of each
                t, loss_ours = best_time(ours_loss, ours, windows, 1)
                t_ours = min(t_ours, t)
                t, loss_hf = best_time(hf_loss, hf, windows, 1)
                t_hf = min(t_hf, t)
            tokens = args.windows * args.seq_len
            rows.append((name, tokens / t_ours, tokens / t_hf, t_hf / t_ours, loss_ours, loss_hf))
            print(f"{name}: {n_params / 1e6:.1f}M params, {args.windows} windows x {args.seq_len} tokens: "
                  f"ours {tokens / t_ours:,.0f} tok/s, HF {tokens / t_hf:,.0f} tok/s, ratio {t_hf / t_ours:.2f}x; "
                  f"mean loss ours {loss_ours:.6f} HF {loss_hf:.6f}", flush=True)
            if name == "fp32" and abs(loss_ours - loss_hf) > 1e-4 * abs(loss_hf):
                raise SystemExit(f"fp32 losses differ: ours {loss_ours} HF {loss_hf}")
            del ours, hf
    print()
    print("| dtype | ours tok/s | HF tok/s | ours / HF |")
    print("|---|---:|---:|---:|")
    for name, ours_tps, hf_tps, ratio, _, _ in rows:
        print(f"| {name} | {ours_tps:,.0f} | {hf_tps:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
