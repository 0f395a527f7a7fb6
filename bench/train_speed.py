"""Training speed and memory of our LongQLoRA step against HF transformers + PEFT + bitsandbytes.

Both sides run the same LongQLoRA configuration on the same HF checkpoint (a random LlamaForCausalLM
written by transformers' `save_pretrained` in bf16, loaded in the compute dtype), the same random tokens and
the same optimizer:

    frozen base: the seven decoder linears in NF4 with double quantization, compute dtype --dtype
    LoRA r=64, alpha=16, dropout=0.05 on q, k, v, o, gate, up, down; fp32 adapter weights
    gradient checkpointing of every decoder layer
    torch AdamW (lr 2e-4, no weight decay, foreach off), gradient norm clipped to 0.3, batch 1 x ctx tokens

The implementations (--impls), each in its own fresh process:
    ours_s2    train.build_model (model.Transformer.from_pretrained(quantize="nf4") + lora.add_lora) and
               train.train_step (forward to the final norm, chunked lm_head + cross-entropy, backward, clip,
               step) with S²-Attn (groups of ctx / 4, half of the heads shifted): LongQLoRA's training setup
    ours_full  the same with full causal attention (SDPA)
    hf_full    LlamaForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
               bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)),
               PEFT get_peft_model(LoraConfig(...)), model(input_ids, labels=input_ids).loss (full logits),
               full attention (SDPA). HF has no S²-Attn, so this is the baseline of both comparisons:
                   ours_s2 / hf_full     LongQLoRA's stack against the usual QLoRA stack at the same length
                   ours_full / hf_full   the same attention on both sides
               --hf-setup same-dtype: gradient_checkpointing_enable(); embeddings, norms and lm_head stay in
                                      the compute dtype, as ours do (the fair comparison, default)
               --hf-setup kbit:       peft.prepare_model_for_kbit_training, what LongQLoRA's own train.py calls;
                                      it also casts embeddings, norms and lm_head to fp32
    base_s2, base_full   ours from another source tree (--baseline DIR, e.g. `git archive HEAD`): the
               before / after of a change, in the same run (compared as ours_* / base_*)

Shapes (--shape, several allowed; --dim/--intermediate/--layers/--heads/--ctx override them), vocab 32000, r=64:
    small   dim 256,  intermediate 688,  4 layers, 4 heads,  ctx 1024   (head-dominated: the lm_head is 2/3 of it)
    d1024   dim 1024, intermediate 2752, 4 layers, 8 heads,  ctx 2048
    d1024-4k  the same at ctx 4096 (attention weighs more against the linears than at dim 2048)
    d2048   dim 2048, intermediate 5504, 4 layers, 16 heads, ctx 4096   (decoder-dominated, as a 7B is)

--dtype auto (default) computes in bf16 where the CPU has native bf16 (avx512_bf16 / amx_bf16) or on CUDA, and
in fp32 elsewhere (emulated bf16 is ~30x slower and says little); the run says which it chose. Several dtypes
(`--dtype bf16 fp32`) are measured one after the other in the same run.

Runs alternate in fresh processes (ours_s2, ours_full, hf_full, ours_s2, ...: --repeats rounds) so background
load on a shared machine hits every side alike. Each process loads the model, runs one warm-up step (on the
first --warmup-ctx tokens: shorter saves minutes on the big shapes) and --steps timed steps, with --threads torch
threads (default 1: on a machine shared with other jobs, 2-thread OpenMP ops wait at their barriers for a
descheduled thread, which slowed both sides 5-8x in our runs; on an idle machine pass --threads 2), and measures
the machine's matmul peak (an n x n @ n x n product, n = --peak-size = 2048, in the same dtype and threads, best of
3) before and after the steps, keeping the higher. Reported per process:
    tokens/s       --steps * ctx / wall time of the timed steps
    CPU ms/token   user + system CPU time of the timed steps per token (steadier than wall time under load)
    peak           CPU: the process's peak resident set size (VmHWM, includes the Python/torch/transformers
                   imports); CUDA: torch.cuda.max_memory_allocated
    above import   CPU: peak RSS minus the RSS right after the imports (model + training)
    step peak      CPU: peak RSS during the training steps (the high-water mark is reset through
                   /proc/self/clear_refs after loading) minus the RSS before them: what training adds
    FLOP/s         matmul FLOPs of the step per token (benchlib.train_flops_per_token: 6N + 8R + 4H + 4A with
                   the implementation's own attention span) x tokens/s
    utilisation    that FLOP/s over the matmul peak measured in the same process: a figure that carries
                   across machines; also per CPU second (step FLOPs / CPU time of the steps, over the matmul's
                   FLOPs / its CPU time), which hardly depends on how busy a shared machine is
The parent prints every run, the medians and the ratios, and writes them (--out) after every shape and dtype.

--deadline SECONDS bounds the whole run: a process that would not fit in what is left (judged by the last run
of the same implementation) is not started, a running one is stopped at the deadline, and the run ends there,
saying why, with the results of the runs that finished (exit 0 when every comparison got at least one run).

No data: random tokens. The committed results came from (written to /tmp, then copied):
    python bench/train_speed.py --quick --out bench/results/train_speed_quick.json   # < 5 min on 2 busy cores
    python bench/train_speed.py --shape d1024-4k d2048 --dtype bf16 fp32 --repeats 2 --steps 1 --warmup-ctx 1024 \
        --deadline 3000 --out bench/results/train_speed.json
and, for other questions:
    python bench/train_speed.py --shape d1024 --impls ours_full base_full --baseline /tmp/base  # before/after
    python bench/train_speed.py --shape d1024 --impls ours_full --profile ours_full             # profiler table
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchlib

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "small": dict(dim=256, intermediate=688, layers=4, heads=4, ctx=1024),
    "d1024": dict(dim=1024, intermediate=2752, layers=4, heads=8, ctx=2048),
    "d1024-4k": dict(dim=1024, intermediate=2752, layers=4, heads=8, ctx=4096),
    "d2048": dict(dim=2048, intermediate=5504, layers=4, heads=16, ctx=4096),
}
SHAPE_KEYS = ("dim", "intermediate", "layers", "heads", "ctx")
IMPLS = ("ours_s2", "ours_full", "hf_full", "base_s2", "base_full")
DEFAULT_IMPLS = ("ours_s2", "ours_full", "hf_full")
# (numerator, denominator) of every reported ratio, where both ran.
COMPARISONS = (("ours_s2", "hf_full"), ("ours_full", "hf_full"), ("ours_s2", "base_s2"), ("ours_full", "base_full"))
GROUP_SIZE_RATIO = 0.25
QUICK = dict(shape=["small"], steps=2, repeats=3, deadline=280.0)
MEDIAN_KEYS = ("tokens_per_s", "cpu_seconds_per_token", "peak_bytes", "peak_above_import", "step_peak_above_load",
               "flops_per_s", "utilisation", "matmul_flops_per_s", "flops_per_cpu_s", "cpu_utilisation",
               "matmul_flops_per_cpu_s")


# --------------------------------------------------------------------------- the shared checkpoint

def make_checkpoint(cfg: dict, seed: int, cache: Path) -> Path:
    """A random transformers LlamaForCausalLM saved in bf16 with save_pretrained, cached in `cache`."""
    key = "-".join(f"{k}{cfg[k]}" for k in ("vocab_size", "hidden_size", "intermediate_size",
                                             "num_hidden_layers", "num_attention_heads",
                                             "max_position_embeddings")) + f"-s{seed}-bf16"
    return benchlib.random_hf_checkpoint(cache / f"train_speed-{key}", cfg, seed)


def llama_config(c: dict) -> dict:
    return dict(vocab_size=c["vocab"], hidden_size=c["dim"], intermediate_size=c["intermediate"],
                num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["heads"],
                # >= ctx: no Position Interpolation on either side (it costs nothing, but HF would need
                # the same rope_scaling passed in; speed and memory do not depend on it).
                max_position_embeddings=c["ctx"], rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def flops_per_token(c: dict, attn: str) -> dict:
    span = max(1, int(c["ctx"] * GROUP_SIZE_RATIO)) if attn == "s2" else c["ctx"]
    return benchlib.train_flops_per_token(dim=c["dim"], intermediate=c["intermediate"], layers=c["layers"],
                                          heads=c["heads"], kv_heads=c["heads"], head_dim=c["dim"] // c["heads"],
                                          vocab=c["vocab"], lora_r=c["lora_r"], span=span)


# --------------------------------------------------------------------------- the two sides

def token_batches(vocab: int, ctx: int, n: int, seed: int):
    """n batches of random tokens (1, ctx), identical for both sides."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, ctx), generator=g) for _ in range(n)]


def build_ours(ckpt: Path, c: dict, attn: str, dtype, device):
    """Our loader and LoRA through train.py's own build_model; the step is train.train_step."""
    import torch

    import train

    torch.manual_seed(c["seed"])
    flags = train.parse_args(["--model", str(ckpt), "--ctx", str(c["ctx"]), "--quant", "nf4",
                              "--lora-r", str(c["lora_r"]), "--lora-alpha", "16", "--lora-dropout", "0.05",
                              "--attn", attn, "--group-size-ratio", str(GROUP_SIZE_RATIO),
                              "--loss-chunk", str(c["loss_chunk"]), *(["--compile"] if c["compile"] else [])])
    model, trainable, _ = train.build_model(flags, dtype, device)
    # The optimizer HF gets too (train.make_optimizer picks this one on CPU, paged AdamW on CUDA).
    optimizer = torch.optim.AdamW(trainable, lr=c["lr"], weight_decay=0.0, foreach=False)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=False)

    def step(tokens):
        batch = {"input_ids": tokens, "labels": tokens, "padding_mask": None}
        return train.train_step(model, [batch], optimizer, scaler, max_grad_norm=0.3)["loss"]

    return trainable, step


def build_hf(ckpt: Path, c: dict, attn: str, dtype, device):
    """transformers + bitsandbytes 4-bit + PEFT LoRA, the way QLoRA/LongQLoRA users set it up."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    assert attn == "full", "HF has no S²-Attn"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = LlamaForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=dtype,
                                             attn_implementation="sdpa", device_map={"": device})
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}       # as ours: torch.utils.checkpoint(use_reentrant=False)
    if c["hf_setup"] == "kbit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    torch.manual_seed(c["seed"])
    model = get_peft_model(model, LoraConfig(r=c["lora_r"], lora_alpha=16, lora_dropout=0.05, bias="none",
                                             target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=c["lr"], weight_decay=0.0, foreach=False)

    def step(tokens):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return trainable, step


def child(impl: str, ckpt: Path, c: dict) -> dict:
    """One process: load, warm-up step, timed steps, matmul peak; returns the measurements as a dict."""
    import warnings

    warnings.filterwarnings("ignore")
    side, attn = impl.split("_")
    if side == "base":
        sys.path.insert(0, str(Path(c["baseline"]).resolve()))
    import torch

    if c["threads"] > 0:
        torch.set_num_threads(c["threads"])
    if side == "hf":                            # import cost is not the model's: measured before the baseline
        import peft  # noqa: F401
        import transformers  # noqa: F401
    else:
        import train  # noqa: F401
    device = c["device"]
    cuda = torch.device(device).type == "cuda"
    dtype = getattr(torch, benchlib.DTYPES[c["dtype"]])
    rss_import = benchlib.rss_bytes()
    t0 = time.perf_counter()
    trainable, step = (build_hf if side == "hf" else build_ours)(ckpt, c, attn, dtype, device)
    load_s = time.perf_counter() - t0
    peak_load = benchlib.peak_rss_bytes()
    rss_loaded = benchlib.rss_bytes()
    resettable = benchlib.reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak_before = benchlib.matmul_peak(c["dtype"], n=c["peak_size"], device=device)
    batches = [t.to(device) for t in token_batches(c["vocab"], c["ctx"], c["steps"] + 1, c["seed"])]
    t = time.perf_counter()
    # Warm-up: allocator, optimizer state, lazy inits (on the first warmup_ctx tokens: the same code paths).
    losses = [step(batches[0][:, :c["warmup_ctx"]])]
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t
    prof = None
    if c["profile"] == impl:
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                       record_shapes=True)
        prof.__enter__()
    times, cpu0 = [], benchlib.cpu_seconds()
    for tokens in batches[1:]:
        t = time.perf_counter()
        losses.append(step(tokens))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    cpu = benchlib.cpu_seconds() - cpu0
    if prof is not None:
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25),
              file=sys.stderr)
    step_peak = benchlib.peak_rss_bytes()
    cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
    tokens_per_s = c["steps"] * c["ctx"] / sum(times)
    flops = flops_per_token(c, attn)["executed"]
    # The machine's peak is measured before and after the steps and the higher one kept: background load
    # changes by the minute, and a peak taken in a busy moment would overstate the utilisation.
    peak_after = benchlib.matmul_peak(c["dtype"], n=c["peak_size"], device=device)
    peak = {k: max(peak_before[k], peak_after[k]) for k in peak_before}
    return {
        "impl": impl, "tokens_per_s": tokens_per_s, "step_seconds": times, "warmup_seconds": warmup_s,
        "cpu_seconds_per_token": cpu / (c["steps"] * c["ctx"]), "losses": losses, "load_seconds": load_s,
        "trainable_params": sum(p.numel() for p in trainable),
        "rss_after_import": rss_import, "rss_after_load": rss_loaded,
        "peak_rss": max(peak_load, step_peak),
        "peak_bytes": cuda_peak if cuda else max(peak_load, step_peak),
        "peak_above_import": max(peak_load, step_peak) - rss_import,
        "step_peak_above_load": step_peak - rss_loaded if resettable else None,
        "flops_per_token": flops, "flops_per_s": flops * tokens_per_s,
        "matmul_flops_per_s": peak["flops_per_s"], "utilisation": flops * tokens_per_s / peak["flops_per_s"],
        "flops_per_cpu_s": flops / (cpu / (c["steps"] * c["ctx"])), "matmul_flops_per_cpu_s": peak["flops_per_cpu_s"],
        "cpu_utilisation": flops / (cpu / (c["steps"] * c["ctx"])) / peak["flops_per_cpu_s"],
        "threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------- the parent

class Stopped(Exception):
    """The deadline came: the message says where and why."""


def run_child(impl: str, ckpt: Path, c: dict, timeout: float, show_stderr: bool) -> dict:
    threads = str(c["threads"]) if c["threads"] > 0 else None
    try:
        r, proc = benchlib.run_child([sys.executable, __file__, "--child", impl, str(ckpt), json.dumps(c)], timeout,
                                     {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if threads else None)
    except subprocess.TimeoutExpired:
        raise Stopped(f"the {impl} process was stopped after {timeout:.0f} s (the deadline or --timeout)") from None
    if show_stderr and proc.stderr.strip():
        print(proc.stderr, file=sys.stderr)
    return r


def fmt_bytes(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f} MiB"


def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _per_peak(r: dict) -> float:
    """Tokens per CPU second over the matmul FLOPs per CPU second of the same process."""
    return 1 / r["cpu_seconds_per_token"] / r["matmul_flops_per_cpu_s"]


def summarize(runs: list[dict]) -> dict:
    impls = {}
    for impl in dict.fromkeys(r["impl"] for r in runs):
        mine = [r for r in runs if r["impl"] == impl]
        impls[impl] = {k: (statistics.median(r[k] for r in mine) if all(r.get(k) is not None for r in mine) else None)
                       for k in MEDIAN_KEYS}
        impls[impl]["runs"] = len(mine)
        impls[impl]["first_loss"] = mine[0]["losses"][0]
    comparisons = {}
    for a, b in COMPARISONS:
        if a not in impls or b not in impls:
            continue
        ratio = {k: (impls[a][k] / impls[b][k] if impls[a][k] is not None and impls[b][k] else None)
                 for k in ("tokens_per_s", "cpu_seconds_per_token", "peak_bytes", "peak_above_import",
                           "step_peak_above_load")}
        # Speed by CPU time: the steadier figure where other jobs share the cores (they slow the wall clock).
        cpu = ratio["cpu_seconds_per_token"]
        ratio["tokens_per_cpu_s"] = None if not cpu else 1 / cpu
        # And each process's speed over the matmul peak it measured itself (per CPU second): load that slows
        # the matmuls (a busy sibling hyperthread, shared caches) slows the peak measurement alike.
        ratio["tokens_per_cpu_s_over_peak"] = (statistics.median(_per_peak(r) for r in runs if r["impl"] == a)
                                               / statistics.median(_per_peak(r) for r in runs if r["impl"] == b))
        # Per round: each a run against the b run of the same round (how much the noise moves the ratio).
        rounds = {}
        for r in runs:
            rounds.setdefault(r["round"], {})[r["impl"]] = r
        ratio["per_round_tokens_per_s"] = [x[a]["tokens_per_s"] / x[b]["tokens_per_s"]
                                           for x in rounds.values() if a in x and b in x]
        comparisons[f"{a}/{b}"] = ratio
    return {"impls": impls, "comparisons": comparisons}


def print_config(entry: dict) -> None:
    c, s = entry["config"], entry["summary"]
    print(f"\n### {entry['shape']}: dim {c['dim']}, intermediate {c['intermediate']}, {c['layers']} layers, "
          f"{c['heads']} heads, vocab {c['vocab']}, ctx {c['ctx']}, LoRA r={c['lora_r']}, {c['dtype']} "
          f"({entry['dtype_reason']}), {c['threads']} thread(s), {c['device']}")
    print("\n| impl | runs | tokens/s | CPU ms/token | peak | above import | step peak above load | GFLOP/s "
          "(of peak) | GFLOP per CPU s (of peak) | first loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for impl, m in s["impls"].items():
        print(f"| {impl} | {m['runs']} | {m['tokens_per_s']:.1f} | {1e3 * m['cpu_seconds_per_token']:.3f} | "
              f"{fmt_bytes(m['peak_bytes'])} | {fmt_bytes(m['peak_above_import'])} | "
              f"{fmt_bytes(m['step_peak_above_load'])} | {m['flops_per_s'] / 1e9:.1f} "
              f"({100 * m['utilisation']:.0f}% of {m['matmul_flops_per_s'] / 1e9:.0f}) | "
              f"{m['flops_per_cpu_s'] / 1e9:.1f} ({100 * m['cpu_utilisation']:.0f}% of "
              f"{m['matmul_flops_per_cpu_s'] / 1e9:.0f}) | {m['first_loss']:.4f} |")
    if s["comparisons"]:
        print("\n| ratio | tokens/s | tokens per CPU s | the same over each process's peak | peak | above import | "
              "step peak above load | tokens/s per round |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in s["comparisons"].items():
            print(f"| {name} | {fmt_ratio(r['tokens_per_s'])} | {fmt_ratio(r['tokens_per_cpu_s'])} | "
                  f"{fmt_ratio(r['tokens_per_cpu_s_over_peak'])} | "
                  f"{fmt_ratio(r['peak_bytes'])} | {fmt_ratio(r['peak_above_import'])} | "
                  f"{fmt_ratio(r['step_peak_above_load'])} | "
                  f"{', '.join(f'{x:.2f}' for x in r['per_round_tokens_per_s'])} |")
    sys.stdout.flush()


def run_config(shape: str, c: dict, a, deadline: benchlib.Deadline, entry: dict, save) -> None:
    """Every round of every implementation for one shape and dtype, into entry["runs"]; raises Stopped."""
    ckpt = make_checkpoint(llama_config(c), c["seed"], Path(a.cache_dir))
    last = {}                                   # impl -> seconds its last process took
    for rnd in range(a.repeats):
        for impl in a.impls:
            left = deadline.left()
            if impl in last and last[impl] > left:
                raise Stopped(f"{left:.0f} s of the deadline left, and the last {impl} process took "
                              f"{last[impl]:.0f} s: not started")
            if left <= 0:
                raise Stopped("the deadline has passed")
            t = time.perf_counter()
            r = run_child(impl, ckpt, c, min(a.timeout, left), show_stderr=a.profile == impl)
            last[impl] = time.perf_counter() - t
            r["round"], r["process_seconds"] = rnd + 1, last[impl]
            entry["runs"].append(r)
            entry["summary"] = summarize(entry["runs"])
            save()
            print(f"{shape} {c['dtype']} round {rnd + 1} {impl}: {r['tokens_per_s']:.1f} tokens/s, "
                  f"{1e3 * r['cpu_seconds_per_token']:.3f} CPU ms/token, peak {fmt_bytes(r['peak_bytes'])}, "
                  f"step peak above load {fmt_bytes(r['step_peak_above_load'])}, "
                  f"{100 * r['utilisation']:.1f}% of {r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s "
                  f"({100 * r['cpu_utilisation']:.1f}% per CPU s), "
                  f"load {r['load_seconds']:.1f} s, process {last[impl]:.0f} s, "
                  f"losses {[round(x, 4) for x in r['losses']]}", flush=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="shape small, 2 timed steps, up to 3 rounds within a 280 s deadline (< 5 min on 2 busy cores)")
    p.add_argument("--shape", nargs="+", choices=sorted(SHAPES), help="[d1024]; --quick: small")
    for k in SHAPE_KEYS:
        p.add_argument(f"--{k}", type=int, help=f"override the shape's {k}")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", nargs="+", choices=["auto", *sorted(benchlib.DTYPES)], default=["auto"],
                   help="compute dtype(s) of both sides, measured one after the other [auto: bf16 where native, "
                        "else fp32]")
    p.add_argument("--impls", nargs="+", choices=IMPLS,
                   help=f"[{' '.join(DEFAULT_IMPLS)}; with --baseline also base_s2 base_full]")
    p.add_argument("--baseline", help="source tree of the base_* implementations (ours before a change)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    p.add_argument("--warmup-ctx", type=int, help="tokens of the warm-up step [ctx]; less saves time on big shapes")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (every impl) processes")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--loss-chunk", type=int, default=1024, help="our chunked loss: tokens per chunk")
    p.add_argument("--hf-setup", choices=["same-dtype", "kbit"], default="same-dtype")
    p.add_argument("--compile", action="store_true",
                   help="ours (and base) with train.py --compile: torch.compile of every decoder layer (the warm-up "
                        "step then includes compiling; slower than eager on the CPUs measured so far)")
    p.add_argument("--device", default=None, help="cpu or cuda [cuda when available]")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (see the docstring; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=IMPLS, help="print a torch.profiler table of that side's timed steps")
    p.add_argument("--out", help="write the results JSON here (rewritten after every run)")
    p.add_argument("--cache-dir", default=str(benchlib.CACHE), help="where the random checkpoint is written and reused")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmul that measures the peak")
    p.add_argument("--deadline", type=float, help="seconds for the whole run (see the docstring) [--quick: 280]")
    p.add_argument("--child", nargs=3, metavar=("IMPL", "CKPT", "CONFIG"), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), json.loads(a.child[2]))))
        return 0
    t0 = time.perf_counter()
    if a.quick:
        a.steps, a.repeats = QUICK["steps"], QUICK["repeats"]
        a.shape = a.shape or QUICK["shape"]
        a.deadline = a.deadline or QUICK["deadline"]
    a.shape = a.shape or ["d1024"]
    a.impls = list(dict.fromkeys(a.impls or (DEFAULT_IMPLS + (("base_s2", "base_full") if a.baseline else ()))))
    if any(i.startswith("base") for i in a.impls) and not a.baseline:
        raise ValueError("base_* implementations need --baseline DIR")
    if a.baseline and not (Path(a.baseline) / "train.py").is_file():
        raise FileNotFoundError(f"--baseline {a.baseline}: no train.py there")
    for name in ("steps", "repeats", "vocab", "lora_r", "loss_chunk", "warmup_ctx", "peak_size", *SHAPE_KEYS):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    deadline = benchlib.Deadline(a.deadline)
    machine = benchlib.machine()
    dtypes = [benchlib.pick_dtype(d, a.device) for d in dict.fromkeys(a.dtype)]
    print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, native bf16: {machine['native_bf16']}, "
          f"torch {machine['torch']}, device {a.device}, {a.threads} thread(s) per process")
    for name, why in dtypes:
        print(f"dtype {name}: {why}")
    result = {"machine": machine, "command": [sys.executable, *sys.argv] if argv is None else list(argv),
              "complete": False, "stopped": None, "deadline": a.deadline, "configs": []}

    def save():
        result["seconds"] = time.perf_counter() - t0
        if a.out:
            benchlib.write_json(a.out, result)

    try:
        for shape in a.shape:
            for dtype, why in dtypes:
                overrides = {k: getattr(a, k) for k in SHAPE_KEYS if getattr(a, k) is not None}
                c = {**SHAPES[shape], **overrides}
                name = shape if not overrides else "custom"
                if c["dim"] % c["heads"]:
                    raise ValueError(f"dim {c['dim']} is not a multiple of heads {c['heads']}")
                c.update(vocab=a.vocab, lora_r=a.lora_r, lr=a.lr, loss_chunk=a.loss_chunk, hf_setup=a.hf_setup,
                         device=a.device, threads=a.threads, seed=a.seed, steps=a.steps, dtype=dtype,
                         profile=a.profile, baseline=a.baseline, peak_size=a.peak_size, compile=a.compile,
                         warmup_ctx=min(a.warmup_ctx or c["ctx"], c["ctx"]))
                entry = {"shape": name, "dtype": dtype, "dtype_reason": why, "config": c, "impls": a.impls,
                         "flops_per_token": {i: flops_per_token(c, i.split("_")[1]) for i in a.impls},
                         "runs": [], "summary": None}
                result["configs"].append(entry)
                try:
                    run_config(name, c, a, deadline, entry, save)
                finally:
                    if entry["runs"]:
                        print_config(entry)
        result["complete"] = True
    except Stopped as e:
        result["stopped"] = f"stopped early: {e}"
        print(f"\n{result['stopped']}", flush=True)
    save()
    print(f"\n{time.perf_counter() - t0:.0f} s in all" + (f"; wrote {a.out}" if a.out else ""))
    if not result["complete"]:
        # Usable when every comparison asked for got at least one run of both of its sides.
        got = [e for e in result["configs"] if e["summary"] and e["summary"]["comparisons"]]
        return 0 if got else 3
    return 0


if __name__ == "__main__":
    benchlib.cli_main(main)
