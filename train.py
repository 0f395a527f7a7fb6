"""LongQLoRA training, written out by hand: Position Interpolation + NF4 base + LoRA + S²-Attn.

    python train.py --model DIR --data PATH --ctx 8192 [--preset llama2-7b-8k]   # the paper's recipe
    python train.py --ctx 8192                                                     # offline demo (no --model)
    torchrun --nproc_per_node 8 train.py --model DIR ...                          # data parallel
    python train.py --preset llama2-7b-12k --dry-run                               # predicted peak memory

One optimizer step, following the tokens from the data to the update:

  1. data.py yields micro-batches {input_ids, labels, padding_mask} of exactly ctx tokens (packed
     documents by default, LongLoRA; --truncate: one BOS+document per sequence, LongQLoRA; --sft: Vicuna
     v1.1 conversations with the prompts masked). `grad_accum` micro-batches per step and rank.
  2. model.Transformer.forward(..., attn="s2", return_hidden=True): RoPE with every position divided by
     the PI factor ceil(ctx / max_position_embeddings); the seven decoder linears are frozen NF4
     (quant.Linear4bit) plus a trainable fp32 LoRA path, y = W x + (alpha/r) B A dropout(x); attention
     is S²-Attn inside groups of ctx * group_size_ratio tokens, half of the heads shifted by half a group;
     each decoder layer is gradient-checkpointed (only its input is kept, the rest recomputed in backward).
  3. model.chunked_cross_entropy: lm_head + next-token cross-entropy 1024 tokens at a time, so the
     (ctx x vocab) fp32 logits never exist.
  4. Gradient accumulation, weighted by tokens: every micro-batch back-propagates
         sum of its token losses / (number of loss tokens in the whole step, all micro-batches, all ranks)
     so the accumulated gradient is exactly that of the mean loss over every token of the step,
     whatever the split into micro-batches and ranks (an SFT micro-batch with few answer tokens weighs
     less, as it would in one big batch). Data parallel: the ranks' LoRA gradients are summed by an
     all-reduce, which with that weighting is the global mean.
  5. fp16 only: the loss was multiplied by a dynamic scale before backward; gradients are divided by it,
     and a step whose gradients overflowed is skipped (scale halved). bf16/fp32 need no scaling.
  6. Clip the gradient norm to max_grad_norm (0.3), AdamW step (bitsandbytes PagedAdamW32bit on CUDA,
     torch AdamW on CPU), LR constant after a linear warmup.

LoRA weights, their gradients and the optimizer state are fp32; the frozen base computes in the
--dtype (bf16 by default on GPUs that have it, fp16 on V100s, fp32 on CPU).

Outputs (only rank 0 writes): metrics.jsonl (one row per optimizer step), checkpoint-<step>/ every
--save-every steps (adapter, optimizer, scheduler, loss scaler, RNG states, data position; written to a
hidden temporary folder and renamed, so a folder named checkpoint-<step> is always complete),
train_config.json (everything this run resolved), and adapter/ (PEFT format) at the end; with
--full-finetune a full HF model/ instead. --resume continues from the newest checkpoint and reproduces
an uninterrupted run bit for bit on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data as data_lib
import lora as lora_lib
from model import DECODER_LINEARS, ModelArgs, Transformer, chunked_cross_entropy, load_config, save_pretrained

# --------------------------------------------------------------------------- recipes

# What every flag is when neither the command line nor a preset sets it.
DEFAULTS = dict(
    data="synthetic", split=None, cache_dir=None, ctx=8192, max_steps=None, batch_size=1, grad_accum=1, lr=2e-4,
    warmup=20, weight_decay=0.0, max_grad_norm=0.3, lora_r=64, lora_alpha=16.0, lora_dropout=0.05,
    train_embed_norm=False, group_size_ratio=0.25, attn="s2", s2_shift="segment", quant="nf4", quant_backend="auto",
    dtype="auto", sft=False, rope_factor=None, out=None, save_every=100, keep_checkpoints=3, seed=42, layout="packing",
    loss_chunk=1024, log_every=10, full_finetune=False,
)
PRETRAIN_STEPS = 1000          # the paper's 1000 steps when --max-steps is not given (SFT: one epoch)

# The paper's recipes (REFERENCE §2); the model path still comes from --model, explicit flags win.
_LONGQLORA = dict(max_steps=1000, batch_size=1, grad_accum=16, lr=2e-4, warmup=20, weight_decay=0.0,
                  max_grad_norm=0.3, lora_r=64, lora_alpha=16.0, lora_dropout=0.05, quant="nf4", seed=42,
                  attn="s2", group_size_ratio=0.25, layout="truncate")
PRESETS = {
    "llama2-7b-8k": dict(_LONGQLORA, ctx=8192),
    "llama2-7b-12k": dict(_LONGQLORA, ctx=12288),
    "vicuna-13b-sft-8k": dict(_LONGQLORA, ctx=8192, lr=1e-4, sft=True, max_steps=None),  # one epoch
}
# Architectures a dry run uses when there is no --model (LLaMA-2 7B / 13B config.json values).
PRESET_ARCHS = {
    "llama2-7b-8k": "llama2-7b", "llama2-7b-12k": "llama2-7b", "vicuna-13b-sft-8k": "llama2-13b",
}
ARCHS = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, intermediate_size=11008, n_layers=32, n_heads=32,
                      norm_eps=1e-5, max_position_embeddings=4096),
    "llama2-13b": dict(vocab_size=32000, dim=5120, intermediate_size=13824, n_layers=40, n_heads=40,
                       norm_eps=1e-5, max_position_embeddings=4096),
}

# The offline demo (no --model): a small random LLaMA trained with the full method on data.py's synthetic
# long-range key-value recall corpus. Its trained context is a quarter of --ctx, so PI (factor 4) is really used.
# The labelled tokens are answers to queries whose only evidence lies about ctx/8 tokens back: without looking
# that far the loss stops at the corpus floor ln(n_values); the LoRA adapters learn the content match that
# fetches the answer (S²-Attn keeps it within reach), and the log says whether the loss got below that floor.
DEMO_OUT = "out/demo"
DEMO_ARCH = dict(vocab_size=32, dim=64, intermediate_size=128, n_layers=2, n_heads=4)
DEMO_INIT_STD = DEMO_ARCH["dim"] ** -0.5      # fan-in init: the frozen lm_head can express a peaked distribution
# LoRA+ (trainable embeddings and norms) and a large LoRA scale (alpha/r = 4) let the adapter learn the recall
# at ctx 8192 within the demo's steps (about 2,000 labelled tokens each); in trials without them (r=64,
# alpha=16, LoRA alone) the loss stayed at or above the floor for hundreds of steps.
DEMO_RECIPE = dict(max_steps=80, lr=4e-3, warmup=5, max_grad_norm=1.0, lora_r=16, lora_alpha=64.0,
                   train_embed_norm=True, save_every=0, log_every=5)


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="LongQLoRA: PI + NF4 + LoRA + S²-Attn fine-tuning. "
                                "[defaults] in brackets; --preset and the demo change some of them.")
    # Every default is None here: the value is resolved later as flag > preset > demo > DEFAULTS.
    a = p.add_argument
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
    a("--s2-shift", choices=["segment", "roll", "none"],
      help="S²-Attn shift: segment boundaries, LongLoRA's roll, or none (short attention ablation) [segment]")
    a("--quant", choices=["nf4", "none"], help="storage of the frozen decoder linears [nf4]")
    a("--quant-backend", choices=["auto", "torch", "bnb"], help="NF4 dequantization kernel [auto]")
    a("--dtype", choices=["auto", "bf16", "fp16", "fp32"],
      help="compute dtype of the frozen base; auto: bf16 on GPUs with it, fp16 on older GPUs, fp32 on CPU [auto]")
    a("--sft", action="store_true", default=None, help="supervised fine-tuning on a Vicuna-template JSONL")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--packing", dest="layout", action="store_const", const="packing", default=None,
                        help="pretraining: documents joined with EOS and cut into ctx chunks (LongLoRA) [default]")
    layout.add_argument("--truncate", dest="layout", action="store_const", const="truncate",
                        help="pretraining: one BOS+document per sequence, truncated and padded (LongQLoRA)")
    a("--rope-factor", type=float, help="PI factor; default ceil(ctx / max_position_embeddings); 1: no PI")
    a("--loss-chunk", type=int, help="tokens per lm_head + cross-entropy chunk [1024]")
    a("--out", help="output folder [out/demo for the demo, else out/<model name>-<ctx>]")
    a("--save-every", type=int, help="checkpoint every N steps (0: never) [100; demo: 0]")
    a("--keep-checkpoints", type=int, help="keep only the newest N checkpoints (0: all) [3]")
    a("--resume", action="store_true", default=None, help="continue from the newest complete checkpoint in --out")
    a("--overwrite", action="store_true", default=None, help="replace a previous run in --out")
    a("--seed", type=int, help="seed of LoRA init, dropout and data order [42]")
    a("--log-every", type=int, help="print a log line every N steps [10]")
    a("--preset", choices=sorted(PRESETS), help="the paper's recipe; explicit flags override it")
    a("--dry-run", action="store_true", default=None, help="print the predicted peak memory of one step and exit")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, resolved: explicit flag > --preset > demo recipe (no --model) > DEFAULTS."""
    parser = build_parser()

    def usage_error(message):
        raise ValueError(message)
    parser.error = usage_error      # one `error: ...` line from the CLI wrapper, exit 2
    args = parser.parse_args(argv)
    args.demo = args.model is None and not args.dry_run
    if args.full_finetune and args.quant is None:
        args.quant = "none"         # full fine-tuning updates the dense weights themselves
    if args.preset and args.model is None and not args.dry_run:
        raise ValueError(f"--preset {args.preset} sets the recipe, not the model: give --model (or --dry-run)")
    preset = PRESETS.get(args.preset, {})
    demo = DEMO_RECIPE if args.demo else {}
    for key, default in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key, demo.get(key, default)))
    for key in ("resume", "overwrite", "dry_run"):
        setattr(args, key, bool(getattr(args, key)))
    if args.out is None:
        args.out = DEMO_OUT if args.demo or args.model is None else f"out/{Path(args.model).name}-{args.ctx}"
    return args


def check_args(args, training: bool = False) -> None:
    """Impossible settings fail here, before anything is read or written."""
    if args.ctx < 2:
        raise ValueError(f"--ctx {args.ctx}: a training sequence needs at least 2 tokens")
    if not 0 < args.group_size_ratio <= 1:
        raise ValueError(f"--group-size-ratio {args.group_size_ratio} must be in (0, 1]")
    if args.attn == "s2" and int(args.ctx * args.group_size_ratio) < 1:
        raise ValueError(f"--ctx {args.ctx} x --group-size-ratio {args.group_size_ratio} gives S²-Attn groups of "
                         f"{int(args.ctx * args.group_size_ratio)} tokens; a group needs at least 1")
    for flag in ("batch_size", "grad_accum", "lora_r", "loss_chunk", "log_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("warmup", "save_every", "keep_checkpoints"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.rope_factor is not None and not args.rope_factor >= 1:
        raise ValueError(f"--rope-factor must be >= 1 (1: no interpolation), got {args.rope_factor}")
    if args.full_finetune and args.quant == "nf4":
        raise ValueError("--full-finetune trains the dense weights; it cannot use --quant nf4")
    if args.full_finetune and args.dtype == "fp16":
        raise ValueError("--full-finetune with fp16 weights is not supported (use bf16 or fp32)")
    if not training:
        return
    if args.sft and args.data == "synthetic":
        raise ValueError("--sft needs --data pointing to a JSONL of conversations")
    if args.demo and args.data != "synthetic":
        raise ValueError(f"--data {args.data}: text data needs the tokenizer of a --model "
                         "(the demo uses --data synthetic)")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other")


# --------------------------------------------------------------------------- devices and processes

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set): one process per GPU (nccl) or CPU process (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Distributed(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32        # bf16 is no faster on CPUs without AMX, and fp32 is exact
        # native bf16 from Ampere (compute capability 8) on; a V100 (7.0) emulates it slowly, so fp16 there
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux reports KiB


# --------------------------------------------------------------------------- the model

def pi_factor(ctx: int, max_position_embeddings: int, rope_factor: float | None = None) -> float:
    """Position Interpolation: positions are divided by ceil(ctx / trained context) (2 for 8192 / 4096)."""
    if rope_factor is not None:
        return float(rope_factor)
    return float(max(1, math.ceil(ctx / max_position_embeddings)))


def build_model(model_dir, *, ctx: int, dtype=torch.bfloat16, device="cpu", quant: str = "nf4",
                quant_backend: str = "auto", rope_factor: float | None = None, lora_r: int = 64,
                lora_alpha: float = 16.0, lora_dropout: float = 0.05, train_embed_norm: bool = False,
                full_finetune: bool = False, gradient_checkpointing: bool = True):
    """Load the base for LongQLoRA training. Returns (model in train mode, trainable params, PI factor).

    PI factor f > 1 loads RoPE with rope_scaling {"rope_type": "linear", "factor": f}; f = 1 keeps the
    checkpoint's own RoPE. quant "nf4" stores the seven decoder linears in NF4; LoRA (r, alpha, dropout)
    goes on all seven. full_finetune: no LoRA, every weight trains.
    """
    args = ModelArgs.from_hf_config(load_config(model_dir), Path(model_dir) / "config.json")
    factor = pi_factor(ctx, args.max_position_embeddings, rope_factor)
    scaling = {"rope_type": "linear", "factor": factor} if factor != 1 else None
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device, rope_scaling=scaling,
                                        quantize=None if quant == "none" else quant, quant_backend=quant_backend)
    if full_finetune:
        trainable = [p for p in model.parameters()]
        for p in trainable:
            p.requires_grad_(True)
    else:
        trainable = lora_lib.add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                                      targets=DECODER_LINEARS, train_embed_norm=train_embed_norm)
    model.gradient_checkpointing = gradient_checkpointing
    model.train()
    return model, trainable, factor


def demo_model_args(ctx: int) -> ModelArgs:
    """The demo's small LLaMA, trained (so to speak) for a quarter of the demo's context."""
    return ModelArgs(**DEMO_ARCH, max_position_embeddings=max(1, ctx // 4))


def make_demo_base(out_dir: Path, ctx: int, seed: int) -> Path:
    """A random LLaMA saved as a real HF checkpoint, so the demo then loads it like any model (NF4 and all)."""
    torch.manual_seed(seed)
    base = Transformer(demo_model_args(ctx))
    base.init_weights(std=DEMO_INIT_STD)
    return save_pretrained(base, out_dir / "demo-base")


# --------------------------------------------------------------------------- data

def build_dataset(args, model_args: ModelArgs):
    """The training sequences (indexable; every item a dict of (ctx,) tensors) and the pad id."""
    pad_id = model_args.eos_token_id if isinstance(model_args.eos_token_id, int) else 0
    if args.data == "synthetic":
        bos = model_args.bos_token_id if isinstance(model_args.bos_token_id, int) else 1
        # an endless supply: sequence i is generated from (seed, i) on demand
        return data_lib.SyntheticDataset(model_args.vocab_size, args.ctx, 1_000_000, args.seed, bos_id=bos), pad_id
    path = Path(args.data)
    tokenizer = None
    if args.sft or path.suffix != ".bin":
        tokenizer = data_lib.load_tokenizer(args.model)
        pad_id = tokenizer.pad_id
    if args.sft:
        return data_lib.SFTDataset(path, tokenizer, args.ctx), pad_id
    split = args.split
    if split is None and data_lib.is_pg19_layout(path):
        split = "train"
    corpus = data_lib.tokenize_source(path, tokenizer, split=split, cache_dir=args.cache_dir,
                                     vocab_size=model_args.vocab_size)
    if args.layout == "truncate":
        return data_lib.TruncatedDataset(corpus, args.ctx, pad_id), pad_id
    stream = corpus.n_tokens + len(corpus) - 1          # documents joined by EOS
    if stream < args.ctx:
        raise ValueError(f"{path}: {stream} tokens, fewer than --ctx {args.ctx} (packing needs at least one "
                         "full sequence)")
    eos = tokenizer.eos_id if tokenizer is not None else model_args.eos_token_id
    return data_lib.PackedDataset(corpus, args.ctx, eos), pad_id


def next_micro_batches(dataset, sampler, n: int, batch_size: int, pad_id: int) -> list[dict]:
    """The next n micro-batches of this rank; afterwards the sampler has consumed exactly their indices."""
    return [data_lib.collate([dataset[next(sampler)] for _ in range(batch_size)], pad_id) for _ in range(n)]


# --------------------------------------------------------------------------- optimisation

def make_optimizer(params, lr: float, weight_decay: float, device: torch.device):
    """Paged AdamW (32-bit states) on CUDA: optimizer states page to CPU RAM under memory pressure
    instead of failing. On CPU there is nothing to page to: plain torch AdamW, same update rule."""
    if device.type == "cuda":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW32bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                         weight_decay=weight_decay), "bitsandbytes PagedAdamW32bit"
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                             foreach=False), "torch.optim.AdamW (CPU: no paging)"


def constant_with_warmup(optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LR of step s (0-based): lr * min(1, (s + 1) / warmup). Unlike HF's schedule the first step is not
    wasted at LR 0; step warmup - 1 and every later one use the full LR."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)


class LossScaler:
    """Dynamic loss scaling for fp16 compute (V100s have no bf16).

    fp16 gradients of a mean loss underflow (anything below 6e-8 becomes 0), so the loss is multiplied by
    `scale` before backward and the (fp32 LoRA) gradients divided by it afterwards. If any gradient is
    inf/NaN the step is skipped and the scale halved; after `growth_interval` good steps in a row it
    doubles. Disabled (scale 1, nothing skipped) for bf16 and fp32.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0

    def unscale_(self, params) -> bool:
        """Divide the gradients by the scale in place; True when all of them are finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.enabled:
            return True
        for g in grads:
            g.mul_(1.0 / self.scale)
        return bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps,
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def all_reduce_sum_(tensors, bucket_bytes: int = 64 << 20) -> None:
    """Sum `tensors` over the ranks in place, packed into flat buckets of one dtype (few, large messages)."""
    by_dtype: dict[torch.dtype, list] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        start = 0
        while start < len(group):
            end, size = start, 0
            while end < len(group) and (end == start or size + group[end].numel() * group[end].element_size()
                                        <= bucket_bytes):
                size += group[end].numel() * group[end].element_size()
                end += 1
            flat = torch.cat([t.reshape(-1) for t in group[start:end]])
            dist.all_reduce(flat)
            offset = 0
            for t in group[start:end]:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            start = end


def loss_token_count(batch: dict) -> int:
    """Tokens the loss is taken over: positions t whose next label labels[t + 1] is not ignored."""
    return int((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum())


def micro_batch_loss(model, batch: dict, *, attn: str = "s2", group_size_ratio: float = 0.25,
                     s2_shift: str = "segment", loss_chunk: int = 1024) -> torch.Tensor:
    """Summed next-token loss of one micro-batch: tokens -> hidden states -> chunked lm_head + CE."""
    hidden = model(batch["input_ids"], attn=attn, group_size_ratio=group_size_ratio, s2_shift=s2_shift,
                   padding_mask=batch["padding_mask"], return_hidden=True)
    return chunked_cross_entropy(hidden, model.lm_head.weight, batch["labels"], chunk_size=loss_chunk,
                                 reduction="sum")


def to_device(batch: dict, device) -> dict:
    return {k: None if v is None else v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, micro_batches, optimizer, scheduler, trainable, *, scaler: LossScaler | None = None,
               max_grad_norm: float = 0.3, attn: str = "s2", group_size_ratio: float = 0.25,
               s2_shift: str = "segment", loss_chunk: int = 1024, world_size: int = 1) -> dict:
    """One optimizer step over this rank's micro-batches (see the module docstring, points 2-6).

    Returns {loss (mean over every loss token of the step, all ranks), grad_norm (before clipping; None
    when skipped), lr (the LR this step used), tokens (real input tokens, all ranks), skipped}.
    """
    scaler = scaler or LossScaler(enabled=False)
    device = next(iter(trainable)).device
    counts = torch.tensor([sum(loss_token_count(b) for b in micro_batches),
                           sum(int(b["input_ids"].numel() if b["padding_mask"] is None else b["padding_mask"].sum())
                               for b in micro_batches)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    loss_tokens, input_tokens = max(1, int(counts[0])), int(counts[1])

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in micro_batches:
        nll = micro_batch_loss(model, to_device(batch, device), attn=attn, group_size_ratio=group_size_ratio,
                               s2_shift=s2_shift, loss_chunk=loss_chunk)
        (nll * (scaler.scale / loss_tokens)).backward()
        loss_sum += nll.detach().double()
    if world_size > 1:
        all_reduce_sum_([p.grad for p in trainable if p.grad is not None] + [loss_sum])

    lr = optimizer.param_groups[0]["lr"]
    finite = scaler.unscale_(trainable)
    scaler.update(finite)
    if not finite:                      # fp16 overflow: no update, LR schedule does not advance
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss_sum) / loss_tokens, "grad_norm": None, "lr": lr, "tokens": input_tokens,
                "skipped": True}
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss_sum) / loss_tokens, "grad_norm": float(grad_norm), "lr": lr,
            "tokens": input_tokens, "skipped": False}


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
RECIPE_KEYS = ("model", "data", "split", "ctx", "batch_size", "grad_accum", "lr", "warmup", "weight_decay",
               "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout", "train_embed_norm", "full_finetune",
               "group_size_ratio", "attn", "s2_shift", "quant", "dtype", "sft", "layout", "rope_factor",
               "seed", "world_size", "loss_chunk")


def rng_state() -> dict:
    """Every random generator the run touches (dropout, data order is seeded separately)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out`, oldest first. Temporary folders are hidden (.checkpoint-*.tmp-*)
    and never match; a checkpoint-<step> folder only appears by rename once it is complete."""
    found = []
    if out.is_dir():
        for d in out.iterdir():
            m = CHECKPOINT.match(d.name)
            if m and d.is_dir() and (d / TRAINER_STATE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def save_checkpoint(out: Path, step: int, model, trainer_state: dict, full_finetune: bool, keep: int) -> Path:
    """checkpoint-<step>/: adapter/ (PEFT) or model/, and trainer_state.pt; written beside, then renamed."""
    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp-{os.getpid()}-", dir=out))
    try:
        if full_finetune:
            save_pretrained(model, tmp / "model")
        else:
            lora_lib.save_adapter(model, tmp / "adapter")
        torch.save(trainer_state, tmp / TRAINER_STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainable_state(model, ckpt: Path, full_finetune: bool) -> None:
    if full_finetune:
        from model import checkpoint_files, our_key, read_tensors
        state = {our_key(name): t for name, t, _ in read_tensors(checkpoint_files(ckpt / "model"))}
        if model.args.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])
    else:
        lora_lib.load_adapter(model, ckpt / "adapter")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def previous_run(out: Path) -> bool:
    """Does `out` hold (part of) a run of this script?"""
    names = ("metrics.jsonl", "train_config.json", "adapter", "model")
    return out.is_dir() and (any((out / n).exists() for n in names) or any(out.glob("checkpoint-*")))


def remove_previous_run(out: Path) -> None:
    for name in ("metrics.jsonl", "train_config.json", "adapter", "model", "demo-base"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in out.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- memory prediction

def predict_peak_memory(args_model: ModelArgs, ctx: int, batch_size: int = 1, lora_r: int = 64, *,
                        quant: str = "nf4", dtype_bytes: int = 2, lora_dropout: float = 0.05,
                        loss_chunk: int = 1024, train_embed_norm: bool = False,
                        full_finetune: bool = False) -> dict:
    """Predicted peak device memory (bytes) of one LongQLoRA training step, by part.

    Assumes what train.py does on CUDA: NF4 base (or dense with quant="none"), LoRA on the seven decoder
    linears with fp32 weights/grads/AdamW moments, every decoder layer checkpointed, SDPA with a fused
    (flash / memory-efficient) kernel so no (T x T) scores exist, chunked lm_head + cross-entropy.
    full_finetune: no LoRA; every (dense) weight gets a 16-bit grad and two fp32 moments (PagedAdamW32bit).
    Peak = what lives the whole step + the checkpointed layer inputs + the larger of (a) one layer's
    recompute and backward working set and (b) the loss chunk's working set (they never overlap).
    Not counted: the CUDA context (~0.3-0.5 GB, outside torch's allocator) and allocator fragmentation.
    """
    a, b = args_model, dtype_bytes
    n = batch_size * ctx                                     # tokens in one micro-batch
    q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    shapes = {"q_proj": (a.dim, q_out), "k_proj": (a.dim, kv_out), "v_proj": (a.dim, kv_out),
              "o_proj": (q_out, a.dim), "gate_proj": (a.dim, a.intermediate_size),
              "up_proj": (a.dim, a.intermediate_size), "down_proj": (a.intermediate_size, a.dim)}
    linear_params = a.n_layers * sum(i * o for i, o in shapes.values())
    if quant == "nf4":
        # packed 4-bit codes + one uint8 absmax per 64 values + one fp32 absmax per 256 of those
        # (double quantisation) + per-layer code books (16 + 256 fp32) and offset.
        base = linear_params // 2 + linear_params // 64 + 4 * (linear_params // (64 * 256)) \
            + 7 * a.n_layers * (16 + 256 + 1) * 4
    else:
        base = linear_params * b
    embed = a.vocab_size * a.dim * b * (1 if a.tie_word_embeddings else 2)
    norms = (2 * a.n_layers + 1) * a.dim * b
    lora_params = 0 if full_finetune else a.n_layers * sum(lora_r * (i + o) for i, o in shapes.values())
    # fp32 weight + fp32 grad + two fp32 AdamW moments
    lora = lora_params * 16
    if train_embed_norm and not full_finetune:               # LoRA+: 16-bit embedding/norms, grads, fp32 moments
        lora += (a.vocab_size * a.dim + (2 * a.n_layers + 1) * a.dim) * (b + 8)
    if full_finetune:                                        # every weight: 16-bit grad + two fp32 moments
        lora = (linear_params + embed // b + norms // b) * (b + 8)
    # Checkpointed activations: each layer's input (L of them), the last layer's output (kept for the
    # final norm's backward) and the normed hidden states the chunked loss saves.
    checkpoints_ = (a.n_layers + 2) * n * a.dim * b
    # One layer recomputed for its backward, bytes per token of what autograd keeps:
    drop = 1 if lora_dropout > 0 else 0                      # bool dropout mask per LoRA input value
    per_token = {
        # RMSNorm (x2): the fp32 copy of its input and its 16-bit normalised output
        "norms": 2 * a.dim * (4 + b),
        # LoRA (x7): each keeps its own fp32 dropped-out input (+ mask) and the r-dim A output in fp32;
        # full fine-tuning instead keeps the 16-bit input of each linear for its weight gradient (q/k/v and
        # gate/up share theirs)
        "lora": sum(i * (4 + drop) + 4 * lora_r for i, _ in shapes.values()) if not full_finetune
        else (2 * a.dim + q_out + a.intermediate_size) * b,
        # q, k, v regrouped for S²-Attn (kv repeated to n_heads for GQA) + SDPA output + fp32 logsumexp
        "attention": 4 * q_out * b + 4 * a.n_heads,
        # MLP: gate output, silu(gate), up output
        "mlp": 3 * a.intermediate_size * b,
        # backward buffers at the MLP (the layer's widest point): grad in/out of the hidden state,
        # grads of gate/up/act in 16-bit and the fp32 grad through down_proj's LoRA input
        "backward": 2 * a.dim * b + 3 * a.intermediate_size * b
        + (0 if full_finetune else 4 * a.intermediate_size),
    }
    dequant = max(i * o for i, o in shapes.values()) * b if quant == "nf4" else 0   # one weight rebuilt at a time
    layer = n * sum(per_token.values()) + dequant
    # Loss chunk: bf16 logits of a chunk, its fp32 copy and fp32 softmax, the fp32 dlogits and their
    # 16-bit cast (backward); plus the fp32 nll / lse per token and the 16-bit grad of the hidden states.
    c = min(loss_chunk, n)
    loss = c * a.vocab_size * (b + 4 + 4 + 4 + b) + n * (8 + a.dim * b)
    parts = {
        "nf4_weights" if quant == "nf4" else "dense_weights": base,
        "embed_and_head": embed,
        "norms": norms,
        "trainable_grads_and_adam" if full_finetune else "lora_weights_grads_adam": lora,
        "checkpointed_hidden_states": checkpoints_,
        "layer_recompute": layer,
        "loss_chunk": loss,
    }
    parts["peak_bytes"] = base + embed + norms + lora + checkpoints_ + max(layer, loss)
    parts["layer_recompute_per_token"] = per_token
    parts["lora_params"] = lora_params
    parts["linear_params"] = linear_params
    return parts


def dry_run(args) -> dict:
    if args.model is not None:
        model_args = ModelArgs.from_hf_config(load_config(args.model), Path(args.model) / "config.json")
        name = args.model
    elif args.preset is not None:
        name = PRESET_ARCHS[args.preset]
        model_args = ModelArgs(**ARCHS[name])
    else:
        model_args, name = demo_model_args(args.ctx), "demo"
    check_args(args)
    dtype_bytes = 4 if args.dtype == "fp32" else 2
    p = predict_peak_memory(model_args, args.ctx, args.batch_size, args.lora_r, quant=args.quant,
                            dtype_bytes=dtype_bytes, lora_dropout=args.lora_dropout, loss_chunk=args.loss_chunk,
                            train_embed_norm=args.train_embed_norm, full_finetune=args.full_finetune)
    gb = lambda x: f"{x / 1e9:8.2f} GB"                            # noqa: E731  (decimal GB, as REFERENCE §7)
    method = "full fine-tuning" if args.full_finetune else f"LoRA r={args.lora_r}"
    print(f"predicted peak device memory of one training step: {name}, ctx {args.ctx}, micro-batch "
          f"{args.batch_size}, {'NF4' if args.quant == 'nf4' else 'dense'} base, {method}, "
          f"{8 * dtype_bytes}-bit compute, {args.attn} attention (fused SDPA), loss chunk {args.loss_chunk}")
    if args.quant == "nf4":
        weights = (f"NF4 weights ({p['linear_params'] / 1e9:.2f}B params, incl. double-quant stats)", p["nf4_weights"])
    else:
        weights = (f"dense decoder weights ({p['linear_params'] / 1e9:.2f}B params)", p["dense_weights"])
    if args.full_finetune:
        trainable = ("every weight: 16-bit grad + 2 fp32 AdamW moments", p["trainable_grads_and_adam"])
    else:
        trainable = (f"LoRA {p['lora_params'] / 1e6:.0f}M params: fp32 weight + grad + 2 AdamW moments"
                     + (" (+ embeddings, norms)" if args.train_embed_norm else ""), p["lora_weights_grads_adam"])
    rows = [
        weights,
        ("16-bit embedding + lm_head", p["embed_and_head"]),
        ("norms", p["norms"]),
        trainable,
        (f"checkpointed hidden states ({model_args.n_layers} layers + 2)", p["checkpointed_hidden_states"]),
        ("one layer's recompute + backward working set", p["layer_recompute"]),
        ("loss chunk (not alive at the same time as the recompute)", p["loss_chunk"]),
    ]
    for label, value in rows:
        print(f"  {label:<72}{gb(value)}")
    per_token = ", ".join(f"{k} {v}" for k, v in p["layer_recompute_per_token"].items())
    print(f"  (recompute, bytes per token: {per_token})")
    print(f"  {'peak':<72}{gb(p['peak_bytes'])}")
    print(f"peak_bytes={p['peak_bytes']}")
    return p


# --------------------------------------------------------------------------- the run

def log(dist_ctx: Distributed, message: str) -> None:
    if dist_ctx.is_main:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def resume_point(args, out: Path):
    """(step, folder) of the newest complete checkpoint with --resume, else None. Without --resume an --out
    holding a previous run is refused unless --overwrite (the demo may replace its own previous output)."""
    if args.resume:
        found = checkpoints(out)
        return found[-1] if found else None
    if previous_run(out) and not args.overwrite:
        old = out / "train_config.json"
        try:
            demo_before = json.loads(old.read_text()).get("demo") is True
        except (OSError, ValueError, AttributeError):
            demo_before = False
        if not (args.demo and demo_before):
            raise ValueError(f"{out} already holds a training run; pass --resume to continue it, "
                             f"--overwrite to replace it, or another --out")
    return None


@dataclass
class Run:
    """Everything set up before the first step."""
    out: Path
    model: Transformer
    trainable: list
    model_args: ModelArgs
    dataset: object
    sampler: data_lib.ShuffledSampler
    pad_id: int
    dtype: torch.dtype
    factor: float
    config: dict
    resume_from: tuple | None


def prepare(args, dist_ctx: Distributed) -> Run:
    """Check the flags, read the model config and the data, load the model, and only then write --out
    (train_config.json). A bad input fails before --out is touched; an --out this call created is
    removed again if anything fails on the way."""
    check_args(args, training=True)
    out = Path(args.out)
    dtype = resolve_dtype(args.dtype, dist_ctx.device)
    if args.full_finetune and dtype == torch.float16:
        raise ValueError("--full-finetune with fp16 weights is not supported on this GPU; use --dtype fp32")
    created_out = not out.exists()
    resume_from = None
    if args.demo:
        resume_from = resume_point(args, out)
        log(dist_ctx, "=" * 78 + "\nDEMO: no --model given, so this trains a small RANDOM LLaMA on the built-in\n"
            "synthetic long-range copying corpus, with the real method end to end (NF4 base, LoRA, PI,\n"
            "S²-Attn, gradient checkpointing). Pass --model DIR --data PATH for real training.\n" + "=" * 78)
        if dist_ctx.is_main:
            if previous_run(out) and not args.resume:
                remove_previous_run(out)
            make_demo_base(out, args.ctx, args.seed)     # deterministic: a resumed demo gets the same base
        if dist_ctx.world_size > 1:
            dist.barrier()
        args.model = str(out / "demo-base")
    try:
        model_args = ModelArgs.from_hf_config(load_config(args.model), Path(args.model) / "config.json")
        # Every rank tokenizes (or reads the cache); cache files are written atomically, so ranks racing
        # on a first run only repeat work.
        dataset, pad_id = build_dataset(args, model_args)
        if not args.demo:
            resume_from = resume_point(args, out)
        sampler = data_lib.ShuffledSampler(len(dataset), args.seed, dist_ctx.rank, dist_ctx.world_size)
        if args.max_steps is None:
            per_step = args.batch_size * args.grad_accum
            args.max_steps = max(1, len(sampler) // per_step) if args.sft else PRETRAIN_STEPS
        torch.manual_seed(args.seed)          # the same LoRA initialisation on every rank
        model, trainable, factor = build_model(
            args.model, ctx=args.ctx, dtype=dtype, device=dist_ctx.device, quant=args.quant,
            quant_backend=args.quant_backend, rope_factor=args.rope_factor, lora_r=args.lora_r,
            lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, train_embed_norm=args.train_embed_norm,
            full_finetune=args.full_finetune)
        config = {**{k: getattr(args, k) for k in DEFAULTS}, "model": str(args.model), "demo": args.demo,
                  "preset": args.preset, "world_size": dist_ctx.world_size, "pi_factor": factor,
                  "rope_scaling": model.args.rope_scaling, "compute_dtype": str(dtype).replace("torch.", ""),
                  "max_position_embeddings": model_args.max_position_embeddings, "device": str(dist_ctx.device),
                  "loss_weighting": "tokens", "torch": torch.__version__}
        if resume_from is not None:
            saved = json.loads((out / "train_config.json").read_text())
            changed = [k for k in RECIPE_KEYS if k in saved and saved[k] != config.get(k)]
            if changed:
                raise ValueError(f"{out / 'train_config.json'}: cannot resume with a different recipe ("
                                 + ", ".join(f"{k}: {saved[k]!r} -> {config.get(k)!r}" for k in changed) + ")")
        # --- from here on --out is written
        if dist_ctx.is_main:
            if args.overwrite and previous_run(out):
                remove_previous_run(out)
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / "train_config.json", config)
    except BaseException:
        if created_out and dist_ctx.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return Run(out, model, trainable, model_args, dataset, sampler, pad_id, dtype, factor, config, resume_from)


def describe(args, run: Run, dist_ctx: Distributed, optimizer_name: str, fp16_scaling: bool) -> None:
    """The setup in a few log lines: what the method is doing to this model."""
    a, n_trainable = run.model_args, sum(p.numel() for p in run.trainable)
    log(dist_ctx, f"model {args.model}: {a.n_layers} layers, dim {a.dim}, trained context "
        f"{a.max_position_embeddings} -> ctx {args.ctx} with PI factor {run.factor:g}"
        + (" (no interpolation)" if run.factor == 1 else ""))
    lora = (f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} on "
            f"{', '.join(DECODER_LINEARS)}" + (" + embeddings and norms" if args.train_embed_norm else ""))
    log(dist_ctx, f"base {'NF4 (double quant)' if args.quant == 'nf4' else 'dense'}, compute "
        f"{run.config['compute_dtype']}, {'full fine-tuning' if args.full_finetune else lora}: "
        f"{n_trainable:,} trainable parameters")
    attention = (f"S²-Attn, groups of {int(args.ctx * args.group_size_ratio)} tokens, shift {args.s2_shift}"
                 if args.attn == "s2" else "full causal")
    log(dist_ctx, f"attention {attention}; gradient checkpointing on; loss in chunks of {args.loss_chunk} tokens; "
        f"optimizer {optimizer_name}" + ("; fp16 dynamic loss scaling" if fp16_scaling else ""))
    kind = "SFT" if args.sft else "synthetic" if args.data == "synthetic" else args.layout
    log(dist_ctx, f"data {args.data}: {len(run.dataset):,} sequences of {args.ctx} tokens ({kind}); "
        f"{args.batch_size} x {args.grad_accum} micro-batches x {dist_ctx.world_size} rank(s) per step; "
        f"{args.max_steps} steps, lr {args.lr:g} after {args.warmup} warmup steps -> {run.out}")


def restore(run: Run, ckpt: Path, optimizer, scheduler, scaler, full_finetune: bool, dist_ctx: Distributed) -> None:
    """Put the model, optimizer, scheduler, loss scaler, data position and RNGs back as they were when
    `ckpt` was written, and drop metrics rows of the interrupted attempt after it."""
    try:
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as e:          # pickle/zip errors of a damaged file come in many types
        raise ValueError(f"{ckpt / TRAINER_STATE}: cannot read, damaged? ({e}); delete {ckpt} to resume from "
                         "the checkpoint before it") from None
    load_trainable_state(run.model, ckpt, full_finetune)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    run.sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"][dist_ctx.rank])
    if dist_ctx.is_main:
        metrics = run.out / "metrics.jsonl"
        kept = [r for r in read_metrics(metrics) if r["step"] <= state["step"]]
        tmp = metrics.with_name(f"metrics.jsonl.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, metrics)


def save_training_state(args, run: Run, step: int, optimizer, scheduler, scaler, dist_ctx: Distributed) -> None:
    rng = rng_state()
    rngs = [rng]
    if dist_ctx.world_size > 1:         # every rank's dropout RNG, so that a resumed run is exact on all
        rngs = [None] * dist_ctx.world_size
        dist.all_gather_object(rngs, rng)
    if dist_ctx.is_main:
        trainer_state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "sampler": run.sampler.state_dict(), "rng": rngs}
        save_checkpoint(run.out, step, run.model, trainer_state, args.full_finetune, args.keep_checkpoints)


def train(args, dist_ctx: Distributed) -> dict:
    from tqdm import tqdm

    run = prepare(args, dist_ctx)
    device = dist_ctx.device
    optimizer, optimizer_name = make_optimizer(run.trainable, args.lr, args.weight_decay, device)
    scheduler = constant_with_warmup(optimizer, args.warmup)
    scaler = LossScaler(enabled=run.dtype == torch.float16)
    metrics_path, start_step = run.out / "metrics.jsonl", 0
    if run.resume_from is not None:
        start_step, ckpt = run.resume_from
        restore(run, ckpt, optimizer, scheduler, scaler, args.full_finetune, dist_ctx)
        log(dist_ctx, f"resumed from {ckpt} (step {start_step})")
    else:
        if args.resume:
            log(dist_ctx, f"--resume: no complete checkpoint in {run.out}, starting at step 0")
        torch.manual_seed(args.seed + dist_ctx.rank)   # dropout masks differ between ranks
        if dist_ctx.is_main:
            metrics_path.write_text("")
    describe(args, run, dist_ctx, optimizer_name, scaler.enabled)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, t_start = [], time.perf_counter()
    bar = tqdm(total=args.max_steps, initial=start_step, desc="train", unit="step", disable=not dist_ctx.is_main,
               dynamic_ncols=True)
    metrics_file = open(metrics_path, "a") if dist_ctx.is_main else None
    try:
        for step in range(start_step + 1, args.max_steps + 1):
            t0 = time.perf_counter()
            micro_batches = next_micro_batches(run.dataset, run.sampler, args.grad_accum, args.batch_size, run.pad_id)
            result = train_step(run.model, micro_batches, optimizer, scheduler, run.trainable, scaler=scaler,
                                max_grad_norm=args.max_grad_norm, attn=args.attn,
                                group_size_ratio=args.group_size_ratio, s2_shift=args.s2_shift,
                                loss_chunk=args.loss_chunk, world_size=dist_ctx.world_size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            row = {"step": step, **result, "tokens_per_s": result["tokens"] / seconds,
                   "peak_mem_bytes": peak_memory_bytes(device), "skipped": int(result["skipped"])}
            if scaler.enabled:
                row["loss_scale"] = scaler.scale
            rows.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % args.log_every == 0 or step == start_step + 1:
                grad_norm = "n/a" if row["grad_norm"] is None else f"{row['grad_norm']:.4g}"
                log(dist_ctx, f"step {step}/{args.max_steps} loss {row['loss']:.4f} lr {row['lr']:.3g} "
                    f"grad_norm {grad_norm} {row['tokens_per_s']:.0f} tok/s "
                    f"peak {row['peak_mem_bytes'] / 2**30:.2f} GiB"
                    + (" SKIPPED (fp16 overflow)" if row["skipped"] else ""))
            if args.save_every and step % args.save_every == 0:
                save_training_state(args, run, step, optimizer, scheduler, scaler, dist_ctx)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    elapsed = time.perf_counter() - t_start

    if dist_ctx.is_main:
        if args.full_finetune:
            save_pretrained(run.model, run.out / "model", copy_from=args.model)
        else:
            lora_lib.save_adapter(run.model, run.out / "adapter", base_model_name_or_path=str(args.model))
    if dist_ctx.world_size > 1:
        dist.barrier()
    all_rows = read_metrics(metrics_path) if dist_ctx.is_main else rows
    summary = {
        "out": str(run.out), "demo": args.demo, "steps": args.max_steps, "steps_run": len(rows),
        "first_loss": all_rows[0]["loss"] if all_rows else None,
        "last_loss": all_rows[-1]["loss"] if all_rows else None,
        "tokens_per_s": sum(r["tokens"] for r in rows) / elapsed if rows else 0.0,
        "peak_mem_bytes": peak_memory_bytes(device), "seconds": elapsed,
        "output": str(run.out / ("model" if args.full_finetune else "adapter")),
    }
    if all_rows:
        log(dist_ctx, f"loss: first step {summary['first_loss']:.4f} -> last step {summary['last_loss']:.4f}; "
            f"{summary['tokens_per_s']:.0f} tok/s; peak {summary['peak_mem_bytes'] / 2**30:.2f} GiB; "
            f"{elapsed:.0f} s; saved {summary['output']}")
    if args.demo and all_rows:
        ds, tail = run.dataset, all_rows[-5:]
        last = sum(r["loss"] for r in tail) / len(tail)
        nearest = ds.distance - ds.n_queries - ds.n_statements + 1
        verdict = ("below the floor: the long-range recall was learned" if last < ds.floor - 0.1 else
                   "not below the floor: the long-range recall was not learned in this run")
        log(dist_ctx, f"DEMO: each labelled token is the value of a key last stated {nearest}-{ds.distance - 1} "
            f"tokens earlier; without attending that far back the best loss is the floor ln({ds.n_values}) = "
            f"{ds.floor:.3f}. Loss: first step {all_rows[0]['loss']:.3f}, mean of the last {len(tail)} steps "
            f"{last:.3f} ({verdict})")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Run training (or --dry-run) with command-line flags; returns a summary dict. Raises on bad input."""
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    dist_ctx = init_distributed()
    try:
        return train(args, dist_ctx)
    finally:
        if dist_ctx.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def cli(argv=None) -> int:
    try:
        main(argv)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
