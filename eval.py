"""Evaluation of a context-extended LLaMA: perplexity on long texts (PG19, Proof-pile) and passkey retrieval.

As LongQLoRA reports it (REFERENCE §6, §7): lengths 1024 / 2048 / 4096 / 8192, full causal attention (S²-Attn
only approximates it in training), the base in NF4. RoPE scales as in training, the same at every length
(infra/rope_scaling.py: --rope-factor, else the adapter's longqlora.json, else config.json), printed and saved.

Perplexity. The text is one flat token stream x_0 .. x_{N-1} (tokenized documents back to back, each starting
with BOS, or LongLoRA's pre-tokenized `.bin`). A window x_s .. x_{s+L-1} (L = seq_len) holds L - 1 predictions,
nll_t = -log p(x_t | x_s .. x_{t-1}). Our protocols (disjoint the default), and the published scripts':
  disjoint   Windows start at s in range(0, N - L, L) with the LAST start dropped (as the scripts drop it):
             non-overlapping windows; ppl = exp(mean over windows of each window's mean nll).
  sliding    Every token x_1 .. x_{N-1} is scored exactly once, ppl = exp(sum of nlls / (N - 1)): the first
             window [0, L) scores x_1 .. x_{L-1}; each next window [e - L, e), e = L + stride, L + 2 stride, ...,
             N, scores only its new targets x_{e_prev} .. x_{e-1}, with at least L - stride tokens of context.
             Windows are right-aligned, all exactly L long (the HF docs' last one is shorter); stride defaults to
             L // 2 and must be < L. The scored set is the same at every L, so lengths are comparable.
  longqlora  LongQLoRA's evaluate.py and LongLoRA's eval.py (infra/eval_data.py): disjoint's loop with stride
  longlora   8192 whatever L is, or 256 (overlapping windows: tokens scored several times).
"tokens" in the results counts scored predictions (with multiplicity for longlora's overlaps). The loss is
computed in chunks (model.chunked_cross_entropy), so an 8k window never holds (T, vocab) fp32 logits.

Passkey retrieval (ours; --protocol longlora: LongLoRA's test, infra/eval_data.py): filler text ("The grass
is green. ...") with one line "The pass key is K. Remember it. K is the pass key." at a random depth, then
"What is the pass key? The pass key is"; K a random 5-digit number. The prompt is grown to seq_len -
PASSKEY_NEW_TOKENS tokens (prompt and answer fit in seq_len), the answer decoded greedily with the KV cache;
correct when its first number is K. Accuracy per length and per depth bucket.

    python eval.py --model DIR --dataset pg19 --seq-len 1024 2048 4096 8192 --out results.json
    python eval.py --model DIR --adapter ADAPTER --dataset proof-pile --protocol longlora
    python eval.py --model DIR --adapter ADAPTER --dataset pg19 --protocol longqlora   # the paper's script
    python eval.py --model DIR --task passkey --seq-len 1024 2048 4096 8192 --trials 20
"""
from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time

import numpy as np
from tqdm import tqdm

from infra import atomic, cli, eval_data, sources
from infra.eval_data import FILLER, PASSKEY_LINE, PASSKEY_QUESTION, PASSKEY_TASK

# torch and the modules that import it load on first use, not here: --help and bad flags answer at once.
torch, generate, rope_scaling = map(cli.LazyModule, ("torch", "generate", "infra.rope_scaling"))

PROTOCOLS = ("disjoint", "sliding", "longqlora", "longlora")
MAX_CONTEXT_MULTIPLE = 8        # longest --seq-len: this many times the model's usable context


# --------------------------------------------------------------------------- perplexity

def default_stride(protocol: str, seq_len: int) -> int:
    return {"disjoint": seq_len, "sliding": max(1, seq_len // 2),
            **{name: d["stride"] for name, d in eval_data.EVAL_DEFAULTS.items()}}[protocol]


def perplexity_windows(n_tokens: int, seq_len: int, protocol: str,
                       stride: int | None = None) -> list[tuple[int, int, int]]:
    """The windows of a protocol as (start, first_target, end): the model reads tokens[start:end] and the
    targets scored are the tokens at positions first_target .. end - 1 (see the module docstring)."""
    if protocol not in PROTOCOLS:       # benchmarks call this directly: a typo must not score as disjoint
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    stride = default_stride(protocol, seq_len) if stride is None else stride
    if protocol != "sliding":
        starts = list(range(0, n_tokens - seq_len, stride))[:-1]   # LongLoRA drops the last start
        if not starts:
            raise ValueError(f"seq_len {seq_len}: {n_tokens} tokens are too few for one {protocol} window with stride "
                             f"{stride} (need more than {seq_len + stride}, the last window start is dropped)")
        return [(s, s + 1, s + seq_len) for s in starts]
    if stride >= seq_len:
        raise ValueError(f"sliding protocol: stride {stride} must be smaller than seq_len {seq_len} "
                         f"(each scored token needs context inside its window)")
    if n_tokens < 2:
        raise ValueError(f"{n_tokens} tokens: nothing to score")
    end = min(seq_len, n_tokens)
    windows = [(0, 1, end)]
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        windows.append((new_end - seq_len, end, new_end))
        end = new_end
    return windows


def token_nll(model, tokens):
    """nll (B, T - 1) float32: nll[:, t] = -log p(tokens[:, t + 1] | tokens[:, :t + 1])."""
    with torch.inference_mode():
        return model.loss(tokens, tokens, reduction="none")


def evaluate_perplexity(model, tokens, seq_len: int, protocol: str = "disjoint", stride: int | None = None,
                        batch_size: int = 1, progress: bool = True, name: str = "model") -> dict:
    """Perplexity of `tokens` (1-D ids) under one protocol: {"seq_len", "stride", "protocol", "ppl", "nll",
    "tokens", "windows", "seconds"}, nll = log(ppl). All windows have the same length, so they batch freely and
    the result does not depend on batch_size. A window whose loss is not finite is an error naming `name`."""
    stride = default_stride(protocol, seq_len) if stride is None else stride
    windows = perplexity_windows(len(tokens), seq_len, protocol, stride)
    device = model.embed_tokens.weight.device
    window_losses, nll_sum, scored, t0 = [], 0.0, 0, time.perf_counter()
    with tqdm(total=len(windows), desc=f"{protocol} L={seq_len}", unit="win", disable=not progress,
              dynamic_ncols=True) as bar:
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            ids = torch.from_numpy(np.stack([np.asarray(tokens[s:e], dtype=np.int64) for s, _, e in batch]))
            for row, (s, first, e) in zip(token_nll(model, ids.to(device)).double().cpu(), batch):
                picked = row[first - s - 1:e - s - 1]        # prediction of token t sits at index t - s - 1
                window_losses.append(loss := picked.mean().item())
                if not loss < math.log(sys.float_info.max):     # nan, inf, or a perplexity past the float range
                    raise ValueError(f"{name}: the mean loss of window tokens[{s}:{e}] (seq_len {seq_len}) is "
                                     f"{loss:g}, so the perplexity is not finite (overflowing weights?)")
                nll_sum += picked.sum().item()
                scored += len(picked)
            bar.update(len(batch))
    mean_nll = nll_sum / scored if protocol == "sliding" else sum(window_losses) / len(window_losses)
    return {"seq_len": seq_len, "stride": stride, "protocol": protocol, "ppl": math.exp(mean_nll), "nll": mean_nll,
            "tokens": scored, "windows": len(windows), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- passkey retrieval

PASSKEY_NEW_TOKENS = 10         # " 12345." is at most 7 LLaMA tokens (digits are single tokens)
DEPTH_BUCKETS = 5


def passkey_text(n_filler: int, depth: float, key: str) -> str:
    """The prompt text with n_filler filler words, round(depth * n_filler) of them before the key line. Words,
    not LongLoRA's character count, so the prompt length hits its target within a token or two."""
    words = " ".join(FILLER).split()
    filler = [words[i % len(words)] for i in range(n_filler)]      # the filler sentences' words, repeated
    before = round(depth * n_filler)
    return "\n".join([PASSKEY_TASK, " ".join(filler[:before]), PASSKEY_LINE.format(key=key),
                      " ".join(filler[:n_filler - before]), PASSKEY_QUESTION])


def passkey_prompt(tokenizer, target_len: int, depth: float, key: str) -> list[int]:
    """BOS + passkey text with as many filler words as fit in target_len tokens."""
    def length(n):
        return len(tokenizer.encode(passkey_text(n, depth, key), bos=True))

    fixed = length(0)
    if fixed > target_len:
        raise ValueError(f"a passkey prompt needs at least {fixed} tokens; {target_len} is too short")
    per_word = max((length(200) - fixed) / 200, 1e-3)
    n = int((target_len - fixed) / per_word)
    # Tokens are nearly additive in words: a few steps from the estimate reach the largest n that fits.
    while n > 0 and length(n) > target_len:
        n -= max(1, int((length(n) - target_len) / per_word))
    n = max(n, 0)
    while length(n + 1) <= target_len:
        n += 1
    return tokenizer.encode(passkey_text(n, depth, key), bos=True)


def passkey_correct(answer: str, key: str) -> bool:
    """A trial counts when the first number in the model's answer is the key."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group() == key


def passkey_summary(trials: list[dict], n_buckets: int = DEPTH_BUCKETS) -> dict:
    """Accuracy over trials [{"depth", "correct"}] and per depth bucket (None for an empty bucket)."""
    names = [f"{100 * k // n_buckets}-{100 * (k + 1) // n_buckets}%" for k in range(n_buckets)]
    buckets = {name: [] for name in names}
    for t in trials:
        buckets[names[min(int(t["depth"] * n_buckets), n_buckets - 1)]].append(t["correct"])
    correct = sum(t["correct"] for t in trials)
    return {"accuracy": correct / len(trials), "correct": correct, "trials": len(trials),
            "depth_accuracy": {b: (sum(v) / len(v) if v else None) for b, v in buckets.items()}}


def evaluate_passkey(model, tokenizer, seq_len: int, trials: int = 20, seed: int = 0, progress: bool = True,
                     protocol: str | None = None) -> dict:
    """Passkey retrieval at one length: `trials` random (key, depth) pairs, greedy answers with the KV cache.
    protocol "longlora": LongLoRA's prompts and exact-token scoring (infra/eval_data.py); else ours."""
    rng = random.Random(seed * 1_000_003 + seq_len)     # the same trials for a length whatever else runs
    records, t0 = [], time.perf_counter()
    for j in tqdm(range(trials), desc=f"passkey L={seq_len}", unit="trial", disable=not progress, dynamic_ncols=True):
        if protocol == "longlora":
            text, key, depth = eval_data.passkey_trial(seq_len, j, rng)
            prompt, key_ids = tokenizer.encode(text, bos=True), tokenizer.encode(key, bos=False)
            answer = generate.generate(model, tokenizer, prompt, len(key_ids), temperature=0.0)
            correct = eval_data.passkey_correct(answer, key_ids)
        else:
            key, depth = str(rng.randint(10000, 99999)), rng.random()
            prompt = passkey_prompt(tokenizer, seq_len - PASSKEY_NEW_TOKENS, depth, key)
            answer = generate.generate(model, tokenizer, prompt, PASSKEY_NEW_TOKENS, temperature=0.0)
            correct = passkey_correct(tokenizer.decode(answer), key)
        records.append({"key": key, "depth": depth, "prompt_tokens": len(prompt), "correct": correct,
                        "answer": tokenizer.decode(answer)})
    return {"task": "passkey", "seq_len": seq_len, **passkey_summary(records),
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in records) / trials,
            "seconds": time.perf_counter() - t0, "records": records}


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0], formatter_class=cli.DefaultsHelp)
    p.add_argument("--task", choices=("perplexity", "passkey"), default="perplexity", help="what to measure")
    cli.add_inference_flags(p)
    p.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="evaluation lengths")
    p.add_argument("--attn", choices=("full", "s2"), default="full",
                   help="full causal attention (the paper's choice at inference) or S²-Attn (ablation)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="disjoint",
                   help="ours: disjoint = non-overlapping windows of seq_len tokens, sliding = every token scored "
                        "once after at least seq_len - stride tokens of context; the published scripts, each with "
                        "its defaults for flags not given: longqlora = LongQLoRA's evaluate.py (stride 8192 "
                        "whatever seq_len, --quant nf4, --dtype fp16, .bin token files preferred), longlora = "
                        "LongLoRA's eval.py (stride 256, dense fp16, .bin preferred) and, with --task passkey, "
                        "LongLoRA's passkey test (10 trials, keys 1..50000, exact token match)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: seq_len for disjoint, "
                   "seq_len // 2 for sliding, 8192 for longqlora, 256 for longlora)")
    p.add_argument("--dataset", choices=("pg19", "proof-pile"), default="pg19", help="looked up in --data-dir")
    p.add_argument("--split", default=None, help="dataset split (default: validation for pg19, test for proof-pile)")
    p.add_argument("--data-dir", default=None, help="where --dataset looks (default: $LONGQLORA_DATA or data)")
    p.add_argument("--data-path", default=None, help="any text folder, PG19-layout folder, .txt, .jsonl(.gz) or .bin")
    p.add_argument("--download", action="store_true", help="download PG19 into DATA_DIR/pg19 when it is missing")
    p.add_argument("--bin-dtype", choices=("uint16", "uint32"), default=None,
                   help="element type of a .bin token file (default: uint16, or uint32 above 65,536 ids)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: $LONGQLORA_CACHE or ~/.cache/longqlora)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens only (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (the result does not change)")
    p.add_argument("--trials", type=int, default=20, help="passkey trials per length (10 for --protocol longlora)")
    p.add_argument("--seed", type=int, default=0, help="passkey keys and depths")
    p.add_argument("--out", default=None, help="results JSON (rewritten after every length)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags left unset that a published protocol changes stay None here; main() fills them in (infra/eval_data.py)."""
    unset = argparse.Namespace(quant=None, dtype=None, trials=None)     # argparse keeps these unless given
    args = cli.one_line_errors(build_parser()).parse_args(argv, unset)
    for L in args.seq_len:
        cli.check_range("--seq-len", L, 2)
    for flag, low in (("batch_size", 1), ("trials", 1), ("stride", 1), ("max_tokens", 2)):
        if getattr(args, flag) is not None:
            cli.check_range(f"--{flag.replace('_', '-')}", getattr(args, flag), low)
    if args.download and args.dataset != "pg19":
        raise ValueError(f"--download fetches PG19 only, not {args.dataset}")
    if args.task == "passkey" and args.attn != "full":
        raise ValueError("passkey decodes with the KV cache, which needs --attn full")
    if args.task == "passkey" and args.protocol not in ("disjoint", "longlora"):
        raise ValueError(f"--task passkey: --protocol longlora (LongLoRA's test) or none (ours), not {args.protocol}")
    return args


def main(argv=None) -> dict:
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    cli.set_threads(args.threads)
    show, perplexity = not args.no_progress, args.task == "perplexity"
    device = cli.device(args.device)
    eval_data.apply_eval_defaults(args, device.type == "cuda")      # prints a note where it changes the dtype
    if perplexity:  # missing data fails before the model is loaded
        path, reader_split, dataset, split = eval_data.eval_source(args)
    tokenizer = sources.load_tokenizer(args.model) if not perplexity or path.suffix != ".bin" else None
    model, source = generate.load_model(args.model, args.adapter, args.quant, cli.compute_dtype(args.dtype, device),
                                        args.rope_factor, device)
    model.set_attention(args.attn)
    factor, usable = rope_scaling.describe_scaling(model.args.rope_scaling), generate.max_length(model)
    for L in args.seq_len:      # before any time is spent: a passkey prompt for an absurd length takes long to build
        if L > MAX_CONTEXT_MULTIPLE * usable:
            raise ValueError(f"--seq-len {L}: more than {MAX_CONTEXT_MULTIPLE}x this model's usable context of "
                             f"{usable} tokens (max_position_embeddings {model.args.max_position_embeddings}, "
                             f"RoPE factor {factor})")
    if perplexity:
        tokens = sources.tokenize_source(path, tokenizer, reader_split, args.cache_dir, model.args.vocab_size, show,
                                         args.bin_dtype).tokens[:args.max_tokens]
    for L in args.seq_len:      # an impossible length fails before time is spent on the others
        if perplexity:
            perplexity_windows(len(tokens), L, args.protocol, args.stride)
        elif args.protocol != "longlora":
            passkey_prompt(tokenizer, L - PASSKEY_NEW_TOKENS, 0.5, "12345")
    print(f"RoPE factor {factor} at every length (from {source}); usable context {usable} tokens", flush=True)
    report = {"model": str(args.model), "adapter": None if args.adapter is None else str(args.adapter),
              "quant": args.quant, "dtype": str(model.embed_tokens.weight.dtype)[6:], "attn": args.attn,
              "rope_factor": factor, "rope_source": source, "results": []}
    for L in args.seq_len:
        if perplexity:
            r = {"dataset": dataset, "split": split,
                 **evaluate_perplexity(model, tokens, L, args.protocol, args.stride, args.batch_size, show,
                                     f"{args.model}" + (f" with adapter {args.adapter}" if args.adapter else ""))}
        else:
            r = evaluate_passkey(model, tokenizer, L, args.trials, args.seed, show, args.protocol)
        report["results"].append({**r, "rope_factor": factor})
        if args.out:  # after every length, so a crash at 8k keeps the shorter results
            atomic.write_json(args.out, report)
    print(eval_data.results_table(args.task, report["results"]))
    if args.out:
        print(f"results: {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(cli.run(main, cli.parse_or_exit(parse_args)))
