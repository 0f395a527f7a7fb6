"""The paper's claim on a real GPU: LLaMA-2-7B, NF4 + LoRA, 8,192 and 12,288 tokens, one micro-batch; and the
memory savings past it: 12,288 tokens with the MLP in tiles (--mlp-chunk 1024), 65,536 with tiles and the
checkpointed hidden states offloaded to pinned host memory (--offload-activations).

No weights are needed. The model is LLaMA-2-7B's geometry (dim 4096, intermediate 11008, 32 layers, 32
heads, vocab 32000, trained context 4096) with random weights, built without ever holding a 16-bit copy
of the decoder on the GPU: the module is created on the `meta` device, then every decoder linear gets a
random bf16 weight on the GPU that is quantized at once to NF4 (quant.Linear4bit.from_weight) and
dropped; embeddings and lm_head are random 16-bit, norms ones. Then the paper's recipe (REFERENCE §2)
through train.py's own functions:

    PI factor ceil(ctx / 4096) (2 at 8k, 3 at 12k), LoRA r=64 alpha=16 dropout=0.05 on q,k,v,o,gate,up,down
    (fp32), every decoder layer checkpointed, S²-Attn (group 1/4, shifted half), chunked lm_head + CE,
    paged AdamW 32-bit (train.make_optimizer), lr 2e-4, max grad norm 0.3, fp16 with dynamic loss scaling
    or bf16; micro-batch 1 x ctx, --grad-accum micro-batches per step (the paper: 16; peak memory does not
    depend on it: LoRA gradients accumulate in place)

Cases (--cases CTX[:MLP_CHUNK[:offload]]; default 8192, 12288, 12288:1024 and 65536:1024:offload, the dry
run's goals: 12k <= 12 GB with tiles, 64k <= 30 GB with tiles and offload). For each (dtype, case): one warm-up
step, then --steps timed steps. Printed beside each other:
    peak allocated   torch.cuda.max_memory_allocated over the steps (torch's allocator only)
    + paged states   the paged AdamW moments (8 bytes per LoRA parameter) live in CUDA managed memory,
                     outside torch's allocator, so max_memory_allocated does not see them; added back
    reserved         torch.cuda.max_memory_reserved (allocator cache included)
    predicted        memory.predict_peak_memory with the case's options, what `train.py --dry-run [--mlp-chunk
                     C] [--offload-activations]` prints (peak_bytes=...); with offload also the host bytes
                     predicted for the checkpoints beside the process's pinned host memory growth
    tokens/s         timed tokens / timed wall seconds
    MFU / HFU        model / hardware FLOPs per second over --peak-tflops (default 989: H100/H200 SXM
                     dense bf16 and fp16). FLOPs per token, with N = decoder linear params, R = LoRA params,
                     V d = lm_head params, L layers, and k = mean keys per query (S²-Attn: (g + 1) / 2 with
                     g = ctx / 4; full causal: (ctx + 1) / 2); attention forward = 4 d k per layer:
        model FLOPs     4 N (forward + input gradient; the frozen base has no weight gradient)
                        + 6 R (forward + input and weight gradients) + 4 V d + 3 L (4 d k)
        hardware FLOPs  model FLOPs + the recomputed forward of checkpointing (2 N + 2 R + L 4 d k)
                        + the chunked loss recomputing its logits in backward (2 V d)
                     At 8k with full attention this is ~50 GFLOP/token of hardware FLOPs (REFERENCE §7).

Baselines: the dry run's prediction and the paper's card (does the step fit a 32 GiB V100?). No data: random
weights and tokens. No committed JSON yet (no GPU so far); the first run to commit is the first command below,
with --out bench/results/gpu_check.json.

    python bench/gpu_check.py                          # fp16 and bf16, the four cases, ~10 min on an H100/H200
    python bench/gpu_check.py --dtypes bf16 --ctx 8192 --steps 3
    python bench/gpu_check.py --dtypes bf16 --cases 12288:1024 65536:1024:offload --steps 1
    python bench/gpu_check.py --cpu-smoke              # the same code path on a tiny model on the CPU

--fsdp (under torchrun, one GPU per rank): the model sharded across the ranks as train.py --fsdp shards it
(infra/fsdp.py), each rank's peak against the dry run's --world-size N --fsdp prediction; --geometry llama2-70b
for LongLoRA's 70B (the 70B presets' goals: 8k <= 40 GB per rank on 2 ranks with tiles of 2048, <= 30 GB with
offload too; 32k <= 60 GB on 8 ranks):

    torchrun --nproc_per_node 2 bench/gpu_check.py --fsdp --geometry llama2-70b --dtypes bf16 \
        --cases 8192:2048 8192:2048:offload --steps 1
    torchrun --nproc_per_node 2 bench/gpu_check.py --fsdp --cpu-smoke     # gloo, the tiny model on the CPU

It refuses to run (exit 2) without CUDA, except with --cpu-smoke, which runs dim 128, 2 layers, vocab 1024,
trained context 256 at 512 and 768 tokens (PI factors 2 and 3, like 8k and 12k), 768 in MLP tiles of 256 and
1024 with tiles and offload, on the CPU, where memory is the process's peak RSS (VmHWM), offload only adds a
host copy (there is no device to spare), and the optimizer is torch AdamW (what train.make_optimizer picks off
CUDA).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import benchlib

LLAMA2_7B = dict(vocab_size=32000, dim=4096, intermediate_size=11008, n_layers=32, n_heads=32, norm_eps=1e-5,
                 max_position_embeddings=4096)
SMOKE = dict(vocab_size=1024, dim=128, intermediate_size=344, n_layers=2, n_heads=4, norm_eps=1e-5,
             max_position_embeddings=256)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
V100_BYTES = 32 * 2**30          # the paper's card: a 32 GB V100 (32 GiB)
DEFAULT_CASES = ("8192", "12288", "12288:1024", "65536:1024:offload")
SMOKE_CASES = ("512", "768", "768:256", "1024:256:offload")


def parse_case(text: str) -> dict:
    """'CTX[:MLP_CHUNK[:offload]]' -> {"ctx", "mlp_chunk", "offload"}."""
    parts = str(text).split(":")
    try:
        if not 1 <= len(parts) <= 3 or (len(parts) == 3 and parts[2] != "offload"):
            raise ValueError
        ctx, chunk = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CTX[:MLP_CHUNK[:offload]], e.g. 65536:1024:offload") from None
    if ctx < 8 or chunk < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: ctx must be >= 8 and the MLP chunk >= 0")
    return {"ctx": ctx, "mlp_chunk": chunk, "offload": len(parts) == 3}


def case_name(case: dict) -> str:
    return str(case["ctx"]) + (f" tiles {case['mlp_chunk']}" if case["mlp_chunk"] else "") + \
        (" offload" if case["offload"] else "")


# --------------------------------------------------------------------------- building the model

def build_random_nf4_model(margs, dtype, device, seed: int):
    """LLaMA with random weights, decoder linears quantized to NF4 one at a time on `device`."""
    import torch
    import torch.nn as nn

    from model import Transformer
    from quant import Linear4bit

    with torch.device("meta"):
        model = Transformer(margs)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(0.02)

    model.embed_tokens.weight = nn.Parameter(randn(margs.vocab_size, margs.dim), requires_grad=False)
    model.lm_head.weight = nn.Parameter(randn(margs.vocab_size, margs.dim), requires_grad=False)
    model.norm.weight = nn.Parameter(torch.ones(margs.dim, device=device, dtype=dtype), requires_grad=False)
    for layer in model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = nn.Parameter(torch.ones(margs.dim, device=device, dtype=dtype), requires_grad=False)
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                if hasattr(parent, name):
                    meta = getattr(parent, name)
                    w = randn(meta.out_features, meta.in_features)          # the only 16-bit copy, one linear
                    setattr(parent, name, Linear4bit.from_weight(w, compute_dtype=dtype))
                    del w
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:5]}")
    return model


# --------------------------------------------------------------------------- FLOPs

def flops_per_token(margs, ctx: int, lora_params: int, attn: str, group_size_ratio: float) -> dict:
    """Model and hardware FLOPs per trained token (see the module docstring): benchlib's count, whose
    "executed" is the hardware count but for the chunked loss's logits recomputed in backward (2 V d)."""
    a = margs
    span = max(1, int(ctx * group_size_ratio)) if attn == "s2" else ctx
    f = benchlib.train_flops_per_token(dim=a.dim, intermediate=a.intermediate_size, layers=a.n_layers,
                                       heads=a.n_heads, kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                                       vocab=a.vocab_size, lora_r=0, span=span)
    model_flops = f["model"] + 6 * lora_params
    hardware = f["executed"] + 8 * lora_params + 2 * f["head_params"]
    return {"model": model_flops, "hardware": hardware, "decoder_linear_params": f["decoder_linear_params"]}


# --------------------------------------------------------------------------- measuring

class Meter:
    """Peak memory on CUDA (torch allocator) or, on the CPU, the process's peak RSS."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def reset(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            benchlib.reset_peak_rss()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def read(self) -> dict:
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info(self.device)
            return {"peak_allocated": self.torch.cuda.max_memory_allocated(self.device),
                    "peak_reserved": self.torch.cuda.max_memory_reserved(self.device),
                    "device_used_now": total - free, "device_total": total}
        return {"peak_allocated": benchlib.peak_rss_bytes()}


def run_config(model, trainable, margs, case, dtype, args, device, meter) -> dict:
    """Warm-up step + timed steps of one case (ctx, MLP tiles, offload) with the paper's recipe; memory, speed,
    utilisation."""
    import torch

    from infra import fsdp, memory
    import train

    ctx = case["ctx"]
    factor = float(max(1, math.ceil(ctx / margs.max_position_embeddings)))      # PI, as train.py sets it
    model.args.rope_scaling = None if factor == 1 else {"factor": factor, "rope_type": "linear"}
    model.set_memory_savings(case["mlp_chunk"], case["offload"])
    for p in trainable:
        p.grad = None
    meter.reset()
    optimizer = train.make_optimizer(trainable, args.lr, 0.0, device, sharded=args.fsdp)
    optimizer_name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    scaler = (fsdp.ShardedGradScaler if args.fsdp else torch.amp.GradScaler)(device.type,
                                                                              enabled=dtype == torch.float16)
    g = torch.Generator().manual_seed(args.seed)

    def step():
        batches = []
        for _ in range(args.grad_accum):
            tokens = torch.randint(3, margs.vocab_size, (1, ctx), generator=g)
            batches.append({"input_ids": tokens, "labels": tokens, "padding_mask": None})
        return train.train_step(model, batches, optimizer, scaler, 0.3, "tokens", args.world, args.fsdp)

    host_before = benchlib.rss_bytes()     # pinned host memory (offloaded checkpoints) shows in RSS
    results = [step()]                            # warm-up: optimizer state, kernels, allocator
    meter.sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        results.append(step())
    meter.sync()
    seconds = time.perf_counter() - t0
    mem = meter.read()
    host_growth = benchlib.rss_bytes() - host_before      # what the steps left resident on the host (pinned cache)
    tokens = args.steps * args.grad_accum * ctx
    n_lora = sum(p.numel() for p in trainable)
    flops = flops_per_token(margs, ctx, n_lora, args.attn, 0.25)
    tok_s = tokens / seconds
    pred = memory.predict_peak_memory(margs, ctx, 1, args.lora_r, quant="nf4", dtype_bytes=2,
                                     lora_dropout=0.05, loss_chunk=args.loss_chunk, mlp_chunk=case["mlp_chunk"],
                                     offload=case["offload"], world_size=args.world, fsdp=args.fsdp)
    paged = 8 * n_lora if "Paged" in optimizer_name else 0
    del optimizer
    return {
        "dtype": str(dtype).replace("torch.", ""), "ctx": ctx, "mlp_chunk": case["mlp_chunk"],
        "offload": case["offload"], "case": case_name(case), "pi_factor": factor, "attn": args.attn,
        "optimizer": optimizer_name, "grad_accum": args.grad_accum, "timed_steps": args.steps,
        "losses": [r["loss"] for r in results], "skipped": [r["skipped"] for r in results],
        "tokens_per_s": tok_s, "seconds": seconds, **mem, "paged_optimizer_state": paged,
        "peak_allocated_plus_paged": mem["peak_allocated"] + paged, "predicted_peak": pred["peak_bytes"],
        "predicted_parts": {k: v for k, v in pred.items() if isinstance(v, int)},
        "predicted_host_checkpoints": pred["host_checkpoints"], "host_rss_growth": host_growth,
        "model_tflops_per_token": flops["model"] / 1e12, "hardware_tflops_per_token": flops["hardware"] / 1e12,
        "mfu": tok_s * flops["model"] / (args.peak_tflops * 1e12),
        "hfu": tok_s * flops["hardware"] / (args.peak_tflops * 1e12),
        "lora_params": n_lora, "decoder_linear_params": flops["decoder_linear_params"],
    }


# --------------------------------------------------------------------------- main

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, nargs="+", default=None,
                   help="plain cases at these contexts (no tiles, no offload), instead of --cases")
    p.add_argument("--cases", type=parse_case, nargs="+", default=None,
                   help=f"CTX[:MLP_CHUNK[:offload]] [{' '.join(DEFAULT_CASES)}; --cpu-smoke: {' '.join(SMOKE_CASES)}]")
    p.add_argument("--dtypes", nargs="+", choices=["bf16", "fp16"], default=["fp16", "bf16"])
    p.add_argument("--steps", type=int, default=None,
                   help="timed optimizer steps per configuration, after one warm-up step [2; --cpu-smoke: 1]")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (paper: 16; peak does not change)")
    p.add_argument("--attn", choices=["s2", "full"], default="s2")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense 16-bit peak of the device in TFLOP/s for MFU (H100/H200 SXM: 989)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny geometry on the CPU: exercises the same code path")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: the model sharded across the ranks (FSDP2)")
    p.add_argument("--geometry", choices=["llama2-7b", "llama2-13b", "llama2-70b"], default="llama2-7b")
    p.add_argument("--out", help="write the results JSON here")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    import torch

    from infra import fsdp, memory, run
    from model import ModelArgs
    import lora

    if a.ctx is not None and a.cases is not None:
        raise ValueError("give --ctx (plain cases) or --cases, not both")
    rank, a.world, device = run.init_distributed() if a.fsdp else (0, 1, None)
    if rank:
        sys.stdout = open(os.devnull, "w")      # rank 0 reports
    if a.cpu_smoke:
        device, geometry, defaults = torch.device("cpu"), SMOKE, SMOKE_CASES
        a.steps = 1 if a.steps is None else a.steps
        torch.set_num_threads(1)        # a code-path check: one thread is quickest on a busy shared machine
    else:
        if not torch.cuda.is_available():
            raise ValueError("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                             "use --cpu-smoke to exercise the code path on a tiny model on the CPU")
        device, defaults = device or torch.device("cuda", 0), DEFAULT_CASES
        geometry = dict(memory.ARCHS[a.geometry])
        a.steps = 2 if a.steps is None else a.steps
    cases = ([parse_case(c) for c in a.ctx] if a.ctx is not None else a.cases or [parse_case(c) for c in defaults])
    a.ctx = [c["ctx"] for c in cases]
    for name in ("steps", "grad_accum", "lora_r", "loss_chunk"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    margs = ModelArgs(**geometry)
    meter = Meter(device)
    name = "GPU " + torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    name += f", {a.world} ranks sharded by FSDP2 (memory per rank)" if a.fsdp else ""
    print(f"{name}; torch {torch.__version__}; geometry dim {margs.dim}, intermediate {margs.intermediate_size}, "
          f"{margs.n_layers} layers, {margs.n_heads} heads, vocab {margs.vocab_size}, trained ctx "
          f"{margs.max_position_embeddings}; attention {a.attn}; {a.grad_accum} micro-batch(es) x 1 sequence per step; "
          f"MFU against {a.peak_tflops:g} TFLOP/s", flush=True)
    t_start = time.perf_counter()
    rows = []
    for dtype_name in a.dtypes:
        dtype = getattr(torch, benchlib.DTYPES[dtype_name])
        t0 = time.perf_counter()
        torch.manual_seed(a.seed)
        model = build_random_nf4_model(margs, dtype, device, a.seed)
        trainable = lora.add_lora(model, r=a.lora_r, alpha=16, dropout=0.05, targets=LINEARS)
        if a.fsdp:
            trainable = fsdp.shard(model)
        model.gradient_checkpointing, model.loss_chunk = True, a.loss_chunk
        model.set_attention(a.attn, 0.25, "segment")
        model.train()
        resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        print(f"\n{dtype_name}: built NF4 model + LoRA in {time.perf_counter() - t0:.1f} s; "
              f"{resident / 1e9:.2f} GB of weights and adapters", flush=True)
        for case in cases:
            try:
                r = run_config(model, trainable, margs, case, dtype, a, device, meter)
            except torch.cuda.OutOfMemoryError as e:
                r = {"dtype": dtype_name, "ctx": case["ctx"], "case": case_name(case),
                     "error": f"CUDA out of memory: {str(e).splitlines()[0]}"}
                print(f"  {case_name(case)}: {r['error']}", flush=True)
                rows.append(r)
                model.set_memory_savings(0, False)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            rows.append(r)
            gb = lambda x: f"{x / 1e9:.2f} GB"  # noqa: E731
            extra = (f", reserved {gb(r['peak_reserved'])}, device in use after the steps {gb(r['device_used_now'])}"
                     if "peak_reserved" in r else "")
            host = (f"; host: RSS grew {gb(r['host_rss_growth'])}, predicted offloaded checkpoints "
                    f"{gb(r['predicted_host_checkpoints'])}" if r["offload"] else "")
            print(f"  {r['case']:>24} (PI x{r['pi_factor']:g}): peak allocated {gb(r['peak_allocated'])}"
                  f" (+ paged AdamW states {gb(r['paged_optimizer_state'])} = {gb(r['peak_allocated_plus_paged'])})"
                  f"{extra}; predicted {gb(r['predicted_peak'])} "
                  f"(measured/predicted {r['peak_allocated_plus_paged'] / r['predicted_peak']:.2f}); "
                  f"{r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, HFU {100 * r['hfu']:.1f}% "
                  f"({r['model_tflops_per_token'] * 1e3:.1f} / {r['hardware_tflops_per_token'] * 1e3:.1f} GFLOP/token); "
                  f"losses {' '.join(f'{x:.3f}' for x in r['losses'])}{host}"
                  + (f"; skipped (fp16 overflow) {sum(r['skipped'])}" if any(r["skipped"]) else ""), flush=True)
        del model, trainable
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ok = [r for r in rows if "error" not in r]
    print("\n| dtype | case | peak allocated + paged (GB) | predicted (GB) | measured / predicted | fits 32 GiB V100 "
          "| tokens/s | MFU | HFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['dtype']} | {r['case']} | {r['error']} | | | | | | |")
            continue
        print(f"| {r['dtype']} | {r['case']} | {r['peak_allocated_plus_paged'] / 1e9:.2f} | {r['predicted_peak'] / 1e9:.2f} | "
              f"{r['peak_allocated_plus_paged'] / r['predicted_peak']:.2f} | "
              f"{'yes' if r['peak_allocated_plus_paged'] < V100_BYTES else 'NO'} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% |")
    seconds = time.perf_counter() - t_start
    print(f"\n{seconds:.0f} s in all")
    if a.out:
        config = {k: getattr(a, k) for k in ("ctx", "dtypes", "steps", "grad_accum", "attn", "lora_r", "lr",
                                             "loss_chunk", "peak_tflops", "seed")}
        benchlib.write_json(a.out, {"device": name, "cpu_smoke": a.cpu_smoke, "fsdp": a.fsdp, "world_size": a.world,
                                    "results": rows, "seconds": seconds,
                                    "cases": cases, "config": config, "machine": benchlib.machine()})
        print(f"wrote {a.out}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    benchlib.cli_main(main)
