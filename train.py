"""LongQLoRA training, written out by hand: Position Interpolation + NF4 base + LoRA + S²-Attn.

    python train.py --model DIR --data PATH --ctx 8192 [--preset llama2-7b-8k]   # the paper's recipe
    python train.py --ctx 8192                                                     # offline demo (no --model)
    torchrun --nproc_per_node 8 train.py --model DIR ...                          # data parallel
    python train.py --preset llama2-7b-12k --dry-run [--budget 32GB]               # predicted peak memory

One optimizer step, following the tokens from the data to the update:

  1. data.py yields micro-batches {input_ids, labels, padding_mask} of exactly ctx tokens (packed documents,
     LongLoRA; --truncate: one BOS+document per sequence, LongQLoRA; --sft: conversations, prompts masked).
  2. model.Transformer.loss: RoPE with every position divided by the PI factor ceil(ctx / trained context);
     the seven decoder linears are frozen NF4 (quant.Linear4bit) plus a trainable fp32 LoRA path,
     y = W x + (alpha/r) B A dropout(x); attention is S²-Attn inside groups of ctx * group_size_ratio tokens,
     half of the heads shifted by half a group; every decoder layer is gradient-checkpointed; the lm_head and
     the cross-entropy run 1024 tokens at a time, so the (ctx x vocab) logits never exist.
  3. Accumulation over the step's micro-batches (all ranks), --loss-weighting:
       tokens       each micro-batch back-propagates  sum of its token losses / loss tokens of the whole step:
                    the gradient of the mean over every token, however the step is split (our default);
       micro-batch  mean over its own tokens / (micro-batches x ranks): every micro-batch weighs the same, as
                    in LongQLoRA's HF-Trainer SFT (so an answer of 10 tokens counts as much as one of 1000).
  4. fp16 only: torch.amp.GradScaler multiplies the loss before backward and skips a step whose gradients
     overflowed; bf16 and fp32 need no scaling. A non-finite loss or gradient outside fp16 stops the run.
  5. Clip the gradient norm to 0.3, AdamW (bitsandbytes PagedAdamW32bit on CUDA: its states page to CPU under
     memory pressure; torch AdamW on CPU), LR constant after a linear warmup.

LoRA weights, their gradients and the optimizer state are fp32; the frozen base computes in --dtype (bf16 on
GPUs that have it, fp16 on V100s, fp32 on CPU). checkpoint.py holds what --out contains and the rules of
--resume; memory.py the --dry-run prediction; demo.py the offline demo.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from infra import cli

# --------------------------------------------------------------------------- recipes and flags

# What every flag is when neither the command line nor a preset sets it.
DEFAULTS = dict(
    data="synthetic", split=None, cache_dir=None, ctx=8192, max_steps=None, batch_size=1, grad_accum=1, lr=2e-4,
    warmup=20, weight_decay=0.0, max_grad_norm=0.3, lora_r=64, lora_alpha=16.0, lora_dropout=0.05,
    train_embed_norm=False, group_size_ratio=0.25, attn="s2", s2_shift="segment", quant="nf4", quant_backend="auto",
    dtype="auto", sft=False, template="vicuna", loss_weighting="tokens", rope_factor=None, out=None, save_every=100,
    keep_checkpoints=3, seed=42, layout="packing", loss_chunk=1024, log_every=10, full_finetune=False, mlp_chunk=0,
    offload_activations=False, compile=False,
)
PRETRAIN_STEPS = 1000          # the paper's 1000 steps when --max-steps is not given (SFT: one epoch)
# The paper's recipes (REFERENCE §2), with LongQLoRA's roll shift only on request (see --s2-shift).
_LONGQLORA = dict(max_steps=1000, batch_size=1, grad_accum=16, lr=2e-4, warmup=20, weight_decay=0.0,
                  max_grad_norm=0.3, lora_r=64, lora_alpha=16.0, lora_dropout=0.05, quant="nf4", seed=42,
                  attn="s2", group_size_ratio=0.25, layout="truncate")
PRESETS = {
    "llama2-7b-8k": dict(_LONGQLORA, ctx=8192),
    "llama2-7b-12k": dict(_LONGQLORA, ctx=12288),
    "vicuna-13b-sft-8k": dict(_LONGQLORA, ctx=8192, lr=1e-4, sft=True, max_steps=None, template="longqlora",
                              loss_weighting="micro-batch"),
}
# The offline demo's recipe (no --model; demo.py says why it differs from the paper's).
DEMO = dict(max_steps=80, lr=4e-3, warmup=5, max_grad_norm=1.0, lora_r=16, lora_alpha=64.0,
            train_embed_norm=True, save_every=0, log_every=5)
DEMO_OUT = "out/demo"
SHIFT_HELP = ("S²-Attn shift of the second half of the heads: segment (LongLoRA's flash-attn path, causal end to "
              "end), roll (LongLoRA's PyTorch path, which LongQLoRA trained with: it wraps around, so from a few "
              "layers up a position can see the token it predicts; use it to reproduce the paper exactly), none "
              "(no shift: the short-attention ablation) [segment]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="LongQLoRA: PI + NF4 + LoRA + S²-Attn fine-tuning. "
                                "[defaults] in brackets; --preset and the demo change some of them.")
    a = p.add_argument      # every default is None here: resolved as flag > preset > demo > DEFAULTS
    a("--model", help="HF LLaMA directory (config.json, safetensors, tokenizer.model); none: offline demo")
    a("--data", help="'synthetic', a PG19-layout folder, a folder/.txt/.jsonl(.gz) of texts, a .bin token file, "
                     "or with --sft a JSONL of {input, output} / {conversation} records [synthetic]")
    a("--split", help="split of a PG19-layout folder [train]")
    a("--cache-dir", help="token cache folder [$LONGQLORA_CACHE or ~/.cache/longqlora]")
    a("--ctx", type=int, help="training context length in tokens [8192]")
    a("--max-steps", type=int, help="optimizer steps [1000; --sft: one epoch; demo: 80]")
    a("--batch-size", type=int, help="sequences per micro-batch and rank [1]")
    a("--grad-accum", type=int, help="micro-batches per optimizer step [1; presets: 16]")
    a("--lr", type=float, help="peak learning rate [2e-4]")
    a("--warmup", type=int, help="linear warmup steps, constant LR after [20]")
    a("--weight-decay", type=float, help="AdamW weight decay [0]")
    a("--max-grad-norm", type=float, help="clip the gradient norm to this (0: no clipping) [0.3]")
    a("--lora-r", type=int, help="LoRA rank [64]")
    a("--lora-alpha", type=float, help="LoRA alpha, scaling alpha/r [16]")
    a("--lora-dropout", type=float, help="dropout on the LoRA input [0.05]")
    a("--train-embed-norm", action="store_true", default=None, help="also train embeddings and norms (LoRA+)")
    a("--full-finetune", action="store_true", default=None,
      help="PI + full fine-tuning of a dense model, no LoRA (saves model/ instead of adapter/)")
    a("--group-size-ratio", type=float, help="S²-Attn group size as a fraction of ctx [0.25]")
    a("--attn", choices=["s2", "full"], help="attention during training [s2]")
    a("--s2-shift", choices=["segment", "roll", "none"], help=SHIFT_HELP)
    a("--quant", choices=["nf4", "none"], help="storage of the frozen decoder linears [nf4]")
    a("--quant-backend", choices=["auto", "torch", "bnb"], help="NF4 dequantization kernel [auto]")
    a("--dtype", choices=["auto", "bf16", "fp16", "fp32"],
      help="compute dtype of the frozen base; auto: bf16 on GPUs with it, fp16 on older GPUs, fp32 on CPU [auto]")
    a("--sft", action="store_true", default=None, help="supervised fine-tuning on a JSONL of conversations")
    a("--template", choices=["longqlora", "vicuna"],
      help="SFT chat template: LongQLoRA's or FastChat's Vicuna v1.1 (data.chat_pieces) [vicuna; SFT preset: "
           "longqlora]")
    a("--loss-weighting", choices=["tokens", "micro-batch"],
      help="accumulation: every loss token weighs the same, or every micro-batch (LongQLoRA) [tokens; SFT preset: "
           "micro-batch]")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--packing", dest="layout", action="store_const", const="packing", default=None,
                        help="pretraining: documents joined with EOS and cut into ctx chunks (LongLoRA) [default]")
    layout.add_argument("--truncate", dest="layout", action="store_const", const="truncate",
                        help="pretraining: one BOS+document per sequence, truncated and padded (LongQLoRA; presets)")
    a("--rope-factor", type=float, help="PI factor; default ceil(ctx / max_position_embeddings); 1: no PI")
    a("--loss-chunk", type=int, help="tokens per lm_head + cross-entropy chunk [1024]")
    a("--mlp-chunk", type=int, help="MLP of the recomputed layer in tiles of this many tokens: less memory, one "
                                    "more MLP forward (0: untiled) [0]")
    a("--offload-activations", action="store_true", default=None,
      help="keep the checkpointed layer inputs in pinned CPU memory (CUDA; nothing to offload on CPU)")
    a("--compile", action="store_true", default=None,
      help="torch.compile every decoder layer (slower on the CPUs measured so far, see README)")
    a("--out", help="output folder [out/demo for the demo, else out/<model name>-<ctx>]")
    a("--save-every", type=int, help="checkpoint every N steps (0: never) [100; demo: 0]")
    a("--keep-checkpoints", type=int, help="keep only the newest N checkpoints (0: all) [3]")
    a("--resume", action="store_true", default=None, help="continue from the newest complete checkpoint in --out")
    a("--overwrite", action="store_true", default=None, help="replace a previous run in --out")
    a("--seed", type=int, help="seed of LoRA init, dropout and data order [42]")
    a("--log-every", type=int, help="print a log line every N steps [10]")
    a("--threads", type=int, help="CPU threads for torch [all cores]")
    a("--preset", choices=sorted(PRESETS), help="the paper's recipe; explicit flags override it")
    a("--dry-run", action="store_true", default=None, help="print the predicted peak memory of one step and exit")
    a("--budget", help="with --dry-run: also print the longest ctx whose step fits this much memory (e.g. 32GB)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags resolved as explicit flag > --preset > demo recipe (no --model) > DEFAULTS, and checked."""
    args = cli.one_line_errors(build_parser()).parse_args(argv)
    args.demo = args.model is None and not args.dry_run
    if args.full_finetune and args.quant is None:
        args.quant = "none"         # full fine-tuning updates the dense weights themselves
    if args.preset and args.model is None and not args.dry_run:
        raise ValueError(f"--preset {args.preset} sets the recipe, not the model: give --model (or --dry-run)")
    preset, demo = PRESETS.get(args.preset, {}), DEMO if args.demo else {}
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, demo.get(key, default)))
    for flag in ("resume", "overwrite", "dry_run", "offload_activations", "compile"):
        setattr(args, flag, bool(getattr(args, flag)))
    if args.out is None:
        args.out = DEMO_OUT if args.model is None else f"out/{Path(args.model).name}-{args.ctx}"
    check_args(args)
    return args


# Range of every numeric flag, checked before anything is read: (flag, low, high, which ends are included).
RANGES = (("ctx", 2, None, "[]"), ("max_steps", 1, None, "[]"), ("batch_size", 1, None, "[]"),
          ("grad_accum", 1, None, "[]"), ("lr", 0, None, "(]"), ("warmup", 0, None, "[]"),
          ("weight_decay", 0, None, "[]"), ("max_grad_norm", 0, None, "[]"), ("lora_r", 1, None, "[]"),
          ("lora_alpha", 0, None, "(]"), ("lora_dropout", 0, 1, "[)"), ("group_size_ratio", 0, 1, "(]"),
          ("rope_factor", 1, None, "[]"), ("loss_chunk", 1, None, "[]"), ("save_every", 0, None, "[]"),
          ("keep_checkpoints", 0, None, "[]"), ("log_every", 1, None, "[]"), ("mlp_chunk", 0, None, "[]"))


def check_args(args) -> None:
    """Impossible or non-finite settings fail here, before anything is read or written."""
    for flag, low, high, ends in RANGES:
        if getattr(args, flag) is not None:
            cli.check_range(f"--{flag.replace('_', '-')}", getattr(args, flag), low, high,
                            open_low=ends[0] == "(", open_high=ends[1] == ")")
    if args.attn == "s2" and int(args.ctx * args.group_size_ratio) < 1:
        raise ValueError(f"--ctx {args.ctx} x --group-size-ratio {args.group_size_ratio} gives S²-Attn groups of "
                         f"{int(args.ctx * args.group_size_ratio)} tokens; a group needs at least 1")
    if args.full_finetune and (args.quant == "nf4" or args.dtype == "fp16"):
        raise ValueError("--full-finetune trains the dense weights: it needs --quant none and bf16 or fp32")
    if args.sft and args.data == "synthetic" and not args.dry_run:
        raise ValueError("--sft needs --data pointing to a JSONL of conversations")
    if args.demo and args.data != "synthetic":
        raise ValueError(f"--data {args.data}: text data needs the tokenizer of a --model (the demo uses synthetic)")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other")
    if args.budget is not None and not args.dry_run:
        raise ValueError("--budget goes with --dry-run")


if __name__ == "__main__":      # flags are parsed before torch loads (seconds): --help and bad flags answer at once
    ARGS = cli.parse_or_exit(parse_args)

import os
import shutil
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from infra import atomic
from infra import checkpoint
import data
from infra import sources
from infra import demo
from infra import hf
import lora
from infra import memory
from model import DECODER_LINEARS
from rope import linear_scaling, pi_factor


# --------------------------------------------------------------------------- the model

def build_model(args, dtype=torch.float32, device="cpu"):
    """The base for LongQLoRA training: (model in train mode, trainable parameters, PI factor).

    PI factor f > 1 loads RoPE with rope_scaling {"rope_type": "linear", "factor": f}; f = 1 keeps the
    checkpoint's own RoPE. --quant nf4 stores the seven decoder linears in NF4; LoRA goes on all seven."""
    factor = args.rope_factor or pi_factor(args.ctx, hf.read_config(args.model).max_position_embeddings)
    model = hf.load_model(args.model, dtype=dtype, device=device, rope_scaling=linear_scaling(factor),
                          quantize=None if args.quant == "none" else "nf4", quant_backend=args.quant_backend)
    model.set_attention(args.attn, args.group_size_ratio, args.s2_shift)
    model.gradient_checkpointing, model.loss_chunk = True, args.loss_chunk
    model.set_memory_savings(args.mlp_chunk, args.offload_activations and model.lm_head.weight.is_cuda)
    for layer in model.layers if args.compile else ():
        layer.compile()
    if args.full_finetune:
        trainable = list(model.parameters())
        model.requires_grad_(True)
    else:
        trainable = lora.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                  targets=DECODER_LINEARS, train_embed_norm=args.train_embed_norm)
    return model.train(), trainable, factor


# --------------------------------------------------------------------------- data

def build_dataset(args, model_args):
    """The training sequences (indexable; every item a dict of (ctx,) tensors) and the pad id."""
    pad_id = model_args.eos_token_id if isinstance(model_args.eos_token_id, int) else 0
    if args.data == "synthetic":       # an endless supply: sequence i is generated from (seed, i) on demand
        bos = model_args.bos_token_id if isinstance(model_args.bos_token_id, int) else 1
        return demo.SyntheticDataset(model_args.vocab_size, args.ctx, 1_000_000, args.seed, bos_id=bos), pad_id
    path = Path(args.data)
    tokenizer = sources.load_tokenizer(args.model) if args.sft or path.suffix != ".bin" else None
    pad_id = tokenizer.pad_id if tokenizer is not None else pad_id
    if args.sft:
        return data.SFTDataset(path, tokenizer, args.ctx, args.template), pad_id
    split = args.split or ("train" if sources.is_pg19_layout(path) else None)
    corpus = sources.tokenize_source(path, tokenizer, split=split, cache_dir=args.cache_dir,
                                  vocab_size=model_args.vocab_size)
    if args.layout == "truncate":
        return data.TruncatedDataset(corpus, args.ctx, pad_id), pad_id
    if corpus.n_tokens + len(corpus) - 1 < args.ctx:      # documents joined by EOS
        raise ValueError(f"{path}: {corpus.n_tokens + len(corpus) - 1} tokens, fewer than --ctx {args.ctx} (packing "
                         "needs at least one full sequence)")
    eos = tokenizer.eos_id if tokenizer is not None else model_args.eos_token_id
    return data.PackedDataset(corpus, args.ctx, eos), pad_id


# --------------------------------------------------------------------------- one optimizer step

def make_optimizer(params, lr: float, weight_decay: float, device: torch.device):
    """Paged AdamW (32-bit states) on CUDA; plain torch AdamW on CPU, where there is nothing to page to."""
    if device.type == "cuda":
        import bitsandbytes as bnb   # here: importing it probes CUDA for seconds, and the CPU path never needs it
        return bnb.optim.PagedAdamW32bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=False)


def constant_with_warmup(optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LR of step s (0-based): lr * min(1, (s + 1) / warmup). Unlike HF's schedule the first step is not
    wasted at LR 0; step warmup - 1 and every later one use the full LR."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)


def loss_tokens(batch: dict) -> int:
    """Tokens the loss is taken over: positions t whose next label labels[t + 1] is not ignored."""
    return int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())


def train_step(model, micro_batches, optimizer, scaler, max_grad_norm: float = 0.3, weighting: str = "tokens",
               world_size: int = 1) -> dict:
    """One optimizer step over this rank's micro-batches (the module docstring, points 2-5). Returns {loss
    (all ranks), grad_norm (before clipping), lr, tokens (real input tokens, all ranks), skipped (fp16
    overflow), finite}. A non-finite loss or gradient is never applied: finite=False, weights untouched."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device
    n_loss = [loss_tokens(b) for b in micro_batches]
    n_input = sum(int(b["input_ids"].numel() if b["padding_mask"] is None else b["padding_mask"].sum())
                  for b in micro_batches)
    counts = torch.tensor([sum(n_loss), n_input], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for batch, n in zip(micro_batches, n_loss):
        weight = (1 / max(1.0, float(counts[0])) if weighting == "tokens"
                  else 1 / (max(1, n) * len(micro_batches) * world_size))
        ids, labels, mask = (None if t is None else t.to(device) for t in batch.values())
        nll = model.loss(ids, labels, padding_mask=mask, reduction="sum") * weight
        scaler.scale(nll).backward()
        loss += nll.detach().double()
    if world_size > 1:
        for handle in [dist.all_reduce(t, async_op=True) for t in [loss] + [p.grad for p in params]]:
            handle.wait()
    lr = optimizer.param_groups[0]["lr"]
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    # fp16: GradScaler skips a step whose gradients overflowed (exactly when the norm is not finite) and
    # lowers the scale; without it a non-finite loss or gradient is a broken run, never applied.
    skipped = scaler.is_enabled() and not math.isfinite(grad_norm)
    finite = scaler.is_enabled() or (math.isfinite(float(loss)) and math.isfinite(grad_norm))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss), "grad_norm": None if skipped else grad_norm, "lr": lr, "tokens": int(counts[1]),
            "skipped": skipped, "finite": finite}


# --------------------------------------------------------------------------- the run

MAX_SKIPPED = 50       # fp16 steps skipped in a row (overflow at every loss scale) before the run is declared broken


def prepare(args, rank: int, world: int, device, dtype, log):
    """Check --out, read the config and the data, load the model, and only then write train_config.json:
    a bad input fails before --out is touched, and an --out this call created is removed if anything fails."""
    out = Path(args.out)
    created, start = not out.exists(), None
    try:
        if args.demo:
            start = checkpoint.resume_point(out, args.resume, args.overwrite, args.max_steps, demo=True)
            log(demo.BANNER)
            if rank == 0:
                if start is None:
                    checkpoint.remove_run(out)        # the demo replaces its own previous output
                demo.make_base(out, args.ctx, args.seed)
            if world > 1:
                dist.barrier()
            args.model = str(out / "demo-base")
        model_args = hf.read_config(args.model)
        dataset, pad_id = build_dataset(args, model_args)
        if not args.demo:       # bad model or data are reported before a conflict with --out
            start = checkpoint.resume_point(out, args.resume, args.overwrite, args.max_steps)
        sampler = data.ShuffledSampler(len(dataset), args.seed, rank, world)
        if args.max_steps is None:
            args.max_steps = max(1, len(sampler) // (args.batch_size * args.grad_accum)) if args.sft else PRETRAIN_STEPS
            if start is not None and start[0] > args.max_steps:
                raise ValueError(f"{start[1]}: the checkpoint is at step {start[0]}, past this run's {args.max_steps}")
        if args.warmup > args.max_steps:
            log(f"warning: --warmup {args.warmup} is longer than the run ({args.max_steps} steps): the full LR is "
                "never reached")
        torch.manual_seed(args.seed)          # the same LoRA initialisation on every rank
        model, trainable, factor = build_model(args, dtype, device)
        training = {"rope_scaling": model.args.rope_scaling, "ctx": args.ctx,
                    "max_position_embeddings": model_args.max_position_embeddings,
                    **({"template": args.template} if args.sft else {})}
        config = {**{k: getattr(args, k) for k in DEFAULTS}, **training, "model": str(args.model), "demo": args.demo,
                  "preset": args.preset, "world_size": world, "pi_factor": factor, "compute_dtype": str(dtype)[6:],
                  "base_fingerprint": hf.fingerprint(args.model), "device": str(device), "torch": torch.__version__}
        if start is not None:
            checkpoint.check_same_recipe(out, config)
        if rank == 0 and start is None:        # --- from here on --out is written (on resume: once restored)
            if args.overwrite:
                checkpoint.remove_run(out)
            atomic.write_json(out / "train_config.json", config)
            (out / "metrics.jsonl").write_text("")
    except BaseException:
        if created and rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        raise
    a = model.args
    log(f"model {args.model}: {a.n_layers} layers, dim {a.dim}, trained context {a.max_position_embeddings} -> ctx "
        f"{args.ctx}, PI factor {factor:g}; {'NF4' if args.quant == 'nf4' else 'dense'} base, "
        + ("full fine-tuning" if args.full_finetune else f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on "
           f"{', '.join(DECODER_LINEARS)}" + (" + embeddings, norms" if args.train_embed_norm else ""))
        + f": {sum(p.numel() for p in trainable):,} trainable parameters; attention "
        + (f"S²-Attn (groups of {int(args.ctx * args.group_size_ratio)}, shift {args.s2_shift})"
           if args.attn == "s2" else "full") + f"; {len(dataset):,} sequences of {args.ctx} tokens, "
        f"{args.batch_size} x {args.grad_accum} x {world} rank(s) per step; {args.max_steps} steps -> {out}")
    return model, trainable, dataset, sampler, pad_id, training, config, start


def train(args) -> dict:
    rank, world, device = cli.init_distributed()
    log = (lambda message: print(message, flush=True)) if rank == 0 else (lambda message: None)
    dtype = cli.compute_dtype(args.dtype, device)
    model, trainable, dataset, sampler, pad_id, training, config, start = prepare(args, rank, world, device, dtype,
                                                                                   log)
    out, metrics_path = Path(args.out), Path(args.out) / "metrics.jsonl"
    optimizer = make_optimizer(trainable, args.lr, args.weight_decay, device)
    scheduler = constant_with_warmup(optimizer, args.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def save_weights(folder: Path):
        checkpoint.save_weights(model, folder, args.full_finetune, args.model, training)

    step, last_saved = start or (0, None)
    if start is not None:
        checkpoint.restore(last_saved, model, args.full_finetune, optimizer, scheduler, scaler, sampler, rank)
        if rank == 0:
            checkpoint.truncate_metrics(metrics_path, step)
            atomic.write_json(out / "train_config.json", config)
        log(f"resumed from {last_saved} (step {step})")
    else:
        torch.manual_seed(args.seed + rank)   # dropout masks differ between ranks
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stream = data.batches(dataset, sampler, args.batch_size, pad_id)
    rows, skipped, t_start = [], 0, time.perf_counter()
    with tqdm(total=args.max_steps, initial=step, desc="train", unit="step", disable=rank != 0,
              dynamic_ncols=True) as bar, cli.StopRequest() as stop, open(metrics_path if rank == 0 else os.devnull,
                                                                          "a") as metrics:
        for step in range(step + 1, args.max_steps + 1):
            t0 = time.perf_counter()
            r = train_step(model, [next(stream) for _ in range(args.grad_accum)], optimizer, scaler,
                           args.max_grad_norm, args.loss_weighting, world)
            if not r["finite"]:
                raise ValueError(f"step {step}: loss {r['loss']:.4g}, gradient norm {r['grad_norm']:.4g}: not finite; "
                                 f"stopped before applying it, nothing saved. Last good checkpoint: "
                                 f"{last_saved or 'none'}. Lower --lr, or check the data and the base weights")
            skipped = skipped + 1 if r["skipped"] else 0
            if skipped >= MAX_SKIPPED or (step == args.max_steps and skipped == len(rows) + 1):
                raise ValueError(f"step {step}: fp16 loss scaling skipped {skipped} steps in a row (the gradients "
                                 f"overflow even at scale {scaler.get_scale():g}); nothing saved. Last good "
                                 f"checkpoint: {last_saved or 'none'}. Use --dtype bf16 or fp32")
            if not r["skipped"]:
                scheduler.step()      # a skipped step does not advance the schedule
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row = {"step": step, **{k: r[k] for k in ("loss", "grad_norm", "lr", "tokens")},
                   "tokens_per_s": r["tokens"] / (time.perf_counter() - t0), "peak_mem_bytes": cli.peak_memory_bytes(device),
                   "skipped": int(r["skipped"]), **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {})}
            rows.append(row)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % args.log_every == 0 or len(rows) == 1:
                log(f"step {step}/{args.max_steps} loss {row['loss']:.4f} lr {row['lr']:.3g} grad_norm "
                    f"{row['grad_norm'] or 0:.4g} {row['tokens_per_s']:.0f} tok/s peak "
                    f"{row['peak_mem_bytes'] / 2**30:.2f} GiB" + (" SKIPPED (fp16 overflow)" if r["skipped"] else ""))
            interrupted = cli.stop_requested(stop, world)
            if interrupted or (args.save_every and step % args.save_every == 0):
                state = checkpoint.trainer_state(step, optimizer, scheduler, scaler, sampler, world)
                last_saved = checkpoint.save(out, step, save_weights, state, args.keep_checkpoints) if rank == 0 \
                    else last_saved
            if interrupted:
                log(f"stopped at step {step}; checkpoint {last_saved}; continue with --resume")
                raise KeyboardInterrupt
    elapsed = time.perf_counter() - t_start
    if rank == 0:
        save_weights(out)
    if world > 1:
        dist.barrier()
    all_rows = checkpoint.read_metrics(metrics_path) if rank == 0 else rows
    summary = {"out": str(out), "demo": args.demo, "steps": args.max_steps, "steps_run": len(rows),
               "first_loss": all_rows[0]["loss"] if all_rows else None,
               "last_loss": all_rows[-1]["loss"] if all_rows else None,
               "tokens_per_s": sum(r["tokens"] for r in rows) / elapsed if rows else 0.0,
               "peak_mem_bytes": cli.peak_memory_bytes(device), "seconds": elapsed,
               "output": str(out / ("model" if args.full_finetune else "adapter"))}
    if all_rows:
        log(f"loss: first step {summary['first_loss']:.4f} -> last step {summary['last_loss']:.4f}; "
            f"{summary['tokens_per_s']:.0f} tok/s; peak {summary['peak_mem_bytes'] / 2**30:.2f} GiB; "
            f"{elapsed:.0f} s; saved {summary['output']}")
        if args.demo:
            log(demo.verdict(all_rows, dataset))
    return summary


def main(argv=None) -> dict:
    """train.py with command-line flags (or --dry-run); returns a summary dict. Raises on bad input."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    cli.set_threads(args.threads)
    if args.dry_run:
        return memory.dry_run(args)
    try:
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli.run(main, ARGS))
