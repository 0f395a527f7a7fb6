"""LongQLoRA training, written out by hand: Position Interpolation + NF4 base + LoRA + S²-Attn.

    python train.py --model DIR --data PATH --ctx 8192 [--preset llama2-7b-8k]   # the paper's recipe
    python train.py --ctx 8192                                                     # offline demo (no --model)
    torchrun --nproc_per_node 8 train.py --model DIR ...                          # data parallel
    torchrun --nproc_per_node 8 train.py --model DIR ... --fsdp    # sharded (infra/fsdp.py): a base too big for a GPU
    python train.py --preset llama2-7b-12k --dry-run [--budget 32GB] [--world-size 8 --fsdp]   # predicted peak

One optimizer step, following a token from the data to the update (the functions below, in this order):
  1. build_dataset: data.py cuts the token stream into sequences of exactly ctx tokens (packed documents,
     LongLoRA; --truncate: one BOS+document per sequence, LongQLoRA; --sft: conversations, prompts masked);
     data.batches yields micro-batches {input_ids, labels, padding_mask} of them.
  2. build_model: model.Transformer.loss embeds the token; RoPE turns its position p into p / f, f the PI
     factor ceil(ctx / trained context); the seven decoder linears are frozen NF4 (quant.Linear4bit) plus a
     trainable fp32 LoRA path, y = W x + (alpha/r) B A dropout(x); attention is S²-Attn inside groups of
     ctx * group_size_ratio tokens, half of the heads shifted by half a group; every decoder layer is
     gradient-checkpointed; the lm_head and the cross-entropy of the next token run 1024 positions at a time,
     so the (ctx x vocab) logits never exist.
  3. train_step: accumulation over the step's micro-batches (all ranks), --loss-weighting:
       tokens       each micro-batch back-propagates  sum of its token losses / loss tokens of the whole step:
                    the gradient of the mean over every token, however the step is split (our default);
       micro-batch  mean over its own tokens / (micro-batches x ranks): every micro-batch weighs the same, as
                    in LongQLoRA's HF-Trainer SFT (so an answer of 10 tokens counts as much as one of 1000).
     fp16 only: torch.amp.GradScaler multiplies the loss before backward and skips a step whose gradients
     overflowed; bf16 and fp32 need no scaling. A non-finite loss or gradient outside fp16 stops the run.
     Then the gradient norm is clipped to 0.3 and AdamW steps (bitsandbytes PagedAdamW32bit on CUDA: its
     states page to CPU under memory pressure; torch AdamW on CPU), LR constant after a linear warmup.
LoRA weights, their gradients and the optimizer state are fp32; the frozen base computes in --dtype.
--as-published switches the five places where we deliberately differ from LongQLoRA's code back to it.
In infra/: run.py, the run around the loop (--out, resume, log, --eval-every); memory.py, --dry-run; demo.py, the demo.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from infra import cli

# torch and every module that imports it load on first use, not here: the flags below answer --help and a
# bad value at once instead of after the seconds torch takes to import.
torch, data, lora, rope, demo, fsdp, hf, memory, run, sources = map(cli.LazyModule, ("torch", "data", "lora", "rope",
    "infra.demo", "infra.fsdp", "infra.hf", "infra.memory", "infra.run", "infra.sources"))

# --------------------------------------------------------------------------- the flags

# Every flag once: (name, default, range, help). A type as the default (int, float, str) means "none unless
# given"; a range is an interval checked before anything is read ("[1, inf)") or a tuple of choices.
RECIPE = [      # what the run computes: --resume refuses to change any of these
    ("model", str, None, "HF LLaMA directory (config.json, safetensors, tokenizer.model); none: offline demo"),
    ("data", str, None, "a PG19-layout folder, a folder/.txt/.jsonl(.gz) of texts, a .bin token file, with --sft a "
                        "JSONL of {input, output} / {conversation} records, or 'synthetic' (the demo's default)"),
    ("split", str, None, "split of a PG19-layout folder (default: train)"),
    ("ctx", 8192, "[2, inf)", "training context length in tokens"),
    ("batch_size", 1, "[1, inf)", "sequences per micro-batch and rank"),
    ("grad_accum", 1, "[1, inf)", "micro-batches per optimizer step"),
    ("lr", 2e-4, "(0, inf)", "peak learning rate"),
    ("warmup", 20, "[0, inf)", "linear warmup steps, constant LR after"),
    ("weight_decay", 0.0, "[0, inf)", "AdamW weight decay"),
    ("max_grad_norm", 0.3, "[0, inf)", "clip the gradient norm to this (0: no clipping)"),
    ("lora_r", 64, "[1, inf)", "LoRA rank"),
    ("lora_alpha", 16.0, "(0, inf)", "LoRA alpha, scaling alpha/r"),
    ("lora_dropout", 0.05, "[0, 1)", "dropout on the LoRA input"),
    ("lora_dropout_masks", "shared", ("shared", "per-projection"), "dropout masks: one shared by q/k/v and one by "
     "gate/up (they read the same input), or one per projection as PEFT draws them"),
    ("train_embed_norm", False, None, "also train embeddings and norms (LoRA+)"),
    ("full_finetune", False, None, "PI + full fine-tuning of a dense model, no LoRA (saves model/, not adapter/)"),
    ("group_size_ratio", 0.25, "(0, 1]", "S²-Attn group size as a fraction of ctx"),
    ("attn", "s2", ("s2", "full"), "attention during training"),
    ("s2_shift", "segment", ("segment", "roll", "none", "roll-published"), "S²-Attn shift of the second half of "
     "the heads: segment (LongLoRA's flash-attn path, causal end to end), roll (LongLoRA's PyTorch path, which "
     "LongQLoRA trained with: it wraps around, so from a few layers up a position can see the token it predicts), "
     "roll-published (roll with that path's padding mask: every group masked with the first group's block, so "
     "pad keys wrapped into the last group stay visible), none (no shift: the short-attention ablation)"),
    ("quant", "nf4", ("nf4", "none"), "storage of the frozen decoder linears"),
    ("dtype", "auto", ("auto", "bf16", "fp16", "fp32"),
     "compute dtype of the frozen base; auto: bf16 on GPUs with it, fp16 on older GPUs, fp32 on CPU"),
    ("sft", False, None, "supervised fine-tuning on a JSONL of conversations"),
    ("template", "vicuna", ("longqlora", "vicuna"), "SFT chat template: LongQLoRA's or FastChat's Vicuna v1.1"),
    ("loss_weighting", "tokens", ("tokens", "micro-batch"),
     "accumulation: every loss token weighs the same, or every micro-batch (LongQLoRA)"),
    ("layout", "packing", ("packing", "truncate"), "pretraining sequences: documents joined with EOS and cut into "
     "ctx chunks (LongLoRA), or one BOS+document per sequence, truncated and padded (LongQLoRA)"),
    ("rope_factor", float, f"[1, {cli.MAX_ROPE_FACTOR}]", "PI factor; 1: no PI (default: ceil(ctx / trained ctx))"),
    ("seed", 42, "[0, 9223372036854775807)", "seed of LoRA init, dropout and data order (torch takes 64 bits)"),
    ("as_published", False, None, "every knob as LongQLoRA's published code, flaws included: --s2-shift "
     "roll-published, --loss-weighting micro-batch, HF's warmup (first update at LR 0), --dtype fp16 with loss "
     "scaling (CUDA; fp32 on CPU), --lora-dropout-masks per-projection; explicit flags and --preset still apply"),
]
RUN = [         # how the run is carried out: free to change on --resume
    ("max_steps", int, "[1, inf)", "optimizer steps (default: 1000; --sft: one epoch)"),
    ("out", str, None, "output folder (default: out/demo for the demo, else out/<model name>-<ctx>)"),
    ("save_every", 100, "[0, inf)", "checkpoint every N steps (0: never)"),
    ("keep_checkpoints", 3, "[0, inf)", "keep only the newest N checkpoints (0: all)"),
    ("log_every", 10, "[1, inf)", "print a log line every N steps"),
    ("cache_dir", str, None, "token cache folder (default: $LONGQLORA_CACHE or ~/.cache/longqlora)"),
    ("quant_backend", "auto", ("auto", "torch", "bnb"), "NF4 dequantization kernel"),
    ("loss_chunk", 1024, "[1, inf)", "tokens per lm_head + cross-entropy chunk"),
    ("mlp_chunk", 0, "[0, inf)", "MLP of the recomputed layer in tiles of this many tokens: less memory, one "
                                 "more MLP forward (0: untiled)"),
    ("offload_activations", False, None, "keep the checkpointed layer inputs in pinned CPU memory (CUDA only)"),
    ("fsdp", False, None, "with torchrun: shard the base, LoRA, gradients and AdamW states across the ranks (FSDP2, "
                          "infra/fsdp.py) instead of a whole copy per rank: for a base one device cannot hold"),
    ("compile", False, None, "torch.compile every decoder layer (slower on the CPUs measured so far, see README)"),
    ("eval_every", 0, "[0, inf)", "every N steps and at the end: held-out loss at --ctx, full attention (0: never)"),
    ("eval_data", str, None, "held-out data, read like --data (default: a PG19 --data's validation split; synthetic)"),
    ("eval_sequences", 8, "[1, inf)", "held-out sequences per evaluation"),
    ("tensorboard", False, None, "also log the metrics to <out>/tensorboard (needs the tensorboard package)"),
]
# The paper's recipes (REFERENCE §2; its LoRA and optimizer settings are the defaults above), LongQLoRA's roll
# shift only on request (see --s2-shift); and the offline demo's (no --model; infra/demo.py says why).
LONGQLORA = dict(max_steps=1000, grad_accum=16, layout="truncate")
PRESETS = {
    "llama2-7b-8k": dict(LONGQLORA, ctx=8192),
    "llama2-7b-12k": dict(LONGQLORA, ctx=12288),
    "vicuna-13b-sft-8k": dict(LONGQLORA, ctx=8192, lr=1e-4, sft=True, max_steps=None, template="longqlora",
                              loss_weighting="micro-batch"),
    # LLaMA-2-70B, sharded (--fsdp): 8k on 2+ GPUs of 40 GB, 32k on 8 (README: DDP or FSDP)
    "llama2-70b-8k": dict(LONGQLORA, ctx=8192, fsdp=True, mlp_chunk=2048),
    "llama2-70b-32k": dict(LONGQLORA, ctx=32768, fsdp=True, mlp_chunk=2048, offload_activations=True),
}
DEMO = dict(max_steps=80, lr=4e-3, warmup=5, max_grad_norm=1.0, lora_r=16, lora_alpha=64.0, train_embed_norm=True,
            save_every=0, log_every=5, out="out/demo", data="synthetic", eval_every=40, eval_sequences=4)
COMMAND = [     # what this invocation does; not saved with the run
    ("preset", str, tuple(PRESETS), "the paper's recipe; explicit flags override it"),
    ("resume", False, None, "continue from the newest complete checkpoint in --out"),
    ("overwrite", False, None, "replace a previous run in --out"),
    ("threads", int, None, "CPU threads for torch (default: all cores; the demo: up to 4 idle ones)"),
    ("dry_run", False, None, "print the predicted peak memory of one step and exit"),
    ("budget", str, None, "with --dry-run: also print the longest ctx whose step fits this much memory (e.g. 32GB)"),
    ("world_size", int, "[1, inf)", "with --dry-run: predict one rank of this many (default 1; --fsdp shards)"),
]
FLAGS = RECIPE + RUN + COMMAND
# --as-published: LongQLoRA's code where our defaults deliberately differ (README: the deviation table).
AS_PUBLISHED = dict(s2_shift="roll-published", loss_weighting="micro-batch", lora_dropout_masks="per-projection")


def build_parser() -> argparse.ArgumentParser:
    p = cli.table_parser(FLAGS, prog="train.py", description="LongQLoRA: PI + NF4 + LoRA + S²-Attn fine-tuning. "
                         "--preset and the demo change some defaults.")
    for layout in ("packing", "truncate"):      # the spellings of LongLoRA's and LongQLoRA's layouts
        p.add_argument(f"--{layout}", dest="layout", action="store_const", const=layout, help=f"--layout {layout}")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags resolved as explicit flag > --preset > demo recipe (no --model) > the table, and checked."""
    args = build_parser().parse_args(argv)
    args.demo = args.model is None and not args.dry_run
    if args.preset and args.model is None and not args.dry_run:
        raise ValueError(f"--preset {args.preset} sets the recipe, not the model: give --model (or --dry-run)")
    if args.full_finetune and args.quant is None:
        args.quant = "none"         # full fine-tuning updates the dense weights themselves
    gpu = args.as_published and (args.dry_run or torch.cuda.is_available())     # --dry-run predicts the GPU run
    published = dict(AS_PUBLISHED, dtype="fp16" if gpu else "fp32") if args.as_published else {}
    cli.resolve(args, FLAGS, published, PRESETS.get(args.preset, {}), DEMO if args.demo else {})
    if args.out is None and args.model is not None:
        args.out = f"out/{Path(args.model).name}-{args.ctx}"
    cli.check_train_args(args)
    return args


# --------------------------------------------------------------------------- data, model, one optimizer step

def build_dataset(args, model_args):
    """The training sequences (indexable; every item a dict of (ctx,) tensors) and the pad id."""
    if args.data is None:       # never the demo's corpus for a real model unless asked for
        raise ValueError("--model without --data: give the text to train on, or --data synthetic for the demo's corpus")
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


def build_model(args, dtype=None, device="cpu"):
    """The base for LongQLoRA training: (model in train mode, trainable parameters, PI factor).

    PI factor f > 1 loads RoPE with rope_scaling {"rope_type": "linear", "factor": f}; f = 1 keeps the
    checkpoint's own RoPE. --quant nf4 stores the seven decoder linears in NF4; LoRA goes on all seven."""
    factor = args.rope_factor or rope.pi_factor(args.ctx, hf.read_config(args.model).max_position_embeddings)
    model = hf.load_model(args.model, dtype=dtype or torch.float32, device=device,
                          rope_scaling=rope.linear_scaling(factor), quantize=None if args.quant == "none" else "nf4",
                          quant_backend=args.quant_backend)
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
                                  train_embed_norm=args.train_embed_norm,
                                  shared_dropout=args.lora_dropout_masks == "shared")
    return model.train(), trainable, factor


def loss_tokens(batch: dict) -> int:
    """Tokens the loss is taken over: positions t whose next label labels[t + 1] is not ignored."""
    return int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())


def train_step(model, micro_batches, optimizer, scaler, max_grad_norm: float = 0.3, weighting: str = "tokens",
               world_size: int = 1, sharded: bool = False) -> dict:
    """One optimizer step over this rank's micro-batches (the module docstring, point 3). Returns {loss
    (all ranks), grad_norm (before clipping), lr, tokens (real input tokens, all ranks), skipped (fp16
    overflow), finite}. A non-finite loss or gradient is never applied: finite=False, weights untouched.
    sharded (--fsdp): backward already summed each gradient shard over the ranks, the norm covers all shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device
    n_loss = [loss_tokens(b) for b in micro_batches]
    n_input = sum(int(b["input_ids"].numel() if b["padding_mask"] is None else b["padding_mask"].sum())
                  for b in micro_batches)
    counts = torch.tensor([sum(n_loss), n_input], dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for batch, n in zip(micro_batches, n_loss):
        weight = (1 / max(1.0, float(counts[0])) if weighting == "tokens"
                  else 1 / (max(1, n) * len(micro_batches) * world_size))
        ids, labels, mask = (None if t is None else t.to(device) for t in batch.values())
        nll = model.loss(ids, labels, padding_mask=mask, reduction="sum") * weight
        scaler.scale(nll).backward()
        loss += nll.detach().double()
    if world_size > 1:
        grads = [] if sharded else [p.grad for p in params]
        for handle in [torch.distributed.all_reduce(t, async_op=True) for t in [loss] + grads]:
            handle.wait()
    lr = optimizer.param_groups[0]["lr"]
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    grad_norm = float(norm.full_tensor() if sharded else norm)
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


def make_optimizer(params, lr: float, weight_decay: float, device, sharded: bool = False):
    """Paged AdamW (32-bit states) on CUDA; plain torch AdamW on CPU, where there is nothing to page to, and for
    --fsdp's sharded parameters, which bitsandbytes' optimizers do not take."""
    if device.type == "cuda" and not sharded:
        import bitsandbytes as bnb   # here: importing it probes CUDA for seconds, and the CPU path never needs it
        return bnb.optim.PagedAdamW32bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=False)


def constant_with_warmup(optimizer, warmup: int, hf: bool = False):
    """LR of step s (0-based): lr * min(1, (s + 1) / warmup). Unlike HF's schedule the first step is not
    wasted at LR 0; step warmup - 1 and every later one use the full LR. hf (--as-published): HF's
    lr * min(1, s / warmup), the first update at LR 0, the full LR from step warmup on."""
    first = 0 if hf else 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + first) / warmup) if warmup else 1.0)


# --------------------------------------------------------------------------- the loop

def train(args) -> dict:
    """Optimizer steps up to --max-steps. infra/run.py does the rest: --out (locked while the run writes it),
    loading (build_dataset, build_model), --resume, the log, checkpoints every --save-every steps and on Ctrl-C."""
    with run.Run(args, build_dataset, build_model, [f[0] for f in RECIPE], [f[0] for f in RECIPE + RUN]) as r:
        optimizer = make_optimizer(r.trainable, args.lr, args.weight_decay, r.device, r.fsdp)
        scheduler = constant_with_warmup(optimizer, args.warmup, hf=args.as_published)
        scaling = fsdp.ShardedGradScaler if r.fsdp else torch.amp.GradScaler    # --fsdp: the ranks agree on overflow
        scaler = scaling(r.device.type, enabled=r.dtype == torch.float16)
        start = r.restore(optimizer, scheduler, scaler)         # 0, or the checkpoint's step, everything as it was
        batches = data.batches(r.dataset, r.sampler, args.batch_size, r.pad_id)
        with r.progress(start):
            for step in range(start + 1, args.max_steps + 1):
                t0 = time.perf_counter()
                result = train_step(r.model, [next(batches) for _ in range(args.grad_accum)], optimizer, scaler,
                                    args.max_grad_norm, args.loss_weighting, r.world, r.fsdp)
                r.check(step, result, scaler)     # not finite, or fp16 overflow at every scale: stop, nothing saved
                if not result["skipped"]:
                    scheduler.step()              # a skipped step does not advance the schedule
                r.record(step, result, t0, scaler)                       # metrics.jsonl, the bar, the log
                r.evaluate_if_due(step)                                  # --eval-every: held-out loss at --ctx
                r.save_if_due(step, optimizer, scheduler, scaler)        # --save-every, or Ctrl-C: save and stop
        return r.finish()


def main(argv=None) -> dict:
    """train.py with command-line flags (or --dry-run); returns a summary dict. Raises on bad input."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    cli.set_threads(demo.threads() if args.demo and args.threads is None else args.threads)
    return memory.dry_run(args) if args.dry_run else train(args)


if __name__ == "__main__":
    sys.exit(cli.run(main, cli.parse_or_exit(parse_args)))
