"""Training speed and memory of our LongQLoRA step against HF transformers + PEFT + bitsandbytes.

Both sides run the same LongQLoRA configuration on the same HF checkpoint (a random LlamaForCausalLM
written by transformers' `save_pretrained`), the same random tokens and the same optimizer:

    frozen base: the seven decoder linears in NF4 with double quantization, compute dtype --dtype (bf16)
    LoRA r=64, alpha=16, dropout=0.05 on q, k, v, o, gate, up, down; fp32 adapter weights
    gradient checkpointing of every decoder layer; full causal attention (SDPA) on both sides
    torch AdamW (lr 2e-4, no weight decay, foreach off), gradient norm clipped to 0.3, batch 1 x ctx tokens

    ours: train.build_model (model.Transformer.from_pretrained(quantize="nf4") + lora.add_lora) and
          train.train_step (forward to the final norm, chunked lm_head + cross-entropy, backward, clip, step)
    hf:   LlamaForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
          bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)),
          PEFT get_peft_model(LoraConfig(...)), model(input_ids, labels=input_ids).loss (full logits)
          --hf-setup same-dtype: gradient_checkpointing_enable(); embeddings, norms and lm_head stay in
                                 the compute dtype, as ours do (the fair comparison, default)
          --hf-setup kbit:       peft.prepare_model_for_kbit_training, what LongQLoRA's own train.py calls;
                                 it also casts embeddings, norms and lm_head to fp32

Runs alternate in fresh processes (ours, hf, ours, hf, ...: --repeats pairs) so background load on a
shared machine hits both sides alike. Each process loads the model, runs one warm-up step and --steps
timed steps, with --threads torch threads (default 1: on a machine shared with other jobs, 2-thread
OpenMP ops wait at their barriers for a descheduled thread, which slowed both sides 5-8x in our runs;
on an idle machine pass --threads 2). Reported per process:
    tokens/s       --steps * ctx / wall time of the timed steps
    CPU ms/token   user + system CPU time of the timed steps per token (steadier than wall time under load)
    peak           CPU: the process's peak resident set size (VmHWM, includes the Python/torch/transformers
                   imports); CUDA: torch.cuda.max_memory_allocated
    above import   CPU: peak RSS minus the RSS right after the imports (model + training; for ours this also
                   holds what building the model on the meta device imports: torch._refs, sympy, ~80 MiB)
    step peak      CPU: peak RSS during the training steps (the high-water mark is reset through
                   /proc/self/clear_refs after loading) minus the RSS before them: what training adds
The parent prints every run, the medians and the ratios ours/hf.

    python bench/train_speed.py --quick --out bench/results/train_speed.json   # < 5 min on 2 cores
    python bench/train_speed.py --ctx 2048 --repeats 3 --steps 3
    python bench/train_speed.py --profile ours        # torch.profiler table of one timed step
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CACHE = ROOT / "bench" / "cache"          # default --cache-dir (git-ignored)


# --------------------------------------------------------------------------- memory

def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: peak resident set size since start or the last reset_peak_rss(). Not ru_maxrss, which Linux
    carries over from the parent across fork + exec (a child would read at least its parent's RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line (Linux only)")


def cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other processes' load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark VmHWM (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the shared checkpoint

def make_checkpoint(cfg: dict, seed: int, dtype_name: str, cache: Path) -> Path:
    """A random transformers LlamaForCausalLM saved with save_pretrained, cached in `cache`."""
    key = "-".join(f"{k}{cfg[k]}" for k in ("vocab_size", "hidden_size", "intermediate_size",
                                             "num_hidden_layers", "num_attention_heads",
                                             "max_position_embeddings")) + f"-s{seed}-{dtype_name}"
    path = cache / f"train_speed-{key}"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(getattr(torch, DTYPES[dtype_name]))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=cache))
    model.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def llama_config(a) -> dict:
    return dict(vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=a.intermediate,
                num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                # >= ctx: no Position Interpolation on either side (it costs nothing, but HF would need
                # the same rope_scaling passed in; speed and memory do not depend on it).
                max_position_embeddings=a.ctx, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


# --------------------------------------------------------------------------- the two sides

def token_batches(vocab: int, ctx: int, n: int, seed: int):
    """n batches of random tokens (1, ctx), identical for both sides."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, ctx), generator=g) for _ in range(n)]


def build_ours(ckpt: Path, a, dtype, device):
    """Our loader and LoRA through train.py's own build_model; the step is train.train_step."""
    import torch

    import train

    torch.manual_seed(a.seed)
    flags = train.parse_args(["--model", str(ckpt), "--ctx", str(a.ctx), "--quant", "nf4", "--lora-r", str(a.lora_r),
                              "--lora-alpha", "16", "--lora-dropout", "0.05", "--attn", "full",
                              "--loss-chunk", str(a.loss_chunk)])
    model, trainable, _ = train.build_model(flags, dtype, device)
    # The optimizer HF gets too (train.make_optimizer picks this one on CPU, paged AdamW on CUDA).
    optimizer = torch.optim.AdamW(trainable, lr=a.lr, weight_decay=0.0, foreach=False)
    scaler = torch.amp.GradScaler(device.type if hasattr(device, "type") else str(device), enabled=False)

    def step(tokens):
        batch = {"input_ids": tokens, "labels": tokens, "padding_mask": None}
        return train.train_step(model, [batch], optimizer, scaler, max_grad_norm=0.3)["loss"]

    return model, trainable, step


def build_hf(ckpt: Path, a, dtype, device):
    """transformers + bitsandbytes 4-bit + PEFT LoRA, the way QLoRA/LongQLoRA users set it up."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = LlamaForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=dtype,
                                             attn_implementation="sdpa", device_map={"": device})
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}       # as ours: torch.utils.checkpoint(use_reentrant=False)
    if a.hf_setup == "kbit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    torch.manual_seed(a.seed)
    model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=16, lora_dropout=0.05, bias="none",
                                             target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=a.lr, weight_decay=0.0, foreach=False)

    def step(tokens):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return model, trainable, step


def child(impl: str, ckpt: Path, a) -> dict:
    """One process: load, warm-up step, timed steps; returns the measurements as a dict."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if impl == "hf":                            # import cost is not the model's: measured before the baseline
        import peft  # noqa: F401
        import transformers  # noqa: F401
    import train  # noqa: F401
    device = a.device
    cuda = torch.device(device).type == "cuda"
    dtype = getattr(torch, DTYPES[a.dtype])
    rss_import = rss_bytes()
    t0 = time.perf_counter()
    model, trainable, step = (build_ours if impl == "ours" else build_hf)(ckpt, a, dtype, device)
    load_s = time.perf_counter() - t0
    peak_load = peak_rss_bytes()
    rss_loaded = rss_bytes()
    resettable = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    batches = [t.to(device) for t in token_batches(a.vocab, a.ctx, a.steps + 1, a.seed)]
    losses = [step(batches[0])]                 # warm-up: allocator, optimizer state, lazy inits
    if cuda:
        torch.cuda.synchronize()
    prof = None
    if a.profile == impl:
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                       record_shapes=True)
        prof.__enter__()
    times, cpu0 = [], cpu_seconds()
    for tokens in batches[1:]:
        t = time.perf_counter()
        losses.append(step(tokens))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if prof is not None:
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25),
              file=sys.stderr)
    cpu = cpu_seconds() - cpu0
    step_peak = peak_rss_bytes()
    result = {
        "impl": impl, "tokens_per_s": a.steps * a.ctx / sum(times), "step_seconds": times,
        "cpu_seconds_per_token": cpu / (a.steps * a.ctx), "losses": losses, "load_seconds": load_s,
        "trainable_params": sum(p.numel() for p in trainable),
        "rss_after_import": rss_import, "rss_after_load": rss_loaded,
        "peak_rss": max(peak_load, step_peak),
        "peak_above_import": max(peak_load, step_peak) - rss_import,
        "step_peak_above_load": step_peak - rss_loaded if resettable else None,
        "threads": torch.get_num_threads(),
    }
    if cuda:
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return result


# --------------------------------------------------------------------------- the parent

def run_child(impl: str, ckpt: Path, argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child", impl, str(ckpt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    if proc.stderr.strip() and "--profile" in argv:
        print(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_bytes(x) -> str:
    return "-" if x is None else f"{x / 2**20:8.1f} MiB"


def summarize(runs: list[dict], cuda: bool) -> dict:
    peak_key = "cuda_peak_allocated" if cuda else "peak_rss"
    out = {}
    for impl in ("ours", "hf"):
        mine = [r for r in runs if r["impl"] == impl]
        med = lambda k: statistics.median(r[k] for r in mine) if all(r.get(k) is not None for r in mine) else None  # noqa: E731
        out[impl] = {"tokens_per_s": med("tokens_per_s"), "cpu_seconds_per_token": med("cpu_seconds_per_token"),
                     "peak_bytes": med(peak_key),
                     "peak_above_import": med("peak_above_import"),
                     "step_peak_above_load": med("step_peak_above_load")}
    ratio = lambda k: None if not out["hf"][k] or out["ours"][k] is None else out["ours"][k] / out["hf"][k]  # noqa: E731
    out["ratios"] = {k: ratio(k) for k in ("tokens_per_s", "cpu_seconds_per_token", "peak_bytes", "peak_above_import",
                                           "step_peak_above_load")}
    # Pairwise ratios (each ours run against the hf run right after it) show how much the noise moves them.
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
    out["pair_speed_ratios"] = [o["tokens_per_s"] / h["tokens_per_s"] for o, h in pairs]
    return out


def print_table(runs, s, a, cuda):
    print(f"\nconfig: vocab {a.vocab}, dim {a.dim}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, "
          f"ctx {a.ctx}, batch 1, {a.dtype} compute, NF4+double quant, LoRA r={a.lora_r} on 7 projections, "
          f"gradient checkpointing, full attention, AdamW lr {a.lr}, hf setup {a.hf_setup}, "
          f"{runs[0]['threads']} threads, device {a.device}")
    head = "cuda max allocated" if cuda else "peak RSS"
    print(f"\n| run | impl | tokens/s | CPU ms/token | {head} | above import | step peak above load | losses |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs):
        peak = r.get("cuda_peak_allocated") if cuda else r["peak_rss"]
        print(f"| {i // 2 + 1} | {r['impl']} | {r['tokens_per_s']:.1f} | {1e3 * r['cpu_seconds_per_token']:.3f} | {fmt_bytes(peak)} | "
              f"{fmt_bytes(r['peak_above_import'])} | {fmt_bytes(r['step_peak_above_load'])} | "
              f"{' '.join(f'{x:.3f}' for x in r['losses'])} |")
    print("\n| median | tokens/s | CPU ms/token | peak | above import | step peak above load |")
    print("|---|---|---|---|---|---|")
    for impl in ("ours", "hf"):
        m = s[impl]
        print(f"| {impl} | {m['tokens_per_s']:.1f} | {1e3 * m['cpu_seconds_per_token']:.3f} | {fmt_bytes(m['peak_bytes'])} "
              f"| {fmt_bytes(m['peak_above_import'])} "
              f"| {fmt_bytes(m['step_peak_above_load'])} |")
    rt = s["ratios"]
    f = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    print(f"| ours/hf | {f(rt['tokens_per_s'])} | {f(rt['cpu_seconds_per_token'])} | {f(rt['peak_bytes'])} "
          f"| {f(rt['peak_above_import'])} "
          f"| {f(rt['step_peak_above_load'])} |")
    print(f"\nper-pair speed ratios ours/hf: {', '.join(f'{x:.2f}' for x in s['pair_speed_ratios'])}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ctx 1024, 2 timed steps, 3 pairs of runs (< 5 min on 2 cores)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=3, help="pairs of (ours, hf) processes")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--loss-chunk", type=int, default=1024, help="our chunked loss: tokens per chunk")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="compute dtype of both (bf16: this CPU has AVX512-BF16; fp16 matmuls are ~10x slower on CPU)")
    p.add_argument("--hf-setup", choices=["same-dtype", "kbit"], default="same-dtype")
    p.add_argument("--device", default=None, help="cpu or cuda [cuda when available]")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (see the docstring; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["ours", "hf"], help="run one side only (debugging)")
    p.add_argument("--profile", choices=["ours", "hf"], help="print a torch.profiler table of that side's timed steps")
    p.add_argument("--out", help="write the summary JSON here")
    p.add_argument("--cache-dir", default=str(CACHE), help="where the random checkpoint is written and reused")
    p.add_argument("--timeout", type=float, default=600, help="seconds per process")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "CKPT"), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    if a.quick:
        a.ctx, a.steps, a.repeats = 1024, 2, 3
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), a)))
        return 0
    for name in ("ctx", "steps", "repeats", "layers", "dim", "heads", "vocab", "lora_r", "loss_chunk"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if a.dim % a.heads:
        raise ValueError(f"--dim {a.dim} is not a multiple of --heads {a.heads}")
    t0 = time.perf_counter()
    ckpt = make_checkpoint(llama_config(a), a.seed, a.dtype, Path(a.cache_dir))
    child_argv = [x for x in raw if x != "--quick"] + ["--ctx", str(a.ctx), "--steps", str(a.steps),
                                                       "--device", a.device]
    impls = [a.only] if a.only else ["ours", "hf"]
    runs = []
    for rep in range(a.repeats):
        for impl in impls:
            r = run_child(impl, ckpt, child_argv, a.timeout)
            runs.append(r)
            print(f"run {rep + 1} {impl}: {r['tokens_per_s']:.1f} tokens/s, {1e3 * r['cpu_seconds_per_token']:.3f} CPU ms/token, peak RSS {fmt_bytes(r['peak_rss'])}, "
                  f"step peak above load {fmt_bytes(r['step_peak_above_load'])}, load {r['load_seconds']:.1f} s, "
                  f"losses {[round(x, 4) for x in r['losses']]}", flush=True)
    cuda = a.device.startswith("cuda")
    if a.only:
        return 0
    s = summarize(runs, cuda)
    print_table(runs, s, a, cuda)
    seconds = time.perf_counter() - t0
    print(f"\n{seconds:.0f} s in all")
    if a.out:
        result = {
            "ours_tokens_per_s": s["ours"]["tokens_per_s"], "hf_tokens_per_s": s["hf"]["tokens_per_s"],
            "ours_peak_bytes": s["ours"]["peak_bytes"], "hf_peak_bytes": s["hf"]["peak_bytes"],
            "tokens_per_s_ratio": s["ratios"]["tokens_per_s"], "peak_bytes_ratio": s["ratios"]["peak_bytes"],
            "ours_cpu_seconds_per_token": s["ours"]["cpu_seconds_per_token"],
            "hf_cpu_seconds_per_token": s["hf"]["cpu_seconds_per_token"],
            "peak_measure": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) of the process",
            "ours_peak_above_import": s["ours"]["peak_above_import"], "hf_peak_above_import": s["hf"]["peak_above_import"],
            "ours_step_peak_above_load": s["ours"]["step_peak_above_load"],
            "hf_step_peak_above_load": s["hf"]["step_peak_above_load"],
            "ratios": s["ratios"], "pair_speed_ratios": s["pair_speed_ratios"],
            "config": {k: getattr(a, k) for k in ("vocab", "dim", "intermediate", "layers", "heads", "ctx", "steps",
                                                  "repeats", "lora_r", "lr", "loss_chunk", "dtype", "hf_setup",
                                                  "device", "seed")},
            "runs": runs, "seconds": seconds,
        }
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
